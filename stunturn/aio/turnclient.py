"""The asyncio TURN client: one socket (UDP) or stream (TCP/TLS) around :class:`TurnClientCore`.

All protocol logic lives in :mod:`stunturn.turn.client`; this module feeds the core what
arrives, writes what it returns, keeps one timer armed at its next deadline, and turns its
events into awaitable results::

    async with await TurnClient.connect("turn:turn.example.org", "alice", "secret") as client:
        await client.create_permission("192.0.2.7")
        client.send(("192.0.2.7", 5000), b"hello")
        peer, data = await client.receive()

Errors from the server (and timeouts, and a lost connection) raise :class:`TurnClientError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar, cast

from ..server.actions import Transport
from ..stun import Address
from ..stun.transaction import RFC8489_DEFAULT, RetransmitPolicy
from ..turn.client import (
    Allocated,
    ChannelBindFailed,
    ChannelBound,
    ClientStats,
    Closed,
    DataReceived,
    Failed,
    Output,
    PermissionCreated,
    PermissionFailed,
    Refreshed,
    State,
    Transmit,
    TurnClientCore,
    normalize_ip,
    normalize_peer,
)
from ..turn.url import IceServerUrl, parse_ice_url

log = logging.getLogger("stunturn.aio.turnclient")

_K = TypeVar("_K")
_V = TypeVar("_V")

ServerSpec = IceServerUrl | str | tuple[str, int, str, bool]
"""A ``turn:``/``turns:`` URL (parsed or not), or (host, port, "udp"|"tcp", tls)."""
DataCallback = Callable[[Address, bytes], None]

RECEIVE_QUEUE = 1024
"""Datagrams kept for :meth:`TurnClient.receive` when no ``on_data`` callback is given."""
MAX_WRITE_BUFFER = 4 * 1024 * 1024
"""Over TCP/TLS, data beyond this many unsent bytes is dropped rather than buffered."""
CLOSE_TIMEOUT = 5.0


class TurnClientError(Exception):
    """The server refused a request (``code`` is its ERROR-CODE), or it did not answer, or the
    connection broke (``code`` is None)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{reason}" if code is None or str(code) in reason else f"{code} {reason}")
        self.code = code
        self.reason = reason


def server_endpoint(server: ServerSpec) -> tuple[str, int, Transport]:
    """(host, port, transport) of a TURN server given as a URL or a tuple."""
    if isinstance(server, str):
        server = parse_ice_url(server)
    if isinstance(server, IceServerUrl):
        if not server.is_turn:
            raise ValueError(f"{server} is a STUN URL, not a TURN URL")
        if server.transport == "udp":
            return server.host, server.port, Transport.UDP
        return server.host, server.port, Transport.TLS if server.secure else Transport.TCP
    host, port, transport, tls = server
    if transport not in ("udp", "tcp"):
        raise ValueError(f"transport must be 'udp' or 'tcp', not {transport!r}")
    if tls and transport == "udp":
        raise ValueError("TLS over UDP (DTLS) is not supported")
    kind = Transport.TLS if tls else Transport(transport)
    return host, port, kind


class _Stream(asyncio.Protocol):
    """The TCP/TLS connection to the server."""

    def __init__(self, client: TurnClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = client._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.client._connection_lost(exc)


class TurnClient:
    """An allocation on a TURN server, over UDP, TCP or TLS. Create it with :meth:`connect`."""

    def __init__(
        self,
        core: TurnClientCore,
        on_data: DataCallback | None,
        server: tuple[str, int],
    ) -> None:
        self._core = core
        self._loop = asyncio.get_running_loop()
        self._on_data = on_data
        self.server = server
        """(host, port) as given."""
        self.transport = core.transport
        self._sock: socket.socket | None = None
        self._stream: _Stream | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._allocated: asyncio.Future[None] = self._loop.create_future()
        self._permission_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._channel_waiters: dict[Address, list[asyncio.Future[int]]] = {}
        self._refresh_waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._closed = asyncio.Event()
        self._queue: asyncio.Queue[tuple[Address, bytes] | None] = asyncio.Queue(RECEIVE_QUEUE)
        self.error: TurnClientError | None = None
        """Why the client stopped working, once it has."""
        self.dropped = 0
        """Datagrams not sent or not delivered: full socket or stream buffer, full receive
        queue (datagrams dropped inside the core are in ``stats``)."""

    # --- construction ---------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        server: ServerSpec,
        username: str,
        password: str,
        *,
        on_data: DataCallback | None = None,
        lifetime: int | None = 600,
        family: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        local_address: Address | None = None,
        connect_timeout: float = 10.0,
        policy: RetransmitPolicy = RFC8489_DEFAULT,
    ) -> TurnClient:
        """Connect to ``server`` and allocate a UDP relay.

        Args:
            server: ``turn:``/``turns:`` URL (str or parsed) or (host, port, transport, tls).
            username, password: long-term credentials.
            on_data: called with (peer, data) for each datagram relayed to us; without it,
                datagrams wait for :meth:`receive`.
            lifetime: LIFETIME to ask for (None: the server's default).
            family: REQUESTED-ADDRESS-FAMILY (``stunturn.stun.FAMILY_IPV6`` for an IPv6 relay).
            ssl_context: for TLS; the default verifies the server's certificate.
            server_hostname: name to verify in the certificate (default: the URL's host).
            local_address: where to bind the socket.
            connect_timeout: seconds for connecting and allocating together.
            policy: retransmission timing.

        Raises:
            TurnClientError: the connection or the allocation failed or timed out.
            ValueError: a bad URL or argument.
        """
        host, port, kind = server_endpoint(server)
        core = TurnClientCore(
            username, password, transport=kind, lifetime=lifetime, family=family, policy=policy
        )
        client = cls(core, on_data, (host, port))
        try:
            async with asyncio.timeout(connect_timeout):
                await client._open(host, port, ssl_context, server_hostname, local_address)
                client._run(core.allocate(client._loop.time()))
                await client._allocated
        except TimeoutError:
            await client._teardown()
            raise TurnClientError(
                None, f"no allocation from {host}:{port} ({kind}) within {connect_timeout} s"
            ) from None
        except OSError as exc:
            await client._teardown()
            raise TurnClientError(None, f"cannot connect to {host}:{port} ({kind}): {exc}") from exc
        except BaseException:
            await client._teardown()
            raise
        return client

    async def _open(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        local_address: Address | None,
    ) -> None:
        if self.transport is Transport.UDP:
            family = socket.AF_UNSPEC
            if local_address is not None:
                family = socket.AF_INET6 if ":" in local_address[0] else socket.AF_INET
            infos = await self._loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
            if not infos:
                raise OSError(f"cannot resolve {host}")
            af, _, _, _, address = infos[0]
            sock = socket.socket(af, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                if local_address is not None:
                    sock.bind(local_address)
                sock.connect(address)  # the kernel then drops datagrams from anyone else
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._loop.add_reader(sock.fileno(), self._readable)
            return
        tls: ssl.SSLContext | None = None
        if self.transport is Transport.TLS:
            tls = ssl_context if ssl_context is not None else ssl.create_default_context()
        _, protocol = await self._loop.create_connection(
            lambda: _Stream(self),
            host,
            port,
            ssl=tls,
            server_hostname=(server_hostname or host) if tls is not None else None,
            local_addr=local_address,
        )
        self._stream = protocol

    # --- what callers see -------------------------------------------------------------------

    @property
    def relayed_address(self) -> Address:
        """The address peers send to."""
        assert self._core.relayed_address is not None
        return self._core.relayed_address

    @property
    def mapped_address(self) -> Address | None:
        """Our address as the server sees it (XOR-MAPPED-ADDRESS)."""
        return self._core.mapped_address

    @property
    def lifetime(self) -> int:
        """Seconds granted by the last Allocate or Refresh."""
        return self._core.lifetime

    @property
    def local_address(self) -> Address:
        if self._sock is not None:
            host, port = self._sock.getsockname()[:2]
            return (host, port)
        assert self._stream is not None and self._stream.transport is not None
        host, port = self._stream.transport.get_extra_info("sockname")[:2]
        return (host, port)

    @property
    def stats(self) -> ClientStats:
        return self._core.stats

    @property
    def channels(self) -> dict[Address, int]:
        return self._core.channels

    @property
    def closed(self) -> bool:
        """Closed or failed: nothing more can be sent."""
        return self._closed.is_set()

    async def create_permission(self, *ips: str) -> None:
        """Install permissions for peer IPs (kept while data flows; see the core's notes)."""
        self._check()
        wanted = [normalize_ip(ip) for ip in ips]
        futures = [self._wait(self._permission_waiters, ip) for ip in wanted]
        self._run(self._core.create_permission(wanted, self._loop.time()))
        await asyncio.gather(*futures)

    async def bind_channel(self, peer: Address) -> int:
        """Bind a channel to ``peer``; data to it then goes as ChannelData. Returns the number."""
        self._check()
        peer = normalize_peer(peer)
        future = self._wait(self._channel_waiters, peer)
        self._run(self._core.bind_channel(peer, self._loop.time()))
        return await future

    async def refresh(self) -> int:
        """Refresh the allocation now (it is refreshed automatically); returns the lifetime."""
        self._check()
        future = self._wait(self._refresh_waiters, 0)
        self._run(self._core.refresh(self._loop.time()))
        return await future

    def send(self, peer: Address, data: bytes) -> None:
        """Send ``data`` to ``peer`` through the relay. Never blocks: when the permission is
        still being installed the datagram waits (bounded); when buffers are full it is
        dropped, as UDP would."""
        if self.error is not None:
            raise self.error
        stream = self._stream
        if (
            stream is not None
            and stream.transport is not None
            and stream.transport.get_write_buffer_size() > MAX_WRITE_BUFFER
        ):
            self.dropped += 1
            return
        self._run(self._core.send(peer, data, self._loop.time()))

    async def receive(self) -> tuple[Address, bytes]:
        """The next (peer, data) relayed to us, when no ``on_data`` callback was given.

        Raises :class:`TurnClientError` once the client has failed or closed and nothing is
        left to read.
        """
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # let other readers see the end too
            raise self.error or TurnClientError(None, "TURN client closed")
        return item

    async def wait_closed(self) -> None:
        """Wait until the client is closed or has failed."""
        await self._closed.wait()

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Release the allocation (Refresh LIFETIME 0), then close the socket. Idempotent."""
        if self._core.state not in (State.CLOSED, State.FAILED):
            self.error = TurnClientError(None, "TURN client closed")  # no more sends from now
            self._run(self._core.close(self._loop.time()))
            if self._core.state is State.CLOSING:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._closed.wait()
        self._end()
        await self._teardown()

    async def __aenter__(self) -> TurnClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _wait(self, table: dict[_K, list[asyncio.Future[_V]]], key: _K) -> asyncio.Future[_V]:
        future: asyncio.Future[_V] = self._loop.create_future()
        table.setdefault(key, []).append(future)
        return future

    def _run(self, outputs: list[Output]) -> None:
        self._handle(outputs)
        self._rearm()

    def _handle(self, outputs: list[Output]) -> None:
        for output in outputs:
            kind = type(output)
            if kind is Transmit:
                self._write(cast(Transmit, output).data)
            elif kind is DataReceived:
                received = cast(DataReceived, output)
                self._deliver(received.peer, received.data)
            else:
                self._event(output)

    def _event(self, event: Output) -> None:
        if isinstance(event, Allocated):
            if not self._allocated.done():
                self._allocated.set_result(None)
        elif isinstance(event, PermissionCreated):
            _resolve(self._permission_waiters.pop(event.ip, []), None)
        elif isinstance(event, PermissionFailed):
            error = TurnClientError(event.error_code, event.reason)
            _reject(self._permission_waiters.pop(event.ip, []), error)
        elif isinstance(event, ChannelBound):
            _resolve(self._channel_waiters.pop(event.peer, []), event.number)
        elif isinstance(event, Refreshed):
            _resolve(self._refresh_waiters.pop(0, []), event.lifetime)
        elif isinstance(event, ChannelBindFailed):
            error = TurnClientError(event.error_code, event.reason)
            _reject(self._channel_waiters.pop(event.peer, []), error)
        elif isinstance(event, Failed):
            log.debug("TURN client to %s:%d failed: %s", *self.server, event.reason)
            self.error = TurnClientError(event.error_code, event.reason)
            self._end()
            self._close_io()
        elif isinstance(event, Closed):
            self._end()
        # IcmpReceived needs nothing here.

    def _end(self) -> None:
        """No more results will come: wake every waiter with the error."""
        error = self.error or TurnClientError(None, "TURN client closed")
        _reject([self._allocated], error)
        for permission_waiters in self._permission_waiters.values():
            _reject(permission_waiters, error)
        for channel_waiters in self._channel_waiters.values():
            _reject(channel_waiters, error)
        _reject(self._refresh_waiters.pop(0, []), error)
        self._permission_waiters.clear()
        self._channel_waiters.clear()
        if not self._closed.is_set():
            self._closed.set()
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(None)

    def _deliver(self, peer: Address, data: bytes) -> None:
        if self._on_data is not None:
            try:
                self._on_data(peer, data)
            except Exception:
                log.exception("on_data callback raised")
        elif self._queue.full():
            self.dropped += 1
        else:
            self._queue.put_nowait((peer, data))

    def _write(self, data: bytes) -> None:
        if self._sock is not None:
            try:
                self._sock.send(data)
            except OSError:
                self.dropped += 1  # a full buffer or an ICMP error: UDP may lose a datagram
        elif self._stream is not None and self._stream.transport is not None:
            self._stream.transport.write(data)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. ECONNREFUSED from an ICMP error: retransmissions decide
            self._handle(self._core.receive(data, self._loop.time()))
            if self._sock is None:
                return
        self._rearm()

    def _feed(self, data: bytes) -> None:
        self._run(self._core.receive(data, self._loop.time()))

    def _connection_lost(self, exc: Exception | None) -> None:
        reason = str(exc) if exc is not None else "closed by the server"
        self._run(self._core.connection_lost(self._loop.time(), reason))

    def _rearm(self) -> None:
        deadline = self._core.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None if deadline is None else self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        when = self._timer_at
        self._timer = self._timer_at = None
        # A loop may run a timer up to its clock resolution early; the core must see the time
        # it asked for.
        now = max(self._loop.time(), when or 0.0)
        self._run(self._core.on_timer(now))

    def _close_io(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.close()

    async def _teardown(self) -> None:
        self._close_io()
        if self._stream is not None and self._stream.transport is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._stream.lost


def _resolve(futures: list[asyncio.Future[_V]], value: _V) -> None:
    for future in futures:
        if not future.done():
            future.set_result(value)


def _reject(futures: list[asyncio.Future[_V]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
            future.exception()  # marked retrieved: a waiter that gave up is not an error


__all__ = ["DataCallback", "ServerSpec", "TurnClient", "TurnClientError", "server_endpoint"]
