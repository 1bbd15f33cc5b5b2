"""The asyncio TURN client on loopback, against `stunturn serve` and coturn 4.6.1's turnserver.

Each scenario runs over UDP, TCP and TLS (the certificate comes from
:func:`stunturn.aio.tls.make_self_signed` and the client trusts it through ``cafile``): allocate,
install a permission and exchange Send/Data indications with a UDP peer on 127.0.0.2, send to a
second peer (127.0.0.3) without asking for a permission first (the client installs it lazily),
bind a channel and exchange ChannelData of every length modulo 4 (padding over TCP/TLS), take a
burst of 64 datagrams from the peer, refresh, close; then the server's log must show the
allocation released by Refresh LIFETIME 0.

coturn is started with ``-n`` so that Debian's /etc/turnserver.conf (``syslog``,
``no-rfc5780``, ...) is not read, and with ``--stale-nonce=1`` so that its 438 path is used.
Each server relays from its own loopback IP and from ports below Linux's ephemeral range.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from conftest import StartInProcess
from helpers import ServerProcess, free_port

from stunturn.aio.tls import make_self_signed
from stunturn.aio.turnclient import TurnClient, TurnClientError, server_endpoint
from stunturn.config import build_config
from stunturn.stun import Address, Message, MessageClass, Method, decode
from stunturn.turn.url import parse_ice_url

TURNSERVER = shutil.which("turnserver")
PEER_IP, PEER2_IP = "127.0.0.2", "127.0.0.3"
OUR_RELAY, COTURN_RELAY = "127.0.0.21", "127.0.0.22"
OUR_PORTS, COTURN_PORTS = (31000, 31499), (31500, 31999)
TIMEOUT = 3.0


@dataclass
class Target:
    """A running TURN server: its listeners, relay IP and a way to read its log."""

    name: str
    listeners: dict[str, Address]
    relay_ip: str
    log: Callable[[], str]
    released: Callable[[str, int], bool]
    """released(log before the test, relayed port): the log shows the Refresh LIFETIME 0."""

    def spec(self, transport: str) -> tuple[str, int, str, bool]:
        host, port = self.listeners[transport]
        return (host, port, "udp" if transport == "udp" else "tcp", transport == "tls")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    cert_path, key_path, _ = make_self_signed(tmp_path_factory.mktemp("tls"), names=["localhost"])
    return cert_path, key_path


@pytest.fixture(scope="module")
def trusting(cert: tuple[str, str]) -> ssl.SSLContext:
    """A client context that verifies the server against the test certificate."""
    return ssl.create_default_context(cafile=cert[0])


def _our_released(stderr: Callable[[], str]) -> Callable[[str, int], bool]:
    def released(before: str, relay_port: int) -> bool:
        sessions = set()
        ended = set()
        for line in stderr()[len(before) :].splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "allocation_created" and record.get("relay", "").endswith(
                    f":{relay_port}"
                ):
                    sessions.add(record["session"])
                if record.get("event") == "allocation_ended" and (
                    record.get("reason") == "refreshed to 0"
                ):
                    ended.add(record["session"])
        return bool(sessions & ended)

    return released


@pytest.fixture(scope="module")
def ours(cert: tuple[str, str]) -> Iterator[Target]:
    args = [
        "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0",
        "--cert", cert[0], "--key", cert[1], "--workers", "1",
        "--user", "alice:secret", "--relay-ip", OUR_RELAY,
        "--relay-ports", f"{OUR_PORTS[0]}-{OUR_PORTS[1]}", "--allow-loopback-peers",
        "--log-format", "json",
    ]  # fmt: skip
    with ServerProcess(args) as server:
        server.wait_ready()
        listeners = {kind: server.addr(kind) for kind in ("udp", "tcp", "tls")}

        def log() -> str:
            return server.stderr

        yield Target("ours", listeners, OUR_RELAY, log, _our_released(log))


def _wait_listening(
    udp: Address, tcp: Address, tls: Address, proc: subprocess.Popen[bytes]
) -> None:
    """coturn prints nothing reliable on stdout when ready: probe its listeners."""
    deadline = time.monotonic() + 10
    binding = Message(Method.BINDING, MessageClass.REQUEST).encode()
    while time.monotonic() < deadline:
        assert proc.poll() is None, "turnserver exited"
        try:
            for address in (tcp, tls):
                socket.create_connection(address, timeout=0.2).close()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.settimeout(0.2)
                probe.sendto(binding, udp)
                if decode(probe.recv(2048)).cls is MessageClass.SUCCESS:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("turnserver did not start listening")


@pytest.fixture(scope="module")
def coturn(cert: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    if TURNSERVER is None:
        pytest.skip("coturn's turnserver is not installed (apt install coturn)")
    work = tmp_path_factory.mktemp("coturn")
    log_path = work / "turnserver.log"
    port, tls_port = free_port(), free_port()
    # 4.6.1 flags: -n ignores /etc/turnserver.conf; -v logs each session's requests, which the
    # release check reads; --stale-nonce=1 makes nonces stale after 1-2 s (438; coturn counts
    # whole seconds).
    argv = [
        TURNSERVER, "-n", "-v", "--lt-cred-mech", "--user", "alice:secret", "--realm", "test",
        "--allow-loopback-peers", "--listening-ip", "127.0.0.1", "--relay-ip", COTURN_RELAY,
        "--min-port", str(COTURN_PORTS[0]), "--max-port", str(COTURN_PORTS[1]),
        "--listening-port", str(port), "--tls-listening-port", str(tls_port),
        "--cert", cert[0], "--pkey", cert[1], "--no-dtls", "--no-cli",
        "--stale-nonce=1", "--no-software-attribute",
        "--db", str(work / "turndb"), "--pidfile", str(work / "turnserver.pid"),
        "--log-file", str(log_path), "--simple-log", "--no-stdout-log",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        udp, tcp, tls = ("127.0.0.1", port), ("127.0.0.1", port), ("127.0.0.1", tls_port)
        _wait_listening(udp, tcp, tls, proc)

        def log() -> str:
            return log_path.read_text(errors="replace") if log_path.exists() else ""

        def released(before: str, relay_port: int) -> bool:
            return "username=<alice>, lifetime=0" in log()[len(before) :]

        assert "turnserver.conf" not in log(), "turnserver read a configuration file"
        yield Target("coturn", {"udp": udp, "tcp": tcp, "tls": tls}, COTURN_RELAY, log, released)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(params=["ours", pytest.param("coturn", marks=pytest.mark.interop)])
def target(request: pytest.FixtureRequest) -> Target:
    result: Target = request.getfixturevalue(request.param)
    return result


@contextlib.contextmanager
def peer_socket(ip: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((ip, 0))
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()


async def peer_recv(sock: socket.socket) -> tuple[bytes, Address]:
    """One datagram for a peer socket (uvloop has no ``sock_recvfrom``: use a reader)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(BlockingIOError):
        data, source = sock.recvfrom(65536)
        return data, (source[0], source[1])
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await asyncio.wait_for(ready, TIMEOUT)
    finally:
        loop.remove_reader(sock.fileno())
    data, source = sock.recvfrom(65536)
    return data, (source[0], source[1])


async def client_recv(client: TurnClient) -> tuple[Address, bytes]:
    return await asyncio.wait_for(client.receive(), TIMEOUT)


def addr(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return (host, port)


async def _relay_scenario(target: Target, transport: str, ctx: ssl.SSLContext) -> None:
    before = target.log()
    with peer_socket(PEER_IP) as peer, peer_socket(PEER2_IP) as peer2:
        client = await TurnClient.connect(
            target.spec(transport), "alice", "secret", ssl_context=ctx, connect_timeout=5
        )
        async with client:
            relayed = client.relayed_address
            assert relayed[0] == target.relay_ip
            assert client.mapped_address == client.local_address
            assert client.lifetime == 600

            # Send and Data indications after an explicit CreatePermission.
            await client.create_permission(PEER_IP)
            client.send(addr(peer), b"hello")
            assert await peer_recv(peer) == (b"hello", relayed)
            peer.sendto(b"reply", relayed)
            assert await client_recv(client) == (addr(peer), b"reply")

            # A peer with no permission yet: the datagram waits for the lazy CreatePermission.
            client.send(addr(peer2), b"lazy")
            assert await peer_recv(peer2) == (b"lazy", relayed)
            assert client.stats.send_indications_sent == 2
            assert client.stats.data_indications_received == 1

            # ChannelData both ways, every length modulo 4 (padding over TCP/TLS).
            number = await client.bind_channel(addr(peer))
            assert 0x4000 <= number <= 0x4FFF
            assert await client.bind_channel(addr(peer)) == number
            for size in (1, 2, 3, 4, 5, 6, 7, 1200):
                payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
                client.send(addr(peer), payload)
                assert await peer_recv(peer) == (payload, relayed)
                peer.sendto(payload[::-1] + b"!", relayed)
                assert await client_recv(client) == (addr(peer), payload[::-1] + b"!")
            assert client.stats.channel_data_sent == 8
            assert client.stats.channel_data_received == 8

            # A burst from the peer: many frames per read over TCP/TLS, all in order.
            for i in range(64):
                peer.sendto(b"burst %d" % i + b"." * (i % 4), relayed)
            for i in range(64):
                assert await client_recv(client) == (addr(peer), b"burst %d" % i + b"." * (i % 4))

            assert await client.refresh() == 600
            assert client.stats.integrity_failures == 0
            assert client.stats.queue_dropped == 0
        assert client.closed
        with pytest.raises(TurnClientError, match="closed"):
            client.send(addr(peer), b"too late")
    deadline = time.monotonic() + TIMEOUT
    while not target.released(before, relayed[1]):
        assert time.monotonic() < deadline, f"{target.name} did not log the release"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_relay_round_trips(target: Target, transport: str, trusting: ssl.SSLContext) -> None:
    """Allocate, permissions (explicit and lazy), Send/Data, a channel, a burst, refresh and
    release, over each transport to each server."""
    asyncio.run(_relay_scenario(target, transport, trusting))


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_client_under_uvloop(ours: Target, transport: str, trusting: ssl.SSLContext) -> None:
    """The same scenario with the client on uvloop (whose transports differ from asyncio's)."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_relay_scenario(ours, transport, trusting))


def test_tls_verification(ours: Target) -> None:
    """TLS verifies by default (the self-signed certificate is refused); a caller may pass a
    context that does not verify."""

    async def scenario() -> None:
        with pytest.raises(TurnClientError, match="CERTIFICATE_VERIFY_FAILED") as info:
            await TurnClient.connect(ours.spec("tls"), "alice", "secret", connect_timeout=5)
        assert info.value.code is None
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        host, port = ours.listeners["tls"]
        async with await TurnClient.connect(
            parse_ice_url(f"turns:{host}:{port}"), "alice", "secret", ssl_context=unverified
        ) as client:
            assert client.transport == "tls"
            assert client.relayed_address[0] == OUR_RELAY

    asyncio.run(scenario())


@pytest.mark.interop
def test_stale_nonce_with_coturn(coturn: Target) -> None:
    """coturn's nonces go stale after 1-2 s here: the next request draws a 438 and the client
    retries with the new nonce, transparently."""

    async def scenario() -> None:
        before = coturn.log()
        async with await TurnClient.connect(coturn.spec("udp"), "alice", "secret") as client:
            await asyncio.sleep(2.1)
            await client.create_permission(PEER_IP)
        assert "error 438" in coturn.log()[len(before) :]

    asyncio.run(scenario())


def test_wrong_password(target: Target) -> None:
    async def scenario() -> None:
        with pytest.raises(TurnClientError) as info:
            await TurnClient.connect(target.spec("udp"), "alice", "wrong", connect_timeout=5)
        assert info.value.code == 401

    asyncio.run(scenario())


def test_refused_peer(ours: Target) -> None:
    """Our peer policy refuses the server's own listener IP (403)."""

    async def scenario() -> None:
        async with await TurnClient.connect(ours.spec("udp"), "alice", "secret") as client:
            with pytest.raises(TurnClientError) as info:
                await client.create_permission("127.0.0.1")
            assert info.value.code == 403
            with pytest.raises(TurnClientError) as info:
                await client.bind_channel(("127.0.0.1", 9))
            assert info.value.code == 403
            await client.create_permission(PEER_IP)  # the allocation is still fine

    asyncio.run(scenario())


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_server_going_away_fails_the_client(transport: str, cert: tuple[str, str]) -> None:
    """A closed TCP/TLS connection ends the allocation (RFC 8656 section 3.1): the client fails
    with a clear error, and sending raises it."""
    args = [
        "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--workers", "1",
        "--cert", cert[0], "--key", cert[1], "--user", "alice:secret",
        "--relay-ip", OUR_RELAY, "--relay-ports", f"{OUR_PORTS[0]}-{OUR_PORTS[1]}",
    ]  # fmt: skip
    with ServerProcess(args) as server:
        server.wait_ready()
        host, port = server.addr(transport)

        async def scenario() -> None:
            ctx = ssl.create_default_context(cafile=cert[0])
            spec = (host, port, "tcp", transport == "tls")
            client = await TurnClient.connect(spec, "alice", "secret", ssl_context=ctx)
            server.kill()
            await asyncio.wait_for(client.wait_closed(), TIMEOUT)
            assert client.error is not None and client.error.code is None
            assert "connection to the TURN server closed" in client.error.reason
            with pytest.raises(TurnClientError, match="connection to the TURN server closed"):
                client.send((PEER_IP, 9), b"x")
            with pytest.raises(TurnClientError, match="connection to the TURN server closed"):
                await client.receive()
            await client.close()  # still fine to call

        asyncio.run(scenario())


def test_unreachable_servers() -> None:
    """Nobody on the UDP port: the allocation times out; nobody on the TCP port: refused."""

    async def scenario() -> None:
        port = free_port()
        with pytest.raises(TurnClientError, match="no allocation from"):
            await TurnClient.connect(
                ("127.0.0.1", port, "udp", False), "alice", "secret", connect_timeout=0.3
            )
        with pytest.raises(TurnClientError, match="cannot connect"):
            await TurnClient.connect(("127.0.0.1", port, "tcp", False), "alice", "secret")

    asyncio.run(scenario())


def test_server_endpoints() -> None:
    assert server_endpoint("turn:example.org") == ("example.org", 3478, "udp")
    assert server_endpoint("turn:example.org?transport=tcp") == ("example.org", 3478, "tcp")
    assert server_endpoint(parse_ice_url("turns:[::1]")) == ("::1", 5349, "tls")
    assert server_endpoint(("192.0.2.1", 443, "tcp", True)) == ("192.0.2.1", 443, "tls")
    with pytest.raises(ValueError, match="STUN URL"):
        server_endpoint("stun:example.org")
    with pytest.raises(ValueError, match="DTLS"):
        server_endpoint(("192.0.2.1", 443, "udp", True))
    with pytest.raises(ValueError, match="transport"):
        server_endpoint(("192.0.2.1", 443, "sctp", False))


def test_on_data_callback(ours: Target) -> None:
    """With ``on_data`` the datagrams go to the callback (an exception in it is logged, not
    fatal)."""

    async def scenario() -> None:
        got: list[tuple[Address, bytes]] = []
        arrived = asyncio.Event()

        def on_data(peer: Address, data: bytes) -> None:
            got.append((peer, data))
            arrived.set()
            if data == b"boom":
                raise RuntimeError("callback bug")

        with peer_socket(PEER_IP) as peer:
            async with await TurnClient.connect(
                ours.spec("udp"), "alice", "secret", on_data=on_data
            ) as client:
                await client.create_permission(PEER_IP)
                peer.sendto(b"boom", client.relayed_address)
                await asyncio.wait_for(arrived.wait(), TIMEOUT)
                arrived.clear()
                peer.sendto(b"fine", client.relayed_address)
                await asyncio.wait_for(arrived.wait(), TIMEOUT)
            assert got == [(addr(peer), b"boom"), (addr(peer), b"fine")]

    asyncio.run(scenario())


def test_idle_tcp_allocation_survives_until_its_lifetime(
    inprocess_server: StartInProcess,
) -> None:
    """A TCP allocation with no traffic must live as long as its lifetime. Scaled down: the
    server's idle timeout is made 1 s (``idle_timeout``; 300 s by default) while the
    allocation lasts 600 s; after 1.5 s of silence the client's Refresh must still succeed."""
    config = build_config(
        {
            "idle_timeout": 1.0,
            "listen": ["127.0.0.1:0"],
            "workers": 1,
            "user": ["alice:secret"],
            "relay_ip": [OUR_RELAY],
            "relay_ports": f"{OUR_PORTS[0]}-{OUR_PORTS[1]}",
        }
    )
    server = inprocess_server(config)

    async def scenario() -> None:
        spec = (*server.addr("tcp"), "tcp", False)
        async with await TurnClient.connect(spec, "alice", "secret") as client:
            assert client.lifetime == 600
            await asyncio.sleep(1.5)
            assert client.error is None, client.error
            assert await client.refresh() == 600

    asyncio.run(scenario())
