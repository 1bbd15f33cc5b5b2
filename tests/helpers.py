"""Shared helpers for the loopback integration, interop and robustness tests.

Everything here talks to loopback only (127.0.0.0/8 and ::1). It offers:

* :func:`free_port` - a port free for UDP and TCP (optionally with port+1) right now;
* :class:`ServerProcess` - ``stunturn serve`` as a subprocess: waits for its "listening on"
  lines, stops it with a signal, parses the "stopped (...)" summary, and always kills it;
* :class:`InProcessServer` - one :class:`stunturn.aio.server.Worker` in a thread with its own
  event loop, so a test can read the core's counters;
* a tiny blocking STUN client built on our own codec (UDP, TCP, TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stunturn.aio.server import Worker, new_event_loop, serve_forever
from stunturn.aio.workers import resolve_ports
from stunturn.config import ServerConfig
from stunturn.server.counters import Counters
from stunturn.stun import (
    Address,
    Attribute,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    StunParseError,
    decode,
    new_transaction_id,
)
from stunturn.stun.attributes import ErrorCode, XorMappedAddress

PYTHON = sys.executable
STUNTURN = [PYTHON, "-m", "stunturn_cli"]
"""How the tests run the CLI: the installed package, with the interpreter running the tests."""

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
IO_TIMEOUT = 2.0

STREAM_LOOPS = ["uvloop", "asyncio"]
"""Parametrise TCP/TLS tests over the event loop: the shipped one (uvloop) and asyncio's."""

_LISTENING = re.compile(r"^listening on (udp|tcp|tls) (?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d+)$")
_HEADER = re.compile(r"^stunturn \S+: STUN server, (\d+) worker\(s\), RFC 5780 (on|off)$")
_STOPPED = re.compile(r"^stopped \((.*)\)$")


# --- ports ------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1", pair: bool = False) -> int:
    """A port (and port+1 when ``pair``) that is free for both UDP and TCP on ``host`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if pair and port >= 65535:
            continue
        try:
            for p in (port, port + 1) if pair else (port,):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(family, kind) as sock:
                        sock.bind((host, p))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port found on {host}")


def no_uvloop_dir() -> str:
    """A directory whose ``uvloop`` module refuses to import (put it first on PYTHONPATH).

    ``stunturn.aio.server.new_event_loop`` then falls back to asyncio's own loop, in the parent
    and in spawned worker processes alike.
    """
    path = Path(tempfile.gettempdir()) / f"stunturn-tests-no-uvloop-{os.getuid()}"
    path.mkdir(exist_ok=True)
    module = path / "uvloop.py"
    text = 'raise ImportError("uvloop disabled by the stunturn tests")\n'
    if not module.exists() or module.read_text() != text:
        # Atomic, so a test run starting in parallel never imports half a file.
        tmp = path / f"uvloop.py.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, module)
    return str(path)


# --- the server as a subprocess ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    """One "listening on TRANSPORT HOST:PORT" line."""

    transport: str
    host: str
    port: int

    @property
    def addr(self) -> Address:
        return (self.host, self.port)


def parse_counters(line: str) -> dict[str, int]:
    """``stopped (received=3, malformed=0, ...)`` -> {"received": 3, ...}."""
    match = _STOPPED.match(line.strip())
    if match is None:
        raise ValueError(f"not a stopped line: {line!r}")
    counts: dict[str, int] = {}
    for item in match.group(1).split(", "):
        name, value = item.split("=")
        counts[name] = int(value)
    return counts


class ServerProcess:
    """``stunturn serve ARGS`` in a subprocess; stdout and stderr are collected by threads.

    Use as a context manager or call :meth:`close` (the ``stunturn_server`` fixture does): the
    process is always killed at the end, whatever happened.
    """

    def __init__(
        self,
        args: Sequence[str],
        loop: str = "uvloop",
        new_session: bool = False,
        batched_io: bool = True,
    ) -> None:
        self.args = ["serve", *args]
        self.new_session = new_session
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if not batched_io:
            env["STUNTURN_NO_MMSG"] = "1"  # the plain recvfrom/sendto UDP path
        if loop == "asyncio":
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (no_uvloop_dir(), env.get("PYTHONPATH", "")) if p
            )
        elif loop != "uvloop":
            raise ValueError(f"unknown loop {loop!r}")
        self.loop = loop
        self._cond = threading.Condition()
        self._out: list[str] = []
        self._err: list[str] = []
        self.proc = subprocess.Popen(
            [*STUNTURN, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=new_session,
        )
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.listeners: list[ListenerInfo] = []
        self.workers = 0
        self.rfc5780 = False

    def _pump(self, stream: Iterable[str] | None, into: list[str]) -> None:
        if stream is None:
            return
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    # --- reading output ---

    @property
    def stdout(self) -> str:
        with self._cond:
            return "\n".join(self._out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self._err)

    def wait_for_line(self, pattern: str, timeout: float = READY_TIMEOUT) -> str:
        """The first stdout line matching the regex ``pattern``; fails on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._out:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                exited = self.proc.poll() is not None and not any(
                    t.is_alive() for t in self._threads
                )
                if remaining <= 0 or exited:
                    break
                self._cond.wait(min(remaining, 0.1))
        raise AssertionError(
            f"no line matching {pattern!r} from stunturn {' '.join(self.args)} "
            f"(exit code {self.proc.poll()})\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        """Wait for the start banner, then collect the "listening on" lines that follow it.

        The CLI prints the banner and every listener line and then flushes once, so they
        arrive together; the short settle wait only guards against a split pipe write.
        """
        header = self.wait_for_line(_HEADER.pattern, timeout)
        match = _HEADER.match(header)
        assert match is not None
        self.workers = int(match.group(1))
        self.rfc5780 = match.group(2) == "on"
        settle = time.monotonic() + 0.5
        count = -1
        found: list[re.Match[str]] = []
        while time.monotonic() < settle:
            with self._cond:
                lines = list(self._out)
            found = [m for m in map(_LISTENING.match, lines) if m is not None]
            if found and len(found) == count:
                break
            count = len(found)
            time.sleep(0.05)
        self.listeners = [
            ListenerInfo(m.group(1), m.group(2) or m.group(3), int(m.group(4))) for m in found
        ]
        assert self.listeners, f"no listeners printed:\n{self.stdout}\n{self.stderr}"
        return self

    def addr(self, transport: str = "udp", host: str | None = None) -> Address:
        """The first listener of ``transport`` (on ``host`` when given)."""
        for lst in self.listeners:
            if lst.transport == transport and (host is None or lst.host == host):
                return lst.addr
        raise AssertionError(f"no {transport} listener on {host}: {self.listeners}")

    # --- stopping ---

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (None: send nothing, just wait), wait for the exit and the end of its
        output; returns the exit code."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"stunturn did not exit within {timeout} s of signal {sig}\n"
                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
            ) from None
        for thread in self._threads:
            thread.join(5.0)
        return code

    def stopped_counters(self) -> dict[str, int]:
        """Counters from the "stopped (...)" line (call after :meth:`stop`)."""
        return parse_counters(self.wait_for_line(_STOPPED.pattern, timeout=1.0))

    def kill(self) -> None:
        """SIGKILL the CLI and any worker process it started."""
        children = child_pids(self.proc.pid)
        if self.new_session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)

    def close(self) -> None:
        """Kill whatever is still running and close the pipes."""
        self.kill()
        for thread in self._threads:
            thread.join(5.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), e.g. the worker processes of the CLI."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) comes after the command name, which is in parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_pids(pid: int) -> list[int]:
    """The spawned worker processes of a ``--workers N`` server (not the resource tracker)."""
    workers = []
    for child in child_pids(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``stunturn ARGS`` to completion (for commands that fail or print help)."""
    return subprocess.run(
        [*STUNTURN, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- the server in this process ------------------------------------------------------------------


class InProcessServer:
    """One worker serving ``config`` on an event loop in a background thread.

    Its core's counters can be read at any time (plain ints, written by one thread).
    ``use_uvloop`` picks the loop ``stunturn serve`` would use; the default is asyncio's.
    """

    def __init__(self, config: ServerConfig, use_uvloop: bool = False) -> None:
        self.config = resolve_ports(config)
        self.use_uvloop = use_uvloop
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: Worker | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        loop = new_event_loop() if self.use_uvloop else asyncio.new_event_loop()
        self.loop = loop

        def ready(worker: Worker) -> None:
            self.worker = worker
            self._ready.set()

        try:
            loop.run_until_complete(
                serve_forever(self.config, on_ready=ready, install_signals=False)
            )
        except BaseException as exc:
            self.error = exc
        finally:
            loop.close()
            self._ready.set()

    def start(self, timeout: float = 10.0) -> InProcessServer:
        self._thread.start()
        if not self._ready.wait(timeout) or self.worker is None:
            raise AssertionError(f"in-process server did not start: {self.error!r}")
        return self

    @property
    def counters(self) -> Counters:
        assert self.worker is not None
        return self.worker.core.counters

    def addr(self, transport: str = "udp") -> Address:
        assert self.worker is not None
        for lst in self.worker.listeners:
            if lst.transport.value == transport:
                return lst.local
        raise AssertionError(f"no {transport} listener")

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop is not None and self.worker is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self.loop.call_soon_threadsafe(self.worker.stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "in-process server did not stop"

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- a tiny blocking STUN client ------------------------------------------------------------------


def binding_request(
    *attrs: Attribute, tid: bytes | None = None, fingerprint: bool = False
) -> tuple[bytes, bytes]:
    """(transaction ID, wire bytes) of a Binding request carrying ``attrs``."""
    tid = tid or new_transaction_id()
    msg = Message(Method.BINDING, MessageClass.REQUEST, tid, list(attrs))
    return tid, msg.encode(fingerprint=fingerprint)


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """An unconnected UDP socket bound on loopback (so replies from any source arrive)."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.bind((host, port))
    return sock


def sockname(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return (name[0], name[1])


def recv_response(
    sock: socket.socket, tid: bytes, timeout: float = IO_TIMEOUT
) -> tuple[Message, Address] | None:
    """Wait for a STUN message with transaction ID ``tid`` on a UDP socket; None on timeout.

    Other datagrams (late answers to earlier requests, garbage) are skipped.
    """
    deadline = time.monotonic() + timeout
    for _ in range(10_000):  # bounded even if unrelated datagrams keep arriving
        remaining = max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            return None
        data, src = sock.recvfrom(65536)
        try:
            msg = decode(data)
        except StunParseError:
            continue
        if msg.transaction_id == tid:
            return msg, (src[0], src[1])
    return None


def udp_exchange(
    sock: socket.socket,
    server: Address,
    *attrs: Attribute,
    fingerprint: bool = False,
    timeout: float = 0.5,
    attempts: int = 4,
) -> tuple[Message, Address]:
    """Send a Binding request from ``sock`` and return (response, source of the response).

    Retransmits the same transaction a few times, as a real client would on lossy UDP.
    """
    tid, data = binding_request(*attrs, fingerprint=fingerprint)
    for _ in range(attempts):
        sock.sendto(data, server)
        got = recv_response(sock, tid, timeout)
        if got is not None:
            return got
    raise AssertionError(f"no response from {server} after {attempts} attempts")


def strays_before_answer(
    sock: socket.socket, server: Address, timeout: float = IO_TIMEOUT
) -> list[bytes]:
    """Send a valid Binding request and read until its answer; return what arrived before it.

    The server reads one socket in order, so once this answer is in, any answer it was going
    to send to earlier datagrams from ``sock`` has been sent too: no sleeping and guessing.
    """
    tid, data = binding_request()
    sock.sendto(data, server)
    strays: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        raw = sock.recv(65536)
        if raw[8:20] == tid:
            msg = decode(raw)
            assert mapped(msg) == sockname(sock)
            return strays
        strays.append(raw)
    raise AssertionError(f"no answer from {server} (strays: {strays})")


def udp_query(server: Address, *attrs: Attribute, fingerprint: bool = False) -> Message:
    """One Binding transaction from a fresh socket; asserts XOR-MAPPED-ADDRESS is its address."""
    with udp_socket(server[0]) as sock:
        msg, _ = udp_exchange(sock, server, *attrs, fingerprint=fingerprint)
        if msg.cls is MessageClass.SUCCESS:
            assert mapped(msg) == sockname(sock)
        return msg


def mapped(msg: Message) -> Address:
    """XOR-MAPPED-ADDRESS of a response (asserting it is there)."""
    attr = msg.get(XorMappedAddress)
    assert attr is not None, f"no XOR-MAPPED-ADDRESS in {msg}"
    return attr.address


def error_code(msg: Message) -> int | None:
    attr = msg.get(ErrorCode)
    return None if attr is None else attr.code


def tcp_connect(
    server: Address, timeout: float = IO_TIMEOUT, source: str | None = None
) -> socket.socket:
    sock = socket.create_connection(
        server, timeout=timeout, source_address=(source, 0) if source else None
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def client_tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """Verify against ``cafile`` (hostname included), or verify nothing when None."""
    if cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=cafile)


def tls_connect(
    server: Address,
    ctx: ssl.SSLContext,
    server_hostname: str | None = None,
    timeout: float = IO_TIMEOUT,
) -> ssl.SSLSocket:
    raw = tcp_connect(server, timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname or server[0])
    except BaseException:
        raw.close()
        raise


def stream_read(
    sock: socket.socket, framer: StreamFramer, count: int, timeout: float = IO_TIMEOUT
) -> list[Message]:
    """Read until ``count`` STUN messages arrived (fewer if the peer closes or time runs out)."""
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        frames += framer.feed(data)
    return [decode(f) for f in frames]


def stream_exchange(
    sock: socket.socket,
    chunks: Sequence[bytes],
    count: int,
    pause: float = 0.0,
    timeout: float = IO_TIMEOUT,
) -> list[Message]:
    """Write ``chunks`` (as separate writes, ``pause`` seconds apart), read ``count`` answers."""
    for i, chunk in enumerate(chunks):
        if i and pause:
            time.sleep(pause)
        sock.sendall(chunk)
    return stream_read(sock, StreamFramer(), count, timeout)
