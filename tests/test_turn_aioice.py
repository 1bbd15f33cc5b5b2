"""TURN interop with aioice 0.13's TURN client and ICE agent, against ``stunturn serve``.

* ``aioice.turn.create_turn_endpoint(protocol_factory, server_addr, username, password)``
  allocates over UDP (answering our 401 with its long-term key), and its ``TurnTransport``
  relays datagrams: ``sendto`` binds a channel on first use (aioice only ever uses
  ChannelBind + ChannelData, never Send indications) and the peer's datagrams come back as
  ChannelData. ``close()`` deletes the allocation with Refresh LIFETIME 0.
* Two ``aioice.Connection(..., transport_policy=TransportPolicy.RELAY)`` agents gather only
  relayed candidates from our server and run ICE between their two relays on the same server
  (relay to relay: the policy allows the server's relay IP on relay-range ports).

The server logs every allocation as one JSON line (``--log-format json``), so the tests check
that the relayed addresses aioice reports are the ones our server created.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import aioice
import pytest
from aioice.ice import Connection, TransportPolicy
from aioice.turn import create_turn_endpoint
from helpers import ServerProcess

pytestmark = pytest.mark.interop

PEER_HOST = "127.0.0.2"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    args = [
        "--listen", "127.0.0.1:0", "--workers", "2", "--user", "alice:secret",
        "--relay-ip", "127.0.0.1", "--allow-loopback-peers", "--log-format", "json",
    ]  # fmt: skip
    with ServerProcess(args) as s:
        s.wait_ready()
        yield s


def log_events(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    """The server's JSON log entries for ``event`` (allocation_created, allocation_ended)."""
    out = []
    for line in server.stderr.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                out.append(entry)
    return out


def wait_events(
    server: ServerProcess, event: str, match: dict[str, str], timeout: float = 3.0
) -> list[dict[str, Any]]:
    """Entries for ``event`` whose fields include ``match``, once there are any (the log
    reaches us through a pipe, a little after the responses)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in log_events(server, event) if match.items() <= e.items()]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def same_allocation(created: dict[str, Any]) -> dict[str, Any]:
    """Fields that identify an allocation in later log entries (session IDs are per worker)."""
    return {"session": created["session"], "pid": created["pid"]}


class Collector(asyncio.DatagramProtocol):
    """Receives what the TURN transport delivers."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.lost = asyncio.Event()
        """Set by aioice once its Refresh LIFETIME 0 is answered (or given up) after close()."""

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


def test_aioice_version() -> None:
    """These tests were written against aioice 0.13's TURN and ICE API."""
    assert aioice.__version__.startswith("0.")


async def _endpoint_scenario(
    server: tuple[str, int],
) -> tuple[tuple[str, int], tuple[str, int], tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await asyncio.wait_for(
        create_turn_endpoint(Collector, server, "alice", "secret"), TIMEOUT
    )
    relayed: tuple[str, int] = transport.get_extra_info("sockname")
    mapped: tuple[str, int] = transport.get_extra_info("related_address")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind((PEER_HOST, 0))
        peer.setblocking(False)
        peer_addr: tuple[str, int] = peer.getsockname()
        try:
            # client -> relay -> peer (the first send binds a channel)
            for i in range(20):
                transport.sendto(f"to peer {i}".encode(), peer_addr)
            for i in range(20):
                data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), TIMEOUT)
                assert data == f"to peer {i}".encode() and source == relayed
            # peer -> relay -> client (as ChannelData, which aioice maps back to the peer)
            for i in range(20):
                await loop.sock_sendto(peer, f"to client {i}".encode(), relayed)
            for i in range(20):
                got = await asyncio.wait_for(protocol.queue.get(), TIMEOUT)
                assert got == (f"to client {i}".encode(), peer_addr)
            assert protocol.errors == []
        finally:
            transport.close()
            await asyncio.wait_for(protocol.lost.wait(), TIMEOUT)  # Refresh 0 answered
    return relayed, mapped, peer_addr


def test_create_turn_endpoint_relays_both_ways(server: ServerProcess) -> None:
    """aioice allocates on our server over UDP, binds a channel and relays 20 datagrams each
    way between itself and a plain UDP peer on 127.0.0.2: the peer sees them from the relayed
    address, aioice sees the replies from the peer's address, in order. Our server logged the
    allocation (same relay and client) and, after ``close()``, its end by Refresh 0."""
    relayed, mapped, _ = asyncio.run(_endpoint_scenario(server.addr("udp")))
    relay = f"{relayed[0]}:{relayed[1]}"
    created = wait_events(server, "allocation_created", {"relay": relay})
    assert len(created) == 1 and created[0]["user"] == "alice"
    assert created[0]["client"] == f"udp:{mapped[0]}:{mapped[1]}"
    ended = wait_events(server, "allocation_ended", same_allocation(created[0]))
    assert ended and ended[0]["reason"] == "refreshed to 0", ended
    assert ended[0]["packets_to_peer"] == 20 and ended[0]["packets_to_client"] == 20


async def _ice_scenario(server: tuple[str, int]) -> list[tuple[str, int]]:
    def agent(controlling: bool) -> Connection:
        return Connection(
            ice_controlling=controlling,
            turn_server=server,
            turn_username="alice",
            turn_password="secret",
            transport_policy=TransportPolicy.RELAY,
            use_ipv6=False,
        )

    a, b = agent(True), agent(False)
    try:
        await asyncio.wait_for(asyncio.gather(a.gather_candidates(), b.gather_candidates()), 10)
        relays = []
        for conn in (a, b):
            assert [c.type for c in conn.local_candidates] == ["relay"], conn.local_candidates
            relays.append((conn.local_candidates[0].host, conn.local_candidates[0].port))
        for local, remote in ((a, b), (b, a)):
            for candidate in remote.local_candidates:
                await local.add_remote_candidate(candidate)
            await local.add_remote_candidate(None)
            local.remote_username = remote.local_username
            local.remote_password = remote.local_password
        await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 10)
        for i in range(10):
            await a.send(f"a to b {i}".encode())
            assert await asyncio.wait_for(b.recv(), TIMEOUT) == f"a to b {i}".encode()
            await b.send(f"b to a {i}".encode())
            assert await asyncio.wait_for(a.recv(), TIMEOUT) == f"b to a {i}".encode()
        return relays
    finally:
        await a.close()
        await b.close()


def test_ice_relay_to_relay(server: ServerProcess) -> None:
    """Two aioice ICE agents with TransportPolicy.RELAY gather one relayed candidate each from
    our server, connect through their two relays on that server (connectivity checks,
    nomination, all via ChannelData) and exchange 10 datagrams each way. Both relayed
    candidates are allocations our server logged, for user alice; closing the agents deleted
    both, after each relayed at least the 10 datagrams (plus the ICE checks) each way."""
    relays = asyncio.run(_ice_scenario(server.addr("udp")))
    assert len(set(relays)) == 2
    for host, port in relays:
        assert host == "127.0.0.1"
        created = wait_events(server, "allocation_created", {"relay": f"{host}:{port}"})
        assert len(created) == 1 and created[0]["user"] == "alice", created
        ended = wait_events(server, "allocation_ended", same_allocation(created[0]))
        assert len(ended) == 1 and ended[0]["reason"] == "refreshed to 0", ended
        assert ended[0]["packets_to_peer"] >= 10 and ended[0]["packets_to_client"] >= 10
    assert server.proc.poll() is None and "Traceback" not in server.stderr
