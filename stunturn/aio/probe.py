"""The asyncio driver of NAT discovery: real UDP sockets around the sans-IO step machine.

It opens each socket the machine asks for on a fresh kernel-chosen port, feeds it what arrives,
carries out its sends and TCP requests, and keeps one timer armed at the machine's next
deadline. All the protocol logic is in :mod:`stunturn.nat.discovery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

from ..nat.discovery import (
    Action,
    CloseSocket,
    Discovery,
    OpenSocket,
    ProbeConfig,
    SendDatagram,
    TcpRequest,
)
from ..stun import Address, FramingError, StreamFramer
from .netif import interface_addresses

DEFAULT_SERVERS = ("stun.stunprotocol.org:3478",)
"""Public RFC 5780 servers natprobe uses when given none (Stuntman's public instance). No test
contacts them; every test names its servers."""


async def resolve(host: str, port: int, family: int = 0) -> Address:
    """Resolve a host name or IP literal to one (ip, port), UDP."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    addr = infos[0][4]
    return (str(addr[0]), int(addr[1]))


def _source_toward(destination: Address) -> str | None:
    """The local IP the kernel would use towards ``destination`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(destination)
            return str(probe.getsockname()[0])
    except OSError:
        return None


class ProbeRunner:
    """Runs one :class:`Discovery` to completion."""

    def __init__(
        self,
        config: ProbeConfig,
        bind_ip: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        primary = config.servers[0]
        self.v6 = ":" in primary[0]
        self.local_ip = bind_ip or _source_toward(primary) or ("::" if self.v6 else "0.0.0.0")
        local_ips = config.local_ips or frozenset(a.address for a in interface_addresses())
        if bind_ip:
            local_ips |= {bind_ip}
        self.config = ProbeConfig(
            servers=config.servers,
            local_ips=local_ips,
            policy=config.policy,
            hairpin=config.hairpin,
            port_samples=config.port_samples,
            lifetime_max=config.lifetime_max,
            lifetime_step=config.lifetime_step,
            tcp_check=config.tcp_check,
            padding=config.padding,
        )
        self.bind_ip = bind_ip or ("::" if self.v6 else "0.0.0.0")
        self.machine = Discovery(self.config)
        self.on_progress = on_progress
        self.loop = asyncio.get_running_loop()
        self.sockets: dict[int, socket.socket] = {}
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._progress = (-1, -1)

    def _now(self) -> float:
        return self.loop.time()

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self._execute(self.machine.start(self._now()))
            await self.done
        finally:
            self._cleanup()
        report = self.machine.report()
        report["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        return report

    def _execute(self, actions: list[Action]) -> None:
        opened: list[tuple[int, Address]] = []
        for action in actions:
            if isinstance(action, OpenSocket):
                opened.append((action.sock, self._open(action.sock)))
            elif isinstance(action, SendDatagram):
                sock = self.sockets.get(action.sock)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.sendto(action.data, action.destination)
            elif isinstance(action, TcpRequest):
                task = self.loop.create_task(self._tcp(action))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(action, CloseSocket):
                self._close(action.sock)
        for sock_id, local in opened:
            self._execute(self.machine.on_opened(sock_id, local, self._now()))
        self._after_event()

    def _after_event(self) -> None:
        machine = self.machine
        if self.on_progress and machine.progress_total:
            progress = (machine.progress_done, machine.progress_total)
            if progress != self._progress:
                self._progress = progress
                self.on_progress(*progress)
        if machine.done:
            if not self.done.done():
                self.done.set_result(None)
            return
        deadline = machine.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._execute(self.machine.on_timer(self._now()))

    def _open(self, sock_id: int) -> Address:
        family = socket.AF_INET6 if self.v6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((self.bind_ip, 0))  # a fresh port from the kernel's randomised range
        self.sockets[sock_id] = sock
        self.loop.add_reader(sock.fileno(), self._readable, sock_id)
        return (self.local_ip, int(sock.getsockname()[1]))

    def _readable(self, sock_id: int) -> None:
        sock = self.sockets.get(sock_id)
        if sock is None:
            return
        for _ in range(64):
            try:
                data, source = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            actions = self.machine.on_datagram(sock_id, (source[0], source[1]), data, self._now())
            self._execute(actions)

    async def _tcp(self, action: TcpRequest) -> None:
        data: bytes | None = None
        timeout = self.config.policy.reliable_timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*action.destination), timeout
            )
            try:
                writer.write(action.data)
                framer = StreamFramer()
                deadline = self._now() + timeout
                while data is None:
                    chunk = await asyncio.wait_for(reader.read(4096), deadline - self._now())
                    if not chunk:
                        break
                    frames = framer.feed(chunk)
                    if frames:
                        data = frames[0]
            finally:
                writer.close()
        except (OSError, TimeoutError, FramingError):
            data = None
        self._execute(self.machine.on_tcp_response(action.request, data, self._now()))

    def _close(self, sock_id: int) -> None:
        sock = self.sockets.pop(sock_id, None)
        if sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock.fileno())
            sock.close()

    def _cleanup(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sock_id in list(self.sockets):
            self._close(sock_id)
        for task in list(self._tasks):
            task.cancel()


async def probe(
    servers: tuple[Address, ...],
    *,
    hairpin: bool = True,
    lifetime_max: float | None = None,
    port_samples: int = 8,
    bind_ip: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    config: ProbeConfig | None = None,
) -> dict[str, Any]:
    """Probe the NAT in front of this host; returns the natprobe/1 report."""
    cfg = config or ProbeConfig(
        servers=servers, hairpin=hairpin, lifetime_max=lifetime_max, port_samples=port_samples
    )
    return await ProbeRunner(cfg, bind_ip, on_progress).run()
