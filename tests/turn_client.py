"""A small blocking TURN client for the loopback tests, built on our own codec.

It does what a test needs and nothing clever: one UDP socket, long-term credentials (the 401
and 438 challenges are answered by retrying with the realm and nonce they carry), requests
retransmitted a few times with the same transaction ID, success responses checked for a
valid MESSAGE-INTEGRITY, and everything else that arrives (Data indications, ChannelData) kept in
order for :meth:`TurnClient.receive`.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import struct
import time
from dataclasses import dataclass
from types import TracebackType

from stunturn.stun import (
    TRANSPORT_UDP,
    Address,
    Attribute,
    Message,
    MessageClass,
    Method,
    StunParseError,
    check_integrity,
    decode,
    long_term_key,
    new_transaction_id,
)
from stunturn.stun.attributes import (
    ChannelNumber,
    Data,
    DontFragment,
    ErrorCode,
    Icmp,
    Lifetime,
    Nonce,
    Realm,
    RequestedTransport,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)

RETRANSMIT = 0.5
"""Seconds between retransmissions of one request (loopback rarely loses anything)."""
ATTEMPTS = 4


class TurnError(AssertionError):
    """A request got an error response; ``code`` is its ERROR-CODE."""

    def __init__(self, response: Message) -> None:
        attr = response.get(ErrorCode)
        self.code = attr.code if attr is not None else 0
        self.response = response
        super().__init__(f"{Method(response.method).name} failed: {self.code}")


@dataclass(frozen=True, slots=True)
class DataIndication:
    """A Data indication: DATA from ``peer``, or an ICMP report about it."""

    peer: Address
    data: bytes | None
    icmp: Icmp | None
    source: Address
    """Where the datagram came from (the server's listening address)."""


@dataclass(frozen=True, slots=True)
class ChannelData:
    """A ChannelData message on ``channel``."""

    channel: int
    data: bytes
    source: Address


Received = DataIndication | ChannelData


class TurnClient:
    """One UDP socket on ``local`` talking to a TURN server with long-term credentials."""

    def __init__(
        self,
        server: Address,
        username: str,
        password: str,
        local: Address = ("127.0.0.1", 0),
    ) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(local)
        self.realm: str | None = None
        self.nonce: str | None = None
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self.lifetime: int | None = None
        self._pending: collections.deque[Received] = collections.deque()

    @property
    def local(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return (host, port)

    @property
    def key(self) -> bytes:
        assert self.realm is not None
        return long_term_key(self.username, self.realm, self.password)

    # --- requests -------------------------------------------------------------------------

    def transact(self, msg: Message, timeout: float = RETRANSMIT) -> Message | None:
        """Send ``msg`` (encoded as is, retransmitted) and return its response, or None."""
        return self.exchange(msg.transaction_id, msg.encode(), timeout)

    def sign(self, msg: Message) -> bytes:
        """``msg`` with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY (realm and nonce known)."""
        assert self.realm is not None and self.nonce is not None, "no challenge seen yet"
        signed = Message(msg.method, msg.cls, msg.transaction_id, list(msg.attributes))
        signed.attributes += [Username(self.username), Realm(self.realm), Nonce(self.nonce)]
        return signed.encode(self.key)

    def request(self, method: int, *attrs: Attribute, check: bool = True) -> Message:
        """An authenticated request; answers 401/438 challenges. Raises :class:`TurnError` for
        a final error response when ``check`` (else returns it)."""
        for _ in range(3):
            msg = Message(method, MessageClass.REQUEST, new_transaction_id(), list(attrs))
            known = self.realm is not None and self.nonce is not None
            data = self.sign(msg) if known else msg.encode()
            response = self.exchange(msg.transaction_id, data, RETRANSMIT)
            if response is None:
                raise AssertionError(f"no answer to {Method(method).name} from {self.server}")
            error = response.get(ErrorCode)
            realm, nonce = response.get(Realm), response.get(Nonce)
            if error is not None and error.code in (401, 438) and nonce is not None:
                if realm is not None:
                    self.realm = realm.value
                self.nonce = nonce.value
                if error.code == 438 or not known:
                    continue  # a fresh nonce, or the first challenge: sign and retry
            if response.cls is MessageClass.SUCCESS:
                assert check_integrity(response, self.key), "response integrity does not verify"
            elif check:
                raise TurnError(response)
            return response
        raise AssertionError(f"{Method(method).name}: still challenged after 3 tries")

    def allocate(
        self, lifetime: int | None = None, dont_fragment: bool = False, *, check: bool = True
    ) -> Message:
        """Allocate a UDP relay; remembers the relayed and mapped addresses."""
        attrs: list[Attribute] = [RequestedTransport(TRANSPORT_UDP)]
        if lifetime is not None:
            attrs.append(Lifetime(lifetime))
        if dont_fragment:
            attrs.append(DontFragment())
        response = self.request(Method.ALLOCATE, *attrs, check=check)
        if response.cls is MessageClass.SUCCESS:
            relayed = response.get(XorRelayedAddress)
            mapped = response.get(XorMappedAddress)
            granted = response.get(Lifetime)
            assert relayed is not None and mapped is not None and granted is not None
            self.relayed, self.mapped, self.lifetime = (
                relayed.address,
                mapped.address,
                granted.seconds,
            )
        return response

    def refresh(self, lifetime: int | None = None, *, check: bool = True) -> Message:
        """Refresh (LIFETIME 0 deletes the allocation)."""
        attrs = [Lifetime(lifetime)] if lifetime is not None else []
        response = self.request(Method.REFRESH, *attrs, check=check)
        if lifetime == 0 and response.cls is MessageClass.SUCCESS:
            self.relayed = None
        return response

    def create_permission(self, *peers: str, check: bool = True) -> Message:
        """One CreatePermission for all ``peers`` (IPs; the port is ignored by the server)."""
        attrs = [XorPeerAddress(host, 0) for host in peers]
        return self.request(Method.CREATE_PERMISSION, *attrs, check=check)

    def channel_bind(self, channel: int, peer: Address, *, check: bool = True) -> Message:
        """Bind ``channel`` to ``peer`` (this also installs a permission for its IP)."""
        return self.request(
            Method.CHANNEL_BIND, ChannelNumber(channel), XorPeerAddress(*peer), check=check
        )

    # --- data -----------------------------------------------------------------------------

    def send_indication(self, peer: Address, data: bytes) -> None:
        """A Send indication carrying ``data`` to ``peer``."""
        msg = Message(Method.SEND, MessageClass.INDICATION, new_transaction_id())
        msg.attributes += [XorPeerAddress(*peer), Data(data)]
        self.sock.sendto(msg.encode(), self.server)

    def send_channel(self, channel: int, data: bytes) -> None:
        """ChannelData on ``channel`` (no padding: this is UDP)."""
        self.sock.sendto(struct.pack("!HH", channel, len(data)) + data, self.server)

    def receive(self, timeout: float = 2.0) -> Received | None:
        """The next Data indication or ChannelData, or None when nothing came in time."""
        if self._pending:
            return self._pending.popleft()
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            item = self._read(remaining)
            if isinstance(item, DataIndication | ChannelData):
                return item
        return None

    # --- plumbing -------------------------------------------------------------------------

    def exchange(self, tid: bytes, data: bytes, timeout: float = RETRANSMIT) -> Message | None:
        """Send ``data`` (retransmitted) and return the response with transaction ID ``tid``;
        its ``raw`` holds the bytes as received. Other traffic is kept for :meth:`receive`."""
        for _ in range(ATTEMPTS):
            self.sock.sendto(data, self.server)
            deadline = time.monotonic() + timeout
            for _ in range(10_000):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                item = self._read(remaining)
                if item is None:
                    break
                if isinstance(item, Message) and item.transaction_id == tid:
                    return item
                if isinstance(item, DataIndication | ChannelData):
                    self._pending.append(item)
        return None

    def _read(self, timeout: float) -> Message | Received | bytes | None:
        """One datagram, classified; None on timeout, the raw bytes when it is not STUN."""
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not readable:
            return None
        raw, src = self.sock.recvfrom(65536)
        source = (src[0], src[1])
        if len(raw) >= 4 and 0x40 <= raw[0] < 0x80:
            length = int.from_bytes(raw[2:4], "big")
            return ChannelData(int.from_bytes(raw[:2], "big"), raw[4 : 4 + length], source)
        try:
            msg = decode(raw)
        except StunParseError:
            return raw
        if msg.method == Method.DATA and msg.cls is MessageClass.INDICATION:
            peer = msg.get(XorPeerAddress)
            assert peer is not None, "Data indication without XOR-PEER-ADDRESS"
            data = msg.get(Data)
            return DataIndication(
                peer.address, data.value if data is not None else None, msg.get(Icmp), source
            )
        return msg

    def close(self) -> None:
        """Delete the allocation, best effort (a Refresh LIFETIME 0 not waited for), so tests
        sharing a server do not pile up allocations against the quotas; close the socket."""
        if self.relayed is not None and self.realm is not None and self.nonce is not None:
            msg = Message(Method.REFRESH, MessageClass.REQUEST, new_transaction_id())
            msg.attributes.append(Lifetime(0))
            with contextlib.suppress(OSError):
                self.sock.sendto(self.sign(msg), self.server)
        self.sock.close()

    def __enter__(self) -> TurnClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def error_of(response: Message) -> int | None:
    """ERROR-CODE of a response, or None for a success."""
    attr = response.get(ErrorCode)
    return None if attr is None else attr.code
