"""Acceptance: headless Chromium's WebRTC stack relays a DataChannel through our TURN server,
over UDP, TCP and TLS.

``tests/chromium/relay.html`` opens two RTCPeerConnections in one page, both configured with
only one TURN URL (``turn:127.0.0.1:PORT?transport=udp``, ``turn:127.0.0.1:PORT?transport=tcp``
or ``turns:localhost:PORT?transport=tcp``) and ``iceTransportPolicy: "relay"``, signals them to
each other in-page, waits until both use the same nominated pair, echoes DataChannel messages
and reads ``getStats()``. The page POSTs its outcome as JSON to a tiny ``http.server`` on
127.0.0.1 (the same server serves the page).

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
  the rule here adds ``EXCLUDE 127.0.0.1``; every other name still fails to resolve. It also
  adds ``EXCLUDE localhost.``: for ``turns:localhost`` WebRTC's resolver (the network service's
  ``p2p/socket_manager.cc``) asks for the fully qualified "localhost.", which ``EXCLUDE
  localhost`` does not match. (Without it that lookup fails, WebRTC falls back to handing the
  name to the socket layer, and the connection is made all the same.)
* ``--allow-loopback-in-peer-connection``: WebRTC in the renderer starts gathering only once
  the browser's network list has changed from empty (``IpcNetworkManager`` signals "networks
  changed" only then). In the namespace the list is empty, since loopback interfaces are never
  listed, so without this switch both peers stay in "new/gathering" forever. The switch adds a
  ``loopback_ipv4`` network to the list; nothing else changes (see the next point).
* No mDNS, network-enumeration or media permission flags: without a getUserMedia permission
  Chromium does not enumerate adapters, it gathers on the wildcard "any" networks (sockets
  bound to 0.0.0.0 / ::), so the client sockets talk to 127.0.0.1 from 127.0.0.1 and our server
  sees ``udp:127.0.0.1:PORT`` (``tcp:``, ``tls:``) clients. With an IPv4 literal in the URL the
  IPv6 wildcard network cannot reach the server and is skipped: one allocation per peer. With
  a host name (``turns:localhost``) it is not skipped: the TCP/TLS connection is made by the
  network service, which resolves the name itself, so both wildcard networks reach
  127.0.0.1 (WebRTC logs "Socket is bound to the address 127.0.0.x, rather than an address
  associated with network ...") and each peer makes two allocations, both over TLS. With a
  relay-only policy no host candidate is signalled, so ``WebRtcHideLocalIpsWithMdns`` does not
  matter; it is disabled anyway so that no mDNS name is ever registered or resolved.
* The server must relay between two allocations on the same relay IP: ``--relay-ip 127.0.0.1``
  and ``--allow-loopback-peers`` (a peer on a relay port of our relay IP is allowed).

TURN over TLS and the test certificate (found by the tests below, and by trying the
variations noted):

* Chromium verifies a ``turns:`` server's certificate exactly as an HTTPS server's. The TLS
  connection is not libwebrtc's own: it is made by the browser's network service
  (``services/network/p2p/socket_tcp.cc`` over ``net``'s SSL client socket) to the host name of
  the URL, and checked by the browser's certificate verifier against that name. libwebrtc's
  "insecure, no check" TLS policy is not reachable from a page (RTCIceServer has only urls,
  username and credential). A certificate nobody vouches for fails with
  ERR_CERT_AUTHORITY_INVALID (-202); a trusted one issued for another name with
  ERR_CERT_COMMON_NAME_INVALID (-200). The page only sees icecandidateerror 701 "Failed to
  establish connection" per TURN port; no Allocate reaches the server.
* The honest way to make it accept a test certificate is to trust that certificate in the
  profile's NSS database, ``$HOME/.pki/nssdb``, which Chromium on Linux reads besides its own
  root store: ``certutil -d sql:$HOME/.pki/nssdb -A -t P,, -n stunturn -i cert.pem``
  (libnss3-tools; ``tests/chromium/nssdb.py`` does the same through ctypes). ``P,,`` (trusted
  peer) is what a self-signed server certificate such as ``make_self_signed``'s (CA:FALSE)
  needs; trusting it as a CA (``C,,``) is refused with ERR_CERT_INVALID (-207). A test CA
  trusted with ``C,,`` that issued the server certificate works as well. Name and validity are
  still checked, so the certificate must name the URL's host: a DNS SAN ``localhost`` for
  ``turns:localhost`` (an IP SAN 127.0.0.1 for ``turns:127.0.0.1``, which also worked).
* ``--ignore-certificate-errors-spki-list=BASE64(SHA-256(SubjectPublicKeyInfo))`` does apply to
  TURN over TLS, but it accepts the listed key whatever the certificate says: one issued for
  example.test only is accepted for ``turns:localhost``. A key not in the list is still
  refused. ``--ignore-certificate-errors`` (which turns verification off altogether) lets the
  untrusted certificate through as well. Neither flag tests verification.
* ``stunturn serve --self-signed`` makes its certificate at start (names localhost, 127.0.0.1,
  ::1) and prints its SHA-256 fingerprint; a client can fetch the certificate, compare the
  fingerprint and trust it as above.

The checks: over each transport, the right password gives a relay/relay nominated pair, the
same seen from both peers, that echoes every message and whose relay addresses are the ones
the server logged as "allocation created" for clients over that transport only; a wrong
password (UDP) gives 401 on both peers' Allocates, no candidate, no allocation and no
connection within the page's bounded wait; a TLS certificate for the wrong name, or one not
trusted, gives 701, no allocation and the net error above in Chromium's log; the SPKI
allow-list accepts a certificate for the wrong name; the ``--self-signed`` certificate is
accepted once trusted.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import hashlib
import http.server
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from lab.netlab import LabServer, Namespace, loopback_namespace

from stunturn.aio.tls import make_self_signed

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
"""How long the page waits for the DataChannel to open (the bound of the wrong-password
test)."""
REFUSED_TIMEOUT_MS = 5_000
"""The same bound for the certificate tests: Chromium's TLS handshakes fail within about
0.1 s of the page's start, and nothing can connect afterwards (no candidate)."""
REPORT_TIMEOUT = 60.0
"""How long the test waits for the page's report: Chromium's start plus the page's own waits
(open, settle and echoes, up to 10 s each), only reached when something is wrong."""
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
    # 127.0.0.1 must be excluded too, or the page URL itself is mapped to NOTFOUND; and
    # "localhost." too, the fully qualified form WebRTC's resolver asks for (turns:localhost).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE localhost., "
    "EXCLUDE 127.0.0.1",
    "--enable-logging=stderr",
    "--v=0",
]

# The addresses Chromium connect()s UDP sockets to, to learn its default local address.
ROUTE_PROBES = ((socket.AF_INET, ("8.8.8.8", 53)), (socket.AF_INET6, ("2001:4860:4860::8888", 53)))

_TURN_BANNER = re.compile(r"^TURN: realm .*, relay (\S+) ports (\d+)-(\d+), ")
_LISTENER = re.compile(r"^(udp|tcp|tls) ([0-9.]+):(\d+)$")
_ALLOCATE_ERROR = re.compile(r"udp ALLOCATE from \('([0-9.]+)', (\d+)\): (\d+)")
_NET_ERROR = re.compile(r"ssl_client_socket_impl\.cc.*\] handshake failed;.* net_error (-\d+)")
_NOISE = ("dbus", "D-Bus", "vaapi", "InitializeSandbox")


@dataclass(frozen=True)
class Via:
    """How the page reaches our server: ``SCHEME:HOST:PORT?transport=TRANSPORT`` with the port
    of our ``name`` listener."""

    name: str
    """udp, tcp or tls: the listener, the server log's client prefix and getStats'
    ``relayProtocol``."""
    scheme: str
    host: str
    transport: str
    per_peer: int
    """Allocations (relay candidates) each peer makes: one per wildcard network that can
    reach the server (see the module docstring)."""

    def url(self, server: LabServer) -> str:
        port = listener_port(server, self.name)
        return f"{self.scheme}:{self.host}:{port}?transport={self.transport}"


UDP = Via("udp", "turn", "127.0.0.1", "udp", per_peer=1)
TCP = Via("tcp", "turn", "127.0.0.1", "tcp", per_peer=1)
TLS = Via("tls", "turns", "localhost", "tcp", per_peer=2)
VIAS = [UDP, TCP, TLS]


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


def assert_isolated(box: Sandbox, listener: str, turn_port: int) -> None:
    """The guard: nothing in the namespace can reach anything but loopback, and the page
    server and our TURN server (its ``listener``: udp, tcp or tls) are listening in it."""
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
    option = "-ul" if listener == "udp" else "-tl"
    assert _listening(ns, option, turn_port), f"stunturn {listener} not in the namespace"


# --- Chromium ---------------------------------------------------------------------------------


NSSDB_TOOL = PAGE_DIR / "nssdb.py"


def write_nssdb(directory: Path, trust: Sequence[tuple[str, Path]]) -> None:
    """An NSS database in ``directory`` trusting each (trust string, PEM certificate), made by
    ``tests/chromium/nssdb.py`` in a child process (NSS keeps process-wide state)."""
    args = [f"{flags}:{pem}" for flags, pem in trust]
    done = subprocess.run(
        [sys.executable, str(NSSDB_TOOL), str(directory), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, f"nssdb.py failed:\n{done.stdout}{done.stderr}"


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

    def __init__(
        self,
        ns: Namespace,
        url: str,
        flags: Sequence[str] = (),
        trust: Sequence[tuple[str, Path]] = (),
    ) -> None:
        self.ns = ns
        self._tmp = tempfile.mkdtemp(prefix="stunturn-chromium-")
        tmp = Path(self._tmp)
        if trust:
            write_nssdb(tmp / ".pki" / "nssdb", trust)
        self.log_path = tmp / "chromium.log"
        self._log = self.log_path.open("wb")
        args = [
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            *flags,
            f"--user-data-dir={tmp / 'profile'}",
            url,
        ]
        env = dict(os.environ, HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "config"))
        # `ip netns exec` execs Chromium in place: proc.pid is Chromium, leader of its session.
        self.proc = ns.popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log_text(self) -> str:
        """Chromium's log so far, without the lines about D-Bus, VA-API and the sandbox."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [line for line in text.splitlines() if not any(n in line for n in _NOISE)]
        return "\n".join(kept)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

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


def listener_port(server: LabServer, kind: str) -> int:
    """The port of our server's ``kind`` (udp, tcp, tls) listener on 127.0.0.1 (from its
    "listening on KIND 127.0.0.1:PORT" line)."""
    for listener in server.listeners:
        match = _LISTENER.match(listener)
        if match and match.group(1) == kind and match.group(2) == "127.0.0.1":
            return int(match.group(3))
    raise AssertionError(f"no {kind} listener: {server.listeners}\n{server.output}")


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


@dataclass(frozen=True)
class Page:
    """What one load of relay.html gave: its JSON report and Chromium's log."""

    report: dict[str, Any]
    chromium_log: str


def run_page(
    box: Sandbox,
    turn: LabServer,
    via: Via,
    password: str,
    *,
    flags: Sequence[str] = (),
    trust: Sequence[tuple[str, Path]] = (),
    open_timeout_ms: int = OPEN_TIMEOUT_MS,
) -> Page:
    """Check the isolation, then load relay.html, configured with ``via.url(turn)`` only, in a
    fresh headless Chromium in the namespace (extra ``flags``; an NSS database trusting
    ``trust`` in its home); return its report and log."""
    assert_isolated(box, via.name, listener_port(turn, via.name))
    query = urlencode(
        {
            "url": via.url(turn),
            "username": USERNAME,
            "password": password,
            "messages": MESSAGES,
            "timeout": open_timeout_ms,
            "report": "/report",
        }
    )
    url = f"http://127.0.0.1:{box.pages.server_port}/relay.html?{query}"
    with Chromium(box.ns, url, flags, trust) as chromium:
        report = chromium.wait_report(box.pages.reports, REPORT_TIMEOUT)
        assert chromium.outside_namespace() == [], "Chromium processes outside the namespace"
        log = chromium.log_text()
    assert report.get("page") == "relay.html", report
    return Page(report, log)


def _pretty(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True)


def spki_sha256(cert_pem: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM certificate: the form
    ``--ignore-certificate-errors-spki-list`` takes."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def start_tls_turn(
    box: Sandbox, directory: Path, names: Sequence[str], ips: Sequence[str]
) -> tuple[LabServer, Path]:
    """``stunturn serve`` with a TLS listener on 127.0.0.1 (a free port) and a fresh
    self-signed certificate for ``names`` (DNS SANs) and ``ips`` (IP SANs); returns the server
    and the certificate's path."""
    cert, key, _ = make_self_signed(directory, names, ips)
    server = box.start_turn("--tls-listen", "127.0.0.1:0", "--cert", cert, "--key", key)
    return server, Path(cert)


def fetch_certificate(port: int) -> bytes:
    """The DER certificate our TLS listener on 127.0.0.1:``port`` presents (call it in the
    namespace), fetched without verifying it: what a client does before pinning or trusting
    it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=SERVER_TIMEOUT) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def check_relayed(page: Page, turn: LabServer, via: Via) -> None:
    """The page connected through ``turn`` over ``via``: the DataChannel echoed all MESSAGES
    in order; both peers gathered only relay candidates, on our relay IP and port range, each
    one an allocation the server logged as created for our user from a loopback client over
    ``via.name`` (never UDP unless that is ``via``); each peer's nominated pair is succeeded,
    relay (one of its own allocations, reached over ``via``) to relay (one of the other
    peer's)."""
    report = page.report
    relay_ip, low, high = relay_config(turn)
    assert relay_ip == "127.0.0.1"
    turn_url = via.url(turn)
    info = f"page report:\n{_pretty(report)}\nserver output:\n{turn.output}"

    assert report["turnUrl"] == turn_url, info
    assert report["connected"] is True, info
    assert report["errors"] == [], info
    assert report["sent"] == MESSAGES, info
    assert report["echoed"] == MESSAGES, info
    assert report["candidateErrors"] == [], info
    assert 0 < report["elapsedMs"] < OPEN_TIMEOUT_MS, info
    # Both peers settled on one nominated pair (relay.html waits for that, bounded by its
    # open timeout) before sending.
    assert report["settleMs"] is not None, info

    # Gathering produced relay candidates only, each on our relay IP and in our port range.
    # (A relay candidate is always "udp": the relayed address is a UDP port on the server.)
    relays: dict[str, set[tuple[str, int]]] = {}
    for peer in ("pc1", "pc2"):
        candidates = report["candidates"][peer]
        for cand in candidates:
            assert cand["type"] == "relay", info
            assert cand["protocol"] == "udp", info
            assert cand["address"] == relay_ip, info
            assert low <= cand["port"] <= high, info
        relays[peer] = {(c["address"], c["port"]) for c in candidates}
        assert len(relays[peer]) == len(candidates) == via.per_peer, info

    # getStats: each transport's selected pair is nominated and succeeded, relay <-> relay,
    # local = one of this peer's allocations, remote = one of the other peer's, and the two
    # peers' pairs are the same pair seen from either end, which carried the messages.
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
        assert local["relayProtocol"] == via.name, info
        assert local["url"] == turn_url, info
        assert (local["address"], local["port"]) in relays[peer], info
        assert (remote["address"], remote["port"]) in relays[other], info
        mirror = report["selected"][other]["remote"]
        assert (mirror["address"], mirror["port"]) == (local["address"], local["port"]), info

    # The server's side: one allocation per relay candidate, for our user, every one from a
    # loopback client over via.name, relaying exactly the addresses the browsers gathered.
    created = [r for r in log_records(turn) if r.get("msg") == "allocation created"]
    assert len(created) == 2 * via.per_peer, info
    assert all(r["user"] == USERNAME for r in created), info
    assert all(r["client"].startswith(f"{via.name}:127.0.0.1:") for r in created), info
    assert all(r["relay_transport"] == "udp" for r in created), info
    logged = {r["relay"] for r in created}
    assert logged == {f"{h}:{p}" for h, p in relays["pc1"] | relays["pc2"]}, info


def check_refused(page: Page, turn: LabServer, via: Via, open_timeout_ms: int) -> None:
    """The page did not connect: no candidate, a 701 error for our URL on both peers, the
    DataChannel did not open within ``open_timeout_ms``, and the server created no
    allocation."""
    report = page.report
    info = f"page report:\n{_pretty(report)}\nserver output:\n{turn.output}"
    assert report["connected"] is False, info
    assert report["echoed"] == 0, info
    assert report["sent"] == 0, info
    assert report["candidates"] == {"pc1": [], "pc2": []}, info
    assert report["selected"] == {"pc1": None, "pc2": None}, info
    timed_out = f"Error: timeout after {open_timeout_ms} ms: DataChannel open"
    assert report["errors"] == [timed_out], info
    for peer in ("pc1", "pc2"):
        assert not {"connected", "completed"} & set(report["states"][peer]), info
    errors = report["candidateErrors"]
    assert {e["peer"] for e in errors} == {"pc1", "pc2"}, info
    for error in errors:
        assert error["url"] == via.url(turn), info
        assert error["errorCode"] == 701, info
    assert "allocation created" not in turn.output, info


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIAS, ids=lambda via: via.name)
def test_datachannel_through_turn_relay(sandbox: Sandbox, tmp_path: Path, via: Via) -> None:
    """Two Chromium peers, relay candidates only, connect through our server over UDP, TCP or
    TLS: see :func:`check_relayed`. For TLS the server has a self-signed certificate for
    localhost (and 127.0.0.1) and Chromium trusts exactly that certificate ("P,,") in its
    profile's NSS database; no certificate-error flag."""
    trust: list[tuple[str, Path]] = []
    if via.name == "tls":
        turn, cert = start_tls_turn(sandbox, tmp_path / "cert", ["localhost"], ["127.0.0.1"])
        trust.append(("P,,", cert))
    else:
        turn = sandbox.start_turn()
    page = run_page(sandbox, turn, via, PASSWORD, trust=trust)
    check_relayed(page, turn, via)


@pytest.mark.parametrize(
    ("names", "ips", "trusted", "net_error"),
    [
        # Trusted, but issued for another host: ERR_CERT_COMMON_NAME_INVALID.
        pytest.param(["example.test"], [], True, -200, id="wrong-name"),
        # The right names, but nothing vouches for it: ERR_CERT_AUTHORITY_INVALID.
        pytest.param(["localhost"], ["127.0.0.1"], False, -202, id="untrusted"),
    ],
)
def test_turns_certificate_is_verified(
    sandbox: Sandbox,
    tmp_path: Path,
    names: list[str],
    ips: list[str],
    trusted: bool,
    net_error: int,
) -> None:
    """Chromium verifies a ``turns:`` server's certificate like an HTTPS server's: with a
    certificate trusted in the NSS database but issued for another name, or with the right
    name but not trusted, the TLS handshake fails (Chromium's log names the net error), the
    candidate error is 701, no allocation is made and nothing connects."""
    turn, cert = start_tls_turn(sandbox, tmp_path / "cert", names, ips)
    trust = [("P,,", cert)] if trusted else []
    page = run_page(sandbox, turn, TLS, PASSWORD, trust=trust, open_timeout_ms=REFUSED_TIMEOUT_MS)
    check_refused(page, turn, TLS, REFUSED_TIMEOUT_MS)
    # The reason is the certificate, and Chromium did reach our TLS listener: its network
    # stack logs the failed handshake with the net error, for every connection it tried.
    codes = [int(code) for code in _NET_ERROR.findall(page.chromium_log)]
    assert len(codes) >= 2, f"no failed handshake logged:\n{page.chromium_log}"
    assert set(codes) == {net_error}, f"{codes}:\n{page.chromium_log}"


def test_spki_allowlist_skips_the_name_check(sandbox: Sandbox, tmp_path: Path) -> None:
    """``--ignore-certificate-errors-spki-list`` applies to TURN over TLS too, and it accepts
    the listed key whatever the certificate says: a self-signed certificate for example.test
    only (untrusted, and the wrong name for ``turns:localhost``) is accepted and the
    DataChannel is relayed over TLS. So the flag is no test of certificate verification; the
    tests above use the NSS database instead."""
    turn, cert = start_tls_turn(sandbox, tmp_path / "cert", ["example.test"], [])
    flags = [f"--ignore-certificate-errors-spki-list={spki_sha256(cert)}"]
    page = run_page(sandbox, turn, TLS, PASSWORD, flags=flags)
    check_relayed(page, turn, TLS)


def test_self_signed_server_trusted_by_fingerprint(sandbox: Sandbox, tmp_path: Path) -> None:
    """``stunturn serve --self-signed``: fetch the certificate the TLS listener presents, check
    it against the SHA-256 fingerprint the server printed, trust it ("P,,") in Chromium's NSS
    database: its SANs (localhost, 127.0.0.1, ::1) suit ``turns:localhost`` and the
    DataChannel is relayed over TLS."""
    turn = sandbox.start_turn("--tls-listen", "127.0.0.1:0", "--self-signed")
    printed = re.search(
        r"^TLS: self-signed certificate, SHA-256 fingerprint (\S+)$", turn.output, re.M
    )
    assert printed is not None, turn.output
    der = sandbox.ns.call(fetch_certificate, listener_port(turn, "tls"))
    digest = hashlib.sha256(der).hexdigest().upper()
    assert ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)) == printed.group(1)
    cert = tmp_path / "self-signed.pem"
    cert.write_text(ssl.DER_cert_to_PEM_cert(der))
    page = run_page(sandbox, turn, TLS, PASSWORD, trust=[("P,,", cert)])
    check_relayed(page, turn, TLS)


def test_wrong_password_does_not_connect(sandbox: Sandbox) -> None:
    """The same page with a wrong password (over UDP): both peers get 401 for their
    authenticated Allocate, gather no candidate, and the DataChannel does not open within the
    page's bounded wait (OPEN_TIMEOUT_MS). The server created no allocation."""
    turn = sandbox.start_turn("--log-level", "debug")
    turn_url = UDP.url(turn)

    started = time.monotonic()
    page = run_page(sandbox, turn, UDP, WRONG_PASSWORD)
    waited = time.monotonic() - started
    report = page.report
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
