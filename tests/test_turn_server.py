"""The TURN server on real loopback sockets, driven by our own blocking test client.

``stunturn serve`` listens on 127.0.0.1. The peer policy denies the server's own addresses
(except relay-range ports on a relay IP), so test peers live on 127.0.0.2, reachable because
the servers run with ``--allow-loopback-peers``. Everything else a public server would deny.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import StartInProcess, StartServer
from helpers import ServerProcess, free_port, udp_query
from turn_client import ChannelData, DataIndication, TurnClient, error_of

from stunturn.config import build_config
from stunturn.stun import TRANSPORT_UDP, Message, MessageClass, Method, new_transaction_id
from stunturn.stun.attributes import (
    ErrorCode,
    EvenPort,
    Lifetime,
    MessageIntegrity,
    Nonce,
    Realm,
    RequestedTransport,
    ReservationToken,
    XorRelayedAddress,
)

PEER_HOST = "127.0.0.2"
IO = 2.0


def relay_range_avoiding(port: int) -> str:
    """A relay port range that does not contain ``port``, so the server's own listening port
    is never a relay-range port (which the policy would let through on the relay IP)."""
    return "20000-29999" if port >= 30000 else "40000-49999"


def turn_args(port: int, *extra: str) -> list[str]:
    return [
        "--listen", f"127.0.0.1:{port}", "--workers", "1",
        "--user", "alice:secret", "--auth-secret", "restsecret",
        "--relay-ip", "127.0.0.1", "--relay-ports", relay_range_avoiding(port),
        "--allow-loopback-peers", "--default-lifetime", "60", "--max-lifetime", "120",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(turn_args(free_port())) as s:
        s.wait_ready()
        yield s


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    """A plain UDP socket on 127.0.0.2: the peer on the far side of the relay."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((PEER_HOST, 0))
        sock.settimeout(IO)
        yield sock


def addr_of(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return (host, port)


def closed_port(host: str) -> int:
    """A UDP port on ``host`` with nothing bound to it (freed just now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(address: tuple[str, int]) -> bool:
    """Whether nothing holds this UDP address any more (the relay socket is closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(address)
        except OSError:
            return False
        return True


def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def rest_credential(secret: str, user: str, expiry: int) -> tuple[str, str]:
    """TURN REST username and password, computed here independently of stunturn.auth."""
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


ALICE = ("alice", "secret")


def allocate(server: ServerProcess, credentials: tuple[str, str] = ALICE) -> TurnClient:
    """A client with a fresh allocation (close it, or use it as a context manager)."""
    client = TurnClient(server.addr("udp"), *credentials)
    try:
        client.allocate()
    except BaseException:
        client.close()
        raise
    return client


# --- Allocate -------------------------------------------------------------------------------


def test_allocate_challenge_then_success(server: ServerProcess) -> None:
    """An unauthenticated Allocate gets 401 with REALM and NONCE and no integrity; the signed
    retry gets a relayed address on the relay IP inside --relay-ports, our own address as
    XOR-MAPPED-ADDRESS, the default lifetime, a valid MESSAGE-INTEGRITY, and the server logs
    "allocation created"."""
    with TurnClient(server.addr("udp"), "alice", "secret") as client:
        bare = Message(Method.ALLOCATE, MessageClass.REQUEST, new_transaction_id())
        bare.attributes.append(RequestedTransport(TRANSPORT_UDP))
        challenge = client.transact(bare)
        assert challenge is not None and challenge.cls is MessageClass.ERROR
        assert error_of(challenge) == 401
        realm, nonce = challenge.get(Realm), challenge.get(Nonce)
        assert realm is not None and realm.value == "stunturn" and nonce is not None
        assert challenge.get(MessageIntegrity) is None

        client.allocate()
        assert client.relayed is not None
        host, port = client.relayed
        low, high = map(int, relay_range_avoiding(server.addr("udp")[1]).split("-"))
        assert host == "127.0.0.1" and low <= port <= high
        assert client.mapped == client.local
        assert client.lifetime == 60
    assert wait_until(lambda: "allocation created" in server.stderr), server.stderr


def test_allocate_retransmission_and_second_allocate(server: ServerProcess) -> None:
    """A retransmitted Allocate (same transaction ID) gets the very same bytes again; a new
    Allocate on a 5-tuple that already has an allocation gets 437 (RFC 8656 section 7.2)."""
    with TurnClient(server.addr("udp"), "alice", "secret") as client:
        assert error_of(client.refresh(check=False)) == 437  # learns realm and nonce
        msg = Message(Method.ALLOCATE, MessageClass.REQUEST, new_transaction_id())
        msg.attributes.append(RequestedTransport(TRANSPORT_UDP))
        data = client.sign(msg)
        first = client.exchange(msg.transaction_id, data)
        second = client.exchange(msg.transaction_id, data)
        assert first is not None and second is not None
        assert first.cls is MessageClass.SUCCESS and first.raw == second.raw
        again = client.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), check=False)
        assert error_of(again) == 437


# --- relaying ---------------------------------------------------------------------------------


def test_send_indication_and_data_indication(server: ServerProcess, peer: socket.socket) -> None:
    """Send indications reach the peer only once a permission exists, from the relayed
    address; the peer's reply comes back as a Data indication naming the peer, and a datagram
    from an IP without a permission is dropped."""
    peer_addr = addr_of(peer)
    with allocate(server) as client:
        client.send_indication(peer_addr, b"before permission")  # dropped: no permission
        client.create_permission(PEER_HOST)
        client.send_indication(peer_addr, b"hello peer")
        data, source = peer.recvfrom(2048)
        # The first datagram to arrive is the second one sent: the first was never relayed.
        assert (data, source) == (b"hello peer", client.relayed)

        assert client.relayed is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.3", 0))
            stranger.sendto(b"no permission for me", client.relayed)
        peer.sendto(b"hello client", client.relayed)
        got = client.receive(IO)
        assert isinstance(got, DataIndication), got
        assert got.peer == peer_addr and got.data == b"hello client" and got.icmp is None
        assert got.source == server.addr("udp")


def test_channel_data_both_ways(server: ServerProcess, peer: socket.socket) -> None:
    """After ChannelBind, ChannelData from the client reaches the peer (from the relayed
    address, padding-free over UDP) and the peer's datagrams come back as ChannelData on the
    same channel, in order."""
    peer_addr = addr_of(peer)
    with allocate(server) as client:
        client.channel_bind(0x4001, peer_addr)
        payloads = [b"x" * n for n in (1, 3, 4, 5, 1200)]
        for payload in payloads:
            client.send_channel(0x4001, payload)
        for payload in payloads:
            data, source = peer.recvfrom(4096)
            assert (data, source) == (payload, client.relayed)
        assert client.relayed is not None
        for payload in payloads:
            peer.sendto(payload, client.relayed)
        for payload in payloads:
            got = client.receive(IO)
            assert isinstance(got, ChannelData), got
            assert (got.channel, got.data) == (0x4001, payload)


# --- peer policy ------------------------------------------------------------------------------


def test_server_listening_address_refused(server: ServerProcess, peer: socket.socket) -> None:
    """The server's own listening address:port is not a peer (403), even with loopback peers
    allowed; 10.1.2.3 is refused (403) without --allow-peer; a refused CreatePermission
    installs nothing, and the allocation keeps working."""
    listen = server.addr("udp")
    with allocate(server) as client:
        assert error_of(client.channel_bind(0x4002, listen, check=False)) == 403
        assert error_of(client.create_permission("10.1.2.3", check=False)) == 403
        assert error_of(client.channel_bind(0x4003, ("10.1.2.3", 5000), check=False)) == 403
        assert error_of(client.create_permission(PEER_HOST, "10.1.2.3", check=False)) == 403
        client.send_indication(addr_of(peer), b"no permission was installed")
        client.channel_bind(0x4002, addr_of(peer))
        client.send_channel(0x4002, b"still fine")
        assert peer.recvfrom(100)[0] == b"still fine"


def test_own_ip_refused_and_allow_peer(stunturn_server: StartServer) -> None:
    """With the relay on 127.0.0.3, the listening IP 127.0.0.1 is only the server's own address
    and is refused (403) even to CreatePermission; --allow-peer 10.0.0.0/8 lets 10.1.2.3 in."""
    port = free_port()
    args = turn_args(port, "--allow-peer", "10.0.0.0/8")
    args[args.index("--relay-ip") + 1] = "127.0.0.3"
    server = stunturn_server(*args)
    with allocate(server) as client:
        assert client.relayed is not None and client.relayed[0] == "127.0.0.3"
        assert error_of(client.create_permission("127.0.0.1", check=False)) == 403
        assert error_of(client.create_permission("10.1.2.3", check=False)) is None


# --- quotas across workers --------------------------------------------------------------------


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _worker_of(server: ServerProcess, port: int, ok: bool) -> int | None:
    """The pid of the worker that answered the Allocate from 127.0.0.1:``port``."""
    created = f"udp:127.0.0.1:{port}"
    refused = re.compile(rf"'127\.0\.0\.1', {port}\): 486")
    for entry in _json_lines(server.stderr):
        if ok and entry.get("event") == "allocation_created" and entry.get("client") == created:
            return int(entry["pid"])
        if not ok and refused.search(str(entry.get("msg", ""))):
            return int(entry["pid"])
    return None


def _answered(server: ServerProcess, port: int, ok: bool) -> bool:
    return _worker_of(server, port, ok) is not None


def test_user_quota_shared_across_workers(stunturn_server: StartServer) -> None:
    """--workers 2 --user-quota 3: six clients (six source ports, hashed over both workers by
    SO_REUSEPORT) get three allocations and then 486 three times, whichever worker answers; a
    486 from a worker holding fewer than 3 allocations itself proves the count is shared.
    Deleting one allocation (Refresh LIFETIME 0) lets a new one in."""
    port = free_port()
    args = turn_args(port, "--user-quota", "3", "--log-level", "debug", "--log-format", "json")
    args[args.index("--workers") + 1] = "2"
    server = stunturn_server(*args)
    clients: list[TurnClient] = []
    try:
        codes = []
        for _ in range(6):
            client = TurnClient(server.addr("udp"), "alice", "secret")
            clients.append(client)
            codes.append(error_of(client.allocate(check=False)))
        assert codes == [None, None, None, 486, 486, 486]

        def owners(group: list[TurnClient], ok: bool) -> list[int | None]:
            return [_worker_of(server, c.local[1], ok) for c in group]

        assert wait_until(
            lambda: None not in owners(clients[:3], True) + owners(clients[3:], False)
        )
        held = owners(clients[:3], True)
        refusers = owners(clients[3:], False)
        # With probability 1/32 every answer came from the worker that holds all three; then
        # keep knocking from new ports (bounded) until the other worker refuses one too.
        for _ in range(20):
            if any(held.count(pid) < 3 for pid in refusers):
                break
            extra = TurnClient(server.addr("udp"), "alice", "secret")
            clients.append(extra)
            assert error_of(extra.allocate(check=False)) == 486
            port = extra.local[1]
            assert wait_until(functools.partial(_answered, server, port, False))
            refusers.append(_worker_of(server, port, False))
        assert any(held.count(pid) < 3 for pid in refusers), (held, refusers)
        assert len(set(held + refusers)) == 2

        assert clients[0].refresh(0).get(Lifetime) == Lifetime(0)
        late = TurnClient(server.addr("udp"), "alice", "secret")
        clients.append(late)
        assert error_of(late.allocate(check=False)) is None
        again = TurnClient(server.addr("udp"), "alice", "secret")
        clients.append(again)
        assert error_of(again.allocate(check=False)) == 486
    finally:
        for client in clients:
            client.close()


def test_worker_restart_keeps_other_workers_clients(stunturn_server: StartServer) -> None:
    """The supervisor binds every worker's listeners once and keeps them: when a worker dies
    and is replaced, the SO_REUSEPORT group is unchanged, so clients of the surviving worker
    still reach it (their Refresh succeeds) and only the dead worker's allocations are gone."""
    port = free_port()
    args = turn_args(port, "--user-quota", "0", "--log-format", "json")
    args[args.index("--workers") + 1] = "2"
    server = stunturn_server(*args)
    clients = [TurnClient(server.addr("udp"), "alice", "secret") for _ in range(8)]
    try:
        for client in clients:
            client.allocate()

        def owners() -> list[int | None]:
            return [_worker_of(server, c.local[1], True) for c in clients]

        assert wait_until(lambda: None not in owners())
        pids = owners()
        assert len(set(pids)) == 2, "all 8 clients hashed to one worker (p = 1/128)"
        victim = pids[0]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: "restarted" in server.stderr, timeout=20)
        for client, pid in zip(clients, pids, strict=True):
            response = client.refresh(600, check=False)
            if pid == victim:
                assert error_of(response) == 437  # its allocation died with its worker
            else:
                assert error_of(response) is None, "a surviving worker's client was re-hashed"
    finally:
        for client in clients:
            client.close()


# --- EVEN-PORT and RESERVATION-TOKEN ---------------------------------------------------------


def free_pair(host: str, start: int) -> int:
    """An even port ``p >= start`` with ``p`` and ``p + 1`` free for UDP on ``host`` now."""
    for port in range(start, start + 2000, 2):
        if port_free((host, port)) and port_free((host, port + 1)):
            return port
    raise AssertionError(f"no free even port pair from {start}")


def test_even_port_reservation_token(stunturn_server: StartServer) -> None:
    """EVEN-PORT with R: an even relay port and an 8-byte RESERVATION-TOKEN; another client
    (another 5-tuple, so possibly the other worker) redeems the token and gets port + 1; the
    token is good once (508 after). EVEN-PORT without R: an even port and no token."""
    args = turn_args(free_port())
    args[args.index("--workers") + 1] = "2"
    args[args.index("--relay-ports") + 1] = "31000-31999"
    # A loopback IP of its own, so no other program holds the port+1 it reserves (see below).
    args[args.index("--relay-ip") + 1] = "127.0.0.31"
    server = stunturn_server(*args)
    target = server.addr("udp")
    for _ in range(3):
        with TurnClient(target, *ALICE) as a, TurnClient(target, *ALICE) as b:
            first = a.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), EvenPort(True))
            relayed, token = first.get(XorRelayedAddress), first.get(ReservationToken)
            assert relayed is not None and relayed.port % 2 == 0
            assert token is not None and len(token.value) == 8
            second = b.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), token)
            redeemed = second.get(XorRelayedAddress)
            assert redeemed is not None and redeemed.address == (relayed.host, relayed.port + 1)
            with TurnClient(target, *ALICE) as c:
                again = c.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), token,
                                  check=False)  # fmt: skip
                assert error_of(again) == 508
    with TurnClient(target, *ALICE) as plain:
        response = plain.request(
            Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), EvenPort(False)
        )
        relayed = response.get(XorRelayedAddress)
        assert relayed is not None and relayed.port % 2 == 0
        assert response.get(ReservationToken) is None


def test_reservation_token_for_a_port_held_elsewhere(stunturn_server: StartServer) -> None:
    """The only relay pair is p, p+1 and some other program holds p+1. An Allocate with
    EVEN-PORT R must then be refused (508), or else the token it returns must be redeemable;
    it must not hand out a token for a port the server cannot bind."""
    low = free_pair("127.0.0.1", 31000 + os.getpid() % 500 * 2)
    args = turn_args(free_port())
    args[args.index("--relay-ports") + 1] = f"{low}-{low + 1}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as outsider:
        outsider.bind(("127.0.0.1", low + 1))
        server = stunturn_server(*args)
        target = server.addr("udp")
        with TurnClient(target, *ALICE) as a, TurnClient(target, *ALICE) as b:
            first = a.request(
                Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), EvenPort(True), check=False
            )
            token = first.get(ReservationToken)
            if error_of(first) == 508:
                return
            assert token is not None
            second = b.request(
                Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), token, check=False
            )
            assert error_of(second) is None, "token for a port held by another socket"


# --- ICMP, DONT-FRAGMENT ------------------------------------------------------------------------


def test_icmp_port_unreachable_reported(server: ServerProcess) -> None:
    """A Send indication to a closed UDP port on 127.0.0.2 draws an ICMP port unreachable on
    loopback (Linux does not rate-limit ICMP on loopback); the relay socket reads it from its
    error queue (IP_RECVERR) and the client gets a Data indication with XOR-PEER-ADDRESS and an
    ICMP attribute of type 3 code 3, and no DATA."""
    target = (PEER_HOST, closed_port(PEER_HOST))
    with allocate(server) as client:
        client.create_permission(PEER_HOST)
        client.send_indication(target, b"anyone there?")
        got = client.receive(IO)
        assert isinstance(got, DataIndication), got
        assert got.peer == target and got.data is None
        assert got.icmp is not None
        assert (got.icmp.icmp_type, got.icmp.icmp_code) == (3, 3)


def test_dont_fragment_accepted(server: ServerProcess, peer: socket.socket) -> None:
    """An Allocate with DONT-FRAGMENT succeeds (the relay sets DF) and relays a full-size
    datagram both ways."""
    with TurnClient(server.addr("udp"), "alice", "secret") as client:
        client.allocate(dont_fragment=True)
        client.create_permission(PEER_HOST)
        payload = bytes(range(256)) * 5
        client.send_indication(addr_of(peer), payload)
        data, source = peer.recvfrom(4096)
        assert (data, source) == (payload, client.relayed)
        assert client.relayed is not None
        peer.sendto(payload, client.relayed)
        got = client.receive(IO)
        assert isinstance(got, DataIndication) and got.data == payload


# --- REST credentials ---------------------------------------------------------------------------


def test_rest_credentials(server: ServerProcess) -> None:
    """A TURN REST credential (username EXPIRY:USER, password base64 HMAC-SHA1 of it with the
    --auth-secret) allocates; the same scheme with an expiry in the past, or signed with
    another secret, is refused with 401 at Allocate."""
    now = int(time.time())
    username, password = rest_credential("restsecret", "carol", now + 600)
    with TurnClient(server.addr("udp"), username, password) as client:
        assert error_of(client.allocate(check=False)) is None
    username, password = rest_credential("restsecret", "carol", now - 60)
    with TurnClient(server.addr("udp"), username, password) as client:
        response = client.allocate(check=False)
        assert error_of(response) == 401 and response.get(Nonce) is not None
    username, password = rest_credential("othersecret", "carol", now + 600)
    with TurnClient(server.addr("udp"), username, password) as client:
        assert error_of(client.allocate(check=False)) == 401


def test_wrong_password_401(server: ServerProcess) -> None:
    """A long-term credential with the wrong password gets 401, and no allocation exists."""
    with TurnClient(server.addr("udp"), "alice", "wrong") as client:
        response = client.allocate(check=False)
        assert error_of(response) == 401
        error = response.get(ErrorCode)
        assert error is not None and error.reason
        client.password = "secret"  # the same 5-tuple, now with the right password
        assert error_of(client.refresh(check=False)) == 437


# --- lifetimes ----------------------------------------------------------------------------------


def test_lifetime_clamped_and_refresh_zero_deletes(server: ServerProcess) -> None:
    """With --default-lifetime 60 --max-lifetime 120: LIFETIME 3600 is granted 120, a Refresh
    asking 30 s gets 60; Refresh LIFETIME 0 deletes the allocation at once: the relay port is
    released, and a later Refresh gets 437."""
    with TurnClient(server.addr("udp"), "alice", "secret") as client:
        client.allocate(lifetime=3600)
        assert client.lifetime == 120
        assert client.refresh(30).get(Lifetime) == Lifetime(60)
        relayed = client.relayed
        assert relayed is not None and not port_free(relayed)
        assert client.refresh(0).get(Lifetime) == Lifetime(0)
        assert wait_until(lambda: port_free(relayed))
        assert error_of(client.refresh(check=False)) == 437
        assert error_of(client.create_permission(PEER_HOST, check=False)) == 437


def test_allocation_expires_on_timer(inprocess_server: StartInProcess) -> None:
    """The real timer ends an allocation when its lifetime passes. The configuration refuses
    lifetimes under 60 s, so this in-process server gets 1 s by replacing the validated value:
    within ~1 s the relay socket is closed and Refresh gets 437."""
    config = build_config(
        {
            "listen": ["127.0.0.1:0"],
            "workers": 1,
            "user": ["alice:secret"],
            "relay_ip": ["127.0.0.1"],
            "allow_loopback_peers": True,
        }
    )
    running = inprocess_server(replace(config, default_lifetime=1, max_lifetime=1))
    with TurnClient(running.addr("udp"), "alice", "secret") as client:
        client.allocate()
        assert client.lifetime == 1
        relayed = client.relayed
        assert relayed is not None and not port_free(relayed)
        started = time.monotonic()
        assert wait_until(lambda: port_free(relayed), timeout=3.0)
        assert 0.5 <= time.monotonic() - started <= 2.5
        assert error_of(client.refresh(check=False)) == 437


# --- the default user store ---------------------------------------------------------------------


_USERNAME = re.compile(r"^\s+username: (\S+)$", re.M)
_PASSWORD = re.compile(r"^\s+password: (\S+)$", re.M)


def test_default_user_store_first_run(
    stunturn_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stunturn serve` with no credentials creates the default user store under
    $XDG_DATA_HOME with one random user and prints its username and password once; those
    credentials allocate. A second start reuses the store and prints no password; the store
    holds no password."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    args = ["--listen", "127.0.0.1:0", "--workers", "1", "--relay-ip", "127.0.0.1"]
    first = stunturn_server(*args)
    user = _USERNAME.search(first.stdout)
    password = _PASSWORD.search(first.stdout)
    assert user is not None and password is not None, first.stdout
    store = tmp_path / "stunturn" / "users.db"
    assert store.is_file() and str(store) in first.stdout
    with allocate(first, (user.group(1), password.group(1))):
        pass
    assert first.stop() == 0

    second = stunturn_server(*args)
    assert "password" not in second.stdout and _USERNAME.search(second.stdout) is None
    assert f"user store {store}" in second.stdout
    with allocate(second, (user.group(1), password.group(1))) as client:
        assert client.relayed is not None
    assert password.group(1).encode() not in store.read_bytes()
    assert udp_query(second.addr("udp")).cls is MessageClass.SUCCESS
