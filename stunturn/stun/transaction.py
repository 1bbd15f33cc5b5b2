"""Client transaction timing (RFC 8489 section 6.2.1), sans-IO.

Over UDP a request is sent, then retransmitted after RTO, 2*RTO, 4*RTO, ... until ``rc``
requests have gone out; after the last one the client waits ``rm`` times the initial RTO
before declaring a timeout. RFC 8489's defaults are RTO 500 ms, Rc 7, Rm 16 (39.5 s in all).
Over TCP/TLS there is one attempt and one timeout (39.5 s by default).

The object only does arithmetic on ``now``: the caller sends what :meth:`start` and
:meth:`on_timer` return and feeds responses to :meth:`matches`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attributes import Address


@dataclass(frozen=True, slots=True)
class RetransmitPolicy:
    """RTO and counts. ``rc`` = total transmissions; ``rm`` = final wait in units of RTO."""

    rto: float = 0.5
    rc: int = 7
    rm: int = 16
    reliable_timeout: float = 39.5
    """Timeout of the single attempt over TCP/TLS."""

    def total(self) -> float:
        """Seconds from the first transmission to the timeout, over UDP."""
        return float(sum(self.rto * 2**i for i in range(self.rc - 1)) + self.rm * self.rto)


RFC8489_DEFAULT = RetransmitPolicy()


class ClientTransaction:
    """Retransmission schedule and response matching of one request.

    Args:
        tid: the request's transaction ID.
        data: the encoded request.
        destination: where it goes.
        policy: timing.
        reliable: True over TCP/TLS (no retransmissions).
        sources: addresses a response may come from; None means the destination only. RFC
            5780 CHANGE-REQUEST tests expect the reply from another address, and a reply from
            anywhere else is not an answer to this request.
    """

    __slots__ = (
        "_next",
        "_rto",
        "data",
        "deadline",
        "destination",
        "policy",
        "reliable",
        "sent",
        "sources",
        "started",
        "tid",
    )

    def __init__(
        self,
        tid: bytes,
        data: bytes,
        destination: Address,
        policy: RetransmitPolicy = RFC8489_DEFAULT,
        reliable: bool = False,
        sources: frozenset[Address] | None = None,
    ) -> None:
        self.tid = tid
        self.data = data
        self.destination = destination
        self.policy = policy
        self.reliable = reliable
        self.sources = sources if sources is not None else frozenset((destination,))
        self.sent = 0
        self.started = 0.0
        self.deadline = 0.0
        self._rto = policy.rto
        self._next = 0.0

    def start(self, now: float) -> bytes:
        """The first transmission; returns the bytes to send."""
        self.started = now
        self.sent = 1
        if self.reliable:
            self.deadline = now + self.policy.reliable_timeout
        else:
            self._next = now + self._rto
            self.deadline = self._next if self.policy.rc > 1 else now + self.policy.rm * self._rto
        return self.data

    def on_timer(self, now: float) -> bytes | None:
        """Call when ``now >= deadline``: bytes to retransmit, or None when timed out."""
        if self.reliable or now < self._next or self.sent >= self.policy.rc:
            return None
        self.sent += 1
        self._rto *= 2
        if self.sent < self.policy.rc:
            self._next = now + self._rto
            self.deadline = self._next
        else:
            self._next = float("inf")
            self.deadline = now + self.policy.rm * self.policy.rto
        return self.data

    def timed_out(self, now: float) -> bool:
        return now >= self.deadline and (self.reliable or self.sent >= self.policy.rc)

    def accepts(self, source: Address) -> bool:
        """Whether a response with our transaction ID from ``source`` answers us."""
        return source in self.sources
