"""Robustness: 100,000 random and mutated datagrams, garbage TCP streams, and the per-source
response budget. The server must keep answering valid requests and count what it dropped.

The flood is paced by the server itself: every ``PROBE_EVERY`` datagrams a valid request goes
to the same listening socket from another loopback IP and the sender waits for its answer.
A UDP socket is a FIFO, so that answer means everything sent before it was read by the server;
the kernel buffer never simply overflows and the counters see (nearly) every datagram.
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import pytest
from conftest import StartInProcess, StartServer
from helpers import (
    binding_request,
    error_code,
    mapped,
    sockname,
    stream_exchange,
    stream_read,
    tcp_connect,
    udp_exchange,
    udp_socket,
)
from vectors import (
    RFC5769_SAMPLE_IPV4_RESPONSE,
    RFC5769_SAMPLE_REQUEST,
    RFC5769_SAMPLE_REQUEST_LONG_TERM,
)

from stunturn.config import build_config
from stunturn.stun import Address, MessageClass, StreamFramer, UnknownAttribute
from stunturn.stun.attributes import (
    ChangeRequest,
    Padding,
    Priority,
    ResponsePort,
    Software,
    Username,
)

SEED = 5780
TOTAL = 100_000
PROBE_EVERY = 1_000
FUZZ_IP = "127.0.0.1"
PROBE_IP = "127.0.0.7"
"""Pacing probes come from another IP so the fuzz source's response budget never hides them."""


def _templates() -> list[bytes]:
    """Valid requests (and one response) to mutate."""
    out = [
        RFC5769_SAMPLE_REQUEST,
        RFC5769_SAMPLE_REQUEST_LONG_TERM,
        RFC5769_SAMPLE_IPV4_RESPONSE,
        binding_request()[1],
        binding_request(fingerprint=True)[1],
        binding_request(Software("fuzz"), Priority(12345), fingerprint=True)[1],
        binding_request(Username("user:name"), UnknownAttribute(0x8123, b"opt"))[1],
        binding_request(ChangeRequest(True, True), Padding(b"\0" * 64))[1],
        binding_request(ResponsePort(9), UnknownAttribute(0x7001, b"\1\2\3"))[1],
    ]
    return out


def _with_fingerprint(body: bytes) -> bytes:
    """Append a correct FINGERPRINT to a header+attributes blob (fixing the length field)."""
    length = len(body) - 20 + 8
    head = body[:2] + struct.pack("!H", length) + body[4:20]
    crc = zlib.crc32(head + body[20:]) ^ 0x5354554E
    return head + body[20:] + struct.pack("!HHI", 0x8028, 4, crc)


def fuzz_datagrams(rng: random.Random, count: int) -> Iterator[bytes]:
    """``count`` datagrams: random bytes, bit-flipped, truncated, extended and re-lengthed
    valid messages, random attribute lists, bad FINGERPRINTs, ChannelData-looking junk."""
    templates = _templates()
    cookie = b"\x21\x12\xa4\x42"
    for _ in range(count):
        kind = rng.randrange(10)
        base = rng.choice(templates)
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 200))
        elif kind == 1:
            data = bytearray(base)
            for _ in range(rng.randrange(1, 9)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield bytes(data)
        elif kind == 2:
            yield base[: rng.randrange(0, len(base))]
        elif kind == 3:
            yield base + rng.randbytes(rng.randrange(1, 40))
        elif kind == 4:
            # Valid header with consistent length, attributes of random type, length and value.
            attrs = b""
            for _ in range(rng.randrange(1, 6)):
                atype = rng.choice([0x0001, 0x0006, 0x0009, 0x000A, 0x0020, 0x0024, 0x0027])
                atype = atype if rng.random() < 0.7 else rng.randrange(0x10000)
                value = rng.randbytes(rng.randrange(0, 24))
                attrs += struct.pack("!HH", atype, len(value)) + value
                attrs += b"\0" * (-len(value) % 4)
            head = struct.pack("!HH", 0x0001, len(attrs)) + cookie + rng.randbytes(12)
            yield _with_fingerprint(head + attrs) if rng.random() < 0.3 else head + attrs
        elif kind == 5:
            # Correct request, wrong FINGERPRINT.
            good = binding_request(Software("x" * rng.randrange(1, 30)), fingerprint=True)[1]
            yield good[:-4] + struct.pack("!I", rng.randrange(1 << 32))
        elif kind == 6:
            # Length field lies.
            lie = struct.pack("!H", rng.randrange(0x10000))
            yield base[:2] + lie + base[4:]
        elif kind == 7:
            yield bytes([rng.randrange(0x40, 0x50)]) + rng.randbytes(rng.randrange(3, 100))
        elif kind == 8:
            yield rng.randbytes(rng.randrange(200, 1400))
        else:
            # A message type with a random class and method.
            yield struct.pack("!H", rng.randrange(0x4000)) + base[2:]


def flood(server: Address, total: int, seed: int) -> float:
    """Send ``total`` fuzz datagrams to ``server``, paced by answered probes; returns seconds."""
    rng = random.Random(seed)
    start = time.monotonic()
    with udp_socket(FUZZ_IP) as fuzz, udp_socket(PROBE_IP) as probe:
        fuzz.setblocking(False)
        for i, data in enumerate(fuzz_datagrams(rng, total), 1):
            fuzz.sendto(data, server)
            if i % PROBE_EVERY == 0 or i == total:
                msg, _ = udp_exchange(probe, server, timeout=1.0, attempts=5)
                assert mapped(msg) == sockname(probe), f"probe after {i} datagrams"
                # Answers to fuzz that happened to be valid requests: read and discard.
                try:
                    for _ in range(PROBE_EVERY):
                        fuzz.recv(65536)
                except BlockingIOError:
                    pass
    return time.monotonic() - start


def garbage_streams(server: Address, rng: random.Random) -> int:
    """Open 20 connections that send bytes no STUN stream can start with; returns how many
    the server closed on its own."""
    closed = 0
    for _ in range(20):
        with tcp_connect(server) as sock:
            junk = bytes([rng.randrange(0x80, 0x100)]) + rng.randbytes(rng.randrange(1, 8192))
            try:
                sock.sendall(junk)
                sock.settimeout(2.0)
                closed += sock.recv(1024) == b""
            except ConnectionError:
                closed += 1
    return closed


def check_streams_after_garbage(server: Address, rng: random.Random) -> None:
    """A valid request on a NEW connection after garbage is answered; so is one that follows
    well-framed but undecodable frames on the same connection. (From 127.0.0.2: the flood's
    valid requests spent 127.0.0.1's response budget, so an answer to it would depend on
    timing.)"""
    with tcp_connect(server, source="127.0.0.2") as sock:
        tid, data = binding_request()
        [msg] = stream_exchange(sock, [data], 1)
        assert msg.transaction_id == tid and mapped(msg) == sockname(sock)
    with tcp_connect(server, source="127.0.0.2") as sock:
        # Frames the framer accepts (first byte < 0x40, sane length) but the decoder refuses.
        junk = b""
        for _ in range(10):
            body = rng.randbytes(4 * rng.randrange(0, 10))
            junk += struct.pack("!HH", 0x0001, len(body)) + b"\xde\xad\xbe\xef" + body + b"x" * 12
        tid, data = binding_request(fingerprint=True)
        [msg] = stream_exchange(sock, [junk + data], 1)
        assert msg.transaction_id == tid and mapped(msg) == sockname(sock)


@pytest.mark.slow
def test_flood_in_process_counters(inprocess_server: StartInProcess) -> None:
    """The acceptance test: after 100,000 fuzz datagrams (fixed seed) and garbage TCP streams,
    an in-process worker still answers valid requests over UDP and TCP, and its counters show
    what was read and dropped (malformed, bad FINGERPRINT) and that no datagram went missing."""
    config = build_config({"listen": ["127.0.0.1:0"], "workers": 1})
    server = inprocess_server(config)
    udp, tcp = server.addr("udp"), server.addr("tcp")
    elapsed = flood(udp, TOTAL, SEED)
    counters = server.counters
    probes = TOTAL // PROBE_EVERY
    # Every fuzz datagram and every probe reached the core (loopback, paced): none lost.
    assert counters.received >= TOTAL + probes, counters
    assert counters.malformed > TOTAL // 4, counters
    assert counters.bad_fingerprint > TOTAL // 20, counters
    assert counters.ignored > 0, counters
    assert counters.error_responses > 0, counters
    with udp_socket() as sock:
        msg, _ = udp_exchange(sock, udp)
        assert mapped(msg) == sockname(sock)

    rng = random.Random(SEED + 1)
    malformed_before = server.counters.malformed
    closed = garbage_streams(tcp, rng)
    assert closed == 20
    check_streams_after_garbage(tcp, rng)
    # Each broken stream counts once; each undecodable frame counts once.
    assert server.counters.malformed >= malformed_before + 20 + 10
    assert server.error is None
    print(f"flood of {TOTAL} took {elapsed:.1f} s; counters: {server.counters}")


@pytest.mark.slow
def test_flood_subprocess_summary(stunturn_server: StartServer) -> None:
    """The same flood against `stunturn serve` (uvloop, the shipped loop): it keeps answering
    over UDP and, after SIGTERM, its "stopped (...)" line reports malformed=N with N > 0."""
    server = stunturn_server("--listen", "127.0.0.1:0", "--workers", "1")
    udp = server.addr("udp")
    flood(udp, TOTAL, SEED)
    with udp_socket() as sock:
        msg, _ = udp_exchange(sock, udp)
        assert mapped(msg) == sockname(sock)
    assert server.stop(signal.SIGTERM) == 0
    counters = server.stopped_counters()
    assert counters["malformed"] > 0
    assert counters["bad_fingerprint"] > 0
    assert counters["received"] >= TOTAL
    assert "Traceback" not in server.stderr


def test_broken_stream_is_closed(inprocess_server: StartInProcess) -> None:
    """A connection whose framing breaks is closed (a request after the junk on the same
    connection is not answered) and counted as malformed once."""
    server = inprocess_server(build_config({"listen": ["127.0.0.1:0"], "workers": 1}))
    before = server.counters.malformed
    with tcp_connect(server.addr("tcp")) as sock:
        _, data = binding_request()
        sock.sendall(b"\xff" * 8 + data)
        try:
            answers = stream_read(sock, StreamFramer(), 1, timeout=1.0)
        except ConnectionError:
            answers = []
        assert answers == []
    deadline = time.monotonic() + 2.0
    while server.counters.malformed == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.counters.malformed == before + 1


# --- per-source response budget ---------------------------------------------------------------


def _burst(sock: socket.socket, server: Address, count: int) -> int:
    """Send ``count`` requests as fast as possible (half with FINGERPRINT, so both the fast
    path and the general path are exercised); return how many were answered."""
    tids = []
    for i in range(count):
        tid, data = binding_request(fingerprint=i % 2 == 1)
        tids.append(tid)
        sock.sendto(data, server)
    pending = set(tids)
    # Collect until the answers stop coming (0.5 s of quiet), at most 3 s.
    deadline = time.monotonic() + 3.0
    while pending and time.monotonic() < deadline:
        sock.settimeout(min(0.5, max(0.001, deadline - time.monotonic())))
        try:
            raw = sock.recv(2048)
        except TimeoutError:
            break
        pending.discard(raw[8:20])
    return count - len(pending)


def test_rate_limit_withholds_responses_per_source(stunturn_server: StartServer) -> None:
    """With --response-rate 1 --response-burst 5, a source sending 60 requests in a tight loop
    gets about 5 answers; another source IP is still answered; the summary counts
    rate_limited."""
    server = stunturn_server(
        "--listen", "127.0.0.1:0", "--workers", "1",
        "--response-rate", "1", "--response-burst", "5",
    )  # fmt: skip
    target = server.addr("udp")
    with udp_socket("127.0.0.1") as greedy, udp_socket("127.0.0.3") as other:
        answered = _burst(greedy, target, 60)
        assert 5 <= answered <= 7, answered
        msg, _ = udp_exchange(other, target)
        assert msg.cls is MessageClass.SUCCESS and mapped(msg) == sockname(other)
        assert error_code(msg) is None
    assert server.stop() == 0
    counters = server.stopped_counters()
    assert counters["rate_limited"] >= 60 - answered
    assert counters["binding_ok"] == answered + 1
