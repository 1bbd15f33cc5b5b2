"""Fuzz properties: malformed input never escapes as anything but the documented error.

* ``decode`` returns a Message or raises StunParseError; a decoded message re-encodes to
  bytes that decode to the same message, and the integrity checks return booleans.
* ``StreamFramer.feed`` returns frames or raises FramingError; frames plus buffered bytes
  account for every byte fed.
* ``ServerCore.handle_udp`` / ``handle_stream_frame`` return a list of SendTo whose data is a
  STUN response, and every input lands in exactly one counter.

Inputs are random bytes and mutations of valid messages (bit flips, truncations, length-field
edits, attribute-length edits, attribute-type swaps, splices, insertions), from fixed seeds, so
failures reproduce. The long-running variant is tests/fuzz/fuzz_decode.py.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable, Iterator, Sequence

import vectors as v
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import SAMPLES

from stunturn.server import (
    AlternateAddresses,
    CoreConfig,
    Counters,
    SendTo,
    ServerCore,
    StreamAction,
    Transport,
)
from stunturn.stun import (
    ATTRIBUTE_CLASSES,
    Attribute,
    FramingError,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    StunParseError,
    UnknownAttribute,
    check_fingerprint,
    check_integrity,
    check_integrity_sha256,
    decode,
)
from stunturn.stun.attributes import (
    ChangeRequest,
    ErrorCode,
    Padding,
    ResponsePort,
    Software,
    XorMappedAddress,
)

# Inputs per test; the sum is asserted to stay >= 100,000 (test_fuzz_budget).
N_DECODE_RANDOM = 40_000
N_DECODE_STRUCTURED = 20_000
N_DECODE_MUTATED = 60_000
N_FRAMER_STREAMS = 4_000  # each fed in several chunks
N_CORE_UDP = 20_000
N_CORE_STREAM = 8_000

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
KEY = b"fuzz key"
REGISTERED = sorted(ATTRIBUTE_CLASSES)
HEADER = struct.Struct("!HHI12s")

# --- corpus ------------------------------------------------------------------------------------


def seed_corpus() -> list[bytes]:
    """RFC vectors plus messages covering every attribute class, with and without integrity."""
    corpus = [
        v.RFC5769_SAMPLE_REQUEST,
        v.RFC5769_SAMPLE_IPV4_RESPONSE,
        v.RFC5769_SAMPLE_IPV6_RESPONSE,
        v.RFC5769_SAMPLE_REQUEST_LONG_TERM,
        v.RFC8489_B1_SAMPLE_REQUEST,
        v.RFC8489_B1_SAMPLE_REQUEST_AS_PUBLISHED,
    ]
    for attr in SAMPLES:
        corpus.append(Message(Method.BINDING, MessageClass.REQUEST, TID, [attr]).encode())
    everything = Message(Method.ALLOCATE, MessageClass.SUCCESS, TID, list(SAMPLES))
    corpus.append(everything.encode())
    corpus.append(everything.encode(KEY, sha256=True, fingerprint=True))
    for cls in MessageClass:
        corpus.append(Message(Method.BINDING, cls, TID).encode(fingerprint=True))
    return corpus


def core_corpus() -> list[bytes]:
    """Requests that reach every branch of the Binding service."""
    base: list[list[Attribute]] = [
        [],
        [Software("client")],
        [ChangeRequest(True, False)],
        [ChangeRequest(False, True)],
        [ChangeRequest(True, True)],
        [ChangeRequest(False, False)],
        [ResponsePort(40000)],
        [Padding(bytes(9))],
        [Padding(bytes(4)), ResponsePort(1)],
        [ChangeRequest(True, True), ResponsePort(2)],
        [UnknownAttribute(0x7ABC, b"x")],
        [UnknownAttribute(0xC0DE, b"y")],
    ]
    out: list[bytes] = []
    for attrs in base:
        for fp in (False, True):
            msg = Message(Method.BINDING, MessageClass.REQUEST, TID, list(attrs))
            out.append(msg.encode(fingerprint=fp))
            out.append(msg.encode(KEY, fingerprint=fp))
    out.append(Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [Software("x")]).encode())
    out.append(Message(Method.BINDING, MessageClass.INDICATION, TID).encode(fingerprint=True))
    out.append(
        Message(
            Method.BINDING, MessageClass.SUCCESS, TID, [XorMappedAddress("192.0.2.1", 1)]
        ).encode()
    )
    out.append(Message(Method.BINDING, MessageClass.ERROR, TID, [ErrorCode(400, "Bad")]).encode())
    out.append(b"\x40\x00\x00\x04abcd")
    return out


# --- mutators ----------------------------------------------------------------------------------


def attribute_offsets(data: bytes) -> list[int]:
    """Offsets of attribute headers, walking as far as the lengths allow."""
    offsets = []
    pos = 20
    while pos + 4 <= len(data):
        offsets.append(pos)
        pos += 4 + ((int.from_bytes(data[pos + 2 : pos + 4], "big") + 3) & ~3)
    return offsets


def fix_length(data: bytearray) -> bytearray:
    """Make the header length field agree with the data (when there is a header)."""
    if len(data) >= 20:
        data[2:4] = ((len(data) - 20) & 0xFFFF).to_bytes(2, "big")
    return data


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """One to three random edits of ``data``; the header length is often kept consistent."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(10)
        offsets = attribute_offsets(bytes(out))
        if kind == 0 and out:  # bit flips
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:  # random byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 2:  # truncation
            del out[rng.randrange(len(out) + 1) :]
        elif kind == 3 and len(out) >= 4:  # length field edit
            length = int.from_bytes(out[2:4], "big")
            new = rng.choice([0, length + 4, length - 4, length + 1, rng.randrange(0x10000)])
            out[2:4] = (new & 0xFFFF).to_bytes(2, "big")
        elif kind == 4 and offsets:  # attribute length edit
            off = rng.choice(offsets)
            alen = int.from_bytes(out[off + 2 : off + 4], "big")
            new = rng.choice([0, alen + 1, alen - 1, alen + 4, alen - 4, rng.randrange(0x10000)])
            out[off + 2 : off + 4] = (new & 0xFFFF).to_bytes(2, "big")
        elif kind == 5 and offsets:  # attribute type swap: feed one decoder another's value
            off = rng.choice(offsets)
            atype = rng.choice([*REGISTERED, rng.randrange(0x10000)])
            out[off : off + 2] = atype.to_bytes(2, "big")
        elif kind == 6:  # splice with another message
            other = rng.choice(corpus)
            cut_a = rng.randrange(len(out) + 1)
            cut_b = rng.randrange(min(20, len(other)), len(other) + 1)
            out = out[:cut_a] + other[cut_b:]
        elif kind == 7:  # insert or delete a few bytes
            pos = rng.randrange(len(out) + 1)
            if rng.random() < 0.5:
                out[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 8]))
            else:
                del out[pos : pos + rng.choice([1, 2, 4])]
        elif kind == 8 and offsets:  # duplicate an attribute
            off = rng.choice(offsets)
            end = min(
                len(out), off + 4 + ((int.from_bytes(out[off + 2 : off + 4], "big") + 3) & ~3)
            )
            out[end:end] = out[off:end]
        elif len(out) >= 2:  # class/method bits
            out[0] = rng.randrange(0x40)
            out[1] = rng.randrange(256)
        if rng.random() < 0.6:
            fix_length(out)
    return bytes(out)


def random_message(rng: random.Random) -> bytes:
    """A well-framed header followed by random attributes of registered or random types."""
    body = bytearray()
    for _ in range(rng.randint(0, 6)):
        atype = rng.choice(REGISTERED) if rng.random() < 0.8 else rng.randrange(0x10000)
        value = rng.randbytes(rng.choice([0, 1, 2, 3, 4, 8, 12, 16, 20, 32, rng.randrange(64)]))
        body += struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) % 4)
    mtype = rng.randrange(0x4000)
    return HEADER.pack(mtype, len(body), 0x2112A442, rng.randbytes(12)) + bytes(body)


# --- properties --------------------------------------------------------------------------------


def check_decode(data: bytes) -> None:
    """decode: Message or StunParseError; decoded messages re-encode and verify without raising."""
    try:
        msg = decode(data)
    except StunParseError:
        return
    assert isinstance(msg, Message)
    again = decode(msg.encode())
    assert again == msg
    assert isinstance(check_integrity(msg, KEY), bool)
    assert isinstance(check_integrity_sha256(msg, KEY), bool)
    assert isinstance(check_fingerprint(msg), bool)


def random_inputs(rng: random.Random, n: int) -> Iterator[bytes]:
    for i in range(n):
        size = rng.choice([0, 1, 4, 19, 20, 21, 24, 28, 32, rng.randrange(200)])
        data = bytearray(rng.randbytes(size))
        if i % 2 and size >= 20:
            # Give half of them a plausible header so the attribute walk gets exercised.
            data[0] &= 0x3F
            data[4:8] = b"\x21\x12\xa4\x42"
            fix_length(data)
        yield bytes(data)


def test_decode_random_bytes() -> None:
    """Random bytes, half with a valid-looking header: Message or StunParseError."""
    rng = random.Random(0x5EED_0001)
    for data in random_inputs(rng, N_DECODE_RANDOM):
        check_decode(data)


def test_decode_structured_random_messages() -> None:
    """Consistent framing, random attribute types and values: every decoder sees junk."""
    rng = random.Random(0x5EED_0002)
    for _ in range(N_DECODE_STRUCTURED):
        check_decode(random_message(rng))


def test_decode_mutations_of_valid_messages() -> None:
    """Bit flips, truncations, length edits, attribute-length/type edits, splices."""
    rng = random.Random(0x5EED_0003)
    corpus = seed_corpus()
    decoded = 0
    for i in range(N_DECODE_MUTATED):
        data = mutate(rng, corpus[i % len(corpus)], corpus)
        check_decode(data)
        try:
            decode(data)
            decoded += 1
        except StunParseError:
            pass
    # The mutations must not all be rejected at the header, or they test nothing.
    assert decoded > N_DECODE_MUTATED // 20


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_decode_hypothesis_bytes(data: bytes) -> None:
    """Hypothesis-chosen bytes (with shrinking on failure): Message or StunParseError."""
    check_decode(data)


@settings(max_examples=500, deadline=None)
@given(
    mtype=st.integers(0, 0x3FFF),
    attrs=st.lists(
        st.tuples(st.sampled_from(REGISTERED) | st.integers(0, 0xFFFF), st.binary(max_size=40)),
        max_size=6,
    ),
)
def test_decode_hypothesis_attributes(mtype: int, attrs: list[tuple[int, bytes]]) -> None:
    """Hypothesis-chosen (type, value) lists in a valid frame: Message or StunParseError."""
    body = b"".join(
        struct.pack("!HH", t, len(val)) + val + bytes(-len(val) % 4) for t, val in attrs
    )
    check_decode(HEADER.pack(mtype, len(body), 0x2112A442, TID) + body)


# --- StreamFramer ------------------------------------------------------------------------------


def check_framer(framer: StreamFramer, chunks: list[bytes]) -> None:
    """Frames or FramingError; frames + padding + buffered bytes account for every byte fed."""
    fed = 0
    taken = 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            frames = framer.feed(chunk)
        except FramingError:
            return
        for frame in frames:
            assert isinstance(frame, bytes)
            length = int.from_bytes(frame[2:4], "big")
            if frame[0] < 0x40:
                assert len(frame) == 20 + length
                taken += len(frame)
            else:
                assert frame[0] < 0x80
                assert len(frame) == 4 + length
                taken += (len(frame) + 3) & ~3
            assert len(frame) <= framer.max_frame
        assert framer.buffered <= framer.max_buffer
        assert taken + framer.buffered == fed


def chunked(rng: random.Random, stream: bytes) -> list[bytes]:
    cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randint(0, 6)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def test_framer_random_and_mutated_streams() -> None:
    """Random streams and mutated frame sequences, randomly chunked, with various caps."""
    rng = random.Random(0x5EED_0004)
    corpus = [*seed_corpus(), b"\x40\x00\x00\x05hello\x00\x00\x00", b"\x4f\xff\x00\x00"]
    for i in range(N_FRAMER_STREAMS):
        if i % 3 == 0:
            stream = rng.randbytes(rng.randrange(200))
        else:
            frames = [rng.choice(corpus) for _ in range(rng.randint(1, 5))]
            stream = b"".join(mutate(rng, f, corpus) if rng.random() < 0.3 else f for f in frames)
        framer = StreamFramer(*rng.choice([(), (64,), (64, 0), (200, 300), (30, 30)]))
        check_framer(framer, chunked(rng, stream))


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=80), max_size=8), max_frame=st.integers(0, 300))
def test_framer_hypothesis(chunks: list[bytes], max_frame: int) -> None:
    """Hypothesis-chosen chunks and caps: frames or FramingError, every byte accounted for."""
    check_framer(StreamFramer(max_frame=max_frame), chunks)


# --- ServerCore --------------------------------------------------------------------------------

GRID = AlternateAddresses("192.0.2.10", "192.0.2.11", 3478, 3479)
REMOTES = [("198.51.100.7", 54321), ("2001:db8::7", 40000), ("10.0.0.1", 1)]
LOCALS = [*GRID.listeners(), ("2001:db8::1", 3478)]


def make_cores() -> list[ServerCore]:
    return [
        ServerCore(CoreConfig(response_rate=0)),
        ServerCore(CoreConfig(rfc5780=GRID, response_rate=0)),
        ServerCore(CoreConfig(rfc5780=GRID, software="fuzz", response_rate=0)),
        ServerCore(CoreConfig(response_rate=2, response_burst=5)),
    ]


def outcome_total(counters: Counters) -> int:
    c = counters
    return (
        c.malformed + c.bad_fingerprint + c.ignored + c.rate_limited + c.binding_ok
    ) + c.error_responses


def check_actions(data: bytes, actions: Sequence[StreamAction], transport: Transport) -> None:
    """Whatever the core sends is a well-formed STUN response to the input's transaction."""
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, SendTo)
        assert action.transport is transport
        assert len(action.data) <= 20 + 0xFFFF
        response = decode(action.data)
        assert response.cls in (MessageClass.SUCCESS, MessageClass.ERROR)
        assert response.transaction_id == data[8:20]


def core_inputs(rng: random.Random, n: int) -> Iterator[bytes]:
    corpus = core_corpus()
    randoms = random_inputs(rng, n)
    for i, data in enumerate(randoms):
        yield data if i % 4 == 0 else mutate(rng, corpus[i % len(corpus)], corpus)


def run_core(
    n: int,
    seed: int,
    call: Callable[[ServerCore, bytes, float, random.Random], Sequence[StreamAction]],
) -> None:
    rng = random.Random(seed)
    cores = make_cores()
    for i, data in enumerate(core_inputs(rng, n)):
        core = cores[rng.randrange(len(cores))]
        before = core.counters.received
        call(core, data, i / 1000, rng)
        assert core.counters.received == before + 1
    for core in cores:
        assert outcome_total(core.counters) == core.counters.received
    # Enough inputs must get through to answers, or the property says little.
    assert sum(c.counters.binding_ok for c in cores) > n // 50
    assert sum(c.counters.error_responses for c in cores) > n // 100
    assert cores[-1].counters.rate_limited > 0


def test_core_handle_udp_never_raises() -> None:
    """Random and mutated datagrams: a list of well-formed responses, one counter each."""

    def call(
        core: ServerCore, data: bytes, now: float, rng: random.Random
    ) -> Sequence[StreamAction]:
        actions = core.handle_udp(data, rng.choice(LOCALS), rng.choice(REMOTES), now)
        check_actions(data, actions, Transport.UDP)
        return actions

    run_core(N_CORE_UDP, 0x5EED_0005, call)


def test_core_handle_stream_frame_never_raises() -> None:
    """Random and mutated stream frames over TCP and TLS: same properties as UDP."""

    def call(
        core: ServerCore, data: bytes, now: float, rng: random.Random
    ) -> Sequence[StreamAction]:
        transport = rng.choice([Transport.TCP, Transport.TLS])
        local, remote = rng.choice(LOCALS), rng.choice(REMOTES)
        actions = core.handle_stream_frame(data, local, remote, transport, now)
        check_actions(data, actions, transport)
        assert all(
            isinstance(a, SendTo) and (a.local, a.remote) == (local, remote) for a in actions
        )
        return actions

    run_core(N_CORE_STREAM, 0x5EED_0006, call)


def test_fuzz_budget() -> None:
    """The suite's fuzz tests feed at least 100,000 inputs in total."""
    total = (
        N_DECODE_RANDOM
        + N_DECODE_STRUCTURED
        + N_DECODE_MUTATED
        + N_FRAMER_STREAMS
        + N_CORE_UDP
        + N_CORE_STREAM
    )
    assert total >= 100_000
