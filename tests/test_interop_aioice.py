"""Interop with aioice 0.13, a third-party STUN/ICE implementation, on loopback.

* aioice's codec (``aioice.stun.parse_message`` / ``bytes(aioice.stun.Message)``) parses our
  responses and builds requests our server answers, over UDP and TCP;
* aioice's own client code: its STUN transaction machinery (retransmissions included) through
  ``TurnClientTcpProtocol`` for a Binding over TCP and TLS (aioice has no separate STUN-over-TCP
  client; its TURN stream protocol runs any STUN transaction), and its ICE gathering
  (``Connection.get_component_candidates``) for a server-reflexive candidate over UDP.

aioice's ``gather_candidates()`` skips 127.0.0.1 and ::1 when listing host addresses, so on a
loopback-only machine it would gather nothing; the test calls the per-address gathering step it
runs underneath with ``addresses=["127.0.0.1"]``. On loopback the srflx candidate equals the host
candidate (no NAT); the test checks exactly that, and that aioice keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aioice
import pytest
from aioice import stun as astun
from aioice.ice import Connection
from aioice.turn import TurnClientTcpProtocol
from conftest import StartServer
from helpers import (
    STREAM_LOOPS,
    ServerProcess,
    client_tls_context,
    recv_response,
    sockname,
    tcp_connect,
    udp_socket,
)

from stunturn.stun import Address, StreamFramer

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def plain() -> Iterator[ServerProcess]:
    with ServerProcess(["--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--workers", "1"]) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def grid() -> Iterator[ServerProcess]:
    args = ["--listen", "127.0.0.1:0", "--alt-address", "127.0.0.2", "--workers", "1"]
    with ServerProcess(args) as s:
        s.wait_ready()
        yield s


def aioice_udp(
    server: Address, request: astun.Message, host: str = "127.0.0.1"
) -> tuple[astun.Message, Address, Address]:
    """Send an aioice-built request; parse the raw answer with aioice.
    Returns (response, source of the answer, our socket's address)."""
    with udp_socket(host) as sock:
        data = bytes(request)
        for _ in range(4):
            sock.sendto(data, server)
            got = recv_response(sock, request.transaction_id, 0.5)
            if got is not None:
                raw = got[0].raw
                return astun.parse_message(raw), got[1], sockname(sock)
    raise AssertionError("no answer")


def test_aioice_version() -> None:
    """The interop tests below were written against aioice 0.13."""
    assert aioice.__version__.startswith("0.")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("fingerprint", [False, True], ids=["plain", "fingerprint"])
def test_aioice_codec_over_udp(plain: ServerProcess, host: str, fingerprint: bool) -> None:
    """A Binding request built by aioice (with FINGERPRINT added by aioice, or not) is answered;
    aioice parses the answer (checking our FINGERPRINT when present) and reads
    XOR-MAPPED-ADDRESS as the client's own address."""
    request = astun.Message(astun.Method.BINDING, astun.Class.REQUEST)
    if fingerprint:
        request.add_fingerprint()
    response, _, local = aioice_udp(plain.addr("udp", host), request, host)
    assert response.message_method == astun.Method.BINDING
    assert response.message_class == astun.Class.RESPONSE
    assert response.transaction_id == request.transaction_id
    assert response.attributes["XOR-MAPPED-ADDRESS"] == local
    assert ("FINGERPRINT" in response.attributes) == fingerprint


def test_aioice_reads_rfc5780_attributes(grid: ServerProcess) -> None:
    """aioice reads MAPPED-ADDRESS, RESPONSE-ORIGIN and OTHER-ADDRESS from our RFC 5780
    responses, and a CHANGE-REQUEST encoded by aioice (value 6 = change IP and port) makes our
    server answer from the other IP and port."""
    server = grid.addr("udp", "127.0.0.1")
    request = astun.Message(astun.Method.BINDING, astun.Class.REQUEST)
    response, source, local = aioice_udp(server, request)
    assert response.attributes["MAPPED-ADDRESS"] == local
    assert response.attributes["XOR-MAPPED-ADDRESS"] == local
    assert response.attributes["RESPONSE-ORIGIN"] == server == source
    assert response.attributes["OTHER-ADDRESS"] == ("127.0.0.2", server[1] + 1)

    changed = astun.Message(
        astun.Method.BINDING, astun.Class.REQUEST, attributes={"CHANGE-REQUEST": 6}
    )
    response, source, local = aioice_udp(server, changed)
    assert source == ("127.0.0.2", server[1] + 1)
    assert response.attributes["RESPONSE-ORIGIN"] == source
    assert response.attributes["XOR-MAPPED-ADDRESS"] == local


def test_aioice_reads_our_error_response(plain: ServerProcess) -> None:
    """Our 420 (CHANGE-REQUEST on a single-address server) parses in aioice as an error
    response with error_code 420."""
    request = astun.Message(
        astun.Method.BINDING, astun.Class.REQUEST, attributes={"CHANGE-REQUEST": 6}
    )
    response, _, _ = aioice_udp(plain.addr("udp", "127.0.0.1"), request)
    assert response.message_class == astun.Class.ERROR
    assert response.error_code == 420


@pytest.mark.parametrize("loop", STREAM_LOOPS)
def test_aioice_codec_over_tcp(stunturn_server: StartServer, loop: str) -> None:
    """Three aioice-built requests pipelined in one TCP write get three answers that aioice
    parses, each with the connection's client address as XOR-MAPPED-ADDRESS."""
    server = stunturn_server("--listen", "127.0.0.1:0", "--workers", "1", loop=loop)
    requests = [astun.Message(astun.Method.BINDING, astun.Class.REQUEST) for _ in range(3)]
    requests[1].add_fingerprint()
    with tcp_connect(server.addr("tcp")) as sock:
        sock.sendall(b"".join(bytes(r) for r in requests))
        framer = StreamFramer()
        frames: list[bytes] = []
        sock.settimeout(2.0)
        for _ in range(30):
            if len(frames) >= 3:
                break
            data = sock.recv(4096)
            if not data:
                break
            frames += framer.feed(data)
        responses = [astun.parse_message(f) for f in frames]
        assert [r.transaction_id for r in responses] == [r.transaction_id for r in requests]
        for response in responses:
            assert response.attributes["XOR-MAPPED-ADDRESS"] == sockname(sock)


async def _tcp_transaction(server: Address, tls: bool) -> tuple[astun.Message, Address]:
    """One Binding transaction with aioice's stream protocol; returns (response, local)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await asyncio.wait_for(
        loop.create_connection(
            lambda: TurnClientTcpProtocol(
                server, username=None, password=None, lifetime=600, channel_refresh_time=500
            ),
            host=server[0],
            port=server[1],
            ssl=client_tls_context(None) if tls else None,
        ),
        5.0,
    )
    try:
        request = astun.Message(astun.Method.BINDING, astun.Class.REQUEST)
        response, _ = await asyncio.wait_for(protocol.request(request), 2.0)
        local = transport.get_extra_info("sockname")
        return response, (local[0], local[1])
    finally:
        transport.close()


@pytest.mark.parametrize("loop", STREAM_LOOPS)
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_aioice_transaction_over_streams(
    stunturn_server: StartServer, loop: str, tls: bool
) -> None:
    """aioice's own transaction code and stream framing (TurnClientTcpProtocol.request, which
    runs any STUN transaction) completes a Binding transaction with our server over TCP and
    over TLS (self-signed certificate, not verified), and gets the right mapped address."""
    args = ["--listen", "127.0.0.1:0", "--workers", "1"]
    server = stunturn_server(
        *args, *(["--tls-listen", "127.0.0.1:0", "--self-signed"] if tls else []), loop=loop
    )
    target = server.addr("tls" if tls else "tcp")
    response, local = asyncio.run(_tcp_transaction(target, tls))
    assert response.message_class == astun.Class.RESPONSE
    assert response.attributes["XOR-MAPPED-ADDRESS"] == local


async def _gather(server: Address) -> list[aioice.Candidate]:
    connection = Connection(ice_controlling=True, stun_server=server, use_ipv6=False)
    try:
        return await asyncio.wait_for(
            connection.get_component_candidates(component=1, addresses=["127.0.0.1"]), 10.0
        )
    finally:
        await connection.close()


def test_aioice_gathers_server_reflexive_candidate(plain: ServerProcess) -> None:
    """aioice's ICE gathering asks our server for a server-reflexive candidate over UDP (its
    STUN transaction with retransmissions) and gets one; on loopback it equals the host
    candidate, with the host candidate as its related address."""
    candidates = asyncio.run(_gather(plain.addr("udp", "127.0.0.1")))
    by_type = {c.type: c for c in candidates}
    assert set(by_type) == {"host", "srflx"}, candidates
    host, srflx = by_type["host"], by_type["srflx"]
    assert (srflx.host, srflx.port) == (host.host, host.port)
    assert (srflx.related_address, srflx.related_port) == (host.host, host.port)
    assert srflx.priority < host.priority


def test_aioice_gathering_skips_loopback() -> None:
    """Documents why the gathering test calls get_component_candidates: aioice's own host
    address listing leaves out 127.0.0.1 and ::1."""
    addresses = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    assert "127.0.0.1" not in addresses and "::1" not in addresses
