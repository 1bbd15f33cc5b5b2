"""StreamFramer: STUN and ChannelData frames out of a TCP/TLS byte stream.

RFC 8489 section 6.2.2 (STUN over streams is self-delimiting), RFC 8656 section 12.5
(ChannelData over streams is padded to 4; the length field excludes the padding),
First byte 0x00-0x3F STUN, 0x40-0x7F ChannelData (RFC 8656 channels 0x4000-0x4FFF plus the
RFC 5766 range up to 0x7FFF that older clients use).
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stunturn.stun import (
    FramingError,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    StunParseError,
    decode,
)
from stunturn.stun.attributes import Data, Software

TID = bytes(range(12))
STUN = Message(Method.BINDING, MessageClass.REQUEST, TID, [Software("framing test")]).encode()


def channel_data(channel: int, payload: bytes) -> bytes:
    """A ChannelData frame without padding (what the framer returns)."""
    return struct.pack("!HH", channel, len(payload)) + payload


def padded(frame: bytes) -> bytes:
    """The frame as sent over a stream: ChannelData padded to a multiple of 4."""
    if 0x40 <= frame[0] < 0x80:
        return frame + b"\x00" * (-len(frame) % 4)
    return frame


def feed_all(framer: StreamFramer, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += framer.feed(chunk)
        assert framer.buffered <= framer.max_buffer
    return out


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    cuts = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


FRAMES = [
    STUN,
    channel_data(0x4000, b""),
    channel_data(0x4001, b"a"),
    channel_data(0x4FFF, b"ab"),
    channel_data(0x4123, b"abc"),
    channel_data(0x4456, b"abcd"),
    channel_data(0x4789, b"abcde"),
    Message(Method.ALLOCATE, MessageClass.SUCCESS, TID).encode(),  # header only
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f"{f[0]:#04x}-{len(f)}")
def test_every_split_point(frame: bytes) -> None:
    """A frame cut into two pieces at any point comes out once, whole, unpadded."""
    wire = padded(frame)
    for i in range(len(wire) + 1):
        framer = StreamFramer()
        assert feed_all(framer, [wire[:i], wire[i:]]) == [frame], i
        assert framer.buffered == 0


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f"{f[0]:#04x}-{len(f)}")
def test_one_byte_at_a_time(frame: bytes) -> None:
    """Fed one byte per call, the frame appears exactly when its last (padding) byte arrives."""
    wire = padded(frame)
    framer = StreamFramer()
    for i, byte in enumerate(wire):
        out = framer.feed(bytes((byte,)))
        if i < len(wire) - 1:
            assert out == []
            assert framer.buffered == i + 1
        else:
            assert out == [frame]
    assert framer.buffered == 0


def test_channel_data_waits_for_its_padding() -> None:
    """Over streams the padding is part of the frame: the frame is held until it arrives."""
    framer = StreamFramer()
    frame = channel_data(0x4001, b"abcde")
    assert framer.feed(frame) == []
    assert framer.buffered == len(frame)
    assert framer.feed(b"\x00\x00") == []
    assert framer.feed(b"\x00" + STUN) == [frame, STUN]


def test_channel_data_padding_contents_are_dropped() -> None:
    """Whatever the padding bytes are, they are not part of the returned frame."""
    framer = StreamFramer()
    assert framer.feed(channel_data(0x4001, b"a") + b"\xff\xff\xff") == [channel_data(0x4001, b"a")]


def test_interleaved_in_one_chunk() -> None:
    """STUN and ChannelData back to back in one feed come out in order."""
    stream = b"".join(padded(f) for f in FRAMES * 3)
    framer = StreamFramer()
    assert framer.feed(stream) == FRAMES * 3
    assert framer.buffered == 0
    assert [decode(f).transaction_id for f in framer.feed(STUN + STUN)] == [TID, TID]


frame_strategy = st.one_of(
    st.builds(channel_data, st.integers(0x4000, 0x7FFF), st.binary(max_size=70)),
    st.builds(
        lambda tid, data: Message(Method.BINDING, MessageClass.REQUEST, tid, [Data(data)]).encode(),
        st.binary(min_size=12, max_size=12),
        st.binary(max_size=70),
    ),
)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(frame_strategy, max_size=8), data=st.data())
def test_interleaved_with_random_chunking(frames: list[bytes], data: st.DataObject) -> None:
    """Any chunking of any interleaving of frames gives back the same frames, in order."""
    stream = b"".join(padded(f) for f in frames)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    framer = StreamFramer()
    assert feed_all(framer, split_at(stream, points)) == frames
    assert framer.buffered == 0


@pytest.mark.parametrize("first", range(0x80, 0x100, 0x0F))
def test_bad_first_byte_raises_framing_error_sampled(first: int) -> None:
    """Bytes 0x80-0xFF cannot start a frame: FramingError, as soon as 4 bytes are in."""
    framer = StreamFramer()
    assert framer.feed(bytes((first, 0, 0))) == []
    with pytest.raises(FramingError):
        framer.feed(b"\x00")


def test_every_bad_first_byte() -> None:
    """All of 0x80-0xFF raise; all of 0x00-0x7F are accepted as a frame start."""
    for first in range(0x100):
        framer = StreamFramer()
        data = bytes((first, 0x01, 0x00, 0x00)) + bytes(16)
        if first >= 0x80:
            with pytest.raises(FramingError):
                framer.feed(data)
        else:
            assert framer.feed(data) == [data[:20] if first < 0x40 else data[:4]]


def test_bad_byte_after_good_frames() -> None:
    """A good frame followed by garbage: the error surfaces (the stream is broken)."""
    framer = StreamFramer()
    with pytest.raises(FramingError):
        framer.feed(STUN + b"\x99\x00\x00\x00")


def test_framing_error_is_a_stun_parse_error() -> None:
    """FramingError subclasses StunParseError, so one except clause covers malformed input."""
    assert issubclass(FramingError, StunParseError)


def test_max_frame_refuses_large_frames_from_their_header() -> None:
    """A frame larger than max_frame fails when its length field is seen, not after buffering."""
    framer = StreamFramer(max_frame=100)
    with pytest.raises(FramingError):
        framer.feed(struct.pack("!HH", 0x0001, 84))  # 20 + 84 > 100
    framer = StreamFramer(max_frame=100)
    with pytest.raises(FramingError):
        framer.feed(struct.pack("!HH", 0x4000, 97))  # 4 + 97 > 100
    framer = StreamFramer(max_frame=100)
    frame = channel_data(0x4000, bytes(96))  # exactly 100
    assert framer.feed(frame) == [frame]
    stun = Message(Method.BINDING, MessageClass.REQUEST, TID, [Data(bytes(76))]).encode()
    assert len(stun) == 100
    assert framer.feed(stun) == [stun]


def test_max_frame_is_capped_at_the_stun_maximum() -> None:
    """max_frame never exceeds 20 + 65535, and max_buffer is at least max_frame."""
    framer = StreamFramer(max_frame=10**6, max_buffer=10)
    assert framer.max_frame == 20 + 0xFFFF
    assert framer.max_buffer >= framer.max_frame


def test_largest_frames_pass_with_defaults() -> None:
    """A 65552-byte STUN message and a 65535-byte ChannelData payload pass the defaults."""
    big = Message(Method.BINDING, MessageClass.REQUEST, TID, [Data(bytes(65528))]).encode()
    cd = channel_data(0x4000, bytes(0xFFFF))
    framer = StreamFramer()
    assert framer.feed(big + padded(cd)) == [big, cd]


def test_byte_at_a_time_64k_message_keeps_buffer_bounded() -> None:
    """Linear work, checked as a property: one byte per call over a 64 KiB message.

    Each call adds exactly one byte to the buffer (nothing is re-copied or duplicated), the
    buffer never exceeds max_buffer, and the frame comes out intact at the end.
    """
    big = Message(
        Method.BINDING, MessageClass.REQUEST, TID, [Data((bytes(range(256)) * 256)[:65500])]
    )
    raw = big.encode()
    framer = StreamFramer()
    out: list[bytes] = []
    for i in range(len(raw)):
        out += framer.feed(raw[i : i + 1])
        assert framer.buffered == (i + 1) % len(raw)
        assert framer.buffered <= framer.max_buffer
    assert out == [raw]
    assert decode(out[0]) == big


def test_many_small_frames_in_one_feed() -> None:
    """Ten thousand 4-byte ChannelData frames in one call all come out; nothing stays."""
    frames = [channel_data(0x4000 + (i & 0xFFF), b"") for i in range(10_000)]
    framer = StreamFramer()
    assert framer.feed(b"".join(frames)) == frames
    assert framer.buffered == 0


@pytest.mark.parametrize("max_buffer", [0, 50, 100, 104, 1000])
def test_buffer_stays_within_max_buffer(max_buffer: int) -> None:
    """Whatever the chunking, the framer never holds more than max_buffer bytes between calls."""
    stream = b"".join(padded(f) for f in [channel_data(0x4000, bytes(100)), STUN] * 5)
    for size in (1, 3, 7, 64, 1000):
        framer = StreamFramer(max_frame=104, max_buffer=max_buffer)
        out = feed_all(framer, [stream[i : i + size] for i in range(0, len(stream), size)])
        assert len(out) == 10


def test_padded_channel_data_of_max_frame_size_fed_bytewise() -> None:
    """A ChannelData frame of exactly max_frame bytes passes however it is chunked."""
    framer = StreamFramer(max_frame=101, max_buffer=0)
    frame = channel_data(0x4000, bytes(97))  # 101 bytes, 3 bytes of padding on the wire
    out: list[bytes] = []
    for byte in padded(frame):
        out += framer.feed(bytes((byte,)))
    assert out == [frame]


def test_empty_feed() -> None:
    """Feeding nothing returns nothing and keeps the state."""
    framer = StreamFramer()
    assert framer.feed(b"") == []
    assert framer.feed(STUN[:3]) == []
    assert framer.feed(b"") == []
    assert framer.feed(STUN[3:]) == [STUN]
