"""Counters kept by the server core; the I/O layer and metrics read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Counters:
    """Monotonic event counts for one worker."""

    received: int = 0
    """Datagrams or stream frames handed to the core."""
    malformed: int = 0
    """Dropped because they were not valid STUN/ChannelData (never answered)."""
    bad_fingerprint: int = 0
    """Dropped because FINGERPRINT did not match (counted apart from malformed)."""
    ignored: int = 0
    """Valid STUN that needs no answer (responses, unknown indications)."""
    rate_limited: int = 0
    """Responses withheld because the source spent its budget."""
    binding_ok: int = 0
    """Binding success responses sent."""
    error_responses: int = 0
    """Error responses sent (any code)."""
    send_failed: int = 0
    """Sends the socket refused (buffer full, unreachable); filled in by the I/O layer."""
    stream_refused: int = 0
    """TCP/TLS connections closed at once: per-IP or total connection limit reached."""
    stream_timeouts: int = 0
    """TCP/TLS connections closed for sending nothing, or half a message, for too long."""
    stream_dropped: int = 0
    """Relayed datagrams dropped for a TCP/TLS client whose write buffer is full."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: Counters) -> None:
        """Accumulate another worker's counters into this one."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
