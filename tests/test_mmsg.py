"""Batched UDP I/O (recvmmsg/sendmmsg via ctypes) on real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from stunturn.aio import mmsg

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="recvmmsg/sendmmsg not available")


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    family, host = request.param
    server = socket.socket(family, socket.SOCK_DGRAM)
    client = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    client.bind((host, 0))
    server.setblocking(False)
    client.settimeout(2.0)
    yield server, client
    server.close()
    client.close()


def test_batch_receive_and_reply_to_each_source(pair: tuple[socket.socket, socket.socket]) -> None:
    """Datagrams come in one call with their lengths and sources; queued replies (with a gap
    in the slots) go back to the right source in order."""
    server, client = pair
    io = mmsg.BatchIO(batch=8)
    payloads = [bytes([i]) * (i + 1) for i in range(5)]
    for p in payloads:
        client.sendto(p, server.getsockname()[:2])
    n = io.recv(server.fileno())
    assert n == 5
    me = client.getsockname()[:2]
    for i in range(n):
        off = i * mmsg.SLOT
        assert bytes(io.rx[off : off + io.length(i)]) == payloads[i]
        assert io.address(i) == me
    for i in (0, 1, 3, 4):  # slot 2 gets no reply: the flush must skip the gap
        reply = b"re:" + payloads[i]
        io.tx[i * mmsg.SLOT : i * mmsg.SLOT + len(reply)] = reply
        io.queue(i, len(reply))
    assert io.flush(server.fileno()) == 0
    got = [client.recvfrom(100)[0] for _ in range(4)]
    assert got == [b"re:" + payloads[i] for i in (0, 1, 3, 4)]
    assert io.recv(server.fileno()) == 0  # nothing left, no blocking


def test_large_datagram_is_not_truncated(pair: tuple[socket.socket, socket.socket]) -> None:
    """A 60,000-byte datagram fits one slot whole."""
    server, client = pair
    io = mmsg.BatchIO(batch=2)
    big = bytes(range(256)) * 234
    client.sendto(big, server.getsockname()[:2])
    assert io.recv(server.fileno()) == 1
    assert io.length(0) == len(big)
    assert bytes(io.rx[: len(big)]) == big


def test_sockaddr_to_address_round_trip() -> None:
    """Raw sockaddr_in / sockaddr_in6 bytes decode to (host, port)."""
    v4 = (socket.AF_INET).to_bytes(2, "little") + (3478).to_bytes(2, "big")
    v4 += socket.inet_aton("192.0.2.7") + bytes(8)
    assert mmsg.sockaddr_to_address(v4) == ("192.0.2.7", 3478)
    v6 = (socket.AF_INET6).to_bytes(2, "little") + (5349).to_bytes(2, "big") + bytes(4)
    v6 += socket.inet_pton(socket.AF_INET6, "2001:db8::9") + bytes(4)
    assert mmsg.sockaddr_to_address(v6) == ("2001:db8::9", 5349)


def test_ipv6_sources_whole_after_ipv4_reads_without_reset() -> None:
    """An IPv4 read (``v6=False``) skips resetting the address lengths; an IPv6 read on the
    same buffers afterwards must still see whole 28-byte source addresses in every slot,
    including slots that an earlier, larger IPv4 batch shortened."""
    io = mmsg.BatchIO(batch=8)
    sockets = []
    try:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        c4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sockets = [v4, v6, c4, c6]
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        c4.bind(("127.0.0.1", 0))
        c6.bind(("::1", 0))
        v4.setblocking(False)
        v6.setblocking(False)
        for count in (8, 2):  # a full batch, then a small one: both shorten slots
            for i in range(count):
                c4.sendto(b"4" * (i + 1), v4.getsockname()[:2])
            assert _recv_all(io, v4.fileno(), False, count) == count
            for i in range(count):
                assert io.address(i) == c4.getsockname()[:2]
        for i in range(8):
            c6.sendto(b"6" * (i + 1), v6.getsockname()[:2])
        assert _recv_all(io, v6.fileno(), True, 8) == 8
        for i in range(8):
            assert io.address(i) == c6.getsockname()[:2]
    finally:
        for s in sockets:
            s.close()


def _recv_all(io: mmsg.BatchIO, fd: int, v6: bool, expected: int) -> int:
    """One batched read once all ``expected`` datagrams are queued (loopback is immediate,
    but poll briefly rather than rely on it)."""
    import select  # noqa: PLC0415 - only this helper needs it

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll(2000)
    return io.recv(fd, v6)
