"""The ``stunturn.p2p.connect`` API: two peers in one event loop, joined by in-memory signaling.

Everything runs on loopback: host candidates are pinned with ``host_addresses`` (never the
machine's other interfaces), the STUN server is an in-process worker on 127.0.0.1 and the TURN
server is ``stunturn serve`` on 127.0.0.1 relaying from 127.0.0.1 (loopback peers allowed).

Covered: direct connection over IPv4 and IPv6 with the roles given or decided by the
tie-breakers, data both ways, the ``Link.path`` report; the messages put on the signaling
channel; STUN gathering; relay-only through our TURN server over UDP and TCP (and one side
relay-only); failures - no path (declared within 10 s), ``failure_timeout``, the overall
``timeout``, a TURN allocation that fails, a lost path after connecting (consent); malformed
signaling messages and signaling channels that fail; bad arguments. Also a TURN server bug the
relay-only tests ran into (fixed): ChannelData sent just before a Refresh of lifetime 0 was
lost when both came in one receive batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from conftest import StartInProcess, StartServer
from helpers import ServerProcess

from stunturn.aio.turnclient import TurnClient
from stunturn.config import build_config
from stunturn.ice import CandidateType, from_sdp
from stunturn.p2p import Link, Path, SignalingError, connect

T = TypeVar("T")

SUCCESS_TIMEOUT = 15.0
"""Generous bound for things that take milliseconds when all is well."""
USER, PASSWORD = "alice", "s3cret"

Message = dict[str, Any]
Rewrite = Callable[[Message], Message | None]


def run(coro: Awaitable[T], limit: float = 30.0) -> T:
    """Run a scenario with a hard upper bound."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


class QueueSignaling:
    """One end of an in-memory signaling pair. Messages go through a JSON round trip (they
    must be JSON-able), are recorded, and may be rewritten (or dropped: None) on the way."""

    def __init__(
        self,
        inbox: asyncio.Queue[Any],
        outbox: asyncio.Queue[Any],
        rewrite: Rewrite | None = None,
    ) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.rewrite = rewrite
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        message = json.loads(json.dumps(message))
        self.sent.append(message)
        out = self.rewrite(message) if self.rewrite else message
        if out is not None:
            await self.outbox.put(out)

    async def receive(self) -> Message:
        message: Message = await self.inbox.get()
        return message


def signaling_pair(
    rewrite_a: Rewrite | None = None, rewrite_b: Rewrite | None = None
) -> tuple[QueueSignaling, QueueSignaling]:
    a_to_b: asyncio.Queue[Any] = asyncio.Queue()
    b_to_a: asyncio.Queue[Any] = asyncio.Queue()
    return QueueSignaling(b_to_a, a_to_b, rewrite_a), QueueSignaling(a_to_b, b_to_a, rewrite_b)


@dataclasses.dataclass
class Outcome:
    path: Path
    controlling: bool
    received: list[bytes]


async def talk(link: Link, name: str, count: int) -> list[bytes]:
    """Send ``count`` numbered datagrams, then receive ``count`` from the peer."""
    for i in range(count):
        await link.send(f"{name} {i}".encode())
    received = []
    for _ in range(count):
        received.append(await asyncio.wait_for(link.recv(), SUCCESS_TIMEOUT))
    return received


async def peer(
    signaling: QueueSignaling,
    name: str,
    count: int = 20,
    both_done: asyncio.Barrier | None = None,
    **options: Any,
) -> Outcome:
    """Connect, send and receive ``count`` datagrams; with ``both_done``, stay connected
    until the other peer is done too (our last datagrams may still be in flight)."""
    options.setdefault("host_addresses", ["127.0.0.1"])
    options.setdefault("timeout", SUCCESS_TIMEOUT)
    async with connect(signaling, **options) as link:
        received = await talk(link, name, count)
        if both_done is not None:
            await both_done.wait()
        return Outcome(link.path, link.connection.agent.controlling, received)


async def two_peers(
    a: dict[str, Any], b: dict[str, Any], sa: QueueSignaling, sb: QueueSignaling
) -> tuple[Outcome, Outcome]:
    """Peers "a" and "b" with their options, talking until both are done."""
    done = asyncio.Barrier(2)
    return await asyncio.gather(
        peer(sa, "a", both_done=done, **a), peer(sb, "b", both_done=done, **b)
    )


def expected(name: str, count: int = 20) -> list[bytes]:
    return [f"{name} {i}".encode() for i in range(count)]


@contextlib.contextmanager
def silent_socket() -> Iterator[tuple[str, int]]:
    """A bound UDP socket on 127.0.0.1 that never reads: checks sent to it get no answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()


def to_address(address: tuple[str, int]) -> Rewrite:
    def rewrite(message: Message) -> Message:
        if message["type"] != "candidate":
            return message
        cand = from_sdp(message["candidate"])
        moved = dataclasses.replace(cand, host=address[0], port=address[1])
        return {**message, "candidate": moved.to_sdp()}

    return rewrite


def drop_candidates(message: Message) -> Message | None:
    return None if message["type"] == "candidate" else message


async def failing_pair(
    rewrite_a: Rewrite | None, rewrite_b: Rewrite | None, **options: Any
) -> tuple[float, list[BaseException]]:
    sa, sb = signaling_pair(rewrite_a, rewrite_b)
    started = time.monotonic()
    results = await asyncio.gather(
        peer(sa, "a", controlling=True, **options),
        peer(sb, "b", controlling=False, **options),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    return time.monotonic() - started, errors


def candidates(messages: list[Message]) -> list[str]:
    return [m["candidate"] for m in messages if m["type"] == "candidate"]


# --- direct --------------------------------------------------------------------------------


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
@pytest.mark.parametrize(
    "roles",
    [(True, False), (False, True), (None, None), (True, None)],
    ids=["a-offers", "b-offers", "tie", "mixed"],
)
def test_direct_link(ip: str, roles: tuple[bool | None, bool | None]) -> None:
    """Two peers connect over their host candidates, with the roles given or decided by the
    tie-breakers in the hello messages (exactly one side controls; "mixed": one side given,
    the other deciding by tie-breakers, so a role conflict may need repairing). 20 datagrams
    go each way in order; ``link.path`` on each side names its own socket as local and the
    other's as remote (both host, "direct"), with a measured RTT."""

    async def scenario() -> tuple[Outcome, Outcome]:
        sa, sb = signaling_pair()
        return await two_peers(
            {"host_addresses": [ip], "controlling": roles[0]},
            {"host_addresses": [ip], "controlling": roles[1]},
            sa,
            sb,
        )

    a, b = run(scenario())
    assert a.received == expected("b") and b.received == expected("a")
    assert a.controlling != b.controlling
    if roles[1] is not None:
        assert a.controlling is roles[0]
    assert a.path.local_address == b.path.remote_address
    assert b.path.local_address == a.path.remote_address
    for outcome in (a, b):
        path = outcome.path
        assert path.local_address[0] == ip and path.remote_address[0] == ip
        assert (path.local_type, path.remote_type) == ("host", "host")
        assert path.kind == "direct" and not path.relayed
        assert path.rtt_ms is not None and 0 < path.rtt_ms < 5000
        assert path.as_dict() == {
            "kind": "direct",
            "local": {"type": "host", "address": list(path.local_address)},
            "remote": {"type": "host", "address": list(path.remote_address)},
            "rtt_ms": path.rtt_ms,
        }


def test_signaling_messages() -> None:
    """What goes on the signaling channel: one hello (ufrag, pwd, 64-bit tie-breaker), then
    each gathered candidate as an SDP ``candidate:`` line that ``from_sdp`` parses back to
    the socket the path uses, then end-of-candidates. The two sides' credentials differ."""

    async def scenario() -> tuple[QueueSignaling, QueueSignaling, Outcome, Outcome]:
        sa, sb = signaling_pair()
        a, b = await two_peers({"count": 1, "controlling": True}, {"count": 1}, sa, sb)
        return sa, sb, a, b

    sa, sb, a, _ = run(scenario())
    for sig in (sa, sb):
        kinds = [m["type"] for m in sig.sent]
        assert kinds == ["hello", "candidate", "end-of-candidates"], sig.sent
        hello = sig.sent[0]
        assert set(hello) == {"type", "ufrag", "pwd", "tie"}
        assert isinstance(hello["tie"], int) and 0 <= hello["tie"] < 2**64
        assert len(hello["ufrag"]) >= 4 and len(hello["pwd"]) >= 22
    assert sa.sent[0]["ufrag"] != sb.sent[0]["ufrag"]
    [line] = candidates(sa.sent)
    assert line.startswith("candidate:")
    cand = from_sdp(line)
    assert cand.type is CandidateType.HOST and cand.transport == "udp"
    assert cand.address == a.path.local_address
    assert cand.to_sdp() == line


def test_stun_gathering(inprocess_server: StartInProcess) -> None:
    """With our STUN server (in process, on 127.0.0.1) each peer sends it a Binding from its
    host socket. On loopback the mapped address is the host address itself, so no redundant
    server-reflexive candidate is signalled, and the link is direct."""
    server = inprocess_server(build_config({"listen": ["127.0.0.1:0"], "workers": 1}))
    stun = [server.addr("udp")]

    async def scenario() -> tuple[QueueSignaling, Outcome]:
        sa, sb = signaling_pair()
        a, _ = await two_peers({"controlling": True, "stun": stun}, {"stun": stun}, sa, sb)
        return sa, a

    sa, a = run(scenario())
    deadline = time.monotonic() + 5.0  # the server thread answers on its own schedule
    while server.counters.binding_ok < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.counters.binding_ok >= 2
    assert [from_sdp(c).type for c in candidates(sa.sent)] == [CandidateType.HOST]
    assert a.path.kind == "direct"


# --- TURN ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def turn_server() -> Iterator[ServerProcess]:
    args = [
        "--listen", "127.0.0.1:0", "--workers", "1", "--user", f"{USER}:{PASSWORD}",
        "--relay-ip", "127.0.0.1", "--allow-loopback-peers", "--log-format", "json",
    ]  # fmt: skip
    with ServerProcess(args) as server:
        server.wait_ready()
        yield server


def allocations(server: ServerProcess, wanted: set[str]) -> set[str]:
    """Relay addresses of the allocations the server logged (its JSON log on stderr), once
    ``wanted`` are among them or after 3 s (the log comes through a pipe, a little late)."""
    found: set[str] = set()
    deadline = time.monotonic() + 3.0
    while not wanted <= found and time.monotonic() < deadline:
        time.sleep(0.02)
        for line in server.stderr.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == "allocation_created":
                    found.add(entry["relay"])
    return found


def turn_url(server: ServerProcess, transport: str) -> str:
    host, port = server.addr(transport)
    return f"turn:{host}:{port}?transport={transport}"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_relay_only(turn_server: ServerProcess, transport: str) -> None:
    """Both peers relay-only through our TURN server (to it over UDP or TCP): each signals
    one relayed candidate (allocated by our server, related address hidden), both paths are
    relay to relay ("relayed"), and 20 datagrams go each way through the server."""
    url = turn_url(turn_server, transport)
    options: dict[str, Any] = {
        "turn": [url],
        "turn_username": USER,
        "turn_password": PASSWORD,
        "relay_only": True,
    }

    async def scenario() -> tuple[QueueSignaling, QueueSignaling, Outcome, Outcome]:
        sa, sb = signaling_pair()
        a, b = await two_peers(
            {"controlling": True, **options}, {"controlling": False, **options}, sa, sb
        )
        return sa, sb, a, b

    sa, sb, a, b = run(scenario())
    assert a.received == expected("b") and b.received == expected("a")
    signalled = [from_sdp(line) for sig in (sa, sb) for line in candidates(sig.sent)]
    assert len(signalled) == 2
    relays = {f"{c.host}:{c.port}" for c in signalled}
    assert allocations(turn_server, relays) >= relays  # allocated by our server
    for cand, outcome in zip(signalled, (a, b), strict=True):
        assert cand.type is CandidateType.RELAY
        assert (cand.related_host, cand.related_port) == ("0.0.0.0", 9)
        path = outcome.path
        assert (path.local_type, path.remote_type) == ("relay", "relay")
        assert path.local_address == cand.address
        assert path.kind == "relayed" and path.relayed
        assert path.rtt_ms is not None and path.rtt_ms > 0
    assert a.path.remote_address == b.path.local_address


def test_one_side_relay_only(turn_server: ServerProcess) -> None:
    """Only one peer is relay-only: the other reaches its relayed candidate from its host
    socket; both report the path as relayed (relay at one end, host at the other).

    The host peer uses 127.0.0.2: the server's peer policy refuses its own IP (127.0.0.1)
    outside the relay port range, as a public server must."""
    relay: dict[str, Any] = {
        "turn": [turn_url(turn_server, "udp")],
        "turn_username": USER,
        "turn_password": PASSWORD,
        "relay_only": True,
    }

    async def scenario() -> tuple[Outcome, Outcome]:
        sa, sb = signaling_pair()
        return await two_peers(relay, {"host_addresses": ["127.0.0.2"]}, sa, sb)

    a, b = run(scenario())
    assert a.received == expected("b") and b.received == expected("a")
    assert (a.path.local_type, b.path.local_type) == ("relay", "host")
    assert a.path.kind == b.path.kind == "relayed"
    assert a.path.remote_address == b.path.local_address


def test_turn_failure_is_reported_at_once(turn_server: ServerProcess) -> None:
    """Relay-only with a wrong TURN password: the allocation fails (401), no candidate is
    left, and connect() says so at once, naming the TURN server's answer."""

    options: dict[str, Any] = {
        "turn": [turn_url(turn_server, "udp")],
        "turn_username": USER,
        "turn_password": "wrong",
        "relay_only": True,
    }
    elapsed, errors = run(failing_pair(None, None, **options))
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, ConnectionError), error
        assert str(error).startswith("no local candidates (gathering: TURN turn:127.0.0.1:")
        assert "401" in str(error), error
    assert elapsed < 5.0


@pytest.mark.parametrize(
    "then_close",
    [
        False,
        True,
    ],
    ids=["burst", "burst-then-refresh-0"],
)
def test_channel_data_sent_before_closing_is_relayed(
    stunturn_server: StartServer, then_close: bool
) -> None:
    """ChannelData a client sends just before it releases its allocation must still reach
    the peer (the server reads them first). The server process is stopped while the client
    sends 10 ChannelData (and then its Refresh LIFETIME 0), so the server reads them all in
    one batch when it resumes. Found by the relay-only P2P test: a peer that received all it
    wanted and left lost the tail of its own burst."""
    server = stunturn_server(
        "--listen", "127.0.0.1:0", "--workers", "1", "--user", f"{USER}:{PASSWORD}",
        "--relay-ip", "127.0.0.1", "--allow-loopback-peers",
    )  # fmt: skip

    async def scenario(peer: socket.socket) -> list[bytes]:
        address: tuple[str, int] = peer.getsockname()
        loop = asyncio.get_running_loop()
        client = await TurnClient.connect(turn_url(server, "udp"), USER, PASSWORD)
        got: list[bytes] = []
        try:
            await client.bind_channel(address)
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                for i in range(10):
                    client.send(address, b"data %d" % i)
                closing = asyncio.ensure_future(client.close()) if then_close else None
                await asyncio.sleep(0.1)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            with contextlib.suppress(TimeoutError):
                while len(got) < 10:
                    got.append(await asyncio.wait_for(loop.sock_recv(peer, 100), 1.0))
            if closing is not None:
                await closing
        finally:
            await client.close()
        return got

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer_sock:
        peer_sock.bind(("127.0.0.2", 0))
        peer_sock.setblocking(False)
        got = run(scenario(peer_sock))
    assert got == [b"data %d" % i for i in range(10)]


# --- failures -------------------------------------------------------------------------------


def test_no_path_fails_within_10_s() -> None:
    """Every candidate each peer receives points at a socket that never answers: with the
    default settings both declare failure (every pair failed) within 10 s, not at the
    overall timeout."""
    with silent_socket() as dead:
        elapsed, errors = run(
            failing_pair(to_address(dead), to_address(dead), timeout=60.0), limit=40
        )
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, ConnectionError) and not isinstance(error, TimeoutError)
        assert "every candidate pair failed" in str(error), error
    assert elapsed < 10.0


def test_failure_timeout_option() -> None:
    """No candidates reach either peer: ICE gives up after ``failure_timeout`` (an agent
    option passed through connect())."""
    elapsed, errors = run(failing_pair(drop_candidates, drop_candidates, failure_timeout=1.0))
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, ConnectionError), error
        assert "no working candidate pair after 1 s" in str(error)
    assert 0.9 < elapsed < 6.0


class Silent:
    """A signaling channel to nobody: sends vanish, nothing is ever received."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def receive(self) -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("controlling", [None, True])
def test_timeout_says_what_was_awaited(controlling: bool | None) -> None:
    """Nobody answers on the signaling channel: connect() raises TimeoutError after
    ``timeout`` s in all (also while waiting for the hello that decides the roles), saying
    it was waiting for the peer's hello."""

    async def scenario() -> tuple[float, BaseException]:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            async with connect(
                Silent(), host_addresses=["127.0.0.1"], controlling=controlling, timeout=0.5
            ):
                pass
        return time.monotonic() - started, info.value

    elapsed, error = run(scenario())
    assert str(error) == "no connection after 0.5 s (waiting for the peer's hello)"
    assert 0.4 < elapsed < 3.0


def test_lost_path_ends_the_link() -> None:
    """After connecting, one peer goes away: the other's consent checks go unanswered, ICE
    fails, and ``recv()`` raises ConnectionError (instead of waiting forever), as does
    ``send()``. Consent timing is an agent option passed through connect()."""
    fast: dict[str, Any] = {"consent_interval": 0.2, "consent_timeout": 1.0}

    async def scenario() -> tuple[float, str, str]:
        sa, sb = signaling_pair()
        left = asyncio.Event()

        async def stays() -> tuple[float, str, str]:
            async with connect(sa, host_addresses=["127.0.0.1"], controlling=True, **fast) as link:
                assert await asyncio.wait_for(link.recv(), SUCCESS_TIMEOUT) == b"bye"
                await left.wait()
                started = time.monotonic()
                with pytest.raises(ConnectionError) as recv_error:
                    await asyncio.wait_for(link.recv(), SUCCESS_TIMEOUT)
                elapsed = time.monotonic() - started
                with pytest.raises(ConnectionError) as send_error:
                    await link.send(b"anyone?")
                return elapsed, str(recv_error.value), str(send_error.value)

        async def leaves() -> None:
            async with connect(sb, host_addresses=["127.0.0.1"], **fast) as link:
                await link.send(b"bye")
            left.set()

        result, _ = await asyncio.gather(stays(), leaves())
        return result

    elapsed, recv_error, send_error = run(scenario())
    assert "consent" in recv_error and "consent" in send_error
    assert elapsed < 5.0


# --- signaling errors -------------------------------------------------------------------------


class Scripted:
    """A fake peer's signaling: delivers ``script`` in order, then nothing more."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def receive(self) -> Any:
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item
        await asyncio.Event().wait()


HELLO = {"type": "hello", "ufrag": "peer", "pwd": "p" * 22, "tie": 5}
EOC = {"type": "end-of-candidates"}


@pytest.mark.parametrize(
    ("script", "controlling", "error"),
    [
        (["hello"], True, "signaling message is not a dict: 'hello'"),
        ([{"ufrag": "peer"}], True, "signaling message without a string 'type'"),
        ([{"type": 7}], True, "signaling message without a string 'type'"),
        ([{**HELLO, "pwd": None}], True, "hello without a string 'pwd'"),
        ([{**HELLO, "ufrag": "ab"}], True, "hello with a bad 'ufrag'"),
        ([{**HELLO, "pwd": "short"}], True, "hello with a bad 'pwd'"),
        ([{**HELLO, "ufrag": "peer:x"}], True, "hello with a bad 'ufrag'"),
        ([{**HELLO, "tie": "5"}], None, "hello with a bad 'tie'"),
        ([{**HELLO, "tie": 2**64}], True, "hello with a bad 'tie'"),
        ([{k: v for k, v in HELLO.items() if k != "tie"}], None, "hello without 'tie'"),
        ([HELLO, {"type": "candidate"}], True, "candidate message without a string 'candidate'"),
        (
            [HELLO, {"type": "candidate", "candidate": "candidate:1 1 udp x 127.0.0.1 9 typ host"}],
            True,
            "bad candidate from the peer: malformed numbers",
        ),
        (
            [HELLO, {"type": "candidate", "candidate": "1 1 udp 1 127.0.0.1 9 typ host"}],
            True,
            "bad candidate from the peer: not a candidate line",
        ),
        (
            [EOC, {"type": "candidate", "candidate": "candidate:1 1 udp 1 ::1 9 typ host"}, HELLO],
            None,
            "a candidate after end-of-candidates",
        ),
        ([HELLO, {**HELLO, "ufrag": "other"}], True, "a second hello with other credentials"),
    ],
)
def test_bad_messages(script: list[Any], controlling: bool | None, error: str) -> None:
    """A malformed message from the peer ends connect() at once with a SignalingError that
    says what is wrong (never a KeyError, and not a timeout later)."""

    async def scenario() -> tuple[float, BaseException]:
        started = time.monotonic()
        with pytest.raises(SignalingError) as info:
            async with connect(
                Scripted(script),
                host_addresses=["127.0.0.1"],
                controlling=controlling,
                timeout=SUCCESS_TIMEOUT,
            ):
                pass
        return time.monotonic() - started, info.value

    elapsed, exc = run(scenario())
    assert str(exc).startswith(error), exc
    assert elapsed < 5.0


class Echo:
    """A broken signaling channel that hands our own messages back to us."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()

    async def send(self, message: Message) -> None:
        await self.queue.put(message)

    async def receive(self) -> Message:
        return await self.queue.get()


@pytest.mark.parametrize("controlling", [None, True])
def test_signaling_loop_is_detected(controlling: bool | None) -> None:
    """A signaling channel that loops our messages back is named as such."""

    async def scenario() -> None:
        with pytest.raises(SignalingError, match="loops back"):
            async with connect(
                Echo(), host_addresses=["127.0.0.1"], controlling=controlling, timeout=5.0
            ):
                pass

    run(scenario())


def test_unknown_message_types_are_ignored() -> None:
    """Messages of a type this version does not know (a later version's) are skipped."""

    async def scenario() -> tuple[Outcome, Outcome]:
        a_to_b: asyncio.Queue[Any] = asyncio.Queue()
        b_to_a: asyncio.Queue[Any] = asyncio.Queue()

        class Extra(QueueSignaling):
            async def send(self, message: Message) -> None:
                if message["type"] == "candidate":
                    await self.outbox.put({"type": "x-later-feature", "value": [1, 2]})
                await super().send(message)

        sa = Extra(b_to_a, a_to_b)
        sb = QueueSignaling(a_to_b, b_to_a)
        return await two_peers({"count": 3}, {"count": 3}, sa, sb)

    a, b = run(scenario())
    assert a.received == expected("b", 3) and b.received == expected("a", 3)


def test_signaling_failure_before_hello_is_raised() -> None:
    """The app's channel fails before the peer's hello: that error ends connect() at once."""

    async def scenario() -> None:
        signaling = Scripted([ConnectionError("websocket closed")])
        with pytest.raises(ConnectionError, match=r"^websocket closed$"):
            async with connect(
                signaling, host_addresses=["127.0.0.1"], controlling=True, timeout=5.0
            ):
                pass

    run(scenario(), limit=10)


def test_signaling_failure_after_hello_is_tolerated() -> None:
    """The peer's channel breaks after its hello and candidates (instead of delivering
    end-of-candidates; our sends fail too): ICE needs no more signaling, so the peers still
    connect."""

    class Breaks(QueueSignaling):
        async def send(self, message: Message) -> None:
            if message["type"] == "end-of-candidates":
                raise ConnectionError("channel closed")
            await super().send(message)

        async def receive(self) -> Message:
            message = await super().receive()
            if message["type"] == "end-of-candidates":
                raise ConnectionError("channel closed")
            return message

    async def scenario() -> tuple[Outcome, Outcome]:
        a_to_b: asyncio.Queue[Any] = asyncio.Queue()
        b_to_a: asyncio.Queue[Any] = asyncio.Queue()
        sa = QueueSignaling(b_to_a, a_to_b)
        sb = Breaks(a_to_b, b_to_a)
        return await two_peers(
            {"count": 3, "controlling": True}, {"count": 3, "controlling": False}, sa, sb
        )

    a, b = run(scenario())
    assert a.received == expected("b", 3) and b.received == expected("a", 3)


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"relay_only": True}, "relay_only needs a TURN server"),
        ({"turn": ["turn:127.0.0.1:3478"]}, "needs a username and a password"),
        ({"turn": ["http://127.0.0.1"], "turn_username": "u", "turn_password": "p"}, "scheme"),
        ({"host_addresses": ["localhost"]}, "'localhost' is not an IP address"),
        ({"timeout": 0}, "timeout must be positive"),
    ],
)
def test_bad_arguments(options: dict[str, Any], error: str) -> None:
    """Bad arguments raise ValueError before anything is sent or bound."""

    async def scenario() -> list[Message]:
        signaling = Silent()
        with pytest.raises(ValueError, match=error):
            async with connect(signaling, controlling=True, **options):
                pass
        return signaling.sent

    assert run(scenario(), limit=10) == []
