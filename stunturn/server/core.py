"""The sans-IO server core: bytes and ``now`` in, actions out.

One core per worker process. The asyncio layer feeds it datagrams and stream frames and
carries out what it returns (:class:`SendTo`, and :class:`~stunturn.turn.RelayTo` for TURN).
Errors are handled at exactly one boundary here:

* malformed input (:class:`StunParseError`, bad FINGERPRINT) is counted and dropped, never
  answered;
* :class:`StunError` raised by a handler becomes an error response (signed when the request
  was authenticated);
* anything else is a bug and propagates.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ..stun import (
    REASONS,
    Address,
    Message,
    MessageClass,
    Method,
    StunParseError,
    check_fingerprint,
    decode,
)
from ..stun.attributes import ErrorCode, Fingerprint, UnknownAttributes, XorRelayedAddress
from .actions import Action, RelayTo, SendTo, Splice, StreamAction, Transport
from .binding import AlternateAddresses, BindingService
from .counters import Counters
from .errors import StunError
from .keys import address_key, ip_key
from .ratelimit import ResponseBudget

if TYPE_CHECKING:
    from ..turn.service import TurnService

log = logging.getLogger("stunturn.server")

_KNOWN_METHODS = frozenset(int(m) for m in Method)
_TURN_REQUESTS = frozenset(
    (
        Method.ALLOCATE,
        Method.REFRESH,
        Method.CREATE_PERMISSION,
        Method.CHANNEL_BIND,
        Method.CONNECT,
    )
)


def source_key(host: str) -> int:
    """The rate limiter's key for a source IP (see :func:`stunturn.server.keys.ip_key`)."""
    return ip_key(host)


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What the core needs to know; built from the user-facing configuration."""

    rfc5780: AlternateAddresses | None = None
    software: str | None = None
    response_rate: float = 200.0
    response_burst: float = 400.0
    external: tuple[tuple[str, str], ...] = ()
    """(local IP, public IP) pairs for a server behind a NAT (``--external-ip``): wherever the
    server names one of its own addresses (XOR-RELAYED-ADDRESS, RESPONSE-ORIGIN,
    OTHER-ADDRESS) it names the public IP instead, with the same port."""


class ServerCore:
    """Dispatches STUN/TURN messages to services; keeps counters and the response budget."""

    def __init__(self, config: CoreConfig | None = None, turn: TurnService | None = None):
        self.config = config or CoreConfig()
        self.counters = Counters()
        self.error_codes: Counter[int] = Counter()
        """Error responses sent, by code (401 and 438 included): for metrics."""
        self.external = dict(self.config.external)
        self.binding = BindingService(self.config.rfc5780, self.config.software, self.external)
        self.budget = ResponseBudget(self.config.response_rate, self.config.response_burst)
        self.turn = turn

    # --- input ------------------------------------------------------------------------------

    def fast_udp(
        self, data: bytes | memoryview, local: Address, ip: int, port: int, now: float
    ) -> bytes | None:
        """The hot path for the common Binding request from IPv4 ``ip`` (an int) and ``port``.

        Returns the response bytes to send back from ``local``, ``b""`` when the request was
        recognised but its answer is withheld, or None when the datagram needs
        :meth:`handle_udp` (which then counts it).
        """
        response = self.binding.fast_response(data, local, ip, port)
        if response is None:
            return None
        counters = self.counters
        counters.received += 1
        if self.budget.rate and not self.budget.allow(ip, now):
            counters.rate_limited += 1
            return b""
        counters.binding_ok += 1
        return response

    def handle_udp(self, data: bytes, local: Address, remote: Address, now: float) -> list[Action]:
        """A datagram arrived on the UDP listener bound to ``local`` from ``remote``."""
        host, port = remote
        if ":" not in host:
            fast = self.fast_udp(data, local, ip_key(host), port, now)
            if fast is not None:
                return [SendTo(fast, local, remote)] if fast else []
        return self.handle_udp_slow(data, local, remote, now)

    def handle_udp_slow(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> list[Action]:
        """:meth:`handle_udp` for a datagram the caller already offered to :meth:`fast_udp`
        (IPv4) or that the fast path does not take (IPv6)."""
        self.counters.received += 1
        if data and 0x40 <= data[0] < 0x80:
            return self._channel_data(data, Transport.UDP, local, remote, now)
        # Splice (ConnectionBind) never comes of a datagram: 400 over UDP.
        return cast(list[Action], self._handle_stun(data, local, remote, Transport.UDP, now))

    def handle_stream_frame(
        self, frame: bytes, local: Address, remote: Address, transport: Transport, now: float
    ) -> list[StreamAction]:
        """A complete frame (from :class:`StreamFramer`) arrived on a TCP or TLS connection."""
        self.counters.received += 1
        if frame and 0x40 <= frame[0] < 0x80:
            return list(self._channel_data(frame, transport, local, remote, now))
        return self._handle_stun(frame, local, remote, transport, now)

    def count_malformed(self) -> None:
        """The I/O layer saw input it could not frame (e.g. a broken TCP stream)."""
        self.counters.malformed += 1

    # --- timer ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` next has work to do; the I/O layer arms one timer for it."""
        return self.turn.next_deadline() if self.turn is not None else None

    def on_timer(self, now: float) -> None:
        if self.turn is not None:
            self.turn.expire(now)

    # --- dispatch ---------------------------------------------------------------------------

    def _channel_data(
        self, data: bytes, transport: Transport, local: Address, remote: Address, now: float
    ) -> list[Action]:
        """ChannelData that missed the I/O layer's fast path (or came over a stream)."""
        turn = self.turn
        if turn is None or len(data) < 4:
            self.counters.ignored += 1
            return []
        number = (data[0] << 8) | data[1]
        length = (data[2] << 8) | data[3]
        route = turn.route_table(transport, local).get((address_key(remote) << 16) | number)
        if route is None or length > len(data) - 4:
            self.counters.ignored += 1
            return []
        payload = data[4 : 4 + length]
        alloc = route.allocation
        if route.peer_ip not in alloc.permissions:
            self.counters.ignored += 1
            return []
        if alloc.max_bps and not alloc.within_rate(length, False, now):
            return []
        alloc.bytes_to_peer += length
        alloc.packets_to_peer += 1
        return [RelayTo(route.relay, payload, route.peer)]

    def _handle_stun(
        self, data: bytes, local: Address, remote: Address, transport: Transport, now: float
    ) -> list[StreamAction]:
        counters = self.counters
        try:
            msg = decode(data)
        except StunParseError:
            counters.malformed += 1
            return []
        fingerprint = msg.get(Fingerprint) is not None
        if fingerprint and not check_fingerprint(msg):
            counters.bad_fingerprint += 1
            return []
        if msg.cls is MessageClass.INDICATION:
            if msg.method == Method.SEND and self.turn is not None:
                return list(self.turn.handle_send(msg, (transport, remote, local), now))
            counters.ignored += 1
            return []
        if msg.cls is not MessageClass.REQUEST:
            counters.ignored += 1
            return []
        if self.budget.rate and not self.budget.allow(ip_key(remote[0]), now):
            counters.rate_limited += 1
            return []
        try:
            if msg.method == Method.BINDING:
                unknown = msg.unknown_comprehension_required()
                if unknown:
                    # RFC 8489 section 6.3.1.1: 420 listing what we did not understand.
                    raise StunError(420, (UnknownAttributes(tuple(unknown)),))
                response, source, dest = self.binding.respond(
                    msg, local, remote, transport, fingerprint
                )
                counters.binding_ok += 1
                return [SendTo(response.encode(fingerprint=fingerprint), source, dest, transport)]
            if msg.method in _TURN_REQUESTS and self.turn is not None:
                data = self._turn_request(msg, transport, local, remote, now, fingerprint)
                return [SendTo(data, local, remote, transport)] if data else []
            if msg.method == Method.CONNECTION_BIND and self.turn is not None:
                response, auth, conn = self.turn.connection_bind(
                    msg, (transport, remote, local), now
                )
                data = response.encode(
                    auth.key, sha1=not auth.sha256, sha256=auth.sha256, fingerprint=fingerprint
                )
                return [SendTo(data, local, remote, transport),
                        Splice(conn, local, remote, transport)]  # fmt: skip
            raise StunError(400)
        except StunError as exc:
            counters.error_responses += 1
            self.error_codes[exc.code] += 1
            if log.isEnabledFor(logging.DEBUG):
                name = Method(msg.method).name if msg.method in _KNOWN_METHODS else msg.method
                log.debug("%s %s from %s: %d %s", transport, name, remote, exc.code, exc.detail)
            return [SendTo(self._error(msg, exc, fingerprint), local, remote, transport)]

    def _turn_request(
        self,
        msg: Message,
        transport: Transport,
        local: Address,
        remote: Address,
        now: float,
        fingerprint: bool,
    ) -> bytes:
        assert self.turn is not None
        five_tuple = (transport, remote, local)
        response, auth = self.turn.handle_request(msg, five_tuple, now)
        if response is None:
            return b""  # Connect: answered when the connection attempt ends
        if isinstance(response, bytes):
            return response  # a retransmitted Allocate: the same bytes as the first time
        if self.external and msg.method == Method.ALLOCATE:
            # The relay is bound on the local IP; peers reach it through the NAT at the public
            # IP and the same port (the NAT must keep the port).
            external = self.external
            response.attributes = [
                XorRelayedAddress(external.get(a.host, a.host), a.port)
                if isinstance(a, XorRelayedAddress)
                else a
                for a in response.attributes
            ]
        encoded = response.encode(
            auth.key, sha1=not auth.sha256, sha256=auth.sha256, fingerprint=fingerprint
        )
        if msg.method == Method.ALLOCATE:
            self.turn.remember_response(five_tuple, encoded)
        return encoded

    def _error(self, request: Message, exc: StunError, fingerprint: bool) -> bytes:
        response = Message(request.method, MessageClass.ERROR, request.transaction_id)
        response.attributes.append(ErrorCode(exc.code, REASONS.get(exc.code, "")))
        response.attributes.extend(exc.attributes)
        return response.encode(
            exc.key, sha1=not exc.sha256, sha256=exc.sha256, fingerprint=fingerprint
        )
