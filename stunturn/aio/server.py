"""The asyncio layer of the server: sockets in, :class:`ServerCore` in the middle, sockets out.

One :class:`Worker` runs per process. It binds every listener itself (with SO_REUSEPORT when
several workers share the addresses), feeds what arrives to its core, carries out the actions
and keeps the core's one timer armed. The UDP path reads in a drain loop from one reader
callback per socket (batched ``recvmmsg`` where available), which costs far less per datagram
than a transport and protocol object.

Two hot paths never reach the core's general code: Binding requests without attributes
(:meth:`ServerCore.fast_udp`) and ChannelData from clients, which is one dict lookup in the
route table the core keeps current and one ``sendto`` on the relay socket. The peer-to-client
direction is in :mod:`stunturn.aio.relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import resource
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ..config import Endpoint, ServerConfig
from ..server.actions import Action, RelayTo, SendTo, Splice, Transport
from ..server.binding import AlternateAddresses
from ..server.core import CoreConfig, ServerCore, source_key
from ..server.keys import IPV6_KEY_BIT, address_key
from ..stun import Address
from ..turn import Allocation, ChannelRoute, Quotas
from .metrics import RelayTotals, WorkerSnapshot, take_snapshot
from .mmsg import LEN_OFFSET, MSG_SIZE, NAME, SLOT, BatchIO, address_to_sockaddr
from .mmsg import available as mmsg_available
from .relay import RelaySocket, relay_channel_data
from .reload import ReloadSource, apply_configuration
from .stream import RelayBinder, StreamConnection
from .tls import server_context
from .turnsetup import build_turn, external_addresses, prepare

log = logging.getLogger("stunturn.server")
_U32 = struct.Struct("I")
_CHANNEL_HEAD = struct.Struct("!HH")
"""ChannelData header: channel number, length."""
_NAME_HEAD = struct.Struct("!HHI")
"""A raw sockaddr's family (read big-endian, see _AF_INET_BE), port and IPv4 address."""
_AF_INET_BE = struct.unpack("!H", socket.AF_INET.to_bytes(2, sys.byteorder))[0]
"""AF_INET as :data:`_NAME_HEAD` reads the host-order family field."""

UDP_BATCH = 256
"""Most datagrams read per readiness callback before yielding to other sockets."""
UDP_RECV_SIZE = 65536


@dataclass(frozen=True, slots=True)
class Listener:
    """A bound listener, for reporting where the server listens."""

    transport: Transport
    local: Address

    def __str__(self) -> str:
        host, port = self.local
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{self.transport.value} {shown}"


def core_config(config: ServerConfig) -> CoreConfig:
    """Derive the core's settings from the user-facing configuration."""
    rfc5780 = None
    if config.alt_address is not None:
        primary = config.primary_for(Endpoint(config.alt_address, 0))
        assert primary is not None  # ServerConfig.validate guarantees it
        rfc5780 = AlternateAddresses(
            primary.host, config.alt_address, primary.port, primary.port + 1
        )
    return CoreConfig(
        rfc5780=rfc5780,
        software=config.software,
        response_rate=config.response_rate,
        response_burst=float(config.response_burst),
        external=external_addresses(config),
    )


def udp_endpoints(config: ServerConfig, core: CoreConfig) -> list[Endpoint]:
    """Every UDP address to bind: the listen addresses plus the RFC 5780 grid."""
    endpoints = list(config.listen) if config.udp else []
    if core.rfc5780 is not None:
        endpoints += [Endpoint(h, p) for h, p in core.rfc5780.listeners()]
    return list(dict.fromkeys(endpoints))


def tcp_endpoints(config: ServerConfig, core: CoreConfig) -> list[Endpoint]:
    """Every plain TCP address to bind (RFC 5780 grid included so OTHER-ADDRESS works)."""
    if not config.tcp:
        return []
    endpoints = list(config.listen)
    if core.rfc5780 is not None:
        endpoints += [Endpoint(h, p) for h, p in core.rfc5780.listeners()]
    return list(dict.fromkeys(endpoints))


UDP_LISTENER_BUFFER = 8 * 1024 * 1024
"""Receive/send buffer of each UDP listener: absorbs bursts while a worker is descheduled."""
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # Linux; not exported by the socket module


def set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size``-byte socket buffers, beyond net.core.[rw]mem_max when privileged."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


BoundSockets = list[tuple[Transport, socket.socket]]


def bind_listeners(config: ServerConfig, core: CoreConfig, reuse_port: bool) -> BoundSockets:
    """Bind every listener of one worker: UDP, TCP and TLS. Closes all on failure."""
    bound: BoundSockets = []
    try:
        for ep in udp_endpoints(config, core):
            bound.append((Transport.UDP, bind_socket(ep, socket.SOCK_DGRAM, reuse_port)))
        for ep in tcp_endpoints(config, core):
            bound.append((Transport.TCP, bind_socket(ep, socket.SOCK_STREAM, reuse_port)))
        for ep in config.tls_listen:
            bound.append((Transport.TLS, bind_socket(ep, socket.SOCK_STREAM, reuse_port)))
    except BaseException:
        for _, sock in bound:
            sock.close()
        raise
    return bound


def bind_socket(ep: Endpoint, kind: socket.SocketKind, reuse_port: bool) -> socket.socket:
    """Create, configure and bind a non-blocking socket for ``ep``."""
    family = socket.AF_INET6 if ep.family_v6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            # The IPv4 and IPv6 wildcards are separate listeners.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_DGRAM:
            set_buffers(sock, UDP_LISTENER_BUFFER)
        sock.bind((ep.host, ep.port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpListener:
    """One bound UDP socket, read in a drain loop from a reader callback."""

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        host, port = sock.getsockname()[:2]
        self.local: Address = (host, port)
        self.v6 = sock.family == socket.AF_INET6
        turn = worker.core.turn
        self.routes: dict[int, ChannelRoute] = (
            turn.route_table(Transport.UDP, self.local) if turn is not None else {}
        )

    def on_readable(self) -> None:
        """Plain path: one ``recvfrom``/``sendto`` per datagram (no batched I/O here)."""
        sock = self.sock
        recv = sock.recvfrom
        sendto = sock.sendto
        core = self.worker.core
        fast = core.fast_udp
        handle = core.handle_udp_slow
        send = self.worker.send
        local = self.local
        v6 = self.v6
        key = source_key
        routes = self.routes
        now = self.worker.loop.time()
        for _ in range(UDP_BATCH):
            try:
                data, addr = recv(UDP_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # e.g. a queued ICMP error on Linux; nothing to do for this datagram.
                continue
            if v6:
                addr = addr[:2]
            if len(data) >= 4 and 0x40 <= data[0] < 0x80:
                route = routes.get((address_key(addr) << 16) | (data[0] << 8) | data[1])
                if route is not None:
                    relay_channel_data(route, data, now)
                    continue
            elif not v6:
                response = fast(data, local, key(addr[0]), addr[1], now)
                if response is not None:
                    if response:
                        try:
                            sendto(response, addr)
                        except OSError:
                            core.counters.send_failed += 1
                    continue
            for action in handle(data, local, addr, now):
                send(action)
        self.worker.rearm()

    def _forward(self, io: BatchIO, forward: dict[ChannelRoute, list[int]]) -> None:
        """Send the grouped client-to-peer ChannelData payloads, one sendmmsg per route.

        A route with a single payload in this batch uses the socket's own ``sendto`` on a view
        of the receive slot: for one datagram that costs about 2 us less than a ``sendmmsg``
        through ctypes, which pays off from two datagrams on (``bench/micro.py send``)."""
        rx = io.rx
        for route, items in forward.items():
            if len(items) == 2:
                start = items[0] * SLOT + 4
                try:
                    cast(RelaySocket, route.relay).sendto(rx[start : start + items[1]], route.peer)
                except OSError:
                    self.worker.core.counters.send_failed += 1
                continue
            name = route.io_cache
            if name is None:
                name = route.io_cache = address_to_sockaddr(route.peer)
            relay = cast(RelaySocket, route.relay)
            failed = io.send_received(relay.fd, items, 4, cast(bytes, name))
            if failed:
                self.worker.core.counters.send_failed += failed
        forward.clear()

    def on_readable_batched(self) -> None:
        """Batched path: ``recvmmsg`` up to 32 datagrams, answer the common Binding requests
        straight into the transmit slots, ``sendmmsg`` them in one call."""
        io = self.worker.batch_io
        assert io is not None
        fd = self.fd
        core = self.worker.core
        fast = core.fast_udp
        handle = core.handle_udp_slow
        send = self.worker.send
        local = self.local
        v6 = self.v6
        rx, tx, names, hdrs = io.rx, io.tx, io.names, io.rxhdrs
        unpack_u32 = _U32.unpack_from
        unpack_channel = _CHANNEL_HEAD.unpack_from
        unpack_name = _NAME_HEAD.unpack_from
        af_inet = _AF_INET_BE
        from_bytes = int.from_bytes
        batch = io.batch
        now = self.worker.loop.time()
        routes = self.routes
        forward: dict[ChannelRoute, list[int]] = {}
        for _ in range(UDP_BATCH // batch):
            n = io.recv(fd, v6)
            for i in range(n):
                off = i * SLOT
                size = unpack_u32(hdrs, i * MSG_SIZE + LEN_OFFSET)[0]
                noff = i * NAME
                channel, length = unpack_channel(rx, off) if size >= 4 else (0, 0)
                if 0x4000 <= channel < 0x8000:
                    # ChannelData: one lookup keyed by (client address, channel).
                    family, port, ip = unpack_name(names, noff)
                    if family != af_inet:
                        ip = IPV6_KEY_BIT | from_bytes(names[noff + 8 : noff + 24], "big")
                    route = routes.get((((ip << 16) | port) << 16) | channel)
                    if route is not None:
                        # Client to peer: checked here, sent below with one sendmmsg per route.
                        alloc = route.allocation
                        if (
                            length <= size - 4
                            and route.peer_ip in alloc.permissions
                            and (not alloc.max_bps or alloc.within_rate(length, False, now))
                        ):
                            alloc.bytes_to_peer += length
                            alloc.packets_to_peer += 1
                            group = forward.get(route)
                            if group is None:
                                forward[route] = [i, length]
                            else:
                                group += (i, length)
                        continue
                    data = rx[off : off + size]
                else:
                    data = rx[off : off + size]
                    family, port, ip = unpack_name(names, noff)
                    if family == af_inet:
                        response = fast(data, local, ip, port, now)
                        if response is not None:
                            if response:
                                size = len(response)
                                tx[off : off + size] = response
                                io.queue(i, size)
                            continue
                if forward:
                    # ChannelData received before this message goes out first: the message
                    # may end its allocation (Refresh 0) and close the relay socket.
                    self._forward(io, forward)
                remote = io.address(i)
                actions = handle(bytes(data), local, remote, now)
                if len(actions) == 1:
                    # The usual answer, one datagram back to its sender: into the transmit
                    # slot, out with the batch's sendmmsg.
                    action = actions[0]
                    if (
                        type(action) is SendTo
                        and action.remote == remote
                        and action.local == local
                        and action.transport is Transport.UDP
                    ):
                        reply = action.data
                        size = len(reply)
                        tx[off : off + size] = reply
                        io.queue(i, size)
                        continue
                for action in actions:
                    send(action)
            if forward:
                self._forward(io, forward)
            failed = io.flush(fd)
            if failed:
                core.counters.send_failed += failed
            if n < batch:
                break
        self.worker.rearm()


GC_THRESHOLDS = (10_000, 20, 20)
"""Generation thresholds of a serving process (Python's defaults: 700, 10, 10)."""


class Worker:
    """Binds the listeners of one process and serves them until :meth:`stop`."""

    def __init__(
        self,
        config: ServerConfig,
        reuse_port: bool = False,
        *,
        index: int = 0,
        quotas: Quotas | None = None,
        reload_source: ReloadSource | None = None,
    ) -> None:
        self.config = config
        self.reload_source = reload_source
        """Where the configuration came from, read again on SIGHUP (None: certificate only)."""
        self.index = index
        self.core_config = core_config(config)
        self.loop = asyncio.get_running_loop()
        self.udp: dict[Address, UdpListener] = {}
        self.streams: dict[tuple[Transport, Address, Address], StreamConnection] = {}
        turn = None
        self.relay_binder: RelayBinder | None = None
        if config.turn:
            self.relay_binder = RelayBinder(self)
            turn = build_turn(config, self.relay_binder, index, config.workers, quotas)
            turn.clock_offset = time.time() - self.loop.time()
        self.core = ServerCore(self.core_config, turn)
        self.ended = RelayTotals()
        """What the allocations that ended relayed (for the metrics; added once per allocation)."""
        if turn is not None:
            # Every end of an allocation (expiry, Refresh 0, a closed connection, shutdown)
            # reports it once: its counters are added there, never per packet.
            turn.on_deleted = self.ended.add
        self.serving = False
        """True from the end of :meth:`start` until :meth:`stop`."""
        self.draining = False
        """Set to take the worker out of rotation: ``/ready`` answers 503 (hook for draining)."""
        self.reuse_port = reuse_port
        self.servers: list[asyncio.Server] = []
        self.connections: set[StreamConnection] = set()
        self.listeners: list[Listener] = []
        self._stopped = asyncio.Event()
        self.batch_io = BatchIO() if mmsg_available() else None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.ip_streams: dict[str, int] = {}
        """Open TCP/TLS connections per source IP (admitted ones)."""
        workers = max(1, config.workers)
        self.max_streams = -(-config.connection_quota // workers) if config.connection_quota else 0
        """This worker's share of ``connection_quota`` (0: unlimited)."""

    # --- stream admission ----------------------------------------------------------------------

    def admit(self, ip: str) -> bool:
        """Count a new TCP/TLS connection from ``ip``; False when a limit is reached."""
        config = self.config
        if self.max_streams and len(self.connections) >= self.max_streams:
            return False
        count = self.ip_streams.get(ip, 0)
        if config.ip_connection_quota and count >= config.ip_connection_quota:
            return False
        self.ip_streams[ip] = count + 1
        return True

    def release(self, ip: str) -> None:
        count = self.ip_streams.get(ip, 0) - 1
        if count > 0:
            self.ip_streams[ip] = count
        else:
            self.ip_streams.pop(ip, None)

    def reload(self) -> None:
        """SIGHUP: the configuration (see :mod:`stunturn.aio.reload`), then the certificate."""
        if self.reload_source is not None and not apply_configuration(self, self.reload_source):
            return
        self.reload_tls()

    def reload_tls(self) -> bool:
        """Load the certificate and key files again (SIGHUP): new handshakes use them, open
        connections keep theirs. On error the old certificate stays; returns False."""
        ctx = self.tls_context
        config = self.config
        if ctx is None or config.cert is None or config.key is None:
            return False
        try:
            # Tried on a scratch context first: a failed load can leave a context with the
            # new certificate and the old key.
            server_context(config.cert, config.key)
            ctx.load_cert_chain(config.cert, config.key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "certificate reload failed, keeping the old one: %s or %s: %s",
                config.cert,
                config.key,
                exc,
            )
            return False
        log.info("certificate reloaded from %s", config.cert)
        return True

    async def start(self, sockets: BoundSockets | None = None) -> list[Listener]:
        """Serve every listener; raises OSError (e.g. address in use) with nothing left bound.

        ``sockets`` are listeners the supervisor bound for this worker; without them the
        worker binds its own.
        """
        try:
            bound = sockets if sockets is not None else bind_listeners(
                self.config, self.core_config, self.reuse_port
            )  # fmt: skip
            for kind, sock in bound:
                if kind is Transport.UDP:
                    listener = UdpListener(self, sock)
                    self.udp[listener.local] = listener
                    on_readable = listener.on_readable
                    reader = listener.on_readable_batched if self.batch_io else on_readable
                    self.loop.add_reader(sock.fileno(), reader)
                    self.listeners.append(Listener(Transport.UDP, listener.local))
            ctx = None
            if self.config.tls_listen:
                assert self.config.cert is not None and self.config.key is not None
                ctx = self.tls_context = server_context(self.config.cert, self.config.key)
            for kind, sock in bound:
                if kind is not Transport.UDP:
                    await self._start_stream(sock, kind, ctx if kind is Transport.TLS else None)
        except BaseException:
            await self.close()
            raise
        self.serving = True
        return self.listeners

    async def _start_stream(
        self, sock: socket.socket, kind: Transport, ctx: ssl.SSLContext | None
    ) -> None:
        try:
            server = await self.loop.create_server(
                lambda: StreamConnection(self, kind),
                sock=sock,
                ssl=ctx,
                ssl_handshake_timeout=self.config.handshake_timeout if ctx else None,
                backlog=1024,
            )
        except BaseException:
            sock.close()
            raise
        self.servers.append(server)
        host, port = sock.getsockname()[:2]
        self.listeners.append(Listener(kind, (host, port)))

    def send(self, action: Action) -> None:
        """Carry out an action: a UDP SendTo from the listener bound to ``action.local``, or a
        RelayTo from a relay socket."""
        if isinstance(action, RelayTo):
            self.relay(action)
            return
        if isinstance(action, Splice):
            return  # only a stream connection carries these out, on itself
        if action.transport is not Transport.UDP:
            conn = self.streams.get((action.transport, action.remote, action.local))
            if conn is not None and conn.transport is not None:
                conn.transport.write(action.data)
            return
        listener = self.udp.get(action.local)
        if listener is None:
            self.core.counters.send_failed += 1
            return
        try:
            listener.sock.sendto(action.data, action.remote)
        except OSError as exc:
            # A full socket buffer or an unreachable destination loses one datagram, as UDP may.
            self.core.counters.send_failed += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED):
                log.debug("sendto %s failed: %s", action.remote, exc)

    def relay(self, action: RelayTo) -> None:
        relay = action.relay
        assert isinstance(relay, RelaySocket)
        relay.send(action.data, action.peer)

    def send_stream(self, alloc: Allocation | None, frame: bytes, count: int = 1) -> None:
        """Peer data for a client on TCP/TLS: write it to the allocation's connection."""
        if alloc is None:
            return
        conn = self.streams.get(alloc.five_tuple)
        if conn is not None and conn.transport is not None:
            if conn.paused_writing:
                # The client is not reading: drop datagrams rather than queue them unbounded.
                self.core.counters.stream_dropped += count
                return
            conn.transport.write(frame)

    # --- the core's one timer ---------------------------------------------------------------

    def rearm(self) -> None:
        """Arm the timer for the core's next deadline, if earlier than the one armed."""
        deadline = self.core.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = self.loop.time()
        turn = self.core.turn
        if turn is not None:
            turn.clock_offset = time.time() - now
        self.core.on_timer(now)
        self.rearm()

    def stop(self) -> None:
        self.serving = False
        self._stopped.set()

    def snapshot(self, sessions: bool = False) -> WorkerSnapshot:
        """Gauges and counters for the metrics (and the live allocations when ``sessions``)."""
        return take_snapshot(self, sessions)

    def start_drain(self, when_drained: Callable[[], None] | None = None) -> None:
        """SIGUSR1: take no new allocations, keep serving the live ones and Binding, and call
        ``when_drained`` (default :meth:`stop`) once the last allocation has ended or
        ``drain-timeout`` has passed (both decided by the TURN service on the core's timer).
        Idempotent."""
        self.draining = True
        done = when_drained or self.stop
        turn = self.core.turn
        if turn is None:
            log.info("drain: no TURN allocations to wait for")
            done()
            return
        if turn.draining:
            return
        now = self.loop.time()
        turn.on_drained = done
        turn.start_drain(now, now + self.config.drain_timeout)
        self.rearm()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        """Unbind everything and close open connections."""
        if self._timer is not None:
            self._timer.cancel()
        if self.core.turn is not None:
            self.core.turn.close_all()
        if self.relay_binder is not None:
            self.relay_binder.poller.close()
        for listener in self.udp.values():
            self.loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
        self.udp.clear()
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self.servers.clear()


async def serve_forever(
    config: ServerConfig,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[Worker], None] | None = None,
    install_signals: bool = True,
    index: int = 0,
    quotas: Quotas | None = None,
    sockets: BoundSockets | None = None,
    reload_source: ReloadSource | None = None,
) -> Worker:
    """Run one worker until SIGINT/SIGTERM (or :meth:`Worker.stop`); returns it, closed.

    SIGHUP reloads the configuration and the certificate (:meth:`Worker.reload`); SIGUSR1 drains
    (:meth:`Worker.start_drain`), and the worker stops once drained."""
    raise_fd_limit()
    worker = Worker(
        prepare(config), reuse_port, index=index, quotas=quotas, reload_source=reload_source
    )
    await worker.start(sockets)
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        loop.add_signal_handler(signal.SIGHUP, worker.reload)
        loop.add_signal_handler(signal.SIGUSR1, worker.start_drain)
    try:
        if on_ready is not None:
            on_ready(worker)
        await worker.wait_stopped()
    finally:
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
        await worker.close()
    return worker


def tune_gc() -> None:
    """Move everything alive after start-up out of the collector's sight and collect less often.

    The objects made at start-up (modules, configuration, listeners) live as long as the
    process; :func:`gc.freeze` stops every full collection from walking them again. A larger
    first-generation threshold runs the young collection every 10,000 new container objects
    instead of every 700: a TURN request makes dozens of short-lived ones, nearly all freed by
    reference counting, and the per-collection cost is what remains. Measured in
    docs/performance.md (allocation rate).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: each allocation holds a socket."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (Linux), the standard loop otherwise."""
    try:
        import uvloop  # noqa: PLC0415 - optional dependency
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
