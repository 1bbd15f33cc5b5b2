"""Connect two peers: the small API an app uses (ICE over stunturn's STUN/TURN clients).

::

    async with stunturn.p2p.connect(signaling, stun=[("stun.example.org", 3478)],
                                    turn=["turn:turn.example.org?transport=udp"],
                                    turn_username="u", turn_password="p") as link:
        await link.send(b"hello")
        data = await link.recv()
        print(link.path)   # selected pair: types, addresses, RTT

``signaling`` is anything with ``async send(message: dict)`` and ``async receive() -> dict``:
the app's own channel (WebSocket, HTTP, a chat message...). The messages are small JSON-able
dicts:

* ``{"type": "hello", "ufrag": ..., "pwd": ..., "tie": <64-bit int>}`` - ICE credentials, and
  a tie-breaker that decides the roles when the app does not (the larger one controls);
* ``{"type": "candidate", "candidate": "candidate:..."}`` - one candidate in SDP syntax (trickle);
* ``{"type": "end-of-candidates"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .aio.ice import IceConnection, TurnServerSpec
from .ice import CandidateType, from_sdp, new_password, new_ufrag
from .stun import Address


class Signaling(Protocol):
    """The app's signaling channel: ordered, reliable delivery of small dicts to the peer."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def receive(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Path:
    """The selected candidate pair, as an app wants to know it."""

    local_type: str
    local_address: Address
    remote_type: str
    remote_address: Address
    rtt_ms: float | None

    @property
    def relayed(self) -> bool:
        return CandidateType.RELAY.value in (self.local_type, self.remote_type)

    @property
    def kind(self) -> str:
        return "relayed" if self.relayed else "direct"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "local": {"type": self.local_type, "address": list(self.local_address)},
            "remote": {"type": self.remote_type, "address": list(self.remote_address)},
            "rtt_ms": self.rtt_ms,
        }


class Link:
    """A connected path to the peer: unreliable, unordered datagrams, like UDP."""

    def __init__(self, connection: IceConnection) -> None:
        self._connection = connection

    async def send(self, data: bytes) -> None:
        self._connection.send(data)

    async def recv(self) -> bytes:
        return await self._connection.recv()

    @property
    def path(self) -> Path:
        pair = self._connection.agent.selected
        if pair is None:
            raise ConnectionError("not connected")
        local = pair.valid_local or pair.local
        rtt = pair.rtt * 1000 if pair.rtt is not None else None
        return Path(
            local.candidate.type.value,
            local.candidate.address,
            pair.remote.type.value,
            pair.remote.address,
            rtt,
        )

    @property
    def connection(self) -> IceConnection:
        return self._connection


def parse_turn(
    urls: Sequence[str], username: str | None, password: str | None
) -> list[TurnServerSpec]:
    specs: list[TurnServerSpec] = []
    if not urls:
        return specs
    from .turn.url import parse_ice_server  # noqa: PLC0415 - optional part

    for url in urls:
        server = parse_ice_server(url)
        if username is None or password is None:
            raise ValueError(f"TURN server {url} needs a username and a password")
        specs.append(TurnServerSpec(server, username, password))
    return specs


@contextlib.asynccontextmanager
async def connect(
    signaling: Signaling,
    *,
    stun: Sequence[Address] = (),
    turn: Sequence[str] = (),
    turn_username: str | None = None,
    turn_password: str | None = None,
    controlling: bool | None = None,
    include_loopback: bool = False,
    host_addresses: list[str] | None = None,
    relay_only: bool = False,
    timeout: float = 30.0,
    **agent_options: Any,
) -> AsyncIterator[Link]:
    """Gather, exchange candidates over ``signaling``, run ICE, yield a :class:`Link`.

    With ``controlling`` given (e.g. the offerer controls), nothing waits for the peer before
    gathering starts, so one-shot signaling (copy and paste) works; without it, the first
    exchange of ``hello`` messages decides the roles. Raises ConnectionError when no path works
    (ICE declares failure within its ``failure_timeout``, 10 s by default, once checks have
    started), TimeoutError after ``timeout`` seconds in all.
    """
    tie = int.from_bytes(os.urandom(8), "big")
    ufrag, pwd = new_ufrag(), new_password()
    await signaling.send({"type": "hello", "tie": tie, "ufrag": ufrag, "pwd": pwd})
    early: list[dict[str, Any]] = []
    if controlling is None:
        # The roles need both tie-breakers; anything that arrives before the hello is kept.
        hello = await _expect(signaling, "hello", early)
        controlling = tie > int(hello["tie"])
        early.insert(0, hello)
    conn = IceConnection(
        controlling,
        stun=list(stun),
        turn=parse_turn(turn, turn_username, turn_password),
        include_loopback=include_loopback,
        host_addresses=host_addresses,
        relay_only=relay_only,
        tie_breaker=tie,
        ufrag=ufrag,
        password=pwd,
        **agent_options,
    )
    credentials = asyncio.Event()
    try:

        async def send_candidates() -> None:
            async for cand in conn.gather():
                await signaling.send({"type": "candidate", "candidate": cand.to_sdp()})
            await signaling.send({"type": "end-of-candidates"})

        def handle(message: dict[str, Any]) -> bool:
            kind = message.get("type")
            if kind == "hello":
                conn.set_remote_credentials(str(message["ufrag"]), str(message["pwd"]))
                credentials.set()
            elif kind == "candidate":
                with contextlib.suppress(ValueError, KeyError):
                    conn.add_remote_candidate(from_sdp(str(message["candidate"])))
            elif kind == "end-of-candidates":
                conn.add_remote_candidate(None)
                return True
            return False

        async def receive_candidates() -> None:
            for message in early:
                if handle(message):
                    return
            while not handle(await signaling.receive()):
                pass

        async def run() -> None:
            await credentials.wait()
            await conn.connect()

        sender = asyncio.ensure_future(send_candidates())
        receiver = asyncio.ensure_future(receive_candidates())
        try:
            await asyncio.wait_for(run(), timeout)
        finally:
            for task in (sender, receiver):
                if not task.done():
                    task.cancel()
        await conn.bind_relay_channel()
        yield Link(conn)
    finally:
        await conn.close()


async def _expect(signaling: Signaling, kind: str, early: list[dict[str, Any]]) -> dict[str, Any]:
    """The next message of ``kind``; others received meanwhile are appended to ``early``."""
    while True:
        message = await signaling.receive()
        if message.get("type") == kind:
            return message
        early.append(message)
