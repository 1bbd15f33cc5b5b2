"""Microbenchmarks behind choices in the server's hot paths (docs/performance.md).

    python bench/micro.py            # all
    python bench/micro.py send hmac  # some

* ``send``: one UDP datagram to a loopback sink by ``socket.sendto`` on a memoryview versus a
  ``sendmmsg`` of 1, 2, 4, 8, 16 datagrams through ctypes (``stunturn.aio.mmsg.BatchIO``), per
  datagram; the sink is drained outside the timed loop's datagram count.
* ``hmac``: ``hmac.digest`` versus ``stunturn.stun.hmacs.hmac_digest`` (kept keyed states),
  HMAC-SHA1 and HMAC-SHA256 of 120 bytes.
* ``poll``: adding and removing 2,000 UDP sockets to an event loop (``add_reader`` /
  ``remove_reader``, uvloop when installed) versus one ``select.epoll`` set.

Each figure is the best of 5 repeats. Loopback only.
"""

from __future__ import annotations

import asyncio
import hmac
import select
import socket
import sys
import time
from collections.abc import Callable

from stunturn.aio.mmsg import SLOT, BatchIO, address_to_sockaddr
from stunturn.stun.hmacs import hmac_digest

REPEATS = 5


def best(fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(REPEATS))


def bench_send() -> None:
    io = BatchIO()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sink.setblocking(False)
    src = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    src.bind(("127.0.0.1", 0))
    peer = sink.getsockname()[:2]
    name = address_to_sockaddr(peer)
    fd, rx, sendto = src.fileno(), io.rx, src.sendto

    def drain() -> None:
        try:
            while True:
                sink.recv(2048)
        except BlockingIOError:
            pass

    for k in (1, 2, 4, 8, 16):
        rounds = 40_000 // k
        items: list[int] = []
        for j in range(k):
            items += [j, 100]

        def mmsg(items: list[int] = items, rounds: int = rounds, k: int = k) -> float:
            drain()
            t = time.perf_counter()
            for i in range(rounds):
                io.send_received(fd, items, 4, name)
                if i % max(1, 64 // k) == 0:
                    drain()
            return (time.perf_counter() - t) / (rounds * k) * 1e6

        def plain(rounds: int = rounds, k: int = k) -> float:
            drain()
            t = time.perf_counter()
            for i in range(rounds):
                for j in range(k):
                    sendto(rx[j * SLOT + 4 : j * SLOT + 104], peer)
                if i % max(1, 64 // k) == 0:
                    drain()
            return (time.perf_counter() - t) / (rounds * k) * 1e6

        print(
            f"send  {k:2} datagram(s) per call: sendmmsg {best(mmsg):.2f} us/datagram, "
            f"sendto {best(plain):.2f} us/datagram"
        )
    src.close()
    sink.close()


def bench_hmac() -> None:
    data = bytes(120)
    n = 100_000
    for name, key in (("sha1", bytes(16)), ("sha256", bytes(32))):

        def std(name: str = name, key: bytes = key) -> float:
            t = time.perf_counter()
            for _ in range(n):
                hmac.digest(key, data, name)
            return (time.perf_counter() - t) / n * 1e6

        def kept(name: str = name, key: bytes = key) -> float:
            t = time.perf_counter()
            for _ in range(n):
                hmac_digest(key, data, name)
            return (time.perf_counter() - t) / n * 1e6

        print(f"hmac  {name:6}: hmac.digest {best(std):.2f} us, kept states {best(kept):.2f} us")


def bench_poll() -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        kind = "uvloop"
    except ImportError:
        loop = asyncio.new_event_loop()
        kind = "asyncio"
    socks = []
    for _ in range(2000):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        s.bind(("127.0.0.1", 0))
        socks.append(s)

    async def with_loop() -> float:
        t = time.perf_counter()
        for s in socks:
            loop.add_reader(s.fileno(), lambda: None)
        await asyncio.sleep(0)
        for s in socks:
            loop.remove_reader(s.fileno())
        await asyncio.sleep(0)
        return (time.perf_counter() - t) / len(socks) * 1e6

    def with_epoll() -> float:
        ep = select.epoll()
        t = time.perf_counter()
        for s in socks:
            ep.register(s.fileno(), select.EPOLLIN)
        for s in socks:
            ep.unregister(s.fileno())
        elapsed = (time.perf_counter() - t) / len(socks) * 1e6
        ep.close()
        return elapsed

    looped = min(loop.run_until_complete(with_loop()) for _ in range(REPEATS))
    print(
        f"poll  add + remove per socket: {kind} {looped:.2f} us, "
        f"one epoll set {best(with_epoll):.2f} us"
    )
    loop.close()
    for s in socks:
        s.close()


BENCHES = {"send": bench_send, "hmac": bench_hmac, "poll": bench_poll}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown: {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    for name in names:
        BENCHES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
