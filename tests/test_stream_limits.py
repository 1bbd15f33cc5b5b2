"""TCP/TLS resource limits under abuse, against `stunturn serve` on loopback.

One source opens many idle and half-written connections; the limits hold (connections per
source IP, total connections, handshake / partial-message / idle timeouts), they are counted,
and the server keeps answering everybody else. Back-pressure: a client that sends requests
without reading answers is slowed down, not buffered without bound, and loses nothing. The
timeouts are scaled down from their defaults (10 s, 10 s, 300 s) to about a second.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from conftest import StartServer
from helpers import InProcessServer, ServerProcess
from helpers import binding_request as binding_pair

from stunturn.config import build_config
from stunturn.stun import Address, Message, StreamFramer, decode

IP_QUOTA = 6
STARTED = ("--listen", "127.0.0.1:0", "--no-turn", "--tls-listen", "127.0.0.1:0")
LIMITS = (
    "--self-signed",
    "--ip-connection-quota",
    str(IP_QUOTA),
    "--handshake-timeout",
    "1",
    "--message-timeout",
    "1",
    "--idle-timeout",
    "2",
)


def binding_request() -> bytes:
    return binding_pair()[1]


def open_from(source: str, target: Address, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(target, timeout=2.0, source_address=(source, 0))
        socks.append(sock)
    return socks


def is_closed(sock: socket.socket, wait: float) -> bool:
    """Whether the server closed (or reset) the connection within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def closed_now(socks: list[socket.socket], settle: float = 0.3) -> list[bool]:
    """After ``settle`` seconds, which connections the server has closed (checked at once)."""
    time.sleep(settle)
    result = []
    for sock in socks:
        sock.setblocking(False)
        try:
            result.append(sock.recv(1) == b"")
        except BlockingIOError:
            result.append(False)
        except (ConnectionResetError, BrokenPipeError):
            result.append(True)
        sock.settimeout(2.0)
    return result


def tcp_binding(target: Address, source: str = "127.0.0.2") -> Message:
    with socket.create_connection(target, timeout=3.0, source_address=(source, 0)) as sock:
        sock.sendall(binding_request())
        framer = StreamFramer()
        while True:
            data = sock.recv(4096)
            assert data, "server closed instead of answering"
            frames = framer.feed(data)
            if frames:
                return decode(frames[0])


@pytest.fixture
def limited(stunturn_server: StartServer) -> Iterator[ServerProcess]:
    yield stunturn_server(*STARTED, *LIMITS, "--workers", "2")


def test_per_ip_limit_holds_and_others_are_served(limited: ServerProcess) -> None:
    """40 connections from 127.0.0.1: exactly IP_QUOTA stay open (two workers: steering by
    source IP makes the count exact), the rest are closed at once; 127.0.0.2 is answered."""
    target = limited.addr("tcp")
    socks = open_from("127.0.0.1", target, 40)
    try:
        closed = closed_now(socks)
        assert closed.count(False) == IP_QUOTA, closed
        for _ in range(3):
            assert tcp_binding(target).cls.name == "SUCCESS"
        # The idle ones say nothing: closed after the 1 s handshake timeout.
        started = time.monotonic()
        survivors = [s for s, c in zip(socks, closed, strict=True) if not c]
        assert all(is_closed(s, 3.0) for s in survivors)
        assert time.monotonic() - started < 2.5
        # Their places are free again.
        fresh = open_from("127.0.0.1", target, IP_QUOTA)
        assert not any(closed_now(fresh))
        for sock in fresh:
            sock.close()
    finally:
        for sock in socks:
            sock.close()
    assert limited.stop() == 0
    counters = limited.stopped_counters()
    assert counters["stream_refused"] >= 40 - IP_QUOTA
    assert counters["stream_timeouts"] >= IP_QUOTA


def test_half_written_messages_time_out(limited: ServerProcess) -> None:
    """Slowloris: half a message, or one trickled a byte at a time, is cut off after the
    message timeout (progress does not extend it); a complete message resets nothing
    forever: the idle timeout closes a quiet connection later."""
    target = limited.addr("tcp")
    request = binding_request()
    half = socket.create_connection(target, timeout=3.0)
    half.sendall(request[:10])
    trickle = socket.create_connection(target, timeout=3.0)
    polite = socket.create_connection(target, timeout=3.0)
    polite.sendall(request)
    assert polite.recv(4096)
    polite.sendall(request[:7])  # a second message begun, never finished
    started = time.monotonic()
    trickled = 0
    while trickled < len(request) - 1 and time.monotonic() - started < 3:
        try:
            trickle.sendall(request[trickled : trickled + 1])
        except OSError:
            break
        trickled += 1
        time.sleep(0.15)
    elapsed = time.monotonic() - started
    assert trickled < len(request) - 1, "a trickled message was allowed to take 3 s"
    assert elapsed < 2.5
    for sock in (half, trickle, polite):
        assert is_closed(sock, 3.0)
        sock.close()
    assert tcp_binding(target).cls.name == "SUCCESS"


def test_idle_connection_closed_after_idle_timeout(limited: ServerProcess) -> None:
    target = limited.addr("tcp")
    sock = socket.create_connection(target, timeout=3.0)
    sock.sendall(binding_request())
    assert sock.recv(4096)
    started = time.monotonic()
    assert not is_closed(sock, 1.5)  # longer than the message timeout: idle is not partial
    assert is_closed(sock, 3.0)
    assert 1.8 < time.monotonic() - started < 4.0
    sock.close()


def test_tls_handshake_timeout(limited: ServerProcess) -> None:
    """TCP connections to the TLS port that never start the handshake, and one that stops
    half-way, are closed after the handshake timeout; a real TLS client is still served."""
    target = limited.addr("tls")
    silent = socket.create_connection(target, timeout=3.0)
    partial = socket.create_connection(target, timeout=3.0)
    partial.sendall(b"\x16\x03\x01\x00\xc8\x01")  # the start of a ClientHello
    started = time.monotonic()
    for sock in (silent, partial):
        assert is_closed(sock, 4.0)
        sock.close()
    assert time.monotonic() - started < 3.5
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(target, timeout=3.0) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(binding_request())
        assert decode(tls.recv(4096)).cls.name == "SUCCESS"


def test_total_connection_limit(stunturn_server: StartServer) -> None:
    """--connection-quota 8 with one worker: connections from eight source IPs fill it; the
    ninth source is refused until one closes."""
    server = stunturn_server(
        "--listen", "127.0.0.1:0", "--no-turn", "--workers", "1", "--connection-quota", "8"
    )
    target = server.addr("tcp")
    socks = [open_from(f"127.0.0.{10 + i}", target, 1)[0] for i in range(8)]
    try:
        assert not any(closed_now(socks))
        extra = open_from("127.0.0.30", target, 1)[0]
        assert is_closed(extra, 1.0)
        extra.close()
        socks.pop().close()
        time.sleep(0.2)
        assert tcp_binding(target, "127.0.0.31").cls.name == "SUCCESS"
    finally:
        for sock in socks:
            sock.close()


def test_back_pressure_bounds_the_write_buffer() -> None:
    """A client sends 30,000 Binding requests (about 600 KB, answers about 1.3 MB) without
    reading. The server stops reading from it once its write buffer passes stream_buffer
    (64 KiB here): the buffer stays bounded, another client is answered meanwhile, and once
    the client reads, every request gets its answer."""
    config = build_config(
        {
            "listen": ["127.0.0.1:0"],
            "workers": 1,
            "turn": False,
            "stream_buffer": 65536,
            "response_rate": 0,
        }
    )
    with InProcessServer(config) as server:
        server.start()
        target = server.addr("tcp")
        n = 30_000
        requests = b"".join(binding_request() for _ in range(n))
        sock = socket.create_connection(target, timeout=5.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(requests) and time.monotonic() < deadline:
            try:
                sent += sock.send(requests[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(0.5)
        assert server.worker is not None
        (conn,) = server.worker.connections
        assert conn.transport is not None
        buffered = conn.transport.get_write_buffer_size()
        assert buffered <= 65536 + 65536 * 2, buffered  # high-water mark plus one read's answers
        assert tcp_binding(target, "127.0.0.2").cls.name == "SUCCESS"
        # Now read: everything sent gets answered.
        sock.setblocking(True)
        sock.settimeout(5.0)
        framer = StreamFramer()
        answers = 0
        expected = sent // len(binding_request())
        while answers < n:
            if sent < len(requests):
                with contextlib.suppress(BlockingIOError, TimeoutError):
                    sock.setblocking(False)
                    sent += sock.send(requests[sent : sent + 65536])
                    sock.setblocking(True)
                    sock.settimeout(5.0)
                expected = sent // len(binding_request())
            data = sock.recv(1 << 20)
            assert data, f"closed after {answers} answers"
            answers += len(framer.feed(data))
        assert answers == n == expected
        sock.close()
        assert server.counters.stream_dropped == 0


def test_per_ip_limit_is_exact_over_ipv6(stunturn_server: StartServer) -> None:
    """The source-IP steering program reads IPv6 source addresses too (two workers)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = stunturn_server(
        "--listen", "[::1]:0", "--no-turn", "--workers", "2", "--ip-connection-quota", "4"
    )
    target = server.addr("tcp")
    socks = [socket.create_connection(target, timeout=2.0) for _ in range(20)]
    try:
        assert closed_now(socks).count(False) == 4
    finally:
        for sock in socks:
            sock.close()
