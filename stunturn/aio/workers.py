"""Run the server in one process or as several worker processes sharing ports.

With ``workers > 1`` each worker binds every listener with SO_REUSEPORT; the kernel hashes a
datagram's 4-tuple to pick the socket, so one client's 5-tuple always reaches the same worker
and per-client state needs no sharing. The parent only supervises: it checks the ports are free
first (SO_REUSEPORT would otherwise let us silently join another program's socket group),
starts the workers, restarts one that dies, and stops them all on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import ConfigError, Endpoint, ServerConfig
from ..logsetup import configure_logging
from ..server.actions import Transport
from ..server.counters import Counters
from .server import (
    BoundSockets,
    Listener,
    Worker,
    bind_listeners,
    core_config,
    new_event_loop,
    serve_forever,
    tcp_endpoints,
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
) -> None:
    """Entry point of a worker process (spawned), serving the listeners the supervisor bound.

    SIGINT/SIGTERM stop the worker; once stopping, further signals are ignored, so a stop
    signal sent to the whole process group (Ctrl-C, systemd) followed by the supervisor's own
    SIGTERM cannot kill the worker before it has reported its counters.
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
            loop.call_soon_threadsafe(running[0].reload_tls)

    signal.signal(signal.SIGHUP, on_hangup)

    def ready(worker: Worker) -> None:
        running.append(worker)
        conn.send(("ready", [(lst.transport.value, lst.local) for lst in worker.listeners]))
        if stop_requested:  # a stop signal came while the listeners were being bound
            worker.stop()

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
            )
        )
    except OSError as exc:
        conn.send(("error", f"cannot bind: {exc.strerror or exc}"))
        return
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        loop.close()
    conn.send(("counters", worker.core.counters.as_dict()))


class Supervisor:
    """Starts, watches and stops worker processes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
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

    def _spawn(self, index: int) -> tuple[Any, multiprocessing.connection.Connection]:
        parent, child = self.ctx.Pipe()
        args = (self.config, child, index, self.quotas, self.sockets[index])
        proc = self.ctx.Process(target=_worker_main, args=args, daemon=True)
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
            for index in range(self.config.workers):
                proc, conn = self._spawn(index)
                self.procs.append((proc, conn))
                bound = self._await_ready(proc, conn)
            self.listeners = [Listener(_transport(t), tuple(a)) for t, a in bound]
        except BaseException:
            self.stop()
            raise
        return self.listeners

    def run(self) -> RunResult:
        """Block until SIGINT/SIGTERM, restarting workers that die; then stop them.

        SIGHUP is passed on to every worker (each reloads the TLS certificate)."""
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        old = {s: signal.signal(s, lambda *_: os.write(wfd, b"x")) for s in _STOP_SIGNALS}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: os.write(wfd, b"h"))
        try:
            while True:
                sentinels = {proc.sentinel: i for i, (proc, _) in enumerate(self.procs)}
                ready = multiprocessing.connection.wait([rfd, *sentinels])
                if rfd in ready:
                    got = os.read(rfd, 64)
                    if b"x" in got:
                        break
                    self._forward(signal.SIGHUP)  # each worker reloads its certificate
                    continue
                for fd in ready:
                    self._replace(sentinels[fd])
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            os.close(rfd)
            os.close(wfd)
            self.stop()
        return self.result

    def _forward(self, sig: int) -> None:
        for proc, _ in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _replace(self, index: int) -> None:
        proc, conn = self.procs[index]
        proc.join(1.0)  # reap it, so exitcode is known
        log.error("worker %d (pid %d) exited with code %s", index, proc.pid, proc.exitcode)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
        if len(self._restarts) > MAX_RESTARTS:
            raise StartupError("workers keep dying; giving up")
        conn.close()
        if self.quotas is not None:
            self.quotas.reset_worker(index)  # its allocations died with it
        new_proc, new_conn = self._spawn(index)
        self.procs[index] = (new_proc, new_conn)
        self._await_ready(new_proc, new_conn)
        log.info("worker %d restarted (pid %d)", index, new_proc.pid)

    def _close_sockets(self) -> None:
        for bound in self.sockets:
            for _, sock in bound:
                sock.close()
        self.sockets.clear()

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc, conn in self.procs:
            while conn.poll(max(0.0, deadline - time.monotonic())):
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    break
                if kind == "counters":
                    self.result.counters.add(Counters(**payload))
                    break
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self.procs.clear()
        self._close_sockets()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _transport(name: str) -> Transport:
    return Transport(name)


def run_server(
    config: ServerConfig, on_ready: Callable[[ServerConfig, list[Listener]], None]
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
    if config.workers == 1:
        return _run_inline(config, on_ready)
    supervisor = Supervisor(config)
    on_ready(config, supervisor.start(checked=True))
    return supervisor.run()


def _run_inline(
    config: ServerConfig, on_ready: Callable[[ServerConfig, list[Listener]], None]
) -> RunResult:
    loop = new_event_loop()
    try:
        worker = loop.run_until_complete(
            serve_forever(config, on_ready=lambda w: on_ready(config, w.listeners))
        )
    except OSError as exc:
        raise StartupError(f"cannot bind: {exc.strerror or exc}") from None
    finally:
        loop.close()
    return RunResult(worker.core.counters)


__all__ = ["ConfigError", "RunResult", "StartupError", "Supervisor", "resolve_ports", "run_server"]
