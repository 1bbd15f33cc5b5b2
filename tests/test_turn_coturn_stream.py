"""TURN over TCP and TLS, and RFC 6062 TCP relays, driven by coturn 4.6.1's ``turnutils_uclient``.

Two kinds of run, both with uclient as the only client:

* **TURN over a stream, UDP relay** (``-t``, ``-S -t``): uclient's sessions talk to ``stunturn
  serve`` over TCP or TLS and relay UDP to ``turnutils_peer`` (the echo peer of
  test_turn_coturn.py), exactly as in the UDP interop test but with STUN framing, ChannelData
  padding (``-l 101``: every ChannelData carries 3 padding bytes each way) and TLS record
  boundaries in the way. Every message must come back, and the server's log must show the
  allocations made over ``tcp:`` or ``tls:``.
* **RFC 6062 TCP relays** (``-T``, ``-S -T``): checked against coturn's own ``turnserver`` (the
  harness check: what passes there is what a correct server does) and, with the same checks,
  against ours. The harness failed as it should against a server without RFC 6062 (442 to the
  TCP Allocate) and against a half-done one (438 to ConnectionBind, see below).

What the flags do in 4.6.1 (``turnutils_uclient`` with no arguments prints them; ``-h`` is
"hang on", not help):

* ``-t``: talk to the server over TCP (default UDP). ``-S``: secure: TLS over TCP (DTLS over
  UDP). ``-E FILE``: verify the server's certificate against the CA certificate(s) in FILE;
  without it uclient verifies nothing.
* ``-p PORT``: the server's port (TLS included: ``-S`` only changes the default to 5349).
* ``-u``/``-w``: long-term credentials. ``-n``: messages per session. ``-m``: sessions. ``-l``:
  message size. ``-z``: milliseconds between a session's messages. ``-v``: log every request,
  response and TLS handshake, and a "buffer sent" line per message.
* ``-e``/``-r``: the peer address and port (default port 3480). Without ``-c`` every session
  has an "RTCP" twin that relays to port+1 (EVEN-PORT, RESERVATION-TOKEN), which is why
  ``turnutils_peer`` echoes on P and P+1. ``-s``: Send/Data indications instead of channels.
* ``-y``: client-to-client: sessions are paired and each pair relays to each other's relayed
  address, with no peer process at all.
* ``-T``: TCP relay (REQUESTED-TRANSPORT TCP, RFC 6062). It implies ``-t``, ``-y`` and ``-c``
  (no RTCP twin) and ignores ``-s``, ``-e``, ``-r`` and ``-g``: it never talks to a peer on the
  peer port, so there is no TCP echo peer to run. ``-S -T`` does the same over TLS, data
  connections included.
* ``-P``: "passive TCP", implies ``-T``: the second session of each pair is replaced by a plain
  TCP socket on 127.0.0.1 that connects to the first session's relayed address (so the server
  sends ConnectionAttempt). That socket reads what it gets as STUN framing, cannot parse the raw
  data and never counts it: half the messages are always reported lost and the run waits out
  uclient's 10 s stopping time. Not usable as a 0-loss check, so it is not run here.

Every uclient run starts each session's traffic 1-6 s (random) after setting up, so a run takes
about 6-7 s whatever ``-n`` is. Over TLS, uclient picks a random TLS method object for each
connection; the ones for old protocol versions fail the handshake against a TLS 1.2+ server and
uclient retries with another random pick (a bounded number of times), so "tls_connect: cannot
connect" lines in its output are expected and harmless.

How ``-T`` works in 4.6.1 (read in coturn's src/apps/uclient/{mainuclient,startuclient,uclient}.c
and confirmed with ``-v`` on both programs): the sessions are set up in pairs (A, B), but then
every session Connects to every other one, a full mesh:

1. Per pair, a probe connection Allocates (TCP relay) and Refreshes, then closes without
   deallocating: the server must drop that allocation with its connection.
2. A and B each open a control connection and Allocate with REQUESTED-TRANSPORT TCP (401
   first, then authenticated), then Refresh. Each relayed address R(x) is a listening TCP
   socket on the server.
3. A does CreatePermission for R(B) and B for R(A). Permissions are per IP and every relayed
   address has the server's one relay IP, so each session may then talk to every relay (the
   relay IP is loopback: the server must allow loopback peers).
4. Session i sends Connect (XOR-PEER-ADDRESS R(j)) for every later session j: N sessions make
   N(N-1)/2 Connects. The server opens a TCP connection from R(i) to R(j) (coturn binds it to
   i's relayed address); R(j) accepts it, so the server sends j a ConnectionAttempt
   (CONNECTION-ID, XOR-PEER-ADDRESS) and answers i's Connect with a success carrying another
   CONNECTION-ID.
5. i (on the Connect success) and j (on the ConnectionAttempt) each open a new data connection
   to the server's listening port (TLS again with ``-S``) and send ConnectionBind with their
   CONNECTION-ID, signed with the control connection's nonce; after the success the data
   connection carries raw bytes. uclient reads responses on a data connection in chunks of at
   most ``-l`` bytes, so it cannot parse an error response longer than that (a 116-byte 438
   shows as "connection bind error 0 ()"): in practice the server must accept the control
   connection's nonce here, as coturn does. uclient waits until it has all N(N-1) data
   connections and prints "N(N-1) connections are completed" (after 30 + N s it gives up
   with "..., not enough" and goes on).
6. After the 1-6 s start delay each session writes ``-n`` raw ``-l``-byte messages (a sequence
   number and a timestamp), each on a randomly chosen one of its data connections; the server
   relays them i → R(i) → R(j) → j. Readers take fixed ``-l``-byte chunks and count one
   message per chunk. The control connections meanwhile Refresh and CreatePermission again, and
   finally Refresh with LIFETIME 0. Totals as in UDP mode: sent = received = N x ``-n``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ServerProcess,
    binding_request,
    client_tls_context,
    free_port,
    stream_exchange,
    tcp_connect,
    tls_connect,
)
from test_turn_coturn import PEER_HOST, UCLIENT, Totals, echo_peer, needs_coturn, totals, uclient

from stunturn.aio.tls import make_self_signed
from stunturn.stun import Address, MessageClass

pytestmark = pytest.mark.interop

udp_echo_peer = echo_peer
"""The UDP test's fixture under another name: ``turnutils_peer`` echoing on PEER_HOST:P and P+1
(this module starts its own); yields P."""

TURNSERVER = shutil.which("turnserver")

OUR_RELAY = "127.0.0.41"
COTURN_RELAY = "127.0.0.42"
RELAY_PORTS = (20000, 29999)
"""Each server relays from its own loopback IP, on ports below Linux's ephemeral range, so
nothing else on the host holds the port (or port+1 for the RTCP twin) it picks."""

CLIENTS = 10
MESSAGES = 100
TCP_RELAY_SESSIONS = 6  # 15 Connects, 30 data connections
TCP_RELAY_MESSAGES = 50
RUN_TIMEOUT = 45.0
"""A run takes 6-7 s when everything works; uclient bounds its own waits, but a stuck server
could hold it for ever."""
CONNECTED_WITHIN = 10.0
"""-T: every data connection must be bound by then (it takes well under a second on loopback;
uclient itself would wait 30 s and then send anyway)."""


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(certificate, key) for 127.0.0.1; uclient verifies against it with ``-E``."""
    cert, key, _ = make_self_signed(
        tmp_path_factory.mktemp("stream-cert"), names=("localhost",), ips=("127.0.0.1",)
    )
    return cert, key


def server_args(cert: str, key: str, relay_ip: str) -> list[str]:
    return [
        "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0",
        "--cert", cert, "--key", key, "--workers", "2", "--user", "alice:secret",
        "--relay-ip", relay_ip, "--relay-ports", f"{RELAY_PORTS[0]}-{RELAY_PORTS[1]}",
        "--allow-loopback-peers", "--user-quota", "0", "--ip-quota", "0",
        "--log-format", "json",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server(cert_files: tuple[str, str]) -> Iterator[ServerProcess]:
    """``stunturn serve``: UDP and TCP on 127.0.0.1:random, TLS on 127.0.0.1:random."""
    with ServerProcess(server_args(*cert_files, OUR_RELAY)) as s:
        s.wait_ready()
        yield s


def answers_binding(address: Address, secure: bool) -> bool:
    """A STUN Binding over TCP (or TLS) to ``address`` gets a success response."""
    sock: socket.socket
    try:
        if secure:
            sock = tls_connect(address, client_tls_context(), timeout=0.5)
        else:
            sock = tcp_connect(address, timeout=0.5)
    except OSError:
        return False
    with sock, contextlib.suppress(OSError):
        answers = stream_exchange(sock, [binding_request()[1]], 1, timeout=1.0)
        return bool(answers) and answers[0].cls is MessageClass.SUCCESS
    return False


@pytest.fixture(scope="module")
def coturn(
    cert_files: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, int, Path]]:
    """coturn's ``turnserver`` on 127.0.0.1: (TCP port, TLS port, log file).

    ``-n`` keeps it from reading Debian's /etc/turnserver.conf; ``-v`` logs each request, which
    the harness check reads (CONNECT, CONNECTION_BIND). TCP relays are on by default.
    """
    if TURNSERVER is None:
        pytest.skip("coturn's turnserver is not installed (apt install coturn)")
    work = tmp_path_factory.mktemp("coturn")
    log_path = work / "turnserver.log"
    port, tls_port = free_port(), free_port()
    cert, key = cert_files
    argv = [
        TURNSERVER, "-n", "-v", "--lt-cred-mech", "--user", "alice:secret", "--realm", "stunturn",
        "--allow-loopback-peers", "--listening-ip", "127.0.0.1", "--relay-ip", COTURN_RELAY,
        "--min-port", str(RELAY_PORTS[0]), "--max-port", str(RELAY_PORTS[1]),
        "--listening-port", str(port), "--tls-listening-port", str(tls_port),
        "--cert", cert, "--pkey", key, "--no-dtls", "--no-cli",
        "--db", str(work / "turndb"), "--pidfile", str(work / "turnserver.pid"),
        "--log-file", str(log_path), "--simple-log", "--no-stdout-log",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10.0
        while not (
            answers_binding(("127.0.0.1", port), False)
            and answers_binding(("127.0.0.1", tls_port), True)
        ):
            assert proc.poll() is None, "turnserver exited"
            assert time.monotonic() < deadline, "turnserver did not start listening"
            time.sleep(0.05)
        yield port, tls_port, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- checks --------------------------------------------------------------------------------------


def records(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    """The server's JSON log records of ``event`` so far."""
    found = []
    for line in server.stderr.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def wait_records(
    server: ServerProcess, event: str, at_least: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """``records``, once there are ``at_least`` (the log comes through a pipe, a little after
    the responses)."""
    deadline = time.monotonic() + timeout
    found = records(server, event)
    while len(found) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
        found = records(server, event)
    return found


_ERROR_RESPONSE = re.compile(r"error (\d+) \(")
"""How uclient logs an error response ("error 442 (...)", "connection bind error 400 (...)")."""
_REPORTED = ("error:", "not enough", "cannot bind", "cannot complete", "wrong", "unknown")
"""Lower-case parts of uclient's other failure lines ("ERROR: received ... wrong ...",
"WARNING: N connections are completed, not enough", "cannot BIND to tcp connection", ...)."""


def failures(output: str) -> list[str]:
    """uclient lines that report a failure. 437 is a retry uclient makes by itself (a new
    source port); failed TLS handshakes are retried too (see above) and are not failures."""
    bad = []
    for line in output.splitlines():
        text = line.lower()
        if "ssl routines" in text or "tls_connect" in text:
            continue
        codes = _ERROR_RESPONSE.findall(text)
        if any(code != "437" for code in codes) or (
            not codes and any(marker in text for marker in _REPORTED)
        ):
            bad.append(line)
    return bad


def uclient_tcp_relay(port: int, args: list[str], log: Path) -> tuple[int | None, str]:
    """Run ``uclient ARGS`` against 127.0.0.1:``port``, its output going to ``log``; stop it
    as soon as it reports a failure, when its data connections are not all bound within
    CONNECTED_WITHIN, or when it runs past RUN_TIMEOUT (a broken server costs seconds, not the
    40 s uclient would wait). Returns (exit code or None when stopped, output)."""
    assert UCLIENT is not None
    with log.open("w") as out:
        proc = subprocess.Popen(
            [UCLIENT, *args, "-p", str(port), "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    start = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            text = log.read_text(errors="replace")
            if (
                elapsed > RUN_TIMEOUT
                or failures(text)
                or (elapsed > CONNECTED_WITHIN and "connections are completed" not in text)
            ):
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
            stopped = True
        else:
            stopped = False
    return (None if stopped else proc.returncode), log.read_text(errors="replace")


def check_tcp_relay_run(port: int, secure: bool, cafile: str, log: Path) -> str:
    """Run ``uclient -T`` (``-S -T`` when ``secure``) against 127.0.0.1:``port`` and check it:
    all N(N-1)/2 Connects and N(N-1) ConnectionBinds went through, and every message came
    through. Returns uclient's output."""
    flags = ["-S", "-E", cafile] if secure else []
    code, out = uclient_tcp_relay(
        port,
        [
            "-v", "-T", *flags, "-u", "alice", "-w", "secret", "-n", str(TCP_RELAY_MESSAGES),
            "-m", str(TCP_RELAY_SESSIONS), "-l", "100", "-z", "5",
        ],
        log,
    )  # fmt: skip
    tail = out[-3000:]
    assert not failures(out), "\n".join(failures(out)[:20])
    assert code == 0, tail
    n = TCP_RELAY_SESSIONS
    # A Connect is sent again after a 401/438, so at least (not exactly) one per pair.
    assert out.count("tcp connect sent") >= n * (n - 1) // 2, tail
    assert f"{n * (n - 1)} connections are completed" in out, tail
    assert out.count("TCP data network connected to") == n * (n - 1), tail
    every = n * TCP_RELAY_MESSAGES
    assert totals(out) == Totals(every, every, 0, 0), tail
    return out


# --- TURN over TCP and TLS, UDP relay -----------------------------------------------------------

STREAM_MODES = {
    "tcp-channel": ("tcp", ["-t"]),
    "tcp-send-indication": ("tcp", ["-t", "-s"]),
    "tls-channel": ("tls", ["-S", "-t"]),
}


@needs_coturn
@pytest.mark.parametrize("mode", list(STREAM_MODES))
def test_uclient_over_stream_relays_without_loss(
    server: ServerProcess, udp_echo_peer: int, cert_files: tuple[str, str], mode: str
) -> None:
    """10 uclient sessions (5 with their RTCP twin) x 100 messages of 101 bytes over TCP or TLS
    (the certificate verified with -E), relayed over UDP to turnutils_peer and back: every
    message is echoed (1000 each way), 0 lost, exit code 0, no error reported; the server
    logged one allocation per session (plus uclient's probes) from a tcp: or tls: client."""
    transport, flags = STREAM_MODES[mode]
    if transport == "tls":
        flags = [*flags, "-E", cert_files[0]]
    before = len(records(server, "allocation_created"))
    code, out = uclient(
        server.addr(transport)[1], *flags, "-u", "alice", "-w", "secret",
        "-e", PEER_HOST, "-r", str(udp_echo_peer),
        "-n", str(MESSAGES), "-m", str(CLIENTS), "-l", "101", "-z", "5",
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert not failures(out), "\n".join(failures(out)[:20])
    assert code == 0, out[-3000:]
    assert totals(out) == Totals(CLIENTS * MESSAGES, CLIENTS * MESSAGES, 0, 0), out[-3000:]
    created = wait_records(server, "allocation_created", before + CLIENTS)[before:]
    ours = [r for r in created if str(r.get("client", "")).startswith(f"{transport}:")]
    assert len(ours) >= CLIENTS, created
    assert all(r.get("relay_transport") == "udp" for r in ours), ours
    assert server.proc.poll() is None
    assert "Traceback" not in server.stderr, server.stderr[-3000:]


# --- RFC 6062 TCP relays -------------------------------------------------------------------------


@needs_coturn
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_uclient_tcp_relay_against_coturn(
    coturn: tuple[int, int, Path], cert_files: tuple[str, str], transport: str, tmp_path: Path
) -> None:
    """Harness check: ``uclient -T`` (and ``-S -T``) against coturn's turnserver passes the
    checks the stunturn test below makes (6 sessions x 50 messages, 0 lost), and coturn's log
    shows the 15 Connects and 30 ConnectionBinds of the mesh."""
    port, tls_port, log_path = coturn
    before = log_path.read_text(errors="replace")
    secure = transport == "tls"
    check_tcp_relay_run(
        tls_port if secure else port, secure, cert_files[0], tmp_path / "uclient.log"
    )
    mesh = TCP_RELAY_SESSIONS * (TCP_RELAY_SESSIONS - 1) // 2
    deadline = time.monotonic() + 5.0
    while True:
        log = log_path.read_text(errors="replace")[len(before) :]
        connects = log.count("incoming packet CONNECT processed, success")
        binds = log.count("incoming packet CONNECTION_BIND processed, success")
        if (connects, binds) == (mesh, 2 * mesh) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (connects, binds) == (mesh, 2 * mesh), log[-3000:]


@needs_coturn
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_uclient_tcp_relay_against_stunturn(
    server: ServerProcess, cert_files: tuple[str, str], transport: str, tmp_path: Path
) -> None:
    """``uclient -T`` (and ``-S -T``) against ``stunturn serve``: the same checks as the coturn
    harness check above. The server logged a TCP-relay allocation for each session and each
    probe, all from tcp: (or tls:) clients, and ended every one of them once uclient had gone
    (Refresh LIFETIME 0, or the probe's connection closing); it kept running and printed no
    traceback."""
    created_before = len(records(server, "allocation_created"))
    ended_before = len(records(server, "allocation_ended"))
    check_tcp_relay_run(
        server.addr(transport)[1], transport == "tls", cert_files[0], tmp_path / "uclient.log"
    )
    probes = TCP_RELAY_SESSIONS // 2
    created = wait_records(
        server, "allocation_created", created_before + TCP_RELAY_SESSIONS + probes
    )[created_before:]
    assert len(created) == TCP_RELAY_SESSIONS + probes, created
    assert all(r.get("relay_transport") == "tcp" for r in created), created
    assert all(str(r.get("client")).startswith(f"{transport}:") for r in created), created
    ended = wait_records(server, "allocation_ended", ended_before + len(created))[ended_before:]
    assert {r.get("session") for r in ended} >= {r.get("session") for r in created}, ended
    assert server.proc.poll() is None
    assert "Traceback" not in server.stderr, server.stderr[-3000:]
