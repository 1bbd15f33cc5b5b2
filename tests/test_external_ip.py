"""``--external-ip PUBLIC[/PRIVATE]``: a server behind a NAT names its public address.

Where the server returns one of its own addresses - XOR-RELAYED-ADDRESS (RFC 8656), and
RESPONSE-ORIGIN and OTHER-ADDRESS (RFC 5780) - it gives PUBLIC with the same port; sockets stay
bound on PRIVATE. XOR-MAPPED-ADDRESS is the client's address and is never touched.

In memory first (config parsing, the mapping, the core's responses), then end to end: a server
in a network namespace on 10.0.0.0/24 behind a router namespace whose nftables DNAT/SNAT maps
203.0.113.10 and 203.0.113.11 to it, and a client and a peer in a third namespace, so only
the NAT connects them (documentation ranges; nothing leaves the test's namespaces).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from helpers import InProcessServer, binding_request
from turn_client import DataIndication, TurnClient
from turn_helpers import CLIENT, CLIENT2, RELAY_V6, Harness, make_server, relayed

from stunturn.aio.turnsetup import external_addresses, peer_policy, prepare, relay_addresses
from stunturn.config import ConfigError, Endpoint, ServerConfig, build_config
from stunturn.server import AlternateAddresses, CoreConfig, SendTo, ServerCore
from stunturn.stun import FAMILY_IPV6, Message, MessageClass, decode
from stunturn.stun.attributes import (
    AdditionalAddressFamily,
    ChangeRequest,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    XorMappedAddress,
)

T = TypeVar("T")

PRIVATE, PUBLIC = "10.0.0.2", "203.0.113.10"
PRIVATE2, PUBLIC2 = "10.0.0.3", "203.0.113.11"
PRIVATE6, PUBLIC6 = RELAY_V6, "2001:db8:ffff::10"


# --- configuration ---------------------------------------------------------------------------


def test_external_ip_values_are_normalised() -> None:
    config = build_config(
        {
            "external-ip": ["203.0.113.10/10.0.0.2", "2001:DB8:FFFF:0::10"],
            "user": ["a:b"],
        }
    )
    assert config.external_ip == ("203.0.113.10/10.0.0.2", "2001:db8:ffff::10")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("public.example", "expected PUBLIC or PUBLIC/PRIVATE"),
        ("203.0.113.10/::1", "different families"),
        ("0.0.0.0/10.0.0.2", "wildcard"),
        ("203.0.113.10/0.0.0.0", "wildcard"),
        (["203.0.113.10", "203.0.113.11"], "at most one IPv4 PUBLIC without /PRIVATE"),
        (["203.0.113.10/10.0.0.2", "203.0.113.11/10.0.0.2"], "10.0.0.2 is mapped twice"),
    ],
)
def test_bad_external_ip_is_refused(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"external-ip": value, "user": ["a:b"]})
    assert info.value.field == "external-ip" and message in str(info.value)


def test_bare_public_maps_the_relay_address_of_its_family() -> None:
    config = ServerConfig(
        listen=(Endpoint("10.0.0.2", 3478), Endpoint("2001:db8::100", 3478)),
        external_ip=(PUBLIC, PUBLIC6),
    )
    assert relay_addresses(config) == ("10.0.0.2", "2001:db8::100")
    assert external_addresses(config) == (("10.0.0.2", PUBLIC), ("2001:db8::100", PUBLIC6))


def test_private_address_is_the_default_relay_address() -> None:
    """Listening on a wildcard (a container), the relay binds on PRIVATE: the address the NAT
    forwards to."""
    config = ServerConfig(listen=(Endpoint("0.0.0.0", 3478),), external_ip=(f"{PUBLIC}/{PRIVATE}",))
    assert relay_addresses(config) == (PRIVATE,)
    given = ServerConfig(external_ip=(f"{PUBLIC}/{PRIVATE}",), relay_ip=("10.9.9.9",))
    assert relay_addresses(given) == ("10.9.9.9",)
    assert external_addresses(given) == ((PRIVATE, PUBLIC),)  # and 10.9.9.9 is not mapped


def test_public_relay_address_is_protected_like_the_relay_address() -> None:
    """The peer policy treats PUBLIC as the relay IP: relay ports (another allocation, reached
    through the NAT) are allowed, anything else on it (the server's own services) is not."""
    config = prepare(
        ServerConfig(
            listen=(Endpoint(PRIVATE, 3478),),
            external_ip=(PUBLIC,),
            user=(("a", "b"),),
            relay_ports=(50000, 50999),
            allow_peer=("203.0.113.0/24",),  # a documentation range stands for a public one
        )
    )
    policy = peer_policy(config)
    assert policy.check(PUBLIC, 50123).allowed
    assert policy.check("203.0.113.99", 3478).allowed
    for port in (3478, 22):
        decision = policy.check(PUBLIC, port)
        assert not decision.allowed and "own address" in decision.rule


# --- the core ---------------------------------------------------------------------------------


def nat_server(
    external: tuple[tuple[str, str], ...], relay_ips: tuple[str, ...] = (PRIVATE,)
) -> Harness:
    server = make_server(relay_ips=relay_ips)
    server.core = ServerCore(CoreConfig(response_rate=0, external=external), server.turn)
    return server


def test_allocate_names_the_public_address_with_the_relay_port() -> None:
    server = nat_server(((PRIVATE, PUBLIC),))
    client = server.client()
    tid = bytes(range(12))
    response = client.allocate(tid=tid)
    assert response.cls is MessageClass.SUCCESS and client.verified(response)
    [(host, port)] = relayed(response)
    assert host == PUBLIC
    assert (PRIVATE, port) in server.binder.bound, "the relay socket is bound on PRIVATE"
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT)
    first = client.last_raw
    client.allocate(tid=tid)  # a retransmission gets the same (mapped) bytes
    assert client.last_raw == first


def test_dual_allocation_maps_each_family_and_leaves_unmapped_ones() -> None:
    server = nat_server(((PRIVATE, PUBLIC),), relay_ips=(PRIVATE, PRIVATE6))
    response = server.client().allocate(AdditionalAddressFamily(FAMILY_IPV6))
    hosts = [host for host, _ in relayed(response)]
    assert hosts == [PUBLIC, PRIVATE6]


def test_without_external_ip_nothing_changes() -> None:
    server = make_server(relay_ips=(PRIVATE,))
    [(host, _)] = relayed(server.client().allocate())
    assert host == PRIVATE


GRID = AlternateAddresses(PRIVATE, PRIVATE2, 3478, 3479)


def grid_core() -> ServerCore:
    return ServerCore(
        CoreConfig(rfc5780=GRID, response_rate=0, external=((PRIVATE, PUBLIC), (PRIVATE2, PUBLIC2)))
    )


@pytest.mark.parametrize("local", [(PRIVATE, 3478), (PRIVATE, 3479), (PRIVATE2, 3478)])
def test_binding_fast_path_names_public_addresses(local: tuple[str, int]) -> None:
    core = grid_core()
    _, request = binding_request()
    [action] = core.handle_udp(request, local, CLIENT, 0.0)
    assert isinstance(action, SendTo) and action.local == local
    response = decode(action.data)
    public = {PRIVATE: PUBLIC, PRIVATE2: PUBLIC2}
    other = GRID.other(local)
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT)
    assert response.get(MappedAddress) == MappedAddress(*CLIENT)
    assert response.get(ResponseOrigin) == ResponseOrigin(public[local[0]], local[1])
    assert response.get(OtherAddress) == OtherAddress(public[other[0]], other[1])


def test_binding_change_request_names_the_public_source() -> None:
    """The response leaves from the private alternate listener (the NAT maps it); it says it
    came from the public one."""
    core = grid_core()
    _, request = binding_request(ChangeRequest(True, True))
    [action] = core.handle_udp(request, (PRIVATE, 3478), CLIENT2, 0.0)
    assert isinstance(action, SendTo) and action.local == (PRIVATE2, 3479)
    response = decode(action.data)
    assert response.get(ResponseOrigin) == ResponseOrigin(PUBLIC2, 3479)
    assert response.get(OtherAddress) == OtherAddress(PUBLIC2, 3479)
    assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT2)


# --- end to end through a real NAT ----------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc: Any = None


def _setns(name: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_ns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that joined namespace ``name``: sockets it makes (and
    threads it starts) stay in that namespace."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            _setns(name)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20.0)
    if "error" in box:
        raise box["error"]
    assert "value" in box, "namespace call timed out"
    return box["value"]  # type: ignore[no-any-return]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


def _ip_quiet(*args: str) -> None:
    subprocess.run(["ip", *args], check=False, capture_output=True, timeout=20)


NAT_RULES = f"""
table ip stunturn_test {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {PUBLIC} dnat to {PRIVATE}
        ip daddr {PUBLIC2} dnat to {PRIVATE2}
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {PRIVATE} oifname "wan" snat to {PUBLIC}
        ip saddr {PRIVATE2} oifname "wan" snat to {PUBLIC2}
    }}
}}
"""
CLIENT_IP, PEER_IP = "203.0.113.50", "203.0.113.51"


@pytest.fixture
def natted() -> Iterator[dict[str, str]]:
    """Three namespaces: "srv" (10.0.0.2, 10.0.0.3) - "nat" (DNAT/SNAT to 203.0.113.10/.11)
    - "out" (client 203.0.113.50 and peer 203.0.113.51). Deleted afterwards."""
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nft")):
        pytest.skip("needs root, ip and nft to build network namespaces")
    tag = f"stx-{os.getpid()}-{secrets.token_hex(2)}"
    names = {role: f"{tag}-{role}" for role in ("srv", "nat", "out")}
    made: list[str] = []
    try:
        for name in names.values():
            _ip("netns", "add", name)
            made.append(name)
        srv, nat, out = names["srv"], names["nat"], names["out"]
        _ip("link", "add", "lan", "netns", srv, "type", "veth", "peer", "name", "lan", "netns", nat)
        _ip("link", "add", "wan", "netns", nat, "type", "veth", "peer", "name", "wan", "netns", out)
        for ns, dev, addrs in (
            (srv, "lan", [f"{PRIVATE}/24", f"{PRIVATE2}/24"]),
            (nat, "lan", ["10.0.0.1/24"]),
            (nat, "wan", ["203.0.113.1/24", f"{PUBLIC}/32", f"{PUBLIC2}/32"]),
            (out, "wan", [f"{CLIENT_IP}/24", f"{PEER_IP}/24"]),
        ):
            for addr in addrs:
                _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        for ns in names.values():
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", srv, "route", "add", "default", "via", "10.0.0.1")
        subprocess.run(
            ["ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            check=True, capture_output=True, timeout=20,
        )  # fmt: skip
        subprocess.run(
            ["ip", "netns", "exec", nat, "nft", "-f", "-"],
            input=NAT_RULES, check=True, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        for name in made:
            _ip_quiet("netns", "del", name)
        detail = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot build the namespaces: {detail}")
    try:
        yield names
    finally:
        for name in made:
            _ip_quiet("netns", "del", name)


def udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(2.0)
    return sock


def binding(sock: socket.socket, target: tuple[str, int], *attrs: Any) -> tuple[Message, Any]:
    tid, request = binding_request(*attrs)
    for _ in range(3):
        sock.sendto(request, target)
        with contextlib.suppress(TimeoutError):
            data, source = sock.recvfrom(2048)
            msg = decode(data)
            if msg.transaction_id == tid:
                return msg, source
    raise AssertionError(f"no Binding response from {target}")


def test_through_a_real_nat(natted: dict[str, str]) -> None:
    config = build_config(
        {
            "listen": [f"{PRIVATE}:3478"],
            "alt-address": PRIVATE2,
            "tcp": False,
            "workers": 1,
            "user": ["alice:alice-pw"],
            "allow-peer": ["203.0.113.0/24"],
            "relay-ports": "40000-40999",
            "external-ip": [f"{PUBLIC}/{PRIVATE}", f"{PUBLIC2}/{PRIVATE2}"],
        }
    )
    server = in_ns(natted["srv"], lambda: InProcessServer(config).start())
    try:
        assert server.worker is not None and server.worker.core.external
        client_sock = in_ns(natted["out"], lambda: udp_socket(CLIENT_IP))
        peer = in_ns(natted["out"], lambda: udp_socket(PEER_IP))
        turn = in_ns(
            natted["out"],
            lambda: TurnClient((PUBLIC, 3478), "alice", "alice-pw", local=(CLIENT_IP, 0)),
        )
        with client_sock, peer, turn:
            # RFC 5780 through the NAT: the public addresses, reachable and truthful.
            response, source = binding(client_sock, (PUBLIC, 3478))
            assert source == (PUBLIC, 3478)
            assert response.get(XorMappedAddress) == XorMappedAddress(*client_sock.getsockname())
            assert response.get(ResponseOrigin) == ResponseOrigin(PUBLIC, 3478)
            assert response.get(OtherAddress) == OtherAddress(PUBLIC2, 3479)
            response, source = binding(client_sock, (PUBLIC, 3478), ChangeRequest(True, True))
            assert source == (PUBLIC2, 3479)
            assert response.get(ResponseOrigin) == ResponseOrigin(PUBLIC2, 3479)
            response, source = binding(client_sock, (PUBLIC2, 3479))
            assert response.get(OtherAddress) == OtherAddress(PUBLIC, 3478)

            # TURN: the relayed address is public; the peer reaches it through the NAT.
            turn.allocate()
            assert turn.relayed is not None
            relay_host, relay_port = turn.relayed
            assert relay_host == PUBLIC and 40000 <= relay_port <= 40999
            assert turn.mapped == turn.local
            turn.create_permission(PEER_IP)
            turn.send_indication(peer.getsockname(), b"to the peer")
            data, source = peer.recvfrom(2048)
            assert (data, source) == (b"to the peer", (PUBLIC, relay_port))
            peer.sendto(b"to the client", (PUBLIC, relay_port))
            got = turn.receive(2.0)
            assert isinstance(got, DataIndication), got
            assert got.data == b"to the client" and got.peer == peer.getsockname()
            turn.refresh(0)
    finally:
        server.stop()
