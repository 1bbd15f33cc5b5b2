"""Acceptance: headless Chromium's WebRTC stack relays a DataChannel through our TURN server.

``tests/chromium/relay.html`` opens two RTCPeerConnections in one page, both configured with
only ``turn:127.0.0.1:PORT?transport=udp`` and ``iceTransportPolicy: "relay"``, signals them to
each other in-page, echoes DataChannel messages and reads ``getStats()``. The page POSTs its
outcome as JSON to a tiny ``http.server`` on 127.0.0.1 that this module starts (the same server
serves the page). Chromium runs headless in its own session with a fresh profile and is killed
(its whole process group, then any straggler of its session) whatever happens.

What Chromium needs to use a TURN server on loopback (Chromium 150, Debian 12):

* Nothing special for the TURN server itself: WebRTC accepts a loopback TURN server (only ports
  below 1024 other than 53/80/443 are refused by default, so the server listens on a high port),
  and an IP literal in the ``turn:`` URL is never resolved by DNS. The page is served from
  http://127.0.0.1 itself, so the Local Network Access check newer WebRTC consults before
  contacting a TURN server on a local address sees a loopback page reaching loopback: no
  prompt, no flag.
* The host resolver rule from the network rule, ``MAP * ~NOTFOUND, EXCLUDE localhost``, also
  maps the IP literal 127.0.0.1: the page then fails to load (ERR_NAME_NOT_RESOLVED). So the
  rule here adds ``EXCLUDE 127.0.0.1``; every other name still fails to resolve.
* No mDNS, network-enumeration or media permission flags: without a getUserMedia permission
  Chromium does not enumerate adapters, it gathers on the wildcard "any" network (sockets bound
  to 0.0.0.0 / ::), so the client sockets talk to 127.0.0.1 from 127.0.0.1 and our server sees
  ``udp:127.0.0.1:PORT`` clients. The IPv6 wildcard network cannot reach an IPv4 TURN server
  and is skipped (Chromium logs "STUN server address is incompatible"). With a relay-only
  policy no host candidate is signalled, so ``WebRtcHideLocalIpsWithMdns`` does not matter; it
  is disabled anyway so that no mDNS name is ever registered or resolved.
* The server must relay between two allocations on the same relay IP: ``--relay-ip 127.0.0.1``
  and ``--allow-loopback-peers`` (a peer on a relay port of our relay IP is allowed).
* To learn its default local address Chromium's network service ``connect()``s (never sends
  on) UDP sockets to 8.8.8.8:53 and [2001:4860:4860::8888]:53; no datagram leaves the host. On
  a host whose IPv6 default gateway does not answer, that route lookup makes the kernel send
  one ICMPv6 router-reachability probe (Neighbor Solicitation) at most every 60 s.

Two checks: the right password gives a relay/relay nominated pair that echoes every message
and whose relay addresses are the ones the server logged as "allocation created"; a wrong
password gives 401 on both peers' Allocates, no candidate, no allocation and no connection
within the page's bounded wait.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import pytest
from conftest import StartServer
from helpers import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
PAGE_DIR = Path(__file__).resolve().parent / "chromium"

pytestmark = [
    pytest.mark.interop,
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
    # 127.0.0.1 must be excluded too, or the page URL itself is mapped to NOTFOUND.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--enable-logging=stderr",
    "--v=0",
]

_TURN_BANNER = re.compile(r"^TURN: realm .*, relay (\S+) ports (\d+)-(\d+), ")
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


@pytest.fixture(scope="module")
def page_server() -> Iterator[_ReportServer]:
    server = _ReportServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)


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
    """Headless Chromium on one URL, in a new session, with a throw-away profile."""

    def __init__(self, url: str) -> None:
        self._tmp = tempfile.mkdtemp(prefix="stunturn-chromium-")
        tmp = Path(self._tmp)
        self.log_path = tmp / "chromium.log"
        self._log = self.log_path.open("wb")
        args = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", url]
        env = dict(os.environ, HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "config"))
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

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


def start_turn(stunturn_server: StartServer, *extra: str) -> ServerProcess:
    return stunturn_server(
        "--listen", "127.0.0.1:0",
        "--workers", "1",
        "--user", f"{USERNAME}:{PASSWORD}",
        "--relay-ip", "127.0.0.1",
        "--allow-loopback-peers",
        "--log-format", "json",
        *extra,
    )  # fmt: skip


def relay_config(server: ServerProcess) -> tuple[str, int, int]:
    """(relay IP, lowest relay port, highest relay port) from the "TURN: ..." banner line."""
    match = _TURN_BANNER.match(server.wait_for_line(_TURN_BANNER.pattern, timeout=1.0))
    assert match is not None
    return match.group(1), int(match.group(2)), int(match.group(3))


def log_records(server: ServerProcess) -> list[dict[str, Any]]:
    """The server's JSON log records (stderr, one object per line)."""
    records = []
    for line in server.stderr.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def run_page(page_server: _ReportServer, turn: ServerProcess, password: str) -> dict[str, Any]:
    """Load relay.html in a fresh headless Chromium; return its JSON report."""
    host, port = turn.addr("udp")
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
    url = f"http://127.0.0.1:{page_server.server_port}/relay.html?{query}"
    with Chromium(url) as chromium:
        report = chromium.wait_report(page_server.reports, REPORT_TIMEOUT)
    assert report.get("page") == "relay.html", report
    return report


def _pretty(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True)


# --- tests ------------------------------------------------------------------------------------


def test_datachannel_through_turn_relay(
    stunturn_server: StartServer, page_server: _ReportServer
) -> None:
    """Two Chromium peers, relay candidates only, connect through our server: the DataChannel
    echoes all MESSAGES in order, and both peers' nominated pairs are relay (local) to relay
    (remote), on the relay addresses the server logged as "allocation created"."""
    turn = start_turn(stunturn_server)
    relay_ip, low, high = relay_config(turn)
    assert relay_ip == "127.0.0.1"
    turn_url = f"turn:127.0.0.1:{turn.addr('udp')[1]}?transport=udp"

    report = run_page(page_server, turn, PASSWORD)
    info = f"page report:\n{_pretty(report)}\nserver stderr:\n{turn.stderr}"

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
    assert "allocation created" in turn.stderr


def test_wrong_password_does_not_connect(
    stunturn_server: StartServer, page_server: _ReportServer
) -> None:
    """The same page with a wrong password: both peers get 401 for their authenticated
    Allocate, gather no candidate, and the DataChannel does not open within the page's bounded
    wait (OPEN_TIMEOUT_MS). The server created no allocation."""
    turn = start_turn(stunturn_server, "--log-level", "debug")
    turn_url = f"turn:127.0.0.1:{turn.addr('udp')[1]}?transport=udp"

    started = time.monotonic()
    report = run_page(page_server, turn, WRONG_PASSWORD)
    waited = time.monotonic() - started
    info = f"page report:\n{_pretty(report)}\nserver stderr:\n{turn.stderr}"

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
    assert "allocation created" not in turn.stderr, info
