"""Tests of the NAT lab itself (tests/lab/netlab.py): does each flavour behave as designed?

One lab for the module: a LAN of every flavour (two hosts each) plus a full-cone LAN with a 5 s
UDP timeout, and ``stunturn serve --alt-address`` in the WAN namespace. Three kinds of evidence:

* plain UDP sockets driven from this process in the namespaces: "reflector" sockets in the WAN
  on 203.0.113.1:pA, 203.0.113.1:pB and 203.0.113.2:pA see the mapping of a host socket as the
  source of its datagrams (mapping behaviour), and send to that mapping from the contacted
  endpoint, another port of the same IP and another IP (filtering behaviour);
* our server's XOR-MAPPED-ADDRESS over UDP and TCP (UDP-blocked: TCP still goes through);
* coturn's ``turnutils_natdiscovery`` from the LAN hosts: ``-m -f`` (RFC 5780 mapping and
  filtering discovery), ``-H`` (hairpinning) and ``-t -T`` (mapping lifetime).

Then hairpinning on/off (and switching it), the short UDP timeout, hole punching between two
NATed LANs, running code in namespaces, and the cleanup (also after a failure).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import binding_request, mapped, stream_exchange, udp_exchange
from lab.netlab import (
    NETNS_DIR,
    PREFIX,
    SERVER_IPS,
    STUN_PORT,
    Filtering,
    Flavour,
    Host,
    Lab,
    Lan,
    Mapping,
    cleanup_stale,
    lab_session,
    local_addr,
    nat_ruleset,
    recv_from,
    require_lab,
)

pytestmark = pytest.mark.lab

NATDISCOVERY = shutil.which("turnutils_natdiscovery")
NATDISCOVERY_TIMEOUT = 40.0
ARRIVE = 2.0
"""How long a datagram that should arrive may take."""
SILENCE = 0.5
"""How long to wait to conclude that a datagram was dropped (the lab has no real latency)."""
SHORT_TIMEOUT = 5

HAIRPIN = {Flavour.FULL_CONE, Flavour.RESTRICTED_CONE, Flavour.SYMMETRIC, Flavour.MASQUERADE}
"""Flavours built with hairpinning on; the others (port-restricted cone, ...) have it off."""
UDP_FLAVOURS = [f for f in Flavour if f.behaviour.udp]
NAT_UDP_FLAVOURS = [f for f in UDP_FLAVOURS if f.nat]

Addr = tuple[str, int]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_session() as lab:
        for flavour in Flavour:
            lab.add_lan(flavour, hosts=2, hairpin=flavour in HAIRPIN)
        lab.add_lan(Flavour.FULL_CONE, hosts=3, udp_timeout=SHORT_TIMEOUT)
        lab.add_public_host()
        lab.start_stunturn()
        yield lab


def lan_of(lab: Lab, flavour: Flavour) -> Lan:
    """The LAN of ``flavour`` with the default UDP timeout."""
    return next(x for x in lab.lans if x.flavour is flavour and x.router.udp_timeout is None)


@dataclass
class Reflectors:
    """WAN sockets: ``a`` = 203.0.113.1:pA, ``b`` = 203.0.113.1:pB, ``c`` = 203.0.113.2:pA."""

    a: socket.socket
    b: socket.socket
    c: socket.socket


def reflectors(lab: Lab) -> Reflectors:
    for _ in range(20):
        a = lab.wan.udp_socket(SERVER_IPS[0])
        b = lab.wan.udp_socket(SERVER_IPS[0])
        try:
            c = lab.wan.udp_socket(SERVER_IPS[1], local_addr(a)[1])
        except OSError:
            continue
        return Reflectors(a, b, c)
    raise AssertionError("no free port pair in the WAN namespace")


def seen_from(sender: socket.socket, receiver: socket.socket) -> Addr:
    """Send from ``sender`` to ``receiver``; the source address the receiver sees."""
    sender.sendto(b"probe", local_addr(receiver))
    got = recv_from(receiver, ARRIVE)
    assert got is not None, f"{local_addr(sender)} -> {local_addr(receiver)} lost"
    return got[1]


def arrives(sender: socket.socket, to: Addr, receiver: socket.socket) -> Addr | None:
    """Send from ``sender`` to ``to``; the source seen by ``receiver``, None if nothing came."""
    payload = os.urandom(8)
    sender.sendto(payload, to)
    deadline = time.monotonic() + SILENCE
    while (remaining := deadline - time.monotonic()) > 0:
        got = recv_from(receiver, remaining)
        if got is None:
            return None
        if got[0] == payload:
            return got[1]
    return None


def expected_public(host: Host) -> str:
    assert host.lan is not None
    return host.lan.public_ip if host.lan.flavour.nat else host.ip_address


# --- topology and running things in namespaces ----------------------------------------------------


def test_topology(lab: Lab) -> None:
    """Names are unique to this run; addresses and routes are as documented."""
    names = lab.namespaces
    assert len(names) == len(set(names))
    assert all(n.startswith(f"{PREFIX}-{os.getpid()}-{lab.token}-") for n in names)
    assert all((NETNS_DIR / n).exists() for n in names)
    assert set(SERVER_IPS) <= {a.split("/")[0] for a in lab.wan.addresses()}
    for lan in lab.lans:
        assert lan.router.addresses()[0] == f"{lan.public_ip}/24"
        for host in lan.hosts:
            assert [a.split("/")[0] for a in host.addresses()] == [host.ip_address]
            assert f"default via {lan.gateway} dev eth0" in host.ip("route")
        if lan.flavour.nat:
            assert lan.subnet == f"10.0.{lan.index}.0/24"
        else:
            assert lan.subnet.startswith("192.0.2.")
    assert "hairpin" in lab.describe() and lab.wan.name in lab.describe()


def test_run_popen_python_call(lab: Lab) -> None:
    """The four ways to run code in a namespace all land there."""
    host = lan_of(lab, Flavour.SYMMETRIC).hosts[1]
    assert host.ip_address in host.run(["ip", "-4", "-o", "addr"]).stdout
    code = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    code += f"s.connect(('{SERVER_IPS[0]}', 9)); print(s.getsockname()[0])"
    assert host.python(code).stdout.strip() == host.ip_address
    proc = host.popen(["sh", "-c", "ip -4 -o addr show dev eth0"])
    out, _ = proc.communicate(timeout=10)
    assert host.ip_address in out
    assert host.call(lambda: Path("/proc/thread-self/net/dev").read_text()).count("eth0") == 1
    with host.entered():
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        probe.connect((SERVER_IPS[0], 9))
        assert probe.getsockname()[0] == host.ip_address
    # and this thread is back where it was: the lab's addresses are not here
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine, pytest.raises(OSError):
        mine.bind((host.ip_address, 0))


def test_rulesets_are_valid_nftables() -> None:
    """Every flavour x hairpin ruleset passes ``nft -c`` (the lab fixture loads a subset)."""
    require_lab()
    with Lab() as lab:
        for flavour in Flavour:
            for hairpin in (False, True):
                text = nat_ruleset(flavour, "198.51.100.99", hairpin=hairpin, timeout=7)
                if text:
                    lab.wan.run(["nft", "-c", "-f", "-"], input=text)


# --- mapping and filtering, with our own sockets --------------------------------------------------


@pytest.mark.parametrize("flavour", UDP_FLAVOURS, ids=lambda f: f.value)
def test_mapping(lab: Lab, flavour: Flavour) -> None:
    """The source seen by three WAN endpoints (same IP other port, other IP same port): one
    external endpoint for EIM, a different one per destination for APDM; our STUN server's
    XOR-MAPPED-ADDRESS agrees for EIM."""
    host = lan_of(lab, flavour).hosts[0]
    refl = reflectors(lab)
    sock = host.udp_socket()
    seen = [seen_from(sock, r) for r in (refl.a, refl.b, refl.c)]
    assert {ip for ip, _ in seen} == {expected_public(host)}
    behaviour = flavour.behaviour
    if behaviour.mapping is Mapping.EIM:
        assert len(set(seen)) == 1, seen
        if not flavour.nat:
            assert seen[0] == (host.ip_address, local_addr(sock)[1])
        msg, _ = udp_exchange(sock, (SERVER_IPS[0], STUN_PORT))
        assert mapped(msg) == seen[0]
    else:
        assert behaviour.mapping is Mapping.APDM
        assert len(set(seen)) == 3, seen


@pytest.mark.parametrize("flavour", UDP_FLAVOURS, ids=lambda f: f.value)
def test_filtering(lab: Lab, flavour: Flavour) -> None:
    """After the host sent to A only: A always gets through; another port of A's IP only with
    EIF/ADF; another IP only with EIF."""
    host = lan_of(lab, flavour).hosts[0]
    refl = reflectors(lab)
    sock = host.udp_socket()
    mapping = seen_from(sock, refl.a)
    filtering = flavour.behaviour.filtering
    expected = {
        "same endpoint": True,
        "same IP, other port": filtering in (Filtering.EIF, Filtering.ADF),
        "other IP": filtering is Filtering.EIF,
    }
    got = {
        name: arrives(remote, mapping, sock) is not None
        for name, remote in zip(expected, (refl.a, refl.b, refl.c), strict=True)
    }
    assert got == expected


@pytest.mark.parametrize(
    ("flavour", "eim"),
    [(Flavour.PORT_RESTRICTED_CONE, True), (Flavour.MASQUERADE, False)],
    ids=["port-restricted-cone", "masquerade"],
)
def test_two_hosts_one_port(lab: Lab, flavour: Flavour, eim: bool) -> None:
    """Two hosts of one LAN on the same local port. The cones' mapping table gives each its own
    external port, kept for every destination (EIM). Plain masquerade keeps the port for each
    destination as long as it can, so host 1 talking to A after host 0 did gets another port
    than it has towards B: the stock Linux router is EIM only without such collisions."""
    lan = lan_of(lab, flavour)
    refl = reflectors(lab)
    for _ in range(20):
        port = random.randrange(10000, 30000)
        try:
            s0, s1 = (host.udp_socket(port=port) for host in lan.hosts[:2])
        except OSError:
            continue
        break
    else:
        raise AssertionError("no port free in both hosts")
    m0 = seen_from(s0, refl.a)
    m1b, m1a = seen_from(s1, refl.b), seen_from(s1, refl.a)
    assert m0 != m1a
    assert (m1a == m1b) == eim, (m0, m1a, m1b)
    if not eim:
        assert m1b[1] == port


def test_public_host(lab: Lab) -> None:
    """A public host on the WAN bridge is seen as itself and reaches a full-cone mapping and a
    host of a routed LAN directly."""
    pub = lab.public_hosts[0]
    assert pub.ip_address == "203.0.113.101" and pub.lan is None
    refl = reflectors(lab)
    sock = pub.udp_socket()
    assert seen_from(sock, refl.a) == (pub.ip_address, local_addr(sock)[1])
    cone = lan_of(lab, Flavour.FULL_CONE).hosts[0].udp_socket()
    assert arrives(sock, seen_from(cone, refl.a), cone) == (pub.ip_address, local_addr(sock)[1])
    routed_host = lan_of(lab, Flavour.NONE).hosts[1]
    routed = routed_host.udp_socket()
    to = (routed_host.ip_address, local_addr(routed)[1])
    assert arrives(sock, to, routed) == (pub.ip_address, local_addr(sock)[1])


def test_udp_blocked_but_tcp_works(lab: Lab) -> None:
    """UDP-blocked: nothing UDP gets out (to a reflector or to our server), while a STUN
    Binding over TCP to our server is answered with the NAT's public address."""
    lan = lan_of(lab, Flavour.UDP_BLOCKED)
    host = lan.hosts[0]
    refl = reflectors(lab)
    sock = host.udp_socket()
    assert arrives(sock, local_addr(refl.a), refl.a) is None
    with pytest.raises(AssertionError, match="no response"):
        udp_exchange(sock, (SERVER_IPS[0], STUN_PORT), timeout=0.2, attempts=2)
    with host.tcp_connect((SERVER_IPS[0], STUN_PORT)) as conn:
        _, request = binding_request()
        [answer] = stream_exchange(conn, [request], 1)
        address = mapped(answer)
        assert address[0] == lan.public_ip
    # The TCP mapping of a NAT: a plain TCP listener in the WAN sees the public address too.
    listener = lab.wan.new_socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((SERVER_IPS[1], 0))
    listener.listen(1)
    listener.settimeout(ARRIVE)
    with host.tcp_connect(local_addr(listener)):
        accepted, peer = listener.accept()
        accepted.close()
    assert peer[0] == lan.public_ip


# --- hairpinning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", NAT_UDP_FLAVOURS, ids=lambda f: f.value)
def test_hairpinning(lab: Lab, flavour: Flavour) -> None:
    """Host 1 sends to host 0's public mapping. With hairpinning it arrives, from host 1's
    *external* mapping (EIM; APDM: from the public IP), and a host reaches its own mapping;
    without, nothing arrives."""
    lan = lan_of(lab, flavour)
    refl = reflectors(lab)
    s0, s1 = lan.hosts[0].udp_socket(), lan.hosts[1].udp_socket()
    m0, m1 = seen_from(s0, refl.a), seen_from(s1, refl.a)
    source = arrives(s1, m0, s0)
    if not lan.router.hairpin:
        assert source is None
        assert arrives(s0, m0, s0) is None
        return
    assert source is not None
    if flavour.behaviour.mapping is Mapping.EIM:
        assert source == m1
        assert arrives(s0, m0, s0) == m0
    else:
        assert source[0] == lan.public_ip
    assert arrives(s0, source, s1) is not None  # and the answer goes back the same way


def test_switching_hairpinning(lab: Lab) -> None:
    """``set_hairpin`` reloads the rules: off, the full-cone LAN stops hairpinning; on again,
    it hairpins again."""
    lan = lan_of(lab, Flavour.FULL_CONE)
    assert lan.router.hairpin
    refl = reflectors(lab)

    def hairpins() -> bool:
        s0, s1 = lan.hosts[0].udp_socket(), lan.hosts[1].udp_socket()
        m0 = seen_from(s0, refl.a)
        return arrives(s1, m0, s0) is not None

    try:
        lan.router.set_hairpin(False)
        assert "ip daddr" in lan.router.nft_list()
        assert not hairpins()
    finally:
        lan.router.set_hairpin(True)
    assert hairpins()


# --- P2P: hole punching between two NATed LANs ----------------------------------------------------


@pytest.mark.parametrize(
    ("other", "punches"),
    [(Flavour.MASQUERADE, True), (Flavour.SYMMETRIC, False)],
    ids=["cone-cone", "cone-symmetric"],
)
def test_hole_punching(lab: Lab, other: Flavour, punches: bool) -> None:
    """Two hosts behind two NATs learn their mappings from a WAN reflector and send to each
    other's: between port-restricted cones the holes open both ways; against a symmetric NAT
    the port-restricted side never sees the symmetric side's real mapping, so nothing gets in."""
    a = lan_of(lab, Flavour.PORT_RESTRICTED_CONE).hosts[1]
    b = lan_of(lab, other).hosts[1]
    refl = reflectors(lab)
    sa, sb = a.udp_socket(), b.udp_socket()
    ma, mb = seen_from(sa, refl.a), seen_from(sb, refl.a)
    assert arrives(sa, mb, sb) is None  # a opens its hole; b's NAT drops it
    got = arrives(sb, ma, sa)  # b opens its hole towards a; a admits it if b kept mapping mb
    if punches:
        assert got == mb
        assert arrives(sa, mb, sb) == ma
    else:
        assert got is None


# --- the short UDP timeout ------------------------------------------------------------------------


def test_short_udp_timeout(lab: Lab) -> None:
    """With ``udp_timeout=5``: 2 s after the host's only datagram its mapping still admits the
    contacted remote and (full cone) a new one; 8.5 s after it, neither. natdiscovery -t agrees
    (lifetime probe answered after 2 s, lost after 7 s). A new datagram maps again."""
    lan = next(x for x in lab.lans if x.router.udp_timeout == SHORT_TIMEOUT)
    assert lan.router.sysctl("net.netfilter.nf_conntrack_udp_timeout") == str(SHORT_TIMEOUT)
    assert f"timeout {SHORT_TIMEOUT}s" in lan.router.nft_list()
    tool: list[tuple[int, subprocess.Popen[str]]] = []
    if NATDISCOVERY is not None:
        for host, wait in ((lan.hosts[1], 2), (lan.hosts[2], SHORT_TIMEOUT + 2)):
            argv = [NATDISCOVERY, "-t", "-T", str(wait), "-L", host.ip_address, SERVER_IPS[0]]
            tool.append((wait, host.popen(argv)))
    refl = reflectors(lab)
    fresh = [lab.wan.udp_socket(SERVER_IPS[1]) for _ in range(2)]
    sock = lan.hosts[0].udp_socket()
    start = time.monotonic()
    mapping = seen_from(sock, refl.a)
    time.sleep(max(0.0, start + 2.0 - time.monotonic()))
    assert arrives(refl.a, mapping, sock) is not None
    assert arrives(fresh[0], mapping, sock) is not None
    time.sleep(max(0.0, start + SHORT_TIMEOUT + 3.5 - time.monotonic()))
    assert arrives(refl.a, mapping, sock) is None
    assert arrives(fresh[1], mapping, sock) is None
    again = seen_from(sock, refl.a)
    assert arrives(refl.a, again, sock) is not None
    for wait, proc in tool:
        out, _ = proc.communicate(timeout=NATDISCOVERY_TIMEOUT)
        answered = "RFC 5780 response 2" in out
        assert answered == (wait < SHORT_TIMEOUT), out


# --- coturn's natdiscovery ------------------------------------------------------------------------

_MAPPING = {
    Mapping.EIM: "NAT with Endpoint Independent Mapping!",
    Mapping.ADM: "NAT with Address Dependent Mapping!",
    Mapping.APDM: "NAT with Address and Port Dependent Mapping!",
}
_FILTERING = {
    Filtering.EIF: "NAT with Endpoint Independent Filtering!",
    Filtering.ADF: "NAT with Address Dependent Filtering!",
    Filtering.APDF: "NAT with Address and Port Dependent Filtering!",
}


@pytest.fixture(scope="module")
def natdiscovery(lab: Lab) -> dict[tuple[Flavour, str], str]:
    """stdout of ``natdiscovery -m -f`` (host 0) and ``-H`` (host 1) for every flavour, all run
    at once (a run that waits for dropped answers takes ~7 s)."""
    if NATDISCOVERY is None:
        pytest.skip("coturn's turnutils_natdiscovery is not installed (apt install coturn)")
    runs: dict[tuple[Flavour, str], subprocess.Popen[str]] = {}
    for flavour in Flavour:
        lan = lan_of(lab, flavour)
        for mode, host in (("-m -f", lan.hosts[0]), ("-H", lan.hosts[1])):
            argv = [NATDISCOVERY, *mode.split(), "-L", host.ip_address, SERVER_IPS[0]]
            runs[flavour, mode] = host.popen(argv)
    outputs = {}
    for key, proc in runs.items():
        try:
            outputs[key], _ = proc.communicate(timeout=NATDISCOVERY_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"natdiscovery {key[1]} behind {key[0].value} hangs")
    return outputs


@pytest.mark.parametrize("flavour", list(Flavour), ids=lambda f: f.value)
def test_natdiscovery_mapping_and_filtering(
    lab: Lab, natdiscovery: dict[tuple[Flavour, str], str], flavour: Flavour
) -> None:
    """coturn's RFC 5780 discovery from a LAN host finds the designed mapping and filtering,
    and reflexive addresses on the NAT's public IP (the host's own address without NAT)."""
    out = natdiscovery[flavour, "-m -f"]
    behaviour = flavour.behaviour
    host = lan_of(lab, flavour).hosts[0]
    if not behaviour.udp:
        assert "RFC 5780 response" not in out and "STUN receive timeout" in out
        assert "Mapping!" not in out and "Filtering!" not in out
        return
    assert behaviour.mapping is not None and behaviour.filtering is not None
    mapping, filtering = out.split("-= Filtering Behavior Discovery =-")
    assert _MAPPING[behaviour.mapping] in mapping
    assert _FILTERING[behaviour.filtering] in filtering
    assert ("No NAT!" in out) == (not flavour.nat)
    reflexive = set(re.findall(r"UDP reflexive addr: ([\d.]+):\d+", out))
    assert reflexive == {expected_public(host)}


@pytest.mark.parametrize("flavour", list(Flavour), ids=lambda f: f.value)
def test_natdiscovery_hairpinning(
    lab: Lab, natdiscovery: dict[tuple[Flavour, str], str], flavour: Flavour
) -> None:
    """natdiscovery -H gets its own request back through the NAT exactly when the router
    hairpins (no-NAT LANs: always, it is plain routing); never with UDP blocked."""
    out = natdiscovery[flavour, "-H"]
    lan = lan_of(lab, flavour)
    hairpins = flavour.behaviour.udp and (lan.router.hairpin or not flavour.nat)
    assert ("Received a request (maybe a successful hairpinning)" in out) == hairpins, out


# --- cleanup --------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cleanup_after_failure() -> None:
    """A lab left by an exception: its namespaces are gone and every process started in them
    (a tracked one, an orphaned background one, the server and its two workers) is dead."""
    require_lab()
    pids: list[int] = []
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        host = lab.add_lan(Flavour.SYMMETRIC).hosts[0]
        pids.append(host.popen(["sleep", "300"]).pid)
        orphan = host.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"]).stdout
        pids.append(int(orphan))
        server = lab.start_stunturn("--workers", "2")
        pids.append(server.proc.pid)
        pids += lab.wan.pids()
        names = lab.namespaces
        assert len(set(pids)) >= 5 and all(_alive(p) for p in pids)
        raise RuntimeError("boom")
    assert names and not any((NETNS_DIR / n).exists() for n in names)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_cleanup_stale() -> None:
    """Namespaces left by a lab whose process died (SIGKILL: no finalizer ran) are deleted by
    the next lab; those of live processes are not."""
    require_lab()
    dead = subprocess.Popen(["true"])
    dead.wait(5)
    stale = f"{PREFIX}-{dead.pid}-abcdef-wan"
    live = f"{PREFIX}-{os.getpid()}-abcdef-wan"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        assert stale in cleanup_stale()
        assert not (NETNS_DIR / stale).exists() and (NETNS_DIR / live).exists()
    finally:
        for name in (stale, live):
            if (NETNS_DIR / name).exists():
                subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)
