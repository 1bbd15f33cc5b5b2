"""Acceptance: headless Chromium's WebRTC stack relays a DataChannel through our TURN server.

``tests/chromium/relay.html`` opens two RTCPeerConnections in one page, both configured with
only ``turn:127.0.0.1:PORT?transport=udp`` and ``iceTransportPolicy: "relay"``, signals them to
each other in-page, echoes DataChannel messages and reads ``getStats()``. The page POSTs its
outcome as JSON to a tiny ``http.server`` on 127.0.0.1 (the same server serves the page).

Everything runs in a fresh network namespace per test that has only ``lo`` up
(:func:`lab.netlab.loopback_namespace`: no other interface, no route, IPv6 off), so no packet
can leave it whatever Chromium tries:

* ``stunturn serve`` is started in it with the namespace's ``popen`` (:class:`LabServer`);
* the ``http.server`` runs in a thread of this process that joined the namespace
  (``start_thread``), so its listening socket lives there;
* Chromium is started in it with the namespace's ``popen``, headless, in its own session and
  process group with a fresh profile, and is killed (its process group, then any straggler of
  its session) whatever happens; closing the namespace then kills anything left in it and
  deletes it.

Why the namespace: to learn its default local address Chromium's network service
``connect()``s (never sends on) UDP sockets to 8.8.8.8:53 and [2001:4860:4860::8888]:53. On the
host that route lookup can make the kernel send an ICMPv6 router-reachability probe (a Neighbor
Solicitation for the IPv6 default gateway) on the real interface. In the namespace both
connect() calls fail at once (ENETUNREACH / EADDRNOTAVAIL) and nothing is sent anywhere. Each
test first asserts that isolation (:func:`assert_isolated`: only ``lo``, no default route, those
two connect() calls fail) and, while Chromium runs, that every process of its session is in the
namespace.

What Chromium needs to use a TURN server on loopback (Chromium 150, Debian 12):

* Nothing special for the TURN server itself: WebRTC accepts a loopback TURN server (only ports
  below 1024 other than 53/80/443 are refused by default, so the server listens on a high port),
  and an IP literal in the ``turn:`` URL is never resolved by DNS. The page is served from
  http://127.0.0.1 itself, so the Local Network Access check newer WebRTC consults before
  contacting a TURN server on a local address sees a loopback page reaching loopback: no
  prompt, no flag.
* The host resolver rule ``MAP * ~NOTFOUND, EXCLUDE localhost`` (no name is ever resolved)
  also maps the IP literal 127.0.0.1: the page then fails to load (ERR_NAME_NOT_RESOLVED). So
  the rule here adds ``EXCLUDE 127.0.0.1``; every other name still fails to resolve.
* ``--allow-loopback-in-peer-connection``: WebRTC in the renderer starts gathering only once
  the browser's network list has changed from empty (``IpcNetworkManager`` signals "networks
  changed" only then). In the namespace the list is empty, since loopback interfaces are never
  listed, so without this switch both peers stay in "new/gathering" forever. The switch adds a
  ``loopback_ipv4`` network to the list; nothing else changes (see the next point).
* No mDNS, network-enumeration or media permission flags: without a getUserMedia permission
  Chromium does not enumerate adapters, it gathers on the wildcard "any" network (sockets bound
  to 0.0.0.0 / ::), so the client sockets talk to 127.0.0.1 from 127.0.0.1 and our server sees
  ``udp:127.0.0.1:PORT`` clients. The IPv6 wildcard network cannot reach an IPv4 TURN server
  and is skipped. With a relay-only policy no host candidate is signalled, so
  ``WebRtcHideLocalIpsWithMdns`` does not matter; it is disabled anyway so that no mDNS name is
  ever registered or resolved.
* The server must relay between two allocations on the same relay IP: ``--relay-ip 127.0.0.1``
  and ``--allow-loopback-peers`` (a peer on a relay port of our relay IP is allowed).

Two checks: the right password gives a relay/relay nominated pair that echoes every message
and whose relay addresses are the ones the server logged as "allocation created"; a wrong
password gives 401 on both peers' Allocates, no candidate, no allocation and no connection
within the page's bounded wait.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.server
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import pytest
from lab.netlab import LabServer, Namespace, loopback_namespace

CHROMIUM = Path("/usr/bin/chromium")
PAGE_DIR = Path(__file__).resolve().parent / "chromium"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.lab,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is missing (apt install chromium)",
    ),
]

USERNAME = "chromium"
PASSWORD = "relay-through-stunturn"
WRONG_PASSWORD = "not-the-password"
MESSAGES = 20

OPEN_TIMEOUT_MS = 10_000
"""How long the page waits for the DataChannel to open (the bound of the negative test)."""
REPORT_TIMEOUT = 40.0
"""How long the test waits for the page's report (Chromium start + the page's own waits)."""
SERVER_TIMEOUT = 10.0
"""How long the page server and stunturn may take to come up in the namespace."""

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-features=WebRtcHideLocalIpsWithMdns,OptimizationHints,MediaRouter",
    # In a namespace with only `lo` the network list is empty and WebRTC never starts
    # gathering; this adds a "loopback_ipv4" network to it (see the module docstring).
    "--allow-loopback-in-peer-connection",
    # 127.0.0.1 must be excluded too, or the page URL itself is mapped to NOTFOUND.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--enable-logging=stderr",
    "--v=0",
]

# The addresses Chromium connect()s UDP sockets to, to learn its default local address.
ROUTE_PROBES = ((socket.AF_INET, ("8.8.8.8", 53)), (socket.AF_INET6, ("2001:4860:4860::8888", 53)))

_TURN_BANNER = re.compile(r"^TURN: realm .*, relay (\S+) ports (\d+)-(\d+), ")
_LISTENER = re.compile(r"^udp ([0-9.]+):(\d+)$")
_ALLOCATE_ERROR = re.compile(r"udp ALLOCATE from \('([0-9.]+)', (\d+)\): (\d+)")
_NOISE = ("dbus", "D-Bus", "vaapi", "InitializeSandbox")


# --- the page server --------------------------------------------------------------------------


class _ReportServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        handler = functools.partial(_PageHandler, directory=str(PAGE_DIR))
        super().__init__(("127.0.0.1", 0), handler)
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()


class _PageHandler(http.server.SimpleHTTPRequestHandler):
    """GET serves tests/chromium/; POST /report hands the JSON body to the test."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20))
        server = self.server
        assert isinstance(server, _ReportServer)
        if self.path == "/report":
            server.reports.put(json.loads(body))
            self.send_response(204)
        else:
            self.send_response(404)
        self.end_headers()

    def do_GET(self) -> None:
        if self.path == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve_pages(
    started: queue.Queue[_ReportServer | BaseException], stop: threading.Event
) -> None:
    """The page server's thread (already in the namespace): bind, hand the server over, serve
    until ``stop`` is set. (Not ``serve_forever``: its ``shutdown()`` waits forever if this
    thread is gone.)"""
    try:
        server = _ReportServer()
    except BaseException as exc:
        started.put(exc)
        raise
    started.put(server)
    server.timeout = 0.1
    while not stop.is_set():
        server.handle_request()


# --- the namespace ------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """One loopback-only namespace with the page server running in it."""

    ns: Namespace
    pages: _ReportServer
    servers: list[LabServer] = field(default_factory=list)

    def start_turn(self, *extra: str) -> LabServer:
        """``stunturn serve`` in the namespace on 127.0.0.1 (a free port), one worker."""
        server = LabServer(
            self.ns,
            [
                "--listen", "127.0.0.1:0",
                "--workers", "1",
                "--user", f"{USERNAME}:{PASSWORD}",
                "--relay-ip", "127.0.0.1",
                "--allow-loopback-peers",
                "--log-format", "json",
                *extra,
            ],
        )  # fmt: skip
        self.servers.append(server)
        return server.wait_ready(SERVER_TIMEOUT)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A fresh namespace with only ``lo`` (skips if namespaces cannot be made) and the page
    server in a thread inside it; everything killed and the namespace deleted at the end."""
    with loopback_namespace("chromium") as ns:
        started: queue.Queue[_ReportServer | BaseException] = queue.Queue()
        stop = threading.Event()
        thread = ns.start_thread(_serve_pages, started, stop)
        try:
            try:
                item = started.get(timeout=SERVER_TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"the page server did not start in {ns.name}") from None
            if isinstance(item, BaseException):
                raise item
            box = Sandbox(ns, item)
            try:
                yield box
            finally:
                for server in box.servers:
                    server.close()
                stop.set()
                thread.join(5.0)
                item.server_close()
        finally:
            stop.set()


def _connect_error(family: int, addr: tuple[str, int]) -> int:
    """The errno of a UDP connect() to ``addr`` (0 if it succeeds): what Chromium does to
    learn its default local address."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)
        except OSError as exc:
            return exc.errno or -1
    return 0


def _listening(ns: Namespace, option: str, port: int) -> bool:
    """Is there a socket on 127.0.0.1:``port`` in ``ns`` (``ss -H OPTION``: -tln, -uln)?"""
    out = ns.run(["ss", "-Hn", option]).stdout
    return any(f"127.0.0.1:{port}" in line.split() for line in out.splitlines())


def assert_isolated(box: Sandbox, turn_port: int) -> None:
    """The guard: nothing in the namespace can reach anything but loopback, and the page
    server and our TURN server are listening in it."""
    ns = box.ns
    links = [line.split(":")[1].strip() for line in ns.ip("-o", "link", "show").splitlines()]
    assert links == ["lo"], links
    for version in ("-4", "-6"):
        routes = ns.ip(version, "route", "show", "table", "all").splitlines()
        assert not [r for r in routes if r.startswith("default")], routes
        assert set(re.findall(r" dev (\S+)", "\n".join(routes))) <= {"lo"}, routes
    # The route lookups Chromium makes to learn its default local address fail in the
    # namespace itself (IPv6 is off there: no source address), before any packet or neighbour
    # discovery could happen.
    expected = {
        socket.AF_INET: {errno.ENETUNREACH},
        socket.AF_INET6: {errno.ENETUNREACH, errno.EADDRNOTAVAIL},
    }
    for family, addr in ROUTE_PROBES:
        code = ns.call(_connect_error, family, addr)
        assert code in expected[family], (addr, code, os.strerror(code))
    assert _listening(ns, "-tl", box.pages.server_port), "page server not in the namespace"
    assert _listening(ns, "-ul", turn_port), "stunturn not in the namespace"


# --- Chromium ---------------------------------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is ``sid``: Chromium and its children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After "pid (comm)": state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


class Chromium:
    """Headless Chromium on one URL, started in ``ns`` in a new session (``ns.popen``), with a
    throw-away profile."""

    def __init__(self, ns: Namespace, url: str) -> None:
        self.ns = ns
        self._tmp = tempfile.mkdtemp(prefix="stunturn-chromium-")
        tmp = Path(self._tmp)
        self.log_path = tmp / "chromium.log"
        self._log = self.log_path.open("wb")
        args = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", url]
        env = dict(os.environ, HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "config"))
        # `ip netns exec` execs Chromium in place: proc.pid is Chromium, leader of its session.
        self.proc = ns.popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [line for line in text.splitlines() if not any(n in line for n in _NOISE)]
        return "\n".join(kept[-lines:])

    def wait_report(self, reports: queue.Queue[dict[str, Any]], timeout: float) -> dict[str, Any]:
        """The page's report; fails if Chromium exits first or nothing comes in ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return reports.get(timeout=0.2)
            except queue.Empty:
                pass
            code = self.proc.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited with {code}" if code is not None else f"no report in {timeout} s"
                raise AssertionError(f"Chromium {why}; its log:\n{self.log_tail()}")

    def outside_namespace(self) -> list[int]:
        """The processes of Chromium's session whose network namespace is not ``ns``."""
        inode = os.stat(self.ns.path).st_ino
        outside = []
        for pid in _session_pids(self.proc.pid):
            with contextlib.suppress(OSError):  # exited meanwhile
                if os.stat(f"/proc/{pid}/ns/net").st_ino != inode:
                    outside.append(pid)
        return outside

    def close(self) -> None:
        """Kill the process group, then anything left in Chromium's session; remove the
        profile."""
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10.0)
        deadline = time.monotonic() + 5.0
        while (left := _session_pids(pid)) and time.monotonic() < deadline:
            for straggler in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(straggler, signal.SIGKILL)
            time.sleep(0.05)
        self._log.close()
        # Killed children may still be exiting and writing into the profile.
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- helpers ----------------------------------------------------------------------------------


def turn_addr(server: LabServer) -> tuple[str, int]:
    """The UDP address our server listens on (from its "listening on udp ..." line)."""
    for listener in server.listeners:
        match = _LISTENER.match(listener)
        if match:
            return match.group(1), int(match.group(2))
    raise AssertionError(f"no UDP listener: {server.listeners}\n{server.output}")


def relay_config(server: LabServer) -> tuple[str, int, int]:
    """(relay IP, lowest relay port, highest relay port) from the "TURN: ..." banner line."""
    for line in server.output.splitlines():
        match = _TURN_BANNER.match(line)
        if match:
            return match.group(1), int(match.group(2)), int(match.group(3))
    raise AssertionError(f"no TURN banner:\n{server.output}")


def log_records(server: LabServer) -> list[dict[str, Any]]:
    """The server's JSON log records (stderr, one object per line)."""
    records = []
    for line in server.output.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def run_page(box: Sandbox, turn: LabServer, password: str) -> dict[str, Any]:
    """Check the isolation, then load relay.html in a fresh headless Chromium in the
    namespace; return its JSON report."""
    host, port = turn_addr(turn)
    assert_isolated(box, port)
    query = urlencode(
        {
            "turn": f"{host}:{port}",
            "username": USERNAME,
            "password": password,
            "messages": MESSAGES,
            "timeout": OPEN_TIMEOUT_MS,
            "report": "/report",
        }
    )
    url = f"http://127.0.0.1:{box.pages.server_port}/relay.html?{query}"
    with Chromium(box.ns, url) as chromium:
        report = chromium.wait_report(box.pages.reports, REPORT_TIMEOUT)
        assert chromium.outside_namespace() == [], "Chromium processes outside the namespace"
    assert report.get("page") == "relay.html", report
    return report


def _pretty(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True)


# --- tests ------------------------------------------------------------------------------------


def test_datachannel_through_turn_relay(sandbox: Sandbox) -> None:
    """Two Chromium peers, relay candidates only, connect through our server: the DataChannel
    echoes all MESSAGES in order, and both peers' nominated pairs are relay (local) to relay
    (remote), on the relay addresses the server logged as "allocation created"."""
    turn = sandbox.start_turn()
    relay_ip, low, high = relay_config(turn)
    assert relay_ip == "127.0.0.1"
    turn_url = f"turn:127.0.0.1:{turn_addr(turn)[1]}?transport=udp"

    report = run_page(sandbox, turn, PASSWORD)
    info = f"page report:\n{_pretty(report)}\nserver output:\n{turn.output}"

    assert report["connected"] is True, info
    assert report["errors"] == [], info
    assert report["sent"] == MESSAGES, info
    assert report["echoed"] == MESSAGES, info
    assert report["candidateErrors"] == [], info
    assert 0 < report["elapsedMs"] < OPEN_TIMEOUT_MS, info

    # Gathering produced relay candidates only, each on our relay IP and in our port range.
    relays: dict[str, tuple[str, int]] = {}
    for peer in ("pc1", "pc2"):
        candidates = report["candidates"][peer]
        assert candidates, info
        for cand in candidates:
            assert cand["type"] == "relay", info
            assert cand["protocol"] == "udp", info
            assert cand["address"] == relay_ip, info
            assert low <= cand["port"] <= high, info
        relays[peer] = (candidates[0]["address"], candidates[0]["port"])

    # getStats: each transport's selected pair is nominated and succeeded, relay <-> relay,
    # local = this peer's allocation, remote = the other peer's allocation.
    for peer, other in (("pc1", "pc2"), ("pc2", "pc1")):
        pair = report["selected"][peer]
        assert pair is not None, info
        assert pair["state"] == "succeeded", info
        assert pair["nominated"] is True, info
        assert pair["bytesReceived"] > 0, info
        assert pair["bytesSent"] > 0, info
        local, remote = pair["local"], pair["remote"]
        assert local["candidateType"] == "relay", info
        assert remote["candidateType"] == "relay", info
        assert local["relayProtocol"] == "udp", info
        assert local["url"] == turn_url, info
        assert (local["address"], local["port"]) == relays[peer], info
        assert (remote["address"], remote["port"]) == relays[other], info
        for cand in (local, remote):
            assert cand["address"] == relay_ip, info
            assert low <= cand["port"] <= high, info

    # The server's side: two allocations for our user, from loopback clients, whose relayed
    # addresses are exactly the two the browsers used.
    created = [r for r in log_records(turn) if r.get("msg") == "allocation created"]
    assert len(created) == 2, info
    assert all(r["user"] == USERNAME for r in created), info
    assert all(r["client"].startswith("udp:127.0.0.1:") for r in created), info
    logged = {r["relay"] for r in created}
    assert logged == {f"{h}:{p}" for h, p in relays.values()}, info
    assert "allocation created" in turn.output


def test_wrong_password_does_not_connect(sandbox: Sandbox) -> None:
    """The same page with a wrong password: both peers get 401 for their authenticated
    Allocate, gather no candidate, and the DataChannel does not open within the page's bounded
    wait (OPEN_TIMEOUT_MS). The server created no allocation."""
    turn = sandbox.start_turn("--log-level", "debug")
    turn_url = f"turn:127.0.0.1:{turn_addr(turn)[1]}?transport=udp"

    started = time.monotonic()
    report = run_page(sandbox, turn, WRONG_PASSWORD)
    waited = time.monotonic() - started
    info = f"page report:\n{_pretty(report)}\nserver output:\n{turn.output}"

    assert report["connected"] is False, info
    assert report["echoed"] == 0, info
    assert report["sent"] == 0, info
    assert report["candidates"] == {"pc1": [], "pc2": []}, info
    assert report["selected"] == {"pc1": None, "pc2": None}, info
    timed_out = f"Error: timeout after {OPEN_TIMEOUT_MS} ms: DataChannel open"
    assert report["errors"] == [timed_out], info
    assert report["elapsedMs"] >= OPEN_TIMEOUT_MS, info
    assert waited >= OPEN_TIMEOUT_MS / 1000, info
    for peer in ("pc1", "pc2"):
        states = report["states"][peer]
        assert not {"connected", "completed"} & set(states), info

    # Chromium reached our server and was refused for its credentials (a server it cannot
    # reach would give 701, not 401), on both peers.
    errors = report["candidateErrors"]
    assert {e["peer"] for e in errors} == {"pc1", "pc2"}, info
    for error in errors:
        assert error["url"] == turn_url, info
        assert error["errorCode"] == 401, info

    # The server's side: each client got the 401 challenge, then 401 again for its
    # MESSAGE-INTEGRITY made with the wrong password; no allocation was created.
    per_client: dict[tuple[str, int], list[int]] = {}
    for record in log_records(turn):
        match = _ALLOCATE_ERROR.match(str(record.get("msg", "")))
        if match:
            client = (match.group(1), int(match.group(2)))
            per_client.setdefault(client, []).append(int(match.group(3)))
    assert len(per_client) == 2, info
    assert all(len(codes) >= 2 and set(codes) == {401} for codes in per_client.values()), info
    assert "allocation created" not in turn.output, info
