"""TURN over TCP and over TLS with aioice 0.13, against ``stunturn serve``.

The UDP flavour of these tests is in ``test_turn_aioice.py`` (whose log helpers this module
uses). Here aioice reaches our server over a stream, and the server relays over UDP:

* ``aioice.Connection(turn_transport="tcp", turn_ssl=...)`` agents with
  ``TransportPolicy.RELAY`` gather only a relayed candidate, through an allocation made over a
  TCP connection (or a TLS one) to our server, then run ICE relay to relay and exchange data;
* ``aioice.turn.create_turn_endpoint(..., transport="tcp", ssl=...)`` allocates over the
  stream and relays datagrams to and from a UDP echo peer on loopback.

How the client trusts our test certificate, and only it (verification stays on, hostname
check included):

* ``create_turn_endpoint`` takes an ``ssl.SSLContext`` directly: we pass
  ``ssl.create_default_context(cafile=cert)``. Given a ``cafile``, that function loads it
  *instead of* the system store, so our certificate is the only trust anchor; the context
  keeps ``CERT_REQUIRED`` and ``check_hostname``, and asyncio checks the name against the host
  it connects to (127.0.0.1, the certificate's IP SAN).
* ``Connection`` only takes ``turn_ssl: bool`` and hands it on as ``ssl=True``, for which
  asyncio builds ``ssl.create_default_context()`` (verifying, hostname 127.0.0.1). That
  context loads OpenSSL's default verify paths, which OpenSSL reads from the ``SSL_CERT_FILE``
  and ``SSL_CERT_DIR`` environment variables when they are set, at the moment the context is
  made. The TLS tests set ``SSL_CERT_FILE`` to our certificate and ``SSL_CERT_DIR`` to an
  empty directory (``monkeypatch``, undone after each test), so the system CAs are out and our
  certificate is again the only trust anchor. Nothing is patched inside aioice or ssl.
* ``test_tls_refuses_bad_certificates`` shows the verification is real: a certificate with
  the right names but another key, and our certificate served on an address it does not name
  (a second TLS listener on 127.0.0.3), are both refused, through ``ssl=True`` (the
  ``Connection`` path), through an explicit context, and by ``Connection`` itself, which then
  gathers no candidate.

Every address is loopback; the server logs each allocation as a JSON line whose ``client``
field starts with the transport (``tcp:`` / ``tls:``), which the tests check.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import pytest
from aioice.ice import Connection, TransportPolicy
from aioice.turn import create_turn_endpoint
from helpers import ServerProcess
from test_turn_aioice import Collector, same_allocation, wait_events

from stunturn.aio.tls import make_self_signed

pytestmark = pytest.mark.interop

TIMEOUT = 5.0
PEER_HOST = "127.0.0.2"
UNNAMED_HOST = "127.0.0.3"
"""A second TLS listener, on an address the certificate does not name."""
TRANSPORTS = ["tcp", "tls"]
Addr = tuple[str, int]


@dataclass(frozen=True)
class Certs:
    """PEM files: the server's certificate and key, a stranger certificate with the same
    names (another key), and an empty directory to stand for ``SSL_CERT_DIR``."""

    cert: str
    key: str
    stranger: str
    empty_dir: str


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    names, ips = ("localhost",), ("127.0.0.1",)
    cert, key, _ = make_self_signed(tmp_path_factory.mktemp("server-cert"), names, ips)
    stranger, _, _ = make_self_signed(tmp_path_factory.mktemp("stranger-cert"), names, ips)
    return Certs(cert, key, stranger, str(tmp_path_factory.mktemp("empty-capath")))


@pytest.fixture(scope="module")
def server(certs: Certs) -> Iterator[ServerProcess]:
    """TURN on UDP+TCP 127.0.0.1:random, TLS on 127.0.0.1:random and 127.0.0.3:random."""
    args = [
        "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0",
        "--tls-listen", f"{UNNAMED_HOST}:0", "--cert", certs.cert, "--key", certs.key,
        "--workers", "1", "--user", "alice:secret", "--relay-ip", "127.0.0.1",
        "--allow-loopback-peers", "--log-format", "json",
    ]  # fmt: skip
    with ServerProcess(args) as s:
        s.wait_ready()
        yield s


def trust_only(monkeypatch: pytest.MonkeyPatch, certs: Certs, cafile: str) -> None:
    """Make ``cafile`` the only trust anchor of ``ssl.create_default_context()`` contexts
    created from now on in this process (until the test ends)."""
    monkeypatch.setenv("SSL_CERT_FILE", cafile)
    monkeypatch.setenv("SSL_CERT_DIR", certs.empty_dir)


def check_server(server: ServerProcess) -> None:
    assert server.proc.poll() is None, server.stderr
    assert "Traceback" not in server.stderr, server.stderr


class EchoPeer(asyncio.DatagramProtocol):
    """A UDP peer that sends every datagram back to where it came from.

    The transport is kept with a ``cast``: asyncio's selector datagram transport only became
    an ``asyncio.DatagramTransport`` subclass in Python 3.12 (uvloop's is not one either), so
    an ``isinstance`` assertion fails in ``connection_made`` on 3.11, where asyncio merely
    logs the error, and the peer then never echoes anything.
    """

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: list[Addr] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.sources.append(addr)
        # connection_made always runs before the loop reads the socket.
        assert self.transport is not None
        self.transport.sendto(data, addr)


class ClosingCollector(Collector):
    """A :class:`Collector` that also notes when the TURN transport is gone: aioice calls
    ``connection_lost(None)`` once its Refresh LIFETIME 0 has been answered (or given up)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


async def _endpoint_scenario(
    server: Addr, ssl_context: ssl.SSLContext | None
) -> tuple[Addr, Addr, list[Addr]]:
    """Allocate over the stream, send 20 datagrams to a UDP echo peer, get the 20 echoes,
    close; returns (relayed address, mapped address, sources the peer saw)."""
    loop = asyncio.get_running_loop()
    echo_transport, echo = await loop.create_datagram_endpoint(
        EchoPeer, local_addr=(PEER_HOST, 0), family=socket.AF_INET
    )
    try:
        peer_addr: Addr = echo_transport.get_extra_info("sockname")
        transport, protocol = await asyncio.wait_for(
            create_turn_endpoint(
                ClosingCollector, server, "alice", "secret", ssl=ssl_context, transport="tcp"
            ),
            TIMEOUT,
        )
        relayed: Addr = transport.get_extra_info("sockname")
        mapped: Addr = transport.get_extra_info("related_address")
        try:
            # client -> server (stream) -> relay (UDP) -> peer; the echo comes back the same
            # way, as ChannelData on the stream (the first send binds a channel).
            for i in range(20):
                transport.sendto(f"echo {i}".encode(), peer_addr)
            for i in range(20):
                got = await asyncio.wait_for(protocol.queue.get(), TIMEOUT)
                assert got == (f"echo {i}".encode(), peer_addr)
            assert protocol.errors == []
        finally:
            transport.close()
        assert await asyncio.wait_for(protocol.closed, TIMEOUT) is None
        return relayed, mapped, echo.sources
    finally:
        echo_transport.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_create_turn_endpoint_over_stream(
    server: ServerProcess, certs: Certs, transport: str
) -> None:
    """aioice's TURN client allocates over a TCP (or TLS, trusting only our certificate)
    connection, binds a channel and sends 20 datagrams to a UDP echo peer on 127.0.0.2 through
    the relay; the peer sees them from the relayed address and all 20 echoes come back, in
    order, attributed to the peer. The server logged a ``tcp:``/``tls:`` allocation for that
    relay and client, and its deletion by Refresh 0, with 20 packets each way."""
    context = ssl.create_default_context(cafile=certs.cert) if transport == "tls" else None
    relayed, mapped, sources = asyncio.run(
        _endpoint_scenario(server.addr(transport, "127.0.0.1"), context)
    )
    assert relayed[0] == "127.0.0.1" and sources == [relayed] * 20, (relayed, sources)
    created = wait_events(server, "allocation_created", {"relay": f"{relayed[0]}:{relayed[1]}"})
    assert len(created) == 1 and created[0]["user"] == "alice", created
    assert created[0]["client"] == f"{transport}:{mapped[0]}:{mapped[1]}", created
    ended = wait_events(server, "allocation_ended", same_allocation(created[0]))
    assert len(ended) == 1 and ended[0]["reason"] == "refreshed to 0", ended
    assert ended[0]["packets_to_peer"] == 20 and ended[0]["packets_to_client"] == 20, ended
    check_server(server)


def relay_agent(server: Addr, controlling: bool, tls: bool) -> Connection:
    """An aioice agent gathering only a relayed candidate, allocated over TCP (or TLS)."""
    return Connection(
        ice_controlling=controlling,
        turn_server=server,
        turn_username="alice",
        turn_password="secret",
        turn_transport="tcp",
        turn_ssl=tls,
        transport_policy=TransportPolicy.RELAY,
        use_ipv6=False,
    )


Pair = tuple[tuple[str, str, int], tuple[str, str, int]]
"""A selected pair: ((type, host, port) of the local candidate, same for the remote one)."""


def selected_pair(conn: Connection) -> Pair:
    """The pair ICE nominated for component 1 (aioice keeps it in ``_nominated``; there is
    no public accessor in 0.13)."""
    pair = conn._nominated.get(1)
    assert pair is not None, "no nominated pair"
    local, remote = pair.local_candidate, pair.remote_candidate
    return (local.type, local.host, local.port), (remote.type, remote.host, remote.port)


async def _ice_scenario(server: Addr, tls: bool) -> tuple[Pair, Pair]:
    """Both agents gather one relayed candidate each over the stream, connect relay to relay
    and exchange 10 messages each way; returns each agent's selected pair."""
    a, b = relay_agent(server, True, tls), relay_agent(server, False, tls)
    try:
        await asyncio.wait_for(asyncio.gather(a.gather_candidates(), b.gather_candidates()), 10)
        for conn in (a, b):
            assert [c.type for c in conn.local_candidates] == ["relay"], conn.local_candidates
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
        return selected_pair(a), selected_pair(b)
    finally:
        # close() waits for the Refresh LIFETIME 0 of each allocation to be answered.
        await asyncio.wait_for(asyncio.gather(a.close(), b.close()), 10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ice_relay_to_relay_over_stream(
    server: ServerProcess, certs: Certs, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """Two aioice agents (controlling and controlled) with ``TransportPolicy.RELAY`` and
    ``turn_transport="tcp"`` (``turn_ssl=True`` for TLS, trusting only our certificate through
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``) each gather one relayed candidate from our server,
    connect and exchange 10 messages each way. Each selected pair is the agent's own relayed
    candidate with the other's; both are allocations our server logged with a
    ``tcp:``/``tls:`` client, and closing the agents deleted them after relaying at least the
    10 messages each way."""
    tls = transport == "tls"
    if tls:
        trust_only(monkeypatch, certs, certs.cert)
    pair_a, pair_b = asyncio.run(_ice_scenario(server.addr(transport, "127.0.0.1"), tls))
    assert pair_a[0][0] == pair_b[0][0] == "relay", (pair_a, pair_b)
    assert pair_a == (pair_b[1], pair_b[0]), (pair_a, pair_b)
    assert pair_a[0] != pair_b[0], (pair_a, pair_b)
    for _, host, port in (pair_a[0], pair_b[0]):
        created = wait_events(server, "allocation_created", {"relay": f"{host}:{port}"})
        assert len(created) == 1 and created[0]["user"] == "alice", created
        assert created[0]["client"].startswith(f"{transport}:127.0.0.1:"), created
        ended = wait_events(server, "allocation_ended", same_allocation(created[0]))
        assert len(ended) == 1 and ended[0]["reason"] == "refreshed to 0", ended
        assert ended[0]["packets_to_peer"] >= 10 and ended[0]["packets_to_client"] >= 10, ended
    check_server(server)


async def _refused(server: Addr, ssl_arg: bool | ssl.SSLContext) -> ssl.SSLCertVerificationError:
    """The verification error ``create_turn_endpoint`` fails with (the test fails if it
    allocates instead)."""
    try:
        transport, _ = await asyncio.wait_for(
            create_turn_endpoint(
                Collector, server, "alice", "secret", ssl=ssl_arg, transport="tcp"
            ),
            TIMEOUT,
        )
    except ssl.SSLCertVerificationError as exc:
        return exc
    transport.close()
    raise AssertionError(f"TLS to {server} was accepted with ssl={ssl_arg!r}")


async def _gather_relay(server: Addr) -> list[str]:
    """The candidate types a relay-only agent with ``turn_ssl=True`` gathers."""
    agent = relay_agent(server, True, tls=True)
    try:
        await asyncio.wait_for(agent.gather_candidates(), 10)
        return [c.type for c in agent.local_candidates]
    finally:
        await asyncio.wait_for(agent.close(), 10)


@pytest.mark.parametrize("case", ["stranger-cert", "unnamed-address"])
def test_tls_refuses_bad_certificates(
    server: ServerProcess, certs: Certs, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The TLS tests above really verify the certificate, hostname included.

    ``stranger-cert``: the client trusts only another certificate with the same names (so
    only the key differs). ``unnamed-address``: the client trusts only our certificate but
    reaches the server on 127.0.0.3, which the certificate does not name. Either way the
    handshake fails with a verification error, whether aioice is given ``ssl=True`` (the
    default context, trust from the environment, as ``Connection`` does) or an explicit
    context, and a relay-only ``Connection`` gathers no candidate at all.
    """
    if case == "stranger-cert":
        addr, trusted = server.addr("tls", "127.0.0.1"), certs.stranger
    else:
        addr, trusted = server.addr("tls", UNNAMED_HOST), certs.cert
    trust_only(monkeypatch, certs, trusted)
    explicit = ssl.create_default_context(cafile=trusted)
    for ssl_arg in (True, explicit):
        exc = asyncio.run(_refused(addr, ssl_arg))
        if case == "unnamed-address":
            # X509_V_ERR_IP_ADDRESS_MISMATCH: the chain was fine, the name was not.
            assert exc.verify_code == 64, (exc.verify_code, exc.verify_message)
        else:
            # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT: a self-signed certificate not trusted.
            assert exc.verify_code == 18, (exc.verify_code, exc.verify_message)
    assert asyncio.run(_gather_relay(addr)) == []
    check_server(server)
