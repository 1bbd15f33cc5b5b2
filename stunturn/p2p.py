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

A malformed message from the peer raises :class:`SignalingError` (what is wrong, and the
message); messages of other types are ignored, so later versions can add some.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .aio.ice import IceConnection, TurnServerSpec
from .ice import CandidateError, CandidateType, from_sdp, new_password, new_ufrag
from .stun import Address

log = logging.getLogger("stunturn.p2p")

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")


class Signaling(Protocol):
    """The app's signaling channel: ordered, reliable delivery of small dicts to the peer."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def receive(self) -> dict[str, Any]: ...


class SignalingError(ValueError):
    """The peer sent a signaling message that is not valid."""


def check_message(message: object, *, need_tie: bool = False) -> dict[str, Any]:
    """Validate one signaling message from the peer; returns it, or raises SignalingError.

    Checks the fields :func:`connect` reads: ``type`` (a string), for ``hello`` the ICE
    credentials (RFC 8445 section 5.3: ufrag 4-256 and pwd 22-256 ice-chars) and the
    tie-breaker (an integer 0 to 2**64-1, required with ``need_tie``), for ``candidate`` a
    string (parsed later by :func:`stunturn.ice.from_sdp`).
    """
    shown = repr(message)
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    if not isinstance(message, dict):
        raise SignalingError(f"signaling message is not a dict: {shown}")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise SignalingError(f"signaling message without a string 'type': {shown}")
    if kind == "hello":
        for name, low in (("ufrag", 4), ("pwd", 22)):
            value = message.get(name)
            if not isinstance(value, str):
                raise SignalingError(f"hello without a string {name!r}: {shown}")
            if not (low <= len(value) <= 256 and _ICE_CHARS.fullmatch(value)):
                raise SignalingError(
                    f"hello with a bad {name!r} (want {low}-256 of A-Z a-z 0-9 + /): {shown}"
                )
        tie = message.get("tie")
        if tie is None and need_tie:
            raise SignalingError(f"hello without 'tie' (needed to decide the roles): {shown}")
        if tie is not None and (
            isinstance(tie, bool) or not isinstance(tie, int) or not 0 <= tie < 2**64
        ):
            raise SignalingError(f"hello with a bad 'tie' (want an integer 0-2**64-1): {shown}")
    elif kind == "candidate" and not isinstance(message.get("candidate"), str):
        raise SignalingError(f"candidate message without a string 'candidate': {shown}")
    return message


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
        """Send one datagram (raises ConnectionError once the path is lost)."""
        self._connection.send(data)

    async def recv(self) -> bytes:
        """The next datagram (raises ConnectionError once the path is lost or closed)."""
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
    """``turn:``/``turns:`` URLs with their long-term credentials (ValueError when bad)."""
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
    exchange of ``hello`` messages decides the roles.

    Raises:
        ValueError: bad arguments (a TURN URL, missing TURN credentials, ``relay_only``
            without a TURN server, a host address that is not an IP address).
        SignalingError: the peer sent a malformed message.
        ConnectionError: no path works (ICE declares failure within its ``failure_timeout``,
            10 s by default, once checks have started).
        TimeoutError: no connection after ``timeout`` seconds in all, signaling included
            (the message says what was still awaited).
        Whatever ``signaling`` raises before the peer's hello has arrived. After it, ICE
        may still succeed without more signaling, so such errors are logged, and only
        reported if the connection then fails.
    """
    specs = parse_turn(turn, turn_username, turn_password)
    if relay_only and not specs:
        raise ValueError("relay_only needs a TURN server")
    for ip in host_addresses or ():
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"host address {ip!r} is not an IP address") from None
    if not timeout > 0:
        raise ValueError("timeout must be positive")

    def make(controlling: bool, tie: int, ufrag: str, pwd: str) -> IceConnection:
        return IceConnection(
            controlling,
            stun=list(stun),
            turn=specs,
            include_loopback=include_loopback,
            host_addresses=host_addresses,
            relay_only=relay_only,
            tie_breaker=tie,
            ufrag=ufrag,
            password=pwd,
            **agent_options,
        )

    session = _Session(signaling, controlling, make)
    try:
        try:
            async with asyncio.timeout(timeout):
                conn = await session.establish()
        except TimeoutError:
            reason = f"no connection after {timeout:g} s ({session.stage})"
            if session.signaling_error is not None:
                reason += f"; signaling failed: {_describe(session.signaling_error)}"
            raise TimeoutError(reason) from None
        yield Link(conn)
    finally:
        if session.conn is not None:
            await session.conn.close()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class _Session:
    """One run of :func:`connect` up to the selected pair: the hello exchange, then three
    tasks (send our candidates, receive the peer's, run the checks)."""

    def __init__(
        self,
        signaling: Signaling,
        controlling: bool | None,
        make: Callable[[bool, int, str, str], IceConnection],
    ) -> None:
        self.signaling = signaling
        self.controlling = controlling
        self.make = make
        self.conn: IceConnection | None = None
        self.stage = "sending our hello"
        """What we are waiting for (for the timeout message)."""
        self.signaling_error: Exception | None = None
        """A signaling failure after the peer's hello: kept to explain a later failure."""
        self.ours: tuple[str, str] = (new_ufrag(), new_password())
        self.theirs: tuple[str, str] | None = None
        self.remote_ended = False
        self.credentials = asyncio.Event()

    async def establish(self) -> IceConnection:
        tie = int.from_bytes(os.urandom(8), "big")
        ufrag, pwd = self.ours
        await self.signaling.send({"type": "hello", "tie": tie, "ufrag": ufrag, "pwd": pwd})
        early: list[dict[str, Any]] = []
        controlling = self.controlling
        if controlling is None:
            # The roles need both tie-breakers; anything that arrives before the hello is kept.
            self.stage = "waiting for the peer's hello"
            hello = await self._first_hello(early)
            if (hello["ufrag"], hello["pwd"]) == self.ours:
                raise SignalingError("received our own hello: the signaling channel loops back")
            if hello["tie"] == tie:
                raise SignalingError("the peer's tie-breaker equals ours; roles cannot be decided")
            controlling = tie > hello["tie"]
            early.insert(0, hello)
        conn = self.conn = self.make(controlling, tie, ufrag, pwd)
        sender = asyncio.ensure_future(self._send_candidates(conn))
        receiver = asyncio.ensure_future(self._receive(conn, early))
        checker = asyncio.ensure_future(self._check(conn))
        tasks = {sender, receiver, checker}
        try:
            while checker in tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        raise exc
        finally:
            for task in (sender, receiver, checker):
                task.cancel()
            await asyncio.gather(sender, receiver, checker, return_exceptions=True)
        return conn

    async def _first_hello(self, early: list[dict[str, Any]]) -> dict[str, Any]:
        while True:
            message = check_message(await self.signaling.receive(), need_tie=True)
            if message["type"] == "hello":
                return message
            early.append(message)

    def _lost(self, exc: Exception) -> None:
        if self.signaling_error is None:
            self.signaling_error = exc
            log.info("signaling failed after the peer's hello (ICE goes on): %s", _describe(exc))

    async def _send(self, message: dict[str, Any]) -> bool:
        if self.signaling_error is not None:
            return False
        try:
            await self.signaling.send(message)
        except Exception as exc:
            if not self.credentials.is_set():
                raise
            self._lost(exc)
            return False
        return True

    async def _send_candidates(self, conn: IceConnection) -> None:
        async for cand in conn.gather():
            if not await self._send({"type": "candidate", "candidate": cand.to_sdp()}):
                return
        await self._send({"type": "end-of-candidates"})

    async def _receive(self, conn: IceConnection, early: list[dict[str, Any]]) -> None:
        for message in early:
            self._handle(conn, message)
        while not (self.remote_ended and self.credentials.is_set()):
            try:
                message = await self.signaling.receive()
            except Exception as exc:
                if not self.credentials.is_set():
                    raise
                self._lost(exc)
                return
            self._handle(conn, check_message(message))

    def _handle(self, conn: IceConnection, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "hello":
            credentials = (str(message["ufrag"]), str(message["pwd"]))
            if credentials == self.ours:
                raise SignalingError("received our own hello: the signaling channel loops back")
            if self.theirs is None:
                self.theirs = credentials
                conn.set_remote_credentials(*credentials)
                self.credentials.set()
            elif self.theirs != credentials:
                raise SignalingError("a second hello with other credentials (no ICE restarts)")
        elif kind == "candidate":
            if self.remote_ended:
                raise SignalingError("a candidate after end-of-candidates")
            try:
                candidate = from_sdp(message["candidate"])
            except CandidateError as exc:
                raise SignalingError(f"bad candidate from the peer: {exc}") from None
            conn.add_remote_candidate(candidate)
        elif kind == "end-of-candidates":
            if not self.remote_ended:
                self.remote_ended = True
                conn.add_remote_candidate(None)
        else:
            log.debug("ignoring a signaling message of type %r", kind)

    async def _check(self, conn: IceConnection) -> None:
        self.stage = "waiting for the peer's hello"
        await self.credentials.wait()
        self.stage = "connectivity checks running"
        try:
            await conn.connect()
        except ConnectionError as exc:
            if self.signaling_error is None:
                raise
            raise ConnectionError(
                f"{_describe(exc)}; signaling failed: {_describe(self.signaling_error)}"
            ) from exc


__all__ = [
    "Link",
    "Path",
    "Signaling",
    "SignalingError",
    "check_message",
    "connect",
    "parse_turn",
]
