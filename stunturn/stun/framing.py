"""Split a TCP/TLS byte stream into STUN messages and ChannelData frames.

RFC 8489 section 6.2.2: over streams, STUN messages are self-delimiting through the length field.
RFC 8656 section 12.5: ChannelData over streams is padded to a multiple of 4 bytes; the length
field does not count the padding.

The first byte tells the two apart: 0x00-0x3F is STUN, 0x40-0x7F is ChannelData (channel
numbers 0x4000-0x7FFF: RFC 8656 clients use 0x4000-0x4FFF, RFC 5766 clients such as coturn's
tools the whole range). Anything else cannot start a frame on a TURN stream, so the stream is
broken and :class:`FramingError` is raised.

Work is linear in the bytes fed: each byte is copied into the buffer once and out once, and
the consumed prefix is cut off once per :meth:`StreamFramer.feed` call.
"""

from __future__ import annotations

from .errors import StunParseError

MAX_FRAME = 20 + 0xFFFF


class FramingError(StunParseError):
    """The stream cannot be framed (bad first byte, frame too large, buffer cap reached)."""


class StreamFramer:
    """Incremental framer with a cap on buffered bytes.

    Args:
        max_frame: largest frame accepted, in bytes (at most 65555, the STUN maximum).
        max_buffer: most bytes kept between calls (an incomplete frame plus unread data).
    """

    __slots__ = ("_buf", "max_buffer", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME, max_buffer: int = 2 * MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = min(max_frame, MAX_FRAME)
        # A frame of max_frame bytes may still have 3 bytes of ChannelData padding to come.
        self.max_buffer = max(max_buffer, self.max_frame + 3)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes, stop_type: int = -1) -> list[bytes]:
        """Add bytes; return the complete frames now available (ChannelData without padding).

        With ``stop_type`` (a STUN message type), framing stops after a message of that type:
        what follows stays buffered, unframed, for :meth:`take` (RFC 6062: a connection turns
        into a raw byte pipe after its ConnectionBind).
        """
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            first = buf[pos]
            if stop_type >= 0 and frames and ((frames[-1][0] << 8) | frames[-1][1]) == stop_type:
                del buf[:pos]
                return frames
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            if first < 0x40:
                size = total = 20 + length
            elif first < 0x80:
                size = 4 + length
                total = (size + 3) & ~3
            else:
                raise FramingError(f"byte {first:#04x} cannot start a STUN or ChannelData frame")
            if size > self.max_frame:
                raise FramingError(f"frame of {size} bytes exceeds the limit {self.max_frame}")
            if end - pos < total:
                break
            frames.append(bytes(buf[pos : pos + size]))
            pos += total
        if pos:
            del buf[:pos]
        if len(buf) > self.max_buffer:
            raise FramingError(f"more than {self.max_buffer} bytes buffered")
        return frames

    def take(self) -> bytes:
        """Remove and return whatever is buffered (the unframed rest of the stream)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
