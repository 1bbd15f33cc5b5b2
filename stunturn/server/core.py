"""The sans-IO server core: bytes and ``now`` in, :class:`SendTo` actions out.

One core per worker process. The asyncio layer feeds it datagrams and stream frames and
carries out what it returns. Errors are handled at exactly one boundary here:

* malformed input (:class:`StunParseError`, bad FINGERPRINT) is counted and dropped, never
  answered;
* :class:`StunError` raised by a handler becomes an error response;
* anything else is a bug and propagates.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

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
from ..stun.attributes import ErrorCode, Fingerprint, UnknownAttributes
from .actions import SendTo, Transport
from .binding import AlternateAddresses, BindingService
from .counters import Counters
from .errors import StunError
from .ratelimit import ResponseBudget


def source_key(host: str) -> int:
    """An IP address as an integer: the IPv4 value itself, IPv6 offset above 2**32.

    The rate limiter's key, and the form the fast path takes its requester's address in.
    """
    if ":" in host:
        return (1 << 128) | int.from_bytes(socket.inet_pton(socket.AF_INET6, host), "big")
    return int.from_bytes(socket.inet_aton(host), "big")


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What the core needs to know; built from the user-facing configuration."""

    rfc5780: AlternateAddresses | None = None
    software: str | None = None
    response_rate: float = 200.0
    response_burst: float = 400.0


class ServerCore:
    """Dispatches STUN requests to services and keeps counters and the response budget."""

    def __init__(self, config: CoreConfig | None = None) -> None:
        self.config = config or CoreConfig()
        self.counters = Counters()
        self.binding = BindingService(self.config.rfc5780, self.config.software)
        self.budget = ResponseBudget(self.config.response_rate, self.config.response_burst)

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

    def handle_udp(self, data: bytes, local: Address, remote: Address, now: float) -> list[SendTo]:
        """A datagram arrived on the UDP listener bound to ``local`` from ``remote``."""
        host, port = remote
        if ":" not in host:
            fast = self.fast_udp(data, local, source_key(host), port, now)
            if fast is not None:
                return [SendTo(fast, local, remote)] if fast else []
        self.counters.received += 1
        return self._handle_stun(data, local, remote, Transport.UDP, now)

    def handle_stream_frame(
        self, frame: bytes, local: Address, remote: Address, transport: Transport, now: float
    ) -> list[SendTo]:
        """A complete frame (from :class:`StreamFramer`) arrived on a TCP or TLS connection."""
        self.counters.received += 1
        if frame and 0x40 <= frame[0] < 0x50:
            # ChannelData: no TURN allocations exist on a STUN-only server.
            self.counters.ignored += 1
            return []
        return self._handle_stun(frame, local, remote, transport, now)

    def count_malformed(self) -> None:
        """The I/O layer saw input it could not frame (e.g. a broken TCP stream)."""
        self.counters.malformed += 1

    # --- dispatch ---------------------------------------------------------------------------

    def _handle_stun(
        self, data: bytes, local: Address, remote: Address, transport: Transport, now: float
    ) -> list[SendTo]:
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
        if msg.cls is not MessageClass.REQUEST:
            counters.ignored += 1
            return []
        if self.budget.rate and not self.budget.allow(source_key(remote[0]), now):
            counters.rate_limited += 1
            return []
        try:
            unknown = msg.unknown_comprehension_required()
            if unknown:
                # RFC 8489 section 6.3.1.1: 420 listing what we did not understand.
                raise StunError(420, (UnknownAttributes(tuple(unknown)),))
            if msg.method != Method.BINDING:
                raise StunError(400)
            response, source, dest = self.binding.respond(
                msg, local, remote, transport, fingerprint
            )
        except StunError as exc:
            counters.error_responses += 1
            return [SendTo(self._error(msg, exc, fingerprint), local, remote, transport)]
        counters.binding_ok += 1
        return [SendTo(response.encode(fingerprint=fingerprint), source, dest, transport)]

    def _error(self, request: Message, exc: StunError, fingerprint: bool) -> bytes:
        response = Message(request.method, MessageClass.ERROR, request.transaction_id)
        response.attributes.append(ErrorCode(exc.code, REASONS.get(exc.code, "")))
        response.attributes.extend(exc.attributes)
        return response.encode(fingerprint=fingerprint)
