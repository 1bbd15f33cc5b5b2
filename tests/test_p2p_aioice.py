"""ICE interop on loopback: our agent (``stunturn.aio.ice.IceConnection``) and aioice 0.13's
``aioice.Connection``, a third-party ICE implementation, connect to each other.

The two sides exchange what a signaling channel would carry: ICE credentials (ufrag and
password) and candidates in SDP ``a=candidate`` syntax. aioice writes and reads the line without
the ``candidate:`` prefix (``Candidate.to_sdp`` / ``Candidate.from_sdp``); ours writes it with
the prefix (``Candidate.to_sdp``) and reads it with or without ``a=`` (``from_sdp``).

aioice enumerates interfaces itself and leaves out 127.0.0.1 and ::1; the tests replace
``aioice.ice.get_host_addresses`` (with pytest's monkeypatch) so that it offers exactly one
loopback address, and pin our host candidates with ``host_addresses``. No packet leaves
loopback.

Covered, in both roles (ours controlling and aioice controlled, and the reverse): host to host
over IPv4 and IPv6; both sides also asking our STUN server (aioice then signals a
server-reflexive candidate equal to its host candidate, which our agent must take as the same
candidate); both sides relay-only through our TURN server (relay to relay, aioice binding
channels). Each time data goes both ways and our agent's selected pair is checked against the
candidates aioice signalled.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator

import aioice
import aioice.ice
import pytest
from aioice.candidate import Candidate as AioCandidate
from conftest import StartInProcess
from helpers import ServerProcess

from stunturn.aio.ice import IceConnection
from stunturn.config import build_config
from stunturn.ice import CandidateType, IceState, from_sdp
from stunturn.p2p import parse_turn
from stunturn.stun import Address

pytestmark = pytest.mark.interop

TIMEOUT = 15.0
"""Generous: every connection below takes milliseconds."""
USER, PASSWORD = "alice", "s3cret"
ROLES = pytest.mark.parametrize(
    "ours_controlling", [True, False], ids=["ours-controlling", "aioice-controlling"]
)


def offer_only(monkeypatch: pytest.MonkeyPatch, ip: str) -> None:
    """Make aioice's gathering offer exactly ``ip`` as its host address."""

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [ip]

    monkeypatch.setattr(aioice.ice, "get_host_addresses", host_addresses)


def to_aioice(line: str) -> AioCandidate:
    """Our ``candidate:...`` line as aioice reads it (without the prefix)."""
    assert line.startswith("candidate:")
    candidate: AioCandidate = AioCandidate.from_sdp(line[len("candidate:") :])
    return candidate


async def run_ice(
    ours: IceConnection, theirs: aioice.Connection, count: int = 10
) -> tuple[list[str], list[str]]:
    """Gather on both sides, exchange credentials and SDP candidate lines, connect, then send
    ``count`` datagrams each way. Returns (our lines, aioice's lines)."""
    await asyncio.wait_for(theirs.gather_candidates(), TIMEOUT)
    ours_lines = [c.to_sdp() async for c in ours.gather()]
    their_lines = [c.to_sdp() for c in theirs.local_candidates]
    assert ours_lines and their_lines
    for line in their_lines:  # never let a check leave loopback
        assert ipaddress.ip_address(from_sdp(f"candidate:{line}").host).is_loopback, line

    ours.set_remote_credentials(theirs.local_username, theirs.local_password)
    theirs.remote_username, theirs.remote_password = ours.local_credentials
    for line in their_lines:
        ours.add_remote_candidate(from_sdp(f"a=candidate:{line}"))
    ours.add_remote_candidate(None)
    for line in ours_lines:
        await theirs.add_remote_candidate(to_aioice(line))
    await theirs.add_remote_candidate(None)

    await asyncio.wait_for(asyncio.gather(ours.connect(), theirs.connect()), TIMEOUT)

    for i in range(count):
        ours.send(b"to aioice %d" % i)
    for i in range(count):
        assert await asyncio.wait_for(theirs.recv(), TIMEOUT) == b"to aioice %d" % i
    for i in range(count):
        await theirs.send(b"to ours %d" % i)
    for i in range(count):
        assert await asyncio.wait_for(ours.recv(), TIMEOUT) == b"to ours %d" % i
    return ours_lines, their_lines


def check_selected(
    ours: IceConnection, controlling: bool, ours_lines: list[str], their_lines: list[str]
) -> tuple[str, str]:
    """Our selected pair joins one of our signalled candidates to one of aioice's, with no
    role switch and a measured RTT. Returns the pair's (local, remote) candidate types."""
    agent = ours.agent
    assert agent.state is IceState.CONNECTED
    assert agent.controlling is controlling
    pair = agent.selected
    assert pair is not None
    local = (pair.valid_local or pair.local).candidate
    ours_addresses = {from_sdp(line).address for line in ours_lines}
    their_addresses = {from_sdp(f"candidate:{line}").address for line in their_lines}
    assert local.address in ours_addresses
    assert pair.remote.address in their_addresses
    assert pair.rtt is not None and 0 < pair.rtt < TIMEOUT
    return local.type.value, pair.remote.type.value


@ROLES
@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_host_to_host(monkeypatch: pytest.MonkeyPatch, ours_controlling: bool, ip: str) -> None:
    """Host candidates only. Each side parses the other's SDP lines (and our parser gives
    aioice's lines back unchanged); ICE selects our host candidate and aioice's; 10 datagrams
    go each way."""
    offer_only(monkeypatch, ip)

    async def scenario() -> tuple[list[str], list[str], tuple[str, str]]:
        ours = IceConnection(ours_controlling, host_addresses=[ip])
        theirs = aioice.Connection(
            ice_controlling=not ours_controlling, use_ipv4=":" not in ip, use_ipv6=":" in ip
        )
        try:
            ours_lines, their_lines = await run_ice(ours, theirs)
            return (
                ours_lines,
                their_lines,
                check_selected(ours, ours_controlling, ours_lines, their_lines),
            )
        finally:
            await theirs.close()
            await ours.close()

    ours_lines, their_lines, types = asyncio.run(scenario())
    assert types == ("host", "host")
    [ours_line] = ours_lines
    [their_line] = their_lines
    ours_candidate = from_sdp(ours_line)
    assert ours_candidate.type is CandidateType.HOST and ours_candidate.host == ip
    theirs_candidate = from_sdp(f"candidate:{their_line}")
    assert theirs_candidate.type is CandidateType.HOST and theirs_candidate.host == ip
    assert theirs_candidate.to_sdp() == f"candidate:{their_line}"


@ROLES
def test_with_stun_server(
    monkeypatch: pytest.MonkeyPatch, inprocess_server: StartInProcess, ours_controlling: bool
) -> None:
    """Both sides also ask our STUN server (in process, 127.0.0.1). On loopback the mapped
    address is the host address: aioice still signals it as a server-reflexive candidate
    (with its host as related address); our agent takes it for the host candidate it already
    has and does not signal one itself. The link is host to host."""
    offer_only(monkeypatch, "127.0.0.1")
    server = inprocess_server(build_config({"listen": ["127.0.0.1:0"], "workers": 1}))
    stun: Address = server.addr("udp")

    async def scenario() -> tuple[list[str], list[str], tuple[str, str]]:
        ours = IceConnection(ours_controlling, host_addresses=["127.0.0.1"], stun=[stun])
        theirs = aioice.Connection(
            ice_controlling=not ours_controlling, stun_server=stun, use_ipv6=False
        )
        try:
            ours_lines, their_lines = await run_ice(ours, theirs)
            assert [c.type for c in ours.agent.remote_candidates] == [CandidateType.HOST]
            return (
                ours_lines,
                their_lines,
                check_selected(ours, ours_controlling, ours_lines, their_lines),
            )
        finally:
            await theirs.close()
            await ours.close()

    ours_lines, their_lines, types = asyncio.run(scenario())
    assert types == ("host", "host")
    assert [from_sdp(line).type for line in ours_lines] == [CandidateType.HOST]
    theirs = {
        from_sdp(f"candidate:{line}").type: from_sdp(f"candidate:{line}") for line in their_lines
    }
    assert set(theirs) == {CandidateType.HOST, CandidateType.SRFLX}
    srflx = theirs[CandidateType.SRFLX]
    assert srflx.address == theirs[CandidateType.HOST].address
    assert (srflx.related_host, srflx.related_port) == theirs[CandidateType.HOST].address
    deadline = time.monotonic() + 5.0  # the server thread answers on its own schedule
    while server.counters.binding_ok < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.counters.binding_ok >= 2


@pytest.fixture(scope="module")
def turn_server() -> Iterator[ServerProcess]:
    args = [
        "--listen", "127.0.0.1:0", "--workers", "1", "--user", f"{USER}:{PASSWORD}",
        "--relay-ip", "127.0.0.1", "--allow-loopback-peers",
    ]  # fmt: skip
    with ServerProcess(args) as server:
        server.wait_ready()
        yield server


@ROLES
def test_relay_to_relay(
    monkeypatch: pytest.MonkeyPatch, turn_server: ServerProcess, ours_controlling: bool
) -> None:
    """Both sides relay-only through our TURN server: aioice with
    ``TransportPolicy.RELAY`` (its TURN client binds channels), ours with ``relay_only``
    (credentials from a ``turn:`` URL). The selected pair joins the two relayed candidates;
    10 datagrams go each way through the server."""
    offer_only(monkeypatch, "127.0.0.1")
    host, port = turn_server.addr("udp")

    async def scenario() -> tuple[list[str], list[str], tuple[str, str]]:
        ours = IceConnection(
            ours_controlling,
            turn=parse_turn([f"turn:{host}:{port}?transport=udp"], USER, PASSWORD),
            relay_only=True,
        )
        theirs = aioice.Connection(
            ice_controlling=not ours_controlling,
            turn_server=(host, port),
            turn_username=USER,
            turn_password=PASSWORD,
            transport_policy=aioice.TransportPolicy.RELAY,
            use_ipv6=False,
        )
        try:
            ours_lines, their_lines = await run_ice(ours, theirs)
            return (
                ours_lines,
                their_lines,
                check_selected(ours, ours_controlling, ours_lines, their_lines),
            )
        finally:
            await theirs.close()
            await ours.close()

    ours_lines, their_lines, types = asyncio.run(scenario())
    assert types == ("relay", "relay")
    for line in ours_lines:
        assert from_sdp(line).type is CandidateType.RELAY
    for line in their_lines:
        assert from_sdp(f"candidate:{line}").type is CandidateType.RELAY
