"""TURN relay sockets: the peer-to-client hot path, ICMP errors, and the binder the core uses.

A :class:`RelaySocket` is one UDP socket bound on the relay address of an allocation. Datagrams
from peers are read in a drain loop; each is looked up in the allocation's tables, which the
core keeps current (no permission for the peer's IP: dropped; a channel for this peer
address: ChannelData; else a Data indication), and sent to the client. No clock, no logging, no
exception per datagram.

ICMP errors (Linux ``IP_RECVERR``/``IPV6_RECVERR``) are read from the socket's error queue and
reported to the client in a Data indication with an ICMP attribute when it has a permission for
the peer (RFC 8656 section 11.4). What Linux reports this way: ICMP and ICMPv6 errors caused by
datagrams the relay sent (port/host/network unreachable, administratively prohibited,
fragmentation needed / packet too big with the MTU in the error data, TTL exceeded). What it
does not: errors for datagrams sent from other sockets, ICMP that a firewall drops, and errors
arriving after the relay socket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..server.actions import Transport
from ..server.keys import IPV6_KEY_BIT
from ..turn.allocation import Allocation, ChannelRoute, FiveTuple
from ..turn.wire import data_indication
from .mmsg import LEN_OFFSET, MSG_SIZE, NAME, SLOT, address_to_sockaddr

if TYPE_CHECKING:
    from .server import Worker

# Linux constants the socket module does not export.
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2
IP_RECVERR, IPV6_RECVERR = 11, 25
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT, IPV6_PMTUDISC_DO = 23, 0, 2
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6 = 2, 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_U32 = struct.Struct("I")
_CHANNEL = struct.Struct("!HH")
RELAY_BATCH = 64


class RelaySocket:
    """One relay address of one allocation (implements ``stunturn.turn.RelayHandle``)."""

    __slots__ = (
        "address",
        "allocation",
        "client",
        "client_name",
        "client_sock",
        "fd",
        "sendto",
        "sock",
        "stream",
        "v6",
        "worker",
    )

    def __init__(
        self,
        worker: Worker,
        sock: socket.socket,
        five_tuple: FiveTuple,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.worker = worker
        self.sock = sock
        self.sendto = sock.sendto
        self.fd = sock.fileno()
        if address is None:
            host, port = sock.getsockname()[:2]
            address = (host, port)
        self.address = address
        """The bound address (``address`` when the caller knows it, as the binder does)."""
        self.v6 = sock.family == socket.AF_INET6
        self.allocation: Allocation | None = None
        transport, client, local = five_tuple
        self.client = client
        self.stream = transport is not Transport.UDP
        listener = worker.udp.get(local)
        self.client_sock = listener.sock if listener is not None and not self.stream else None
        self.client_name = address_to_sockaddr(client)

    def send(self, data: bytes | memoryview, peer: tuple[str, int]) -> None:
        """Relay data to a peer (a Send indication's DATA or a ChannelData payload)."""
        try:
            self.sendto(data, peer)
        except OSError:
            self.worker.core.counters.send_failed += 1

    def to_client(self, frame: bytes) -> None:
        """Send one message to the allocation's client over its transport."""
        if self.client_sock is not None:
            try:
                self.client_sock.sendto(frame, self.client)
            except OSError:
                self.worker.core.counters.send_failed += 1
        else:
            self.worker.send_stream(self.allocation, frame)

    def on_readable(self) -> None:
        """Peer to client: ChannelData when the peer has a channel, Data indication when its
        IP has a permission, nothing otherwise."""
        io = self.worker.batch_io
        alloc = self.allocation
        if io is None or alloc is None:
            self._read_plain(alloc)
            return
        fd = self.fd
        v6 = self.v6
        rx, tx, names, hdrs = io.rx, io.tx, io.names, io.rxhdrs
        unpack_u32 = _U32.unpack_from
        from_bytes = int.from_bytes
        channels = alloc.peer_channels
        permissions = alloc.permissions
        pack_channel = _CHANNEL.pack
        pack_channel_into = _CHANNEL.pack_into
        set_length = io.set_length
        to_client = self.to_client
        stream = self.stream
        client_fd = self.client_sock.fileno() if self.client_sock is not None else -1
        # A TCP/TLS client gets one write per batch: the frames joined (each its own datagram
        # for a UDP client).
        out: list[bytes] = []
        emit = out.append if stream else to_client
        for _ in range(RELAY_BATCH // io.batch + 1):
            n = io.recv(fd, v6)
            if n == 0:
                self._read_errors()
                return
            batched = 0  # ChannelData frames built in the transmit slots, sent in one call
            first = 0  # length of the first of them
            for i in range(n):
                off = i * SLOT
                size = unpack_u32(hdrs, i * MSG_SIZE + LEN_OFFSET)[0]
                noff = i * NAME
                port = (names[noff + 2] << 8) | names[noff + 3]
                if names[noff] == socket.AF_INET:
                    ip = from_bytes(names[noff + 4 : noff + 8], "big")
                else:
                    ip = IPV6_KEY_BIT | from_bytes(names[noff + 8 : noff + 24], "big")
                if ip not in permissions:
                    continue  # RFC 8656 section 11.3: no permission, no delivery
                if alloc.max_bps and not alloc.within_rate(size, True, self.worker.loop.time()):
                    continue
                alloc.bytes_to_client += size
                alloc.packets_to_client += 1
                number = channels.get((ip << 16) | port)
                if number is None:
                    emit(data_indication(io.address(i), bytes(rx[off : off + size])))
                elif client_fd >= 0:
                    toff = batched * SLOT
                    pack_channel_into(tx, toff, number, size)
                    tx[toff + 4 : toff + 4 + size] = rx[off : off + size]
                    set_length(batched, 4 + size)
                    if not batched:
                        first = 4 + size
                    batched += 1
                else:
                    frame = pack_channel(number, size) + rx[off : off + size]
                    if stream and size & 3:
                        frame += b"\x00" * (4 - (size & 3))
                    emit(frame)
            if out:
                self.worker.send_stream(self.allocation, b"".join(out), len(out))
                out.clear()
            if batched == 1:
                # One frame: the socket's own sendto costs less than a ctypes sendmmsg.
                try:
                    self.client_sock.sendto(tx[:first], self.client)  # type: ignore[union-attr]
                except OSError:
                    self.worker.core.counters.send_failed += 1
            elif batched:
                failed = io.send_to(client_fd, batched, self.client_name)
                if failed:
                    self.worker.core.counters.send_failed += failed
            if n < io.batch:
                return

    def _read_plain(self, alloc: Allocation | None) -> None:
        """The same without batched I/O (or to drain a socket whose allocation is gone)."""
        from ..server.keys import address_key  # noqa: PLC0415 - cold path

        for _ in range(RELAY_BATCH):
            try:
                data, peer = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._read_errors()
                continue
            if alloc is None:
                continue
            peer = peer[:2]
            key = address_key(peer)
            if key >> 16 not in alloc.permissions:
                continue
            number = alloc.peer_channels.get(key)
            if number is not None:
                frame = _CHANNEL.pack(number, len(data)) + data
                if self.stream and len(data) & 3:
                    frame += b"\x00" * (4 - (len(data) & 3))
            else:
                frame = data_indication(peer, data)
            if alloc.max_bps and not alloc.within_rate(len(data), True, self.worker.loop.time()):
                continue
            alloc.bytes_to_client += len(data)
            alloc.packets_to_client += 1
            self.to_client(frame)

    def _read_errors(self) -> None:
        """Drain the ICMP error queue into Data indications with an ICMP attribute."""
        turn = self.worker.core.turn
        for _ in range(16):
            try:
                _, ancdata, _, peer = self.sock.recvmsg(1, 512, MSG_ERRQUEUE)
            except OSError:
                return
            for level, kind, cdata in ancdata:
                if (level, kind) not in (
                    (socket.IPPROTO_IP, IP_RECVERR),
                    (socket.IPPROTO_IPV6, IPV6_RECVERR),
                ) or len(cdata) < _EXTENDED_ERR.size:
                    continue
                _, origin, icmp_type, icmp_code, _, info, _ = _EXTENDED_ERR.unpack_from(cdata)
                if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6) or turn is None:
                    continue
                frame = turn.icmp_indication(self, peer[:2], icmp_type, icmp_code, info)
                if frame is not None:
                    self.to_client(frame)


def relay_channel_data(route: ChannelRoute, data: bytes | memoryview, now: float) -> None:
    """Client to peer: forward a ChannelData payload from the allocation's relay socket."""
    length = (data[2] << 8) | data[3]
    if length > len(data) - 4:
        return  # truncated: dropped (RFC 8656 section 12.5)
    alloc = route.allocation
    if route.peer_ip not in alloc.permissions:
        return  # RFC 8656 section 12: relayed only while the peer has a permission
    if alloc.max_bps and not alloc.within_rate(length, False, now):
        return
    alloc.bytes_to_peer += length
    alloc.packets_to_peer += 1
    try:  # noqa: SIM105 - try/except costs less than contextlib.suppress per datagram
        route.relay.sendto(data[4 : 4 + length], route.peer)
    except OSError:
        pass  # the peer path is best effort, as UDP is


class RelayPoller:
    """One epoll set holding every UDP relay socket of a worker, watched by the event loop as
    a single reader.

    An allocation adds one socket and removes it again. Through the event loop that is a
    poll handle made and started, then stopped and closed (about 8 us with uvloop,
    ``bench/micro.py poll``); here it is one ``epoll_ctl`` to add, and nothing to remove:
    closing the socket takes it out of the set, as the socket's file is never shared.
    Sockets that are ready are served in the order the kernel lists them; a handler that
    leaves data behind is called again on the next round, as epoll here is level-triggered.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.poll = self.epoll.poll
        loop.add_reader(self.epoll.fileno(), self._ready)

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler`` whenever ``fd`` is readable or has an error queued."""
        self.epoll.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def discard(self, fd: int) -> None:
        """Forget ``fd``; the caller closes it next, which takes it out of the epoll set."""
        self.handlers.pop(fd, None)

    def _ready(self) -> None:
        handlers = self.handlers
        for fd, _ in self.poll(0):
            handler = handlers.get(fd)
            if handler is not None:
                handler()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
        self.handlers.clear()


class UdpRelayBinder:
    """Binds relay sockets for the core (implements ``stunturn.turn.RelayBinder``)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.poller = RelayPoller(worker.loop)

    def bind(
        self, host: str, port: int, five_tuple: FiveTuple, dont_fragment: bool
    ) -> RelaySocket | None:
        v6 = ":" in host
        # Non-blocking from the start (no fcntl calls); the bound address is known (no
        # getsockname): an Allocate makes one socket, two options, one bind, one epoll_ctl.
        sock = socket.socket(
            socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
        )
        try:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                sock.setsockopt(
                    socket.IPPROTO_IPV6,
                    IPV6_MTU_DISCOVER,
                    IPV6_PMTUDISC_DO if dont_fragment else IPV6_PMTUDISC_DONT,
                )
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
                # RFC 8656 section 14: DF on relayed datagrams only when the client asked with
                # DONT-FRAGMENT; otherwise let them be fragmented rather than dropped.
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    IP_MTU_DISCOVER,
                    IP_PMTUDISC_DO if dont_fragment else IP_PMTUDISC_DONT,
                )
            sock.bind((host, port))
        except OSError:
            sock.close()
            return None
        relay = RelaySocket(self.worker, sock, five_tuple, (host, port) if port else None)
        self.poller.add(relay.fd, relay.on_readable)
        return relay

    def available(self, host: str, port: int) -> bool:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((host, port))
            except OSError:
                return False
        return True

    def close(self, handle: object) -> None:
        assert isinstance(handle, RelaySocket)
        self.poller.discard(handle.fd)
        handle.sock.close()
