"""TURN interop with coturn 4.6.1's load client, ``turnutils_uclient``, and its echo peer.

``turnutils_peer -L 127.0.0.2 -p P`` echoes every datagram it gets on P and P+1. uclient
allocates through ``stunturn serve`` (with its RTCP half: EVEN-PORT and RESERVATION-TOKEN),
binds channels or installs permissions, sends ``-n`` messages per client with a sequence number
and checks each echo, then prints totals. What the flags mean in 4.6.1 (``turnutils_uclient``
with no arguments prints them; ``-h`` is *not* help but "hang on"):

* ``-s``: Send/Data indications instead of ChannelData;
* ``-W SECRET``: TURN REST credentials (uclient builds ``EXPIRY:USER`` and its HMAC itself);
* ``-N``: "negative tests": ChannelBind with random channel numbers (most are outside
  0x4000-0x7FFF or collide with the peer's existing channel, so the server must say 400 and
  uclient exits on the first refusal);
* ``-R``: "negative protocol tests": about one sent message in ten gets up to nine random
  bytes overwritten. The server drops what no longer parses (a lost magic cookie, a broken
  FINGERPRINT) or answers it with an error; uclient resends the same broken bytes a few times
  and then blocks for ever on the request the server dropped, so the run is bounded by a
  timeout;
* ``-O``: "DoS mode": start every client as fast as possible, walk away from a random fifth of
  the transactions half-way, and ``_exit(0)`` right after connecting, never deallocating.

After each negative mode the server must still answer a STUN Binding and a fresh Allocate
(whose relay works), must not have restarted a worker, and must stop cleanly with no traceback.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import StartServer
from helpers import ServerProcess, free_port, udp_query, worker_pids
from turn_client import ChannelData, TurnClient

from stunturn.stun import MessageClass

pytestmark = pytest.mark.interop

UCLIENT = shutil.which("turnutils_uclient")
PEER = shutil.which("turnutils_peer")
needs_coturn = pytest.mark.skipif(
    UCLIENT is None or PEER is None,
    reason="coturn's turnutils_uclient/turnutils_peer are not installed (apt install coturn)",
)

PEER_HOST = "127.0.0.2"
CLIENTS = 20
MESSAGES = 200

_FINAL = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$", re.M)
_LOST = re.compile(r"Total lost packets (\d+) \(.*total send dropped (\d+) \(")


RELAY = {1: "127.0.0.11", 2: "127.0.0.12", "negative": "127.0.0.13"}
RELAY_PORTS = "20000-29999"
"""Each server relays from its own loopback IP and from ports below Linux's ephemeral range
(32768-60999), so no other program on the host (another test run, a benchmark) holds a port
it picks. That matters because our server reserves EVEN-PORT's port+1 only in its own
bookkeeping (see the xfail test in test_turn_server.py): when something else holds port+1,
uclient's RTCP Allocate with the RESERVATION-TOKEN gets 508 and uclient exits."""


def server_args(workers: int, relay_ip: str) -> list[str]:
    return [
        "--listen", "127.0.0.1:0", "--workers", str(workers),
        "--user", "alice:secret", "--auth-secret", "restsecret",
        "--relay-ip", relay_ip, "--relay-ports", RELAY_PORTS, "--allow-loopback-peers",
        "--user-quota", "0", "--ip-quota", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def echo_peer() -> Iterator[int]:
    """``turnutils_peer`` on 127.0.0.2:P and P+1; yields P once it echoes."""
    if PEER is None:
        pytest.skip("coturn's turnutils_peer is not installed (apt install coturn)")
    port = free_port(PEER_HOST, pair=True)
    proc = subprocess.Popen(
        [PEER, "-L", PEER_HOST, "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            probe.settimeout(0.1)
            for _ in range(100):
                probe.sendto(b"ping", (PEER_HOST, port))
                with contextlib.suppress(TimeoutError):
                    if probe.recv(100) == b"ping":
                        break
                assert proc.poll() is None, "turnutils_peer exited"
            else:
                raise AssertionError("turnutils_peer never echoed")
        yield port
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def server1() -> Iterator[ServerProcess]:
    with ServerProcess(server_args(1, RELAY[1])) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def server2() -> Iterator[ServerProcess]:
    with ServerProcess(server_args(2, RELAY[2])) as s:
        s.wait_ready()
        yield s


@dataclass(frozen=True, slots=True)
class Totals:
    sent: int
    received: int
    lost: int
    send_dropped: int


def totals(output: str) -> Totals:
    """The summary uclient prints at the end (the last tot_send/tot_recv line, the loss line)."""
    final = _FINAL.findall(output)
    lost = _LOST.search(output)
    assert final and lost, f"no uclient summary in:\n{output[-3000:]}"
    sent, received = map(int, final[-1])
    return Totals(sent, received, int(lost.group(1)), int(lost.group(2)))


def uclient(port: int, *args: str, timeout: float = 60.0) -> tuple[int | None, str]:
    """Run uclient against 127.0.0.1:``port``; (exit code or None on timeout, all output)."""
    assert UCLIENT is not None
    cmd = [UCLIENT, *args, "-p", str(port), "127.0.0.1"]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return None, text
    return done.returncode, done.stdout + done.stderr


def count_allocations(server: ServerProcess) -> int:
    return server.stderr.count("allocation created")


def wait_allocations(server: ServerProcess, at_least: int, timeout: float = 5.0) -> int:
    """The number of "allocation created" log lines, once it reaches ``at_least`` (the log
    reaches us through a pipe, a little after the responses)."""
    deadline = time.monotonic() + timeout
    while count_allocations(server) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return count_allocations(server)


MODES = {
    "channel": ("alice", ["-w", "secret"]),
    "send-indication": ("alice", ["-w", "secret", "-s"]),
    "rest": ("bob", ["-W", "restsecret"]),
}


@needs_coturn
@pytest.mark.parametrize(
    ("mode", "workers"),
    [("channel", 1), ("channel", 2), ("send-indication", 2), ("rest", 2)],
)
def test_uclient_relays_without_loss(
    request: pytest.FixtureRequest, echo_peer: int, mode: str, workers: int
) -> None:
    """20 uclient sessions x 200 messages of 100 bytes through our relay to turnutils_peer and
    back: every message is sent and echoed (4000 each way), 0 lost, 0 dropped, exit code 0.
    Channel mode uses ChannelBind + ChannelData, -s uses CreatePermission + Send/Data
    indications, -W uses TURN REST credentials; one and two workers."""
    server: ServerProcess = request.getfixturevalue(f"server{workers}")
    user, credential = MODES[mode]
    before = count_allocations(server)
    code, out = uclient(
        server.addr("udp")[1],
        "-u", user, *credential, "-e", PEER_HOST, "-r", str(echo_peer),
        "-n", str(MESSAGES), "-m", str(CLIENTS), "-l", "100", "-z", "5",
    )  # fmt: skip
    assert code == 0, out[-3000:]
    result = totals(out)
    assert result == Totals(CLIENTS * MESSAGES, CLIENTS * MESSAGES, 0, 0), out[-3000:]
    # The server is shared by these runs: when the OS hands uclient a source port whose
    # 5-tuple still holds an allocation from an earlier run, the RFC answer is 437 and uclient
    # retries on another port by itself ("trying allocate again 437"). Nothing else may fail.
    others = [line for line in out.splitlines() if ("error" in line.lower()) and "437" not in line]
    assert not others, out[-3000:]
    # Each session allocated through us (plus uclient's probe allocations).
    assert wait_allocations(server, before + CLIENTS) >= before + CLIENTS
    assert server.proc.poll() is None
    assert "Traceback" not in server.stderr


# --- negative modes -------------------------------------------------------------------------------


def assert_healthy(server: ServerProcess, peer_port: int, workers: list[int]) -> None:
    """Binding answered, a fresh Allocate works end to end, no worker was restarted, and the
    server stops cleanly with nothing on stderr but log lines."""
    assert server.proc.poll() is None, server.stderr
    assert udp_query(server.addr("udp")).cls is MessageClass.SUCCESS
    # From an address uclient did not use: its abandoned allocations hold 5-tuples on
    # 127.0.0.1, and a reused source port would rightly get 437.
    with TurnClient(server.addr("udp"), "alice", "secret", local=("127.0.0.3", 0)) as client:
        client.allocate()
        client.channel_bind(0x4000, (PEER_HOST, peer_port))
        client.send_channel(0x4000, b"are you still there?")
        got = client.receive(2.0)
        assert isinstance(got, ChannelData) and got.data == b"are you still there?", got
    assert sorted(worker_pids(server.proc.pid)) == sorted(workers)
    assert server.stop() == 0
    server.stopped_counters()
    assert "Traceback" not in server.stderr, server.stderr


@needs_coturn
def test_uclient_negative_channel_numbers(stunturn_server: StartServer, echo_peer: int) -> None:
    """-N: ChannelBind with random channel numbers is refused with 400 (out of range, or a
    second number for a peer that has one); uclient reports it and gives up; the server is
    unharmed."""
    server = stunturn_server(*server_args(2, RELAY["negative"]))
    workers = worker_pids(server.proc.pid)
    code, out = uclient(
        server.addr("udp")[1], "-N", "-u", "alice", "-w", "secret",
        "-e", PEER_HOST, "-r", str(echo_peer), "-n", "10", "-m", "2", timeout=20,
    )  # fmt: skip
    assert code not in (0, None), out
    assert "channel bind: error 400 (Bad Request)" in out, out
    assert_healthy(server, echo_peer, workers)


@needs_coturn
def test_uclient_negative_protocol(stunturn_server: StartServer, echo_peer: int) -> None:
    """-R, four uclients at once (with and without the RTCP half) for 3 s: messages with
    random bytes overwritten are dropped or answered with an error; each uclient blocks on a
    request the server dropped and is killed at the deadline. The server is unharmed."""
    server = stunturn_server(*server_args(2, RELAY["negative"]))
    workers = worker_pids(server.proc.pid)
    assert UCLIENT is not None
    port = str(server.addr("udp")[1])
    peer = ["-e", PEER_HOST, "-r", str(echo_peer)]
    procs = []
    for flags in (["-m", "2"], ["-m", "4"], ["-c", "-m", "2"], ["-c", "-m", "4"]):
        cmd = [UCLIENT, "-R", *flags, "-u", "alice", "-w", "secret", *peer, "-n", "20"]
        procs.append(
            subprocess.Popen(
                [*cmd, "-p", port, "127.0.0.1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        deadline = time.monotonic() + 3.0
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)
    assert_healthy(server, echo_peer, workers)
    assert server.stopped_counters()["received"] > 0


@needs_coturn
def test_uclient_dos_mode(stunturn_server: StartServer, echo_peer: int) -> None:
    """-O, six times (each bounded by a 10 s timeout), with and without -c (no RTCP half):
    40 sessions that rush through Allocate/Refresh, abandon transactions half-way and exit
    without deallocating. With RTCP, uclient also reuses a RESERVATION-TOKEN that an abandoned
    session already redeemed; the server refuses it (508: a token is good for one Allocate) and
    uclient exits. The server keeps serving; abandoned allocations stay until they expire."""
    server = stunturn_server(*server_args(2, RELAY["negative"]))
    workers = worker_pids(server.proc.pid)
    for rtcp in (True, False) * 3:
        uclient(
            server.addr("udp")[1], "-O", *([] if rtcp else ["-c"]), "-u", "alice", "-w", "secret",
            "-e", PEER_HOST, "-r", str(echo_peer), "-n", "10", "-m", "40", timeout=10,
        )  # fmt: skip
    assert wait_allocations(server, 40) >= 40
    assert_healthy(server, echo_peer, workers)
