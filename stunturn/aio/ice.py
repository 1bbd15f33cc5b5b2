"""The asyncio side of ICE: sockets, candidate gathering, and the driver of the sans-IO agent.

:class:`IceConnection` owns one UDP socket per usable local address (its host candidates),
learns server-reflexive candidates by sending Binding requests from those sockets to STUN
servers, and relayed candidates by allocating on TURN servers. Every datagram that arrives is
handed to :class:`stunturn.ice.IceAgent`; every datagram the agent wants sent goes out from the
right base (a host socket, or a TURN allocation). One timer follows the agent's next deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..ice import (
    Candidate,
    CandidateType,
    IceAgent,
    IceState,
    LocalCandidate,
    SendDatagram,
    candidate_priority,
    foundation,
    local_preference,
)
from ..stun import Address, Message, MessageClass, Method, StunParseError, decode
from ..stun.attributes import XorMappedAddress
from ..stun.transaction import ClientTransaction, RetransmitPolicy
from ..turn.client import TurnUsageError
from .netif import interface_addresses
from .turnclient import TurnClient, TurnClientError

if TYPE_CHECKING:
    from ..turn.url import IceServer

log = logging.getLogger("stunturn.ice")

GATHER_POLICY = RetransmitPolicy(rto=0.5, rc=4, rm=2)
"""Server-reflexive gathering: 0, 0.5, 1.5, 3.5 s, give up at 4.5 s."""
RECEIVE_QUEUE = 4096
"""Received datagrams waiting for recv(); more are dropped (counted in ``dropped``)."""


@dataclass(frozen=True, slots=True)
class TurnServerSpec:
    """A TURN server to allocate on, with its long-term credentials."""

    server: IceServer
    username: str
    password: str


@dataclass(slots=True)
class _HostSocket:
    base_id: int
    sock: socket.socket
    address: Address


@dataclass(slots=True)
class _Gathering:
    """Pending server-reflexive Binding transactions and who waits for each."""

    transactions: dict[bytes, tuple[ClientTransaction, _HostSocket, Address]] = field(
        default_factory=dict
    )
    futures: dict[bytes, asyncio.Future[Address | None]] = field(default_factory=dict)


class IceConnection:
    """An ICE agent with real sockets.

    Args:
        controlling: the role (the offerer is usually controlling).
        stun: STUN servers for server-reflexive candidates, as (host, port); a host name is
            resolved (without blocking the loop) when gathering starts.
        turn: TURN servers for relayed candidates.
        include_loopback: also use loopback addresses as host candidates (tests, one machine).
        relay_only: offer relayed candidates only (hide local addresses, force the relay).
        host_addresses: use exactly these local IP addresses instead of enumerating
            interfaces (ValueError for anything that is not an IP address).
        agent_options: passed to :class:`IceAgent` (e.g. ``failure_timeout``).

    :meth:`recv` raises ConnectionError once ICE has failed (consent lost included) or the
    connection was closed; :meth:`send` raises it when no pair is selected.
    """

    def __init__(
        self,
        controlling: bool,
        *,
        stun: list[Address] | tuple[Address, ...] = (),
        turn: list[TurnServerSpec] | tuple[TurnServerSpec, ...] = (),
        include_loopback: bool = False,
        host_addresses: list[str] | None = None,
        tie_breaker: int | None = None,
        relay_only: bool = False,
        **agent_options: Any,
    ) -> None:
        for ip in host_addresses or ():
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"host address {ip!r} is not an IP address") from None
        self.agent = IceAgent(controlling, tie_breaker=tie_breaker, **agent_options)
        self.stun = list(stun)
        self.turn = list(turn)
        self.include_loopback = include_loopback
        self.host_addresses = host_addresses
        self.relay_only = relay_only
        """Gather relayed candidates only (like WebRTC's iceTransportPolicy "relay")."""
        self.loop = asyncio.get_running_loop()
        self._hosts: dict[int, _HostSocket] = {}
        self._relays: dict[int, Any] = {}
        self._next_base = 0
        self._gathering = _Gathering()
        self._timer: asyncio.TimerHandle | None = None
        self._incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        """Application datagrams; None once the connection has failed or closed."""
        self._ended = False
        self._channel_task: asyncio.Task[None] | None = None
        self._state_changed = asyncio.Event()
        self._candidates: asyncio.Queue[Candidate | None] = asyncio.Queue()
        self._relay_channels: set[tuple[int, Address]] = set()
        self.dropped = 0
        """Application datagrams dropped because the receive queue was full."""
        self.gather_errors: list[str] = []
        """Why candidates are missing (a host address that cannot be bound, a STUN server that
        does not answer, a TURN allocation that failed); failures cite them."""

    # --- credentials --------------------------------------------------------------------------

    @property
    def local_credentials(self) -> tuple[str, str]:
        return self.agent.local_ufrag, self.agent.local_password

    def set_remote_credentials(self, ufrag: str, password: str) -> None:
        self.agent.set_remote_credentials(ufrag, password)

    # --- gathering ---------------------------------------------------------------------------

    async def gather(self) -> AsyncIterator[Candidate]:
        """Gather candidates, yielding each as soon as it is known (trickle ICE)."""
        task = self.loop.create_task(self._gather_all())
        try:
            while True:
                candidate = await self._candidates.get()
                if candidate is None:
                    break
                yield candidate
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _new_base(self) -> int:
        self._next_base += 1
        return self._next_base

    def _add_local(self, candidate: Candidate, base_id: int, base: Address) -> None:
        self._execute(
            self.agent.add_local_candidate(LocalCandidate(candidate, base_id, base), self._now())
        )
        self._candidates.put_nowait(candidate)

    def _usable_addresses(self) -> list[str]:
        if self.host_addresses is not None:
            return list(self.host_addresses)
        out = []
        for entry in interface_addresses():
            if entry.is_loopback and not self.include_loopback:
                continue
            if entry.v6 and entry.is_link_local:
                continue  # needs a scope id; browsers skip them too
            out.append(entry.address)
        return list(dict.fromkeys(out))

    async def _gather_all(self) -> None:
        try:
            for index, ip in enumerate([] if self.relay_only else self._usable_addresses()):
                host = self._open_host(ip)
                if host is None:
                    continue
                cand = Candidate(
                    foundation(CandidateType.HOST, ip),
                    1,
                    "udp",
                    candidate_priority(CandidateType.HOST, local_preference(ip, index)),
                    host.address[0],
                    host.address[1],
                    CandidateType.HOST,
                )
                self._add_local(cand, host.base_id, host.address)
            # Relay-only sends nothing but TURN requests (no STUN, not even a name lookup).
            jobs = [] if self.relay_only else [self._gather_srflx(server) for server in self.stun]
            jobs += [self._gather_relay(spec, i) for i, spec in enumerate(self.turn)]
            await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            self.agent.end_of_local_candidates()
            self._candidates.put_nowait(None)
            self._state_changed.set()

    def _open_host(self, ip: str) -> _HostSocket | None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((ip, 0))
            sock.setblocking(False)
        except OSError as exc:
            log.debug("cannot bind a host candidate on %s: %s", ip, exc)
            self.gather_errors.append(f"host {ip}: {exc}")
            sock.close()
            return None
        host = _HostSocket(self._new_base(), sock, (ip, int(sock.getsockname()[1])))
        self._hosts[host.base_id] = host
        self.loop.add_reader(sock.fileno(), self._on_host_readable, host)
        return host

    async def _resolve(self, server: Address) -> list[Address]:
        """The server's addresses, one per family (IP literals as they are)."""
        host, port = server
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [server]
        try:
            infos = await self.loop.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP
            )
        except OSError as exc:
            log.info("STUN server %s: cannot resolve: %s", host, exc)
            self.gather_errors.append(f"STUN server {host}: cannot resolve: {exc}")
            return []
        found: dict[int, Address] = {}
        for family, _, _, _, sockaddr in infos:
            found.setdefault(family, (str(sockaddr[0]), int(sockaddr[1])))
        return list(found.values())

    async def _gather_srflx(self, server: Address) -> None:
        """A Binding from every host socket of the server's family; each distinct mapped
        address that differs from its base becomes a server-reflexive candidate."""
        for address in await self._resolve(server):
            await self._gather_srflx_from(address)

    async def _gather_srflx_from(self, server: Address) -> None:
        waiters = []
        for host in list(self._hosts.values()):
            if (":" in host.address[0]) != (":" in server[0]):
                continue
            msg = Message(Method.BINDING, MessageClass.REQUEST)
            tx = ClientTransaction(msg.transaction_id, msg.encode(), server, GATHER_POLICY)
            future: asyncio.Future[Address | None] = self.loop.create_future()
            self._gathering.transactions[tx.tid] = (tx, host, server)
            waiters.append((host, future))
            self._gathering.futures[tx.tid] = future
            self._send_raw(host, server, tx.start(self._now()))
        self._rearm()
        for host, future in waiters:
            mapped = await future
            if mapped is None:
                self.gather_errors.append(f"STUN server {server[0]}:{server[1]}: no answer")
                continue
            if mapped == host.address:
                continue
            # The same mapping from another STUN server is a duplicate; a peer-reflexive local
            # candidate at this address (a check's answer came first) is not: those are never
            # signalled (RFC 8445 section 7.2.5.3.1), so the peer would not learn the address.
            if any(
                lc.candidate.address == mapped
                and lc.base_id == host.base_id
                and lc.candidate.type is not CandidateType.PRFLX
                for lc in self.agent.local_candidates
            ):
                continue
            cand = Candidate(
                foundation(CandidateType.SRFLX, host.address[0], server[0]),
                1,
                "udp",
                candidate_priority(CandidateType.SRFLX, local_preference(host.address[0])),
                mapped[0],
                mapped[1],
                CandidateType.SRFLX,
                host.address[0],
                host.address[1],
            )
            self._add_local(cand, host.base_id, host.address)

    async def _gather_relay(self, spec: TurnServerSpec, index: int) -> None:
        base_id = self._new_base()

        def on_data(peer: Address, data: bytes) -> None:
            self._deliver(base_id, peer, data)

        try:
            client = await TurnClient.connect(
                spec.server, spec.username, spec.password, on_data=on_data
            )
        except Exception as exc:  # a TURN server that fails is one missing candidate
            log.info("TURN %s: no relayed candidate: %s", spec.server, exc)
            self.gather_errors.append(f"TURN {spec.server}: {exc}")
            return
        self._relays[base_id] = client
        relayed = client.relayed_address
        mapped = client.mapped_address
        if self.relay_only:
            # Relay-only reveals no other address, the related (mapped) one included (RFC 9429
            # section 3.5.3): a placeholder, 0.0.0.0 or :: with the discard port, instead.
            mapped = ("::" if ":" in relayed[0] else "0.0.0.0", 9)
        cand = Candidate(
            foundation(CandidateType.RELAY, relayed[0], spec.server.host, spec.server.transport),
            1,
            "udp",
            candidate_priority(CandidateType.RELAY, max(0, 65535 - index)),
            relayed[0],
            relayed[1],
            CandidateType.RELAY,
            mapped[0] if mapped else None,
            mapped[1] if mapped else None,
        )
        self._add_local(cand, base_id, relayed)

    # --- remote side -----------------------------------------------------------------------

    def add_remote_candidate(self, candidate: Candidate | None) -> None:
        """A candidate from the peer, or None for end-of-candidates."""
        if candidate is None:
            self.agent.end_of_remote_candidates()
            return
        self._execute(self.agent.add_remote_candidate(candidate, self._now()))

    # --- checks ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Run the checks until a pair is selected; raises ConnectionError on failure (at
        once when gathering ended without a single local candidate)."""
        self._execute(self.agent.start(self._now()))
        while True:
            if self.agent.state is IceState.CONNECTED:
                return
            if self.agent.state in (IceState.FAILED, IceState.CLOSED):
                raise ConnectionError(self._failure(self.agent.failure_reason or "ICE failed"))
            if self.agent.local_done and not self.agent.local_candidates:
                raise ConnectionError(self._failure("no local candidates"))
            self._state_changed.clear()
            await self._state_changed.wait()

    def _failure(self, reason: str) -> str:
        if self.gather_errors:
            return f"{reason} (gathering: {'; '.join(dict.fromkeys(self.gather_errors))})"
        return reason

    # --- I/O -----------------------------------------------------------------------------------

    def _now(self) -> float:
        return self.loop.time()

    def _on_host_readable(self, host: _HostSocket) -> None:
        for _ in range(64):
            try:
                data, source = host.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            addr = (source[0], source[1])
            if self._gathering.transactions and self._gathering_response(host, addr, data):
                continue
            self._deliver(host.base_id, addr, data)

    def _gathering_response(self, host: _HostSocket, source: Address, data: bytes) -> bool:
        if len(data) < 20 or data[0] not in (0x01, 0x00):
            return False
        entry = self._gathering.transactions.get(bytes(data[8:20]))
        if entry is None:
            return False
        tx, expected_host, _ = entry
        if expected_host is not host or not tx.accepts(source):
            return False
        try:
            msg = decode(data)
        except StunParseError:
            return True
        if msg.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
            return False
        del self._gathering.transactions[tx.tid]
        mapped = msg.get(XorMappedAddress)
        future = self._gathering.futures.pop(tx.tid, None)
        if future is not None and not future.done():
            ok = msg.cls is MessageClass.SUCCESS and mapped is not None
            future.set_result(mapped.address if ok and mapped else None)
        return True

    def _deliver(self, base_id: int, source: Address, data: bytes) -> None:
        actions, app = self.agent.on_datagram(base_id, source, data, self._now())
        self._execute(actions)
        if app is not None and not self._ended:
            if self._incoming.qsize() >= RECEIVE_QUEUE:
                self.dropped += 1
            else:
                self._incoming.put_nowait(app)

    def _send_raw(self, host: _HostSocket, destination: Address, data: bytes) -> None:
        with contextlib.suppress(OSError):
            host.sock.sendto(data, destination)

    def _execute(self, actions: list[SendDatagram]) -> None:
        for action in actions:
            host = self._hosts.get(action.base_id)
            if host is not None:
                self._send_raw(host, action.destination, action.data)
                continue
            relay = self._relays.get(action.base_id)
            if relay is not None:
                try:
                    relay.send(action.destination, action.data)
                except (TurnClientError, TurnUsageError) as exc:  # the allocation died
                    log.info("relayed base %d lost: %s", action.base_id, exc)
                    del self._relays[action.base_id]
        self._after_event()

    def _after_event(self) -> None:
        self._state_changed.set()
        state = self.agent.state
        if state is IceState.CONNECTED and self._channel_task is None:
            self._channel_task = self.loop.create_task(self.bind_relay_channel())
        elif state in (IceState.FAILED, IceState.CLOSED):
            self._end()
        self._rearm()

    def _end(self) -> None:
        """Wake every recv() waiting (and every later one) with ConnectionError."""
        if not self._ended:
            self._ended = True
            self._incoming.put_nowait(None)

    def _rearm(self) -> None:
        deadlines = [tx.deadline for tx, _, _ in self._gathering.transactions.values()]
        agent_deadline = self.agent.next_deadline()
        if agent_deadline is not None:
            deadlines.append(agent_deadline)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            self._timer = self.loop.call_at(min(deadlines), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._now()
        for tid, (tx, host, _) in list(self._gathering.transactions.items()):
            if now < tx.deadline:
                continue
            data = tx.on_timer(now)
            if data is not None:
                self._send_raw(host, tx.destination, data)
            elif tx.timed_out(now):
                del self._gathering.transactions[tid]
                future = self._gathering.futures.pop(tid, None)
                if future is not None and not future.done():
                    future.set_result(None)
        self._execute(self.agent.on_timer(now))

    # --- data ------------------------------------------------------------------------------------

    async def bind_relay_channel(self) -> None:
        """Bind a TURN channel for the selected pair when it uses a relay (cheaper framing).

        Started in the background when a pair is selected; data goes in Send indications
        until the channel is bound."""
        pair = self.agent.selected
        if pair is None:
            return
        relay = self._relays.get(pair.local.base_id)
        key = (pair.local.base_id, pair.remote.address)
        if relay is not None and key not in self._relay_channels:
            self._relay_channels.add(key)
            with contextlib.suppress(Exception):
                await relay.bind_channel(pair.remote.address)

    def send(self, data: bytes) -> None:
        """Send a datagram over the selected pair (never blocks; dropped when buffers are full,
        like UDP). Raises ConnectionError when no pair is selected."""
        if self.agent.state is not IceState.CONNECTED:
            raise ConnectionError(self._not_connected())
        self._execute(self.agent.send(data))

    async def recv(self) -> bytes:
        """The next datagram from the peer. Raises ConnectionError once ICE has failed (e.g.
        consent lost) or the connection was closed; datagrams received before are returned
        first."""
        data = await self._incoming.get()
        if data is None:
            self._incoming.put_nowait(None)  # for the next caller
            raise ConnectionError(self._not_connected())
        return data

    def _not_connected(self) -> str:
        state = self.agent.state
        if state is IceState.FAILED:
            return f"ICE failed: {self.agent.failure_reason}"
        return f"not connected (ICE {state})"

    @property
    def state(self) -> IceState:
        return self.agent.state

    async def close(self) -> None:
        self.agent.close()
        self._end()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._channel_task is not None and not self._channel_task.done():
            self._channel_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._channel_task
        for host in self._hosts.values():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(host.sock.fileno())
            host.sock.close()
        self._hosts.clear()
        for relay in list(self._relays.values()):
            with contextlib.suppress(Exception):
                await relay.close()
        self._relays.clear()


__all__ = ["GATHER_POLICY", "RECEIVE_QUEUE", "IceConnection", "TurnServerSpec"]
