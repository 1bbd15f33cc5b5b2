"""TCP and TLS client connections, their limits, and RFC 6062 peer connections.

:class:`StreamConnection` is one client connection over TCP or TLS: bytes in, framed STUN and
ChannelData to the core, responses and relayed data out. The limits that keep a public server
standing when someone opens connections and never finishes them:

* admission: at most ``ip_connection_quota`` connections per source IP and
  ``connection_quota`` in total (split evenly between workers); more are aborted at once and
  counted (``stream_refused``). TCP and TLS listeners hash a connection to a worker by source
  IP (see :mod:`stunturn.aio.workers`), so the per-IP count is exact;
* ``handshake_timeout``: the TLS handshake, and then the first complete message, must each
  arrive within it (a connection that says nothing is closed);
* ``message_timeout``: once a message has begun, all of it must arrive within it (slowloris);
  and no message may exceed 65,555 bytes, nor the bytes buffered twice that;
* ``idle_timeout``: a connection with no allocation and no traffic for that long is closed
  (one with an allocation lives as long as the allocation does);
* ``stream_buffer``: bytes queued for writing per connection. Above it the server stops
  reading from whatever feeds the connection (back-pressure) and drops relayed UDP datagrams
  for it (counted, ``stream_dropped``) rather than queueing without bound.

RFC 6062: :class:`TcpRelay` is the listening socket of a TCP allocation's relayed address,
:class:`PeerStream` a TCP connection between it and a peer. A client connection that sends a
successful ConnectionBind becomes a plain byte pipe to its peer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, cast

from ..server.actions import RelayTo, SendTo, Splice, Transport
from ..server.keys import address_key
from ..stun import Address, FramingError, Method, StreamFramer
from ..turn.allocation import Allocation, ChannelRoute, FiveTuple
from ..turn.tcp import CONNECT_TIMEOUT, PeerConnection
from .relay import UdpRelayBinder, relay_channel_data

if TYPE_CHECKING:
    from .server import Worker

_CONNECTION_BIND_REQUEST = int(Method.CONNECTION_BIND)
"""STUN message type of a ConnectionBind request (class bits zero)."""
PEER_BACKLOG = 16
"""Listen backlog of a TCP relayed address."""


class StreamConnection(asyncio.Protocol):
    """A TCP or TLS client connection: framing in, core, writes out."""

    def __init__(self, worker: Worker, transport_kind: Transport) -> None:
        self.worker = worker
        self.kind = transport_kind
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.local: Address = ("", 0)
        self.remote: Address = ("", 0)
        self.admitted = False
        self.paused_writing = False
        self.pipe: PeerStream | None = None
        """RFC 6062 data connection: the peer connection it is spliced to."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._started = False
        """A complete message has arrived (the handshake deadline is over)."""
        self._last = 0.0
        self._routes: dict[int, ChannelRoute] | None = None
        """The core's channel routes for this listener: ChannelData skips the core."""
        self._route_base = 0

    # --- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP and SSL transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        sockname, peername = (transport.get_extra_info(k) for k in ("sockname", "peername"))
        self.local = (sockname[0], sockname[1])
        self.remote = (peername[0], peername[1])
        worker = self.worker
        if not worker.admit(self.remote[0]):
            worker.core.counters.stream_refused += 1
            self.transport.abort()
            return
        self.admitted = True
        self.transport.set_write_buffer_limits(high=worker.config.stream_buffer)
        worker.connections.add(self)
        worker.streams[(self.kind, self.remote, self.local)] = self
        self._last = worker.loop.time()
        self._arm("first", worker.config.handshake_timeout)
        turn = worker.core.turn
        if turn is not None:
            self._routes = turn.route_table(self.kind, self.local)
            self._route_base = address_key(self.remote) << 16

    def data_received(self, data: bytes) -> None:
        if self.pipe is not None:
            self.pipe.to_peer(data)
            return
        transport = self.transport
        assert transport is not None
        worker = self.worker
        try:
            frames = self.framer.feed(data, _CONNECTION_BIND_REQUEST)
        except FramingError:
            worker.core.count_malformed()
            transport.abort()
            return
        now = worker.loop.time()
        self._last = now
        if frames:
            self._started = True
        handle = worker.core.handle_stream_frame
        routes = self._routes
        counters = worker.core.counters
        while frames:
            for frame in frames:
                if routes is not None and 0x40 <= frame[0] < 0x80:
                    # Client to peer over a channel: one lookup, one sendto (as over UDP).
                    route = routes.get(self._route_base | (frame[0] << 8) | frame[1])
                    if route is not None:
                        counters.received += 1
                        relay_channel_data(route, frame, now)
                        continue
                for action in handle(frame, self.local, self.remote, self.kind, now):
                    if isinstance(action, RelayTo):
                        worker.relay(action)
                    elif isinstance(action, Splice):
                        self._splice(action.peer_connection)
                    elif action.remote == self.remote:
                        transport.write(action.data)
            # Framing stops after a ConnectionBind; if it did not splice, go on framing.
            frames = [] if self.pipe is not None else self._more_frames(frames[-1])
        worker.rearm()
        if self.pipe is not None:
            rest = self.framer.take()
            if rest:
                self.pipe.to_peer(rest)
            return
        if not self._started:
            return  # the handshake deadline still runs
        if self.framer.buffered:
            if self._timer_kind != "message":
                self._arm("message", worker.config.message_timeout)
        elif self._timer_kind != "idle":
            self._arm("idle", worker.config.idle_timeout)

    def _more_frames(self, last: bytes) -> list[bytes]:
        if ((last[0] << 8) | last[1]) != _CONNECTION_BIND_REQUEST or not self.framer.buffered:
            return []
        try:
            return self.framer.feed(b"", _CONNECTION_BIND_REQUEST)
        except FramingError:
            self.worker.core.count_malformed()
            if self.transport is not None:
                self.transport.abort()
            return []

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self.admitted:
            return
        self.admitted = False
        worker = self.worker
        worker.release(self.remote[0])
        worker.connections.discard(self)
        five_tuple = (self.kind, self.remote, self.local)
        if worker.streams.get(five_tuple) is self:
            del worker.streams[five_tuple]
        turn = worker.core.turn
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            pipe.client = None
            if turn is not None:
                turn.tcp_closed(pipe.conn)
            pipe.close()
            return
        if turn is not None:
            # RFC 8656 section 3.1: an allocation over TCP/TLS ends with its connection.
            alloc = turn.allocations.get(five_tuple)
            if alloc is not None:
                turn.delete(alloc, "connection closed", worker.loop.time())
                worker.rearm()

    def pause_writing(self) -> None:
        # The client reads slower than we write: stop reading what produces the writes.
        self.paused_writing = True
        source = self.pipe.transport if self.pipe is not None else self.transport
        if source is not None:
            with contextlib.suppress(Exception):
                source.pause_reading()

    def resume_writing(self) -> None:
        self.paused_writing = False
        source = self.pipe.transport if self.pipe is not None else self.transport
        if source is not None:
            with contextlib.suppress(Exception):
                source.resume_reading()

    # --- RFC 6062 -----------------------------------------------------------------------------

    def _splice(self, peer_connection: object) -> None:
        assert isinstance(peer_connection, PeerConnection)
        pipe = peer_connection.io
        if not isinstance(pipe, PeerStream) or pipe.closed or self.transport is None:
            if self.worker.core.turn is not None:
                self.worker.core.turn.tcp_closed(peer_connection)
            if self.transport is not None:
                self.transport.close()
            return
        self._cancel_timer()
        self.pipe = pipe
        pipe.client = self
        if pipe.buffer:
            self.transport.write(bytes(pipe.buffer))
            pipe.buffer.clear()
        if pipe.transport is not None and not self.paused_writing:
            with contextlib.suppress(Exception):
                pipe.transport.resume_reading()

    def to_client(self, data: bytes) -> None:
        """Peer bytes for a spliced data connection."""
        if self.transport is not None:
            self.transport.write(data)

    # --- timers -------------------------------------------------------------------------------

    def _arm(self, kind: str, delay: float) -> None:
        self._cancel_timer()
        self._timer_kind = kind
        self._timer = self.worker.loop.call_later(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = ""

    def _on_timer(self) -> None:
        kind, self._timer, self._timer_kind = self._timer_kind, None, ""
        transport = self.transport
        if transport is None or self.pipe is not None:
            return
        worker = self.worker
        if kind != "idle":
            # Nothing, or half a message, for too long: a slow or hostile client.
            worker.core.counters.stream_timeouts += 1
            transport.abort()
            return
        turn = worker.core.turn
        if turn is not None and (self.kind, self.remote, self.local) in turn.allocations:
            # The allocation's own lifetime bounds this connection (RFC 8656 section 3.1:
            # closing it would delete the allocation); clients refresh only near expiry.
            self._arm("idle", worker.config.idle_timeout)
            return
        remaining = self._last + worker.config.idle_timeout - worker.loop.time()
        if remaining > 0:
            self._arm("idle", remaining)
            return
        transport.close()


class PeerStream(asyncio.Protocol):
    """A TCP connection between a TCP allocation's relayed address and a peer (RFC 6062)."""

    def __init__(self, worker: Worker, conn: PeerConnection) -> None:
        self.worker = worker
        self.conn = conn
        conn.io = self
        self.transport: asyncio.Transport | None = None
        self.client: StreamConnection | None = None
        self.buffer = bytearray()
        """Peer bytes that arrived before the client's ConnectionBind."""
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        """Connecting (Connect) or wrapping an accepted socket."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.closed:
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=self.worker.config.stream_buffer)

    def data_received(self, data: bytes) -> None:
        alloc: Allocation = self.conn.allocation
        alloc.bytes_to_client += len(data)
        alloc.packets_to_client += 1
        client = self.client
        if client is not None:
            client.to_client(data)
            return
        self.buffer += data
        if len(self.buffer) >= self.worker.config.stream_buffer and self.transport is not None:
            self.transport.pause_reading()  # buffered until ConnectionBind; no more for now

    def to_peer(self, data: bytes) -> None:
        alloc = self.conn.allocation
        alloc.bytes_to_peer += len(data)
        alloc.packets_to_peer += 1
        if self.transport is not None:
            self.transport.write(data)

    def pause_writing(self) -> None:
        client = self.client
        if client is not None and client.transport is not None:
            with contextlib.suppress(Exception):
                client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None and client.transport is not None:
            with contextlib.suppress(Exception):
                client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        turn = self.worker.core.turn
        if turn is not None:
            turn.tcp_closed(self.conn)
        self._close_client()

    def close(self) -> None:
        """Close this connection (or stop connecting) and the client data connection."""
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()
        self._close_client()

    def _close_client(self) -> None:
        """Close the spliced client data connection (after what is queued for it)."""
        client, self.client = self.client, None
        if client is not None:
            client.pipe = None
            if client.transport is not None:
                client.transport.close()


class TcpRelay:
    """The listening socket of a TCP allocation's relayed address (a ``RelayHandle``)."""

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        host, port = sock.getsockname()[:2]
        self.address: Address = (host, port)
        self.allocation: Allocation | None = None

    def sendto(self, data: bytes | memoryview, peer: Address, /) -> int:
        raise OSError("a TCP relayed address sends no datagrams")

    def on_readable(self) -> None:
        """Peers connecting: accepted, or closed at once (RFC 6062 section 5.3)."""
        worker = self.worker
        turn = worker.core.turn
        for _ in range(PEER_BACKLOG):
            try:
                sock, addr = self.sock.accept()
            except OSError:
                return
            conn = None
            actions: list[SendTo] = []
            if turn is not None:
                conn, actions = turn.tcp_incoming(self, (addr[0], addr[1]), worker.loop.time())
            if conn is None:
                sock.close()
                continue
            sock.setblocking(False)
            stream = PeerStream(worker, conn)
            stream.task = worker.loop.create_task(_wrap_accepted(worker, stream, sock))
            for action in actions:
                worker.send(action)
            worker.rearm()


async def _wrap_accepted(worker: Worker, stream: PeerStream, sock: socket.socket) -> None:
    try:
        await worker.loop.connect_accepted_socket(lambda: stream, sock)
    except (OSError, asyncio.CancelledError):
        sock.close()
        stream.connection_lost(None)


class RelayBinder(UdpRelayBinder):
    """UDP relay sockets, plus the TCP side of RFC 6062 (implements ``TcpRelayBinder``)."""

    def bind_tcp(self, host: str, port: int, five_tuple: FiveTuple) -> TcpRelay | None:
        sock = _tcp_socket(host)
        try:
            sock.bind((host, port))
            sock.listen(PEER_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        relay = TcpRelay(self.worker, sock)
        self.worker.loop.add_reader(relay.fd, relay.on_readable)
        return relay

    def connect_tcp(self, conn: PeerConnection, relay: object) -> None:
        assert isinstance(relay, TcpRelay)
        stream = PeerStream(self.worker, conn)
        stream.task = self.worker.loop.create_task(self._connect(stream, relay.address))

    async def _connect(self, stream: PeerStream, relay: Address) -> None:
        worker = self.worker
        loop = worker.loop
        conn = stream.conn
        sock = _tcp_socket(relay[0])
        actions: list[SendTo] = []
        turn = worker.core.turn
        assert turn is not None
        try:
            sock.bind(relay)  # the peer sees the relayed address (SO_REUSEPORT allows it)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, conn.peer), CONNECT_TIMEOUT)
            await loop.create_connection(lambda: stream, sock=sock)
        except (TimeoutError, OSError):
            sock.close()
            stream.closed = True
            actions = turn.tcp_connect_failed(conn, loop.time())
        except asyncio.CancelledError:
            sock.close()
            raise
        else:
            actions = turn.tcp_connected(conn, loop.time())
            if not actions:
                stream.close()  # the allocation went away meanwhile
        for action in actions:
            worker.send(action)
        worker.rearm()

    def close_tcp(self, conn: PeerConnection) -> None:
        stream = conn.io
        if isinstance(stream, PeerStream):
            stream.close()

    def close(self, handle: object) -> None:
        if isinstance(handle, TcpRelay):
            with contextlib.suppress(Exception):
                self.worker.loop.remove_reader(handle.fd)
            handle.sock.close()
            return
        super().close(handle)


def _tcp_socket(host: str) -> socket.socket:
    v6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    # Outgoing connections of a TCP allocation bind its relayed address too, beside the
    # listening socket: SO_REUSEPORT on all of them lets the kernel allow that.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


__all__ = ["PeerStream", "RelayBinder", "StreamConnection", "TcpRelay"]
