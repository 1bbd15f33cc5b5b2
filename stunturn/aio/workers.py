"""Run the server in one process or as several worker processes sharing ports.

With ``workers > 1`` each worker binds every listener with SO_REUSEPORT; the kernel hashes a
datagram's 4-tuple to pick the socket, so one client's 5-tuple always reaches the same worker
and per-client state needs no sharing. The parent only supervises: it checks the ports are free
first (SO_REUSEPORT would otherwise let us silently join another program's socket group),
starts the workers, restarts one that dies, and stops them all on SIGINT/SIGTERM.

With ``--metrics`` the parent also serves the HTTP endpoints (:mod:`stunturn.aio.metrics`) from
a thread. Each worker has one pipe to the parent: the worker sends "ready" once it serves and
its counters when it stops; the parent's metrics thread sends ("snapshot", seq, sessions)
requests, which the worker answers from its event loop (a reader on the pipe), and the
parent's main thread, the only reader of the pipes while the server runs, hands each answer
to the request waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import ConfigError, Endpoint, ServerConfig
from ..logsetup import configure_logging
from ..server.actions import Transport
from ..server.counters import Counters
from .metrics import (
    SNAPSHOT_TIMEOUT,
    LocalSource,
    MetricsServer,
    MetricsThread,
    WorkerSnapshot,
    WorkerView,
    bind_metrics,
)
from .reload import ReloadSource
from .server import (
    BoundSockets,
    Listener,
    Worker,
    bind_listeners,
    core_config,
    new_event_loop,
    serve_forever,
    tcp_endpoints,
    tune_gc,
)
from .server import udp_endpoints as udp_endpoints_of
from .shared import SharedQuotas
from .turnsetup import limits_of, prepare

log = logging.getLogger("stunturn.workers")

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
MAX_RESTARTS = 5
"""Worker restarts allowed within RESTART_WINDOW seconds before the server gives up."""
RESTART_WINDOW = 60.0


class StartupError(RuntimeError):
    """The server could not start (address in use, bad certificate, ...)."""


@dataclass(slots=True)
class RunResult:
    """What a finished run reports: summed counters of all workers."""

    counters: Counters = field(default_factory=Counters)


def _probe(ep: Endpoint, kind: socket.SocketKind) -> int:
    """Bind ``ep`` without SO_REUSEPORT to prove it is free; returns the bound port."""
    family = socket.AF_INET6 if ep.family_v6 else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ep.host, ep.port))
        return int(sock.getsockname()[1])


def _check_free(config: ServerConfig) -> None:
    core = core_config(config)
    checks = [(ep, socket.SOCK_DGRAM) for ep in udp_endpoints_of(config, core)]
    checks += [(ep, socket.SOCK_STREAM) for ep in tcp_endpoints(config, core)]
    checks += [(ep, socket.SOCK_STREAM) for ep in config.tls_listen]
    for ep, kind in checks:
        proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
        try:
            _probe(ep, kind)
        except OSError as exc:
            raise StartupError(f"cannot listen on {proto} {ep}: {exc.strerror}") from None


def _free_port(hosts: list[str], pair: bool) -> int:
    """A port (and port+1 when ``pair``) free for UDP and TCP on every host."""
    for _ in range(200):
        port = _probe(Endpoint(hosts[0], 0), socket.SOCK_DGRAM)
        if pair and port >= 65535:
            continue
        try:
            for host in hosts:
                for p in (port, port + 1) if pair else (port,):
                    _probe(Endpoint(host, p), socket.SOCK_DGRAM)
                    _probe(Endpoint(host, p), socket.SOCK_STREAM)
        except OSError:
            continue
        return port
    raise StartupError("could not find a free port")


def resolve_ports(config: ServerConfig) -> ServerConfig:
    """Replace port 0 by concrete free ports so every worker binds the same ones."""
    listen = list(config.listen)
    for i, ep in enumerate(listen):
        if ep.port == 0:
            hosts = [ep.host]
            pair = False
            if config.alt_address is not None and ep == config.primary_for(
                Endpoint(config.alt_address, 0)
            ):
                hosts.append(config.alt_address)
                pair = True
            listen[i] = Endpoint(ep.host, _free_port(hosts, pair))
    tls = [
        Endpoint(ep.host, _probe(ep, socket.SOCK_STREAM)) if ep.port == 0 else ep
        for ep in config.tls_listen
    ]
    return replace(config, listen=tuple(listen), tls_listen=tuple(tls))


# --- TCP/TLS: one source IP, one worker ---------------------------------------------------------

SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000
_BPF_LD_W_ABS, _BPF_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16
_BPF_TAX, _BPF_XOR_X = 0x07, 0xAC
STREAM_BACKLOG = 1024


def _source_ip_program(v6: bool, workers: int) -> bytes:
    """Classic BPF for SO_ATTACH_REUSEPORT_CBPF: socket index = hash(source IP) mod workers.

    IPv4: the source address word; IPv6: the XOR of its last two words (the interface
    identifier), read relative to the network header.
    """
    insns: list[tuple[int, int, int, int]] = []
    if v6:
        insns += [
            (_BPF_LD_W_ABS, 0, 0, (_SKF_NET_OFF + 16) & 0xFFFFFFFF),
            (_BPF_TAX, 0, 0, 0),
            (_BPF_LD_W_ABS, 0, 0, (_SKF_NET_OFF + 20) & 0xFFFFFFFF),
            (_BPF_XOR_X, 0, 0, 0),
        ]
    else:
        insns.append((_BPF_LD_W_ABS, 0, 0, (_SKF_NET_OFF + 12) & 0xFFFFFFFF))
    insns += [(_BPF_MOD_K, 0, 0, workers), (_BPF_RET_A, 0, 0, 0)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


def _attach_program(sock: socket.socket, program: bytes) -> None:
    code = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    fprog = SockFprog(len(program) // 8, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def steer_streams_by_source_ip(sockets: list[BoundSockets]) -> bool:
    """Make the kernel hand every TCP/TLS connection from one source IP to the same worker.

    ``sockets[i]`` are worker i's listeners, in the same order for every worker. Each stream
    listener is put into listening state here, worker by worker, so its index in the kernel's
    SO_REUSEPORT group is the worker's index, and a program that picks the index from the
    source IP is attached to the group. RFC 6062 needs this (a ConnectionBind must reach the
    worker holding the allocation), and per-IP connection limits are exact with it. Returns
    False (and the kernel's default 4-tuple hash stays) where the kernel refuses the program.
    """
    if len(sockets) < 2:
        return True
    ok = True
    for position, (kind, first) in enumerate(sockets[0]):
        if kind is Transport.UDP:
            continue
        for bound in sockets:
            bound[position][1].listen(STREAM_BACKLOG)
        try:
            _attach_program(
                first, _source_ip_program(first.family == socket.AF_INET6, len(sockets))
            )
        except OSError as exc:
            log.warning(
                "cannot steer TCP connections by source IP (%s): per-IP limits are "
                "per worker and RFC 6062 ConnectionBind may reach the wrong one",
                exc,
            )
            ok = False
    return ok


# --- worker process --------------------------------------------------------------------------


def _worker_main(
    config: ServerConfig,
    conn: multiprocessing.connection.Connection,
    index: int,
    quotas: SharedQuotas | None,
    sockets: BoundSockets,
    drained: multiprocessing.connection.Connection | None = None,
    reload_source: ReloadSource | None = None,
) -> None:
    """Entry point of a worker process (spawned), serving the listeners the supervisor bound.

    SIGINT/SIGTERM stop the worker; once stopping, further signals are ignored, so a stop
    signal sent to the whole process group (Ctrl-C, systemd) followed by the supervisor's own
    SIGTERM cannot kill the worker before it has reported its counters.

    SIGUSR1 drains it; once its last allocation has ended it sends its index on ``drained``
    and goes on answering Binding (and refusing Allocate) until the supervisor stops every
    worker together: a listener of the shared SO_REUSEPORT group never goes unanswered.
    """
    configure_logging(config.log_level, config.log_format)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    running: list[Worker] = []
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.append(signum)
        if running and not loop.is_closed():
            loop.call_soon_threadsafe(running[0].stop)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)

    def on_hangup(signum: int, frame: object) -> None:
        if running and not loop.is_closed():
            loop.call_soon_threadsafe(running[0].reload)

    signal.signal(signal.SIGHUP, on_hangup)
    drain_requested: list[int] = []

    def report_drained() -> None:
        if drained is None:
            running[0].stop()
        else:
            with contextlib.suppress(OSError):
                drained.send(index)

    def on_drain(signum: int, frame: object) -> None:
        drain_requested.append(signum)
        if running and not loop.is_closed():
            loop.call_soon_threadsafe(running[0].start_drain, report_drained)

    signal.signal(signal.SIGUSR1, on_drain)

    def answer() -> None:
        """Requests from the supervisor, read on the event loop (snapshots for the metrics)."""
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == "snapshot" and running:
                    _, seq, sessions = message
                    conn.send(("snapshot", seq, running[0].snapshot(bool(sessions))))
        except (EOFError, OSError):
            # The supervisor is gone: nobody would stop or replace this worker any more.
            loop.remove_reader(conn.fileno())
            if running:
                running[0].stop()

    def ready(worker: Worker) -> None:
        tune_gc()
        running.append(worker)
        conn.send(("ready", [(lst.transport.value, lst.local) for lst in worker.listeners]))
        loop.add_reader(conn.fileno(), answer)
        if stop_requested:  # a stop signal came while the listeners were being bound
            worker.stop()
        elif drain_requested:
            worker.start_drain(report_drained)

    try:
        worker = loop.run_until_complete(
            serve_forever(
                config,
                reuse_port=True,
                on_ready=ready,
                install_signals=False,
                index=index,
                quotas=quotas.view(index) if quotas is not None else None,
                sockets=sockets,
                reload_source=reload_source,
            )
        )
    except OSError as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"cannot bind: {exc.strerror or exc}"))
        return
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(conn.fileno())
        loop.close()
    with contextlib.suppress(OSError):  # a supervisor that died cannot hear it
        conn.send(("counters", worker.core.counters.as_dict()))


class _Reply:
    """A snapshot request the metrics thread waits for; the main thread fills it in."""

    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: WorkerSnapshot | None = None


class Supervisor:
    """Starts, watches and stops worker processes (and serves the metrics, when asked)."""

    def __init__(
        self,
        config: ServerConfig,
        metrics_socket: socket.socket | None = None,
        reload_source: ReloadSource | None = None,
    ) -> None:
        self.config = config
        self.reload_source = reload_source
        self.metrics_socket = metrics_socket
        """A bound, listening socket to serve the metrics on (None: no metrics)."""
        self._metrics: MetricsThread | None = None
        self.draining = False
        """Set to take the whole server out of rotation: ``/ready`` answers 503 (drain hook)."""
        self.stopping = False
        self._lock = threading.Lock()
        """Guards the slots' readiness, ``procs``, pending snapshot requests and sending on the
        pipes: the metrics thread sends requests, the main thread replaces workers."""
        self._collecting = threading.Lock()
        """One collection at a time, so at most one request per worker is ever unanswered."""
        self._ready: list[bool] = [False] * config.workers
        self._pending: dict[int, _Reply] = {}
        self._outstanding: dict[int, int] = {}
        """Worker slot -> sequence number of its unanswered snapshot request."""
        self._seq = itertools.count(1)
        self._reported: set[int] = set()
        """Slots whose counters arrived while running (a worker that stopped by itself)."""
        self._eof: set[int] = set()
        """Slots whose pipe is closed (the worker is exiting; its sentinel will say so)."""
        self.ctx = multiprocessing.get_context("spawn")
        self.sockets: list[BoundSockets] = []
        """Each worker slot's listeners, bound once here and kept open for the supervisor's
        life: a worker that dies and is replaced gets the same sockets back, so the kernel's
        SO_REUSEPORT group never changes and no other worker's clients are re-hashed."""
        self.quotas = (
            SharedQuotas(limits_of(config), config.workers, self.ctx) if config.turn else None
        )
        self.procs: list[tuple[Any, multiprocessing.connection.Connection]] = []
        self.listeners: list[Listener] = []
        self.result = RunResult()
        self._restarts: list[float] = []
        self._drained_r, self._drained_w = self.ctx.Pipe(duplex=False)
        """Draining workers send their index here once their last allocation has ended."""
        self._drained: set[int] = set()
        """Slots drained (or dead) since SIGUSR1; no worker is restarted while draining."""

    def _spawn(self, index: int) -> tuple[Any, multiprocessing.connection.Connection]:
        parent, child = self.ctx.Pipe()
        args = (self.config, child, index, self.quotas, self.sockets[index])
        proc = self.ctx.Process(
            target=_worker_main,
            args=args,
            kwargs={"drained": self._drained_w, "reload_source": self.reload_source},
            daemon=True,
        )
        proc.start()
        child.close()
        return proc, parent

    def _await_ready(self, proc: Any, conn: multiprocessing.connection.Connection) -> list[Any]:
        if not conn.poll(READY_TIMEOUT):
            proc.kill()
            raise StartupError("a worker did not start in time")
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise StartupError(f"a worker exited during start (code {proc.exitcode})") from None
        if kind != "ready":
            raise StartupError(str(payload))
        return list(payload)

    def start(self, checked: bool = False) -> list[Listener]:
        """Spawn the workers; ``checked`` says the ports were already proven free."""
        if not checked:
            _check_free(self.config)
        core = core_config(self.config)
        try:
            for _ in range(self.config.workers):
                self.sockets.append(bind_listeners(self.config, core, reuse_port=True))
            steer_streams_by_source_ip(self.sockets)
        except OSError as exc:
            self._close_sockets()
            raise StartupError(f"cannot bind: {exc.strerror or exc}") from None
        try:
            if self.metrics_socket is not None:
                self._metrics = MetricsThread(self.metrics_socket, self, self.config.admin_token)
                self._metrics.start()
            for index in range(self.config.workers):
                proc, conn = self._spawn(index)
                with self._lock:
                    self.procs.append((proc, conn))
                bound = self._await_ready(proc, conn)
                with self._lock:
                    self._ready[index] = True
            self.listeners = [Listener(_transport(t), tuple(a)) for t, a in bound]
        except BaseException:
            self.stop()
            raise
        return self.listeners

    def run(self) -> RunResult:
        """Block until SIGINT/SIGTERM, restarting workers that die; then stop them.

        SIGHUP is passed on to every worker (each reloads the TLS certificate). SIGUSR1 is
        passed on too (each worker drains), and the run ends once every worker has drained."""
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        old = {s: signal.signal(s, lambda *_: os.write(wfd, b"x")) for s in _STOP_SIGNALS}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: os.write(wfd, b"h"))
        old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: os.write(wfd, b"d"))
        give_up: float | None = None
        try:
            while True:
                if self.draining and self._all_drained(give_up):
                    break
                sentinels = {
                    proc.sentinel: i
                    for i, (proc, _) in enumerate(self.procs)
                    # While draining, a drained slot is not watched (nor restarted).
                    if not (self.draining and i in self._drained)
                }
                conns = {c: i for i, (_, c) in enumerate(self.procs) if i not in self._eof}
                timeout = None if give_up is None else max(0.0, give_up - time.monotonic())
                ready = multiprocessing.connection.wait(
                    [rfd, self._drained_r, *sentinels, *conns], timeout
                )
                if self._drained_r in ready:
                    self._drained.add(self._drained_r.recv())
                if rfd in ready:
                    got = os.read(rfd, 64)
                    if b"x" in got:
                        break
                    if b"h" in got:
                        self._forward(signal.SIGHUP)  # each worker reloads its certificate
                    if b"d" in got and give_up is None:
                        give_up = self._start_drain()
                    continue
                for item in ready:
                    if isinstance(item, multiprocessing.connection.Connection) and item in conns:
                        self._receive(conns[item], item)
                for item in ready:
                    if isinstance(item, int) and item in sentinels:
                        self._exited(sentinels[item])
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            os.close(rfd)
            os.close(wfd)
            self.stop()
            self._drained_r.close()
            self._drained_w.close()
        return self.result

    # --- drain (SIGUSR1) ---------------------------------------------------------------------

    def _start_drain(self) -> float:
        """Forward SIGUSR1 to every worker; returns when to stop waiting for them regardless."""
        self.draining = True
        self._forward(signal.SIGUSR1)
        log.info("drain started: SIGUSR1 passed on to %d workers", len(self.procs))
        # Each worker ends its allocations at the drain timeout itself; this only guards
        # against a worker that cannot say so.
        return time.monotonic() + self.config.drain_timeout + 2 * STOP_TIMEOUT

    def _all_drained(self, give_up: float | None) -> bool:
        if len(self._drained) >= len(self.procs):
            log.info("drain finished: every worker drained")
            return True
        if give_up is not None and time.monotonic() >= give_up:
            busy = len(self.procs) - len(self._drained)
            log.warning("drain: %d workers still busy after the drain timeout; stopping", busy)
            return True
        return False

    def _exited(self, index: int) -> None:
        """A worker process ended: replaced, except while draining (its allocations are gone
        with it, so it counts as drained)."""
        if not self.draining:
            self._replace(index)
            return
        if index in self._drained:
            return
        proc, _ = self.procs[index]
        proc.join(1.0)
        log.error("worker %d (pid %d) exited with code %s while draining", index, proc.pid,
                  proc.exitcode)  # fmt: skip
        self._drained.add(index)

    def _forward(self, sig: int) -> None:
        for proc, _ in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    # --- messages from workers, snapshots for the metrics ---------------------------------------

    def _receive(self, index: int, conn: multiprocessing.connection.Connection) -> None:
        """Read what worker ``index`` sent (main thread only: the one reader of the pipes)."""
        try:
            while conn.poll():
                message = conn.recv()
                kind, payload = message[0], message[-1]
                if kind == "snapshot":
                    with self._lock:
                        reply = self._pending.pop(message[1], None)
                        if self._outstanding.get(index) == message[1]:
                            del self._outstanding[index]
                    if reply is not None:
                        reply.value = payload
                        reply.event.set()
                elif kind == "counters":  # it stopped by itself (e.g. a signal to it alone)
                    self.result.counters.add(Counters(**payload))
                    self._reported.add(index)
                elif kind == "error":
                    log.error("worker %d: %s", index, payload)
        except (EOFError, OSError):
            self._eof.add(index)

    def _forget_requests(self, index: int | None = None) -> None:
        """Wake the waiters of one slot's (or every) unanswered request, empty-handed."""
        with self._lock:
            for slot, seq in list(self._outstanding.items()):
                if index is None or slot == index:
                    del self._outstanding[slot]
                    reply = self._pending.pop(seq, None)
                    if reply is not None:
                        reply.event.set()

    def collect(self, sessions: bool) -> list[WorkerView]:
        """Ask every serving worker for a snapshot; blocks up to :data:`SNAPSHOT_TIMEOUT`.

        Called from the metrics thread. A worker that is starting, restarting or does not
        answer in time is reported as None (and is not asked again while a request to it is
        unanswered, so its pipe never fills up).
        """
        with self._collecting:
            asked: list[tuple[int, _Reply | None]] = []
            with self._lock:
                for index in range(self.config.workers):
                    reply = None
                    if (
                        not self.stopping
                        and index < len(self.procs)
                        and self._ready[index]
                        and index not in self._outstanding
                    ):
                        seq = next(self._seq)
                        try:
                            self.procs[index][1].send(("snapshot", seq, sessions))
                        except (OSError, ValueError):
                            pass  # the worker is going; its sentinel will say so
                        else:
                            reply = self._pending[seq] = _Reply()
                            self._outstanding[index] = seq
                    asked.append((index, reply))
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT
            views: list[WorkerView] = []
            for index, reply in asked:
                if reply is not None and reply.event.wait(max(0.0, deadline - time.monotonic())):
                    views.append((index, reply.value))
                else:
                    views.append((index, None))
            return views

    def is_ready(self) -> bool:
        """Every worker serving, and not stopping or draining (``/ready``)."""
        with self._lock:
            return all(self._ready) and not self.stopping and not self.draining

    async def snapshots(self, sessions: bool) -> list[WorkerView]:
        """:meth:`collect`, from the metrics thread's event loop."""
        return await asyncio.to_thread(self.collect, sessions)

    def _replace(self, index: int) -> None:
        proc, conn = self.procs[index]
        proc.join(1.0)  # reap it, so exitcode is known
        log.error("worker %d (pid %d) exited with code %s", index, proc.pid, proc.exitcode)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
        if len(self._restarts) > MAX_RESTARTS:
            raise StartupError("workers keep dying; giving up")
        with self._lock:  # the metrics thread must not send on a closed (or reused) descriptor
            self._ready[index] = False
            conn.close()
        self._forget_requests(index)
        self._eof.discard(index)
        self._reported.discard(index)
        if self.quotas is not None:
            self.quotas.reset_worker(index)  # its allocations died with it
        new_proc, new_conn = self._spawn(index)
        with self._lock:
            self.procs[index] = (new_proc, new_conn)
        self._await_ready(new_proc, new_conn)
        with self._lock:
            self._ready[index] = True
        log.info("worker %d restarted (pid %d)", index, new_proc.pid)

    def _close_sockets(self) -> None:
        for bound in self.sockets:
            for _, sock in bound:
                sock.close()
        self.sockets.clear()

    def stop(self) -> None:
        with self._lock:
            self.stopping = True  # /ready answers 503 from now on; no more snapshot requests
            self._ready = [False] * len(self._ready)
        self._forget_requests()
        for proc, _ in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for index, (proc, conn) in enumerate(self.procs):
            while index not in self._reported and conn.poll(max(0.0, deadline - time.monotonic())):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "counters":  # late snapshot answers are passed over
                    self.result.counters.add(Counters(**message[1]))
                    break
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        with self._lock:
            self.procs.clear()
        self._reported.clear()
        self._eof.clear()
        self._close_sockets()
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _transport(name: str) -> Transport:
    return Transport(name)


def run_server(
    config: ServerConfig,
    on_ready: Callable[[ServerConfig, list[Listener]], None],
    reload_source: ReloadSource | None = None,
) -> RunResult:
    """Run until SIGINT/SIGTERM. Raises :class:`StartupError` when it cannot start.

    ``on_ready`` gets the configuration as completed at start (ports, relay addresses) and the
    listeners, once every worker is serving.
    """
    try:
        config = prepare(resolve_ports(config))
    except OSError as exc:
        raise StartupError(f"cannot pick a port: {exc.strerror}") from None
    _check_free(config)
    metrics_socket = _metrics_socket(config)
    if metrics_socket is not None and config.metrics is not None:
        # Port 0 picks one: on_ready reports the port actually bound.
        port = int(metrics_socket.getsockname()[1])
        config = replace(config, metrics=Endpoint(config.metrics.host, port))
    try:
        if config.workers == 1:
            return _run_inline(config, on_ready, metrics_socket, reload_source)
        supervisor = Supervisor(config, metrics_socket, reload_source)
        on_ready(config, supervisor.start(checked=True))
        return supervisor.run()
    finally:
        if metrics_socket is not None:
            metrics_socket.close()


def _metrics_socket(config: ServerConfig) -> socket.socket | None:
    """Bind the metrics address before anything starts, so a busy port stops the server."""
    endpoint = config.metrics
    if endpoint is None:
        if config.admin_token is not None:
            raise StartupError(
                "admin-token: /status is served on the metrics address; give --metrics too"
            )
        return None
    try:
        sock = bind_metrics(endpoint)
    except OSError as exc:
        raise StartupError(f"cannot listen for metrics on {endpoint}: {exc.strerror}") from None
    if not ipaddress.ip_address(endpoint.host).is_loopback:
        log.warning(
            "metrics on %s, not a loopback address: whoever reaches it can read the metrics%s",
            endpoint,
            "; the admin token travels in clear text" if config.admin_token else "",
        )
    return sock


def _run_inline(
    config: ServerConfig,
    on_ready: Callable[[ServerConfig, list[Listener]], None],
    metrics_socket: socket.socket | None = None,
    reload_source: ReloadSource | None = None,
) -> RunResult:
    loop = new_event_loop()
    source = LocalSource()

    async def run() -> Worker:
        http = None
        if metrics_socket is not None:
            # Served on the worker's own loop, from before the worker binds (/ready: 503).
            http = MetricsServer(metrics_socket, source, config.admin_token)
            await http.start()

        def ready(worker: Worker) -> None:
            tune_gc()
            source.worker = worker
            on_ready(config, worker.listeners)

        try:
            return await serve_forever(config, on_ready=ready, reload_source=reload_source)
        finally:
            if http is not None:
                await http.close()

    try:
        worker = loop.run_until_complete(run())
    except OSError as exc:
        raise StartupError(f"cannot bind: {exc.strerror or exc}") from None
    finally:
        loop.close()
    return RunResult(worker.core.counters)


__all__ = ["ConfigError", "RunResult", "StartupError", "Supervisor", "resolve_ports", "run_server"]
