"""Run natprobe's step machine against a simulated NAT and our own server core, in memory.

:func:`run_discovery` wires a :class:`~stunturn.nat.discovery.Discovery` to a
:class:`~stunturn.nat.sim.SimNetwork`: the machine's sockets live on a LAN host behind a
:class:`~stunturn.nat.sim.SimNat` (or on a public host, with ``nat=None``), and the RFC 5780
server is our sans-IO :class:`~stunturn.server.ServerCore` listening on 2 IPs x 2 ports. Time is
simulated: the loop jumps to the next datagram delivery, TCP answer or machine deadline, so a
run that waits for timeouts takes milliseconds of real time and nothing sleeps.

Besides a correct server, :class:`ServerQuirks` makes the broken ones natprobe must not be fooled
by: a server that ignores CHANGE-REQUEST (answers from the address the request came to), one
that answers it with 420, one that silently drops it, one without OTHER-ADDRESS, one advertising
a bad OTHER-ADDRESS, and coturn 4.6.1's habit of not changing the IP for requests received on its
alternate IP. Packet loss (seeded), extra delays, duplicates and forged sources come from
``loss``/``seed`` and a ``tamper`` hook over every server reply.

Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from stunturn.nat import (
    SCHEMA,
    Action,
    Behaviour,
    CloseSocket,
    Discovery,
    NatType,
    OpenSocket,
    ProbeConfig,
    SendDatagram,
    TcpRequest,
)
from stunturn.nat.sim import SimNat, SimNetwork
from stunturn.server import AlternateAddresses, CoreConfig, ServerCore
from stunturn.server.actions import SendTo, Transport
from stunturn.stun import (
    Address,
    AttrType,
    Message,
    MessageClass,
    Method,
    StunParseError,
    attribute_type,
    decode,
)
from stunturn.stun.attributes import ChangeRequest, ErrorCode, OtherAddress, UnknownAttributes

PRIMARY_IP = "203.0.113.1"
ALT_IP = "203.0.113.2"
PRIMARY_PORT = 3478
ALT_PORT = 3479
PRIMARY: Address = (PRIMARY_IP, PRIMARY_PORT)
OTHER: Address = (ALT_IP, ALT_PORT)
"""OTHER-ADDRESS of the primary listener."""
NAT_IP = "198.51.100.7"
"""The simulated NAT's public address."""
LAN_IP = "10.0.0.2"
"""The probing host behind the NAT."""
PUBLIC_HOST_IP = "198.51.100.9"
"""The probing host when there is no NAT."""
DELAY = 0.005
"""One-way delay of every hop (s)."""


@dataclass(frozen=True, slots=True)
class ServerQuirks:
    """How the simulated STUN server (mis)behaves.

    Attributes:
        rfc5780: listen on 2 IPs x 2 ports and send OTHER-ADDRESS; False: one plain server per
            address in ``servers`` (no OTHER-ADDRESS, 420 to CHANGE-REQUEST, as our core does).
        change_request: ``honour``; ``ignore`` (answer from the address the request came to,
            with a truthful RESPONSE-ORIGIN); ``reject`` (420 UNKNOWN-ATTRIBUTES); ``drop``
            (never answer a request carrying CHANGE-REQUEST).
        alt_ip_keeps_ip: on the alternate IP, change only the port (coturn 4.6.1 does this).
        reject: attribute types answered with 420 (e.g. RESPONSE-PORT, PADDING).
        other_address: advertise this OTHER-ADDRESS instead of the real one.
    """

    rfc5780: bool = True
    change_request: str = "honour"
    alt_ip_keeps_ip: bool = False
    reject: frozenset[int] = frozenset()
    other_address: Address | None = None


GOOD = ServerQuirks()
IGNORES_CHANGE = ServerQuirks(change_request="ignore")
REJECTS_CHANGE = ServerQuirks(change_request="reject")
DROPS_CHANGE = ServerQuirks(change_request="drop")
NO_OTHER_ADDRESS = ServerQuirks(rfc5780=False)
COTURN_LIKE = ServerQuirks(alt_ip_keeps_ip=True)


@dataclass(frozen=True, slots=True)
class Reply:
    """A datagram the server sends, as seen (and possibly rewritten) by a ``tamper`` hook."""

    test: str | None
    """Name of the natprobe test whose transaction ID it carries (None: unknown)."""
    source: Address
    destination: Address
    data: bytes
    extra_delay: float = 0.0


Tamper = Callable[[Reply], list[Reply]]
"""Maps one server reply to what is really sent: [] drops it, two entries duplicate it."""


@dataclass(slots=True)
class SimRun:
    """The outcome of one simulated run."""

    report: dict[str, Any]
    discovery: Discovery
    actions: list[tuple[float, Action]]
    """Every action the machine asked for, with the simulated time."""
    received: list[tuple[float, int, Address]]
    """(time, socket, source) of every datagram delivered to one of the machine's sockets."""
    local: dict[int, Address]
    """Local address of each socket the driver opened."""
    server_requests: list[tuple[float, Address, Address]] = field(default_factory=list)
    """(time, from, to) of every datagram that reached a server listener."""

    @property
    def duration(self) -> float:
        """Simulated seconds from start to verdict."""
        return self.discovery.finished - self.discovery.started

    def test(self, name: str) -> dict[str, Any]:
        """The report entry of the test called ``name``."""
        for entry in self.report["tests"]:
            if entry["name"] == name:
                return dict(entry)
        raise KeyError(name)

    def sockets(self, prefix: str) -> set[int]:
        """Sockets used by the tests whose name starts with ``prefix``."""
        return {t["socket"] for t in self.report["tests"] if t["name"].startswith(prefix)}

    def sends(self, sock: int | None = None) -> list[SendDatagram]:
        """SendDatagram actions (of ``sock`` only, when given)."""
        return [
            a
            for _, a in self.actions
            if isinstance(a, SendDatagram) and (sock is None or a.sock == sock)
        ]


class _LossyNetwork(SimNetwork):
    """A SimNetwork that drops each datagram with probability ``loss`` (seeded)."""

    def __init__(self, delay: float, loss: float, rng: random.Random) -> None:
        super().__init__(delay)
        self.loss = loss
        self.rng = rng
        self.lost = 0

    def send(self, source: Address, destination: Address, data: bytes, now: float) -> None:
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return
        super().send(source, destination, data, now)


def _error(request: Message, code: int, types: tuple[int, ...]) -> bytes:
    attrs: list[Any] = [ErrorCode(code, "Unknown Attribute")]
    if types:
        attrs.append(UnknownAttributes(types))
    return Message(Method.BINDING, MessageClass.ERROR, request.transaction_id, attrs).encode()


class SimServer:
    """Our server core behind the quirks of :class:`ServerQuirks`, on a SimNetwork."""

    def __init__(
        self,
        net: SimNetwork,
        quirks: ServerQuirks,
        addresses: tuple[Address, ...],
        names: Callable[[bytes], str | None],
        tamper: Tamper | None,
    ) -> None:
        self.net = net
        self.quirks = quirks
        self.names = names
        self.tamper = tamper
        self.requests: list[tuple[float, Address, Address]] = []
        grid = AlternateAddresses(PRIMARY_IP, ALT_IP, PRIMARY_PORT, ALT_PORT)
        self.core = ServerCore(
            CoreConfig(rfc5780=grid if quirks.rfc5780 else None, response_rate=0)
        )
        listeners = set(addresses)
        if quirks.rfc5780:
            listeners |= set(grid.listeners())
        for address in listeners:
            net.attach_public(address, self.receive)

    def receive(self, source: Address, destination: Address, data: bytes, now: float) -> None:
        self.requests.append((now, source, destination))
        q = self.quirks
        try:
            request = decode(data)
        except StunParseError:
            return
        change = request.get(ChangeRequest)
        rejected = tuple(t for t in map(attribute_type, request.attributes) if t in q.reject)
        if change is not None and q.rfc5780:
            if q.change_request == "drop":
                return
            if q.change_request == "reject":
                rejected += (AttrType.CHANGE_REQUEST,)
        if rejected:
            self._send(request, destination, source, _error(request, 420, rejected), now)
            return
        if change is not None and q.rfc5780:
            rewritten: ChangeRequest | None = change
            if q.change_request == "ignore":
                rewritten = None
            elif q.alt_ip_keeps_ip and destination[0] == ALT_IP:
                rewritten = ChangeRequest(False, change.change_port)
            if rewritten != change:
                attrs = [a for a in request.attributes if not isinstance(a, ChangeRequest)]
                if rewritten is not None:
                    attrs.append(rewritten)
                data = replace(request, attributes=attrs, raw=b"", offsets=[]).encode()
        for action in self.core.handle_udp(data, destination, source, now):
            assert isinstance(action, SendTo)
            out = action.data
            if q.other_address is not None:
                response = decode(out)
                attrs = [
                    OtherAddress(*q.other_address) if isinstance(a, OtherAddress) else a
                    for a in response.attributes
                ]
                out = replace(response, attributes=attrs, raw=b"", offsets=[]).encode()
            self._send(request, action.local, action.remote, out, now)

    def _send(
        self, request: Message, source: Address, destination: Address, data: bytes, now: float
    ) -> None:
        reply = Reply(self.names(request.transaction_id), source, destination, data)
        for r in self.tamper(reply) if self.tamper else [reply]:
            self.net.send(r.source, r.destination, r.data, now + r.extra_delay)

    def tcp_answer(self, data: bytes, destination: Address, client: Address) -> bytes | None:
        """What the core answers to ``data`` over a TCP connection from ``client``."""
        actions = self.core.handle_stream_frame(data, destination, client, Transport.TCP, 0.0)
        for action in actions:
            if isinstance(action, SendTo):
                return action.data
        return None


def run_discovery(
    nat: SimNat | None = None,
    *,
    server: ServerQuirks = GOOD,
    servers: tuple[Address, ...] = (PRIMARY,),
    udp_blocked: bool = False,
    tcp_answers: bool = True,
    loss: float = 0.0,
    seed: int = 0,
    delay: float = DELAY,
    tamper: Tamper | None = None,
    host_ip: str | None = None,
    max_time: float = 4000.0,
    **config: Any,
) -> SimRun:
    """Run one discovery to its verdict in simulated time.

    Args:
        nat: the NAT in front of the probing host (None: a host with a public address).
            A stateful firewall (``translate=False``) puts the host on the NAT's own address.
        server: the server's behaviour.
        servers: what natprobe is given: one RFC 5780 server or two plain ones.
        udp_blocked: drop every UDP datagram the host sends.
        tcp_answers: the TCP check (UDP-blocked detection) gets our core's real Binding
            success; False: the connection fails.
        loss: probability of losing each datagram, on every hop, drawn from ``seed``.
        delay: one-way delay of every hop.
        tamper: rewrites every server reply (delay, duplicate, forge the source, drop).
        host_ip: the probing host's address (default: by ``nat``).
        max_time: give up (AssertionError) if no verdict by then (simulated seconds).
        config: more :class:`ProbeConfig` fields (``hairpin``, ``lifetime_max``, ...).
    """
    rng = random.Random(seed)
    net = _LossyNetwork(delay, loss, random.Random(seed + 1_000_003))
    if nat is not None:
        net.add_nat(nat)
    if host_ip is None:
        host_ip = PUBLIC_HOST_IP if nat is None else LAN_IP if nat.translate else nat.public_ip
    config.setdefault("local_ips", frozenset({host_ip}))
    machine = Discovery(ProbeConfig(servers=servers, **config), random.Random(seed))
    names: dict[bytes, str] = {}

    def name_of(tid: bytes) -> str | None:
        if tid not in names:
            for ev in machine.evidence:
                names.setdefault(bytes.fromhex(ev.transaction_id), ev.name)
        return names.get(tid)

    sim_server = SimServer(net, server, servers, name_of, tamper)
    actions: list[tuple[float, Action]] = []
    received: list[tuple[float, int, Address]] = []
    local: dict[int, Address] = {}
    closed: set[int] = set()
    used_ports: set[int] = set()
    tcp_due: list[tuple[float, int, bytes | None]] = []

    def receiver(sock: int) -> Callable[[Address, Address, bytes, float], None]:
        def deliver(source: Address, destination: Address, data: bytes, when: float) -> None:
            if sock in closed or machine.done:
                return
            received.append((when, sock, source))
            execute(machine.on_datagram(sock, source, data, when), when)

        return deliver

    def execute(batch: list[Action], now: float) -> None:
        opened: list[int] = []
        for action in batch:
            actions.append((now, action))
            if isinstance(action, OpenSocket):
                port = rng.randrange(30000, 60000)
                while port in used_ports:
                    port = rng.randrange(30000, 60000)
                used_ports.add(port)
                local[action.sock] = (host_ip, port)
                net.bind(local[action.sock], receiver(action.sock), nat)
                opened.append(action.sock)
            elif isinstance(action, SendDatagram):
                if action.sock in closed or udp_blocked:
                    continue
                net.send(local[action.sock], action.destination, action.data, now)
            elif isinstance(action, TcpRequest):
                answer = None
                if tcp_answers:
                    client_ip = nat.public_ip if nat is not None else host_ip
                    client = (client_ip, rng.randrange(30000, 60000))
                    answer = sim_server.tcp_answer(action.data, action.destination, client)
                tcp_due.append((now + 3 * delay, action.request, answer))
            elif isinstance(action, CloseSocket):
                closed.add(action.sock)
        for sock in opened:
            execute(machine.on_opened(sock, local[sock], now), now)

    now = 0.0
    execute(machine.start(now), now)
    while not machine.done:
        candidates = [net.next_time(), machine.next_deadline(), *(t[0] for t in tcp_due)]
        upcoming = [t for t in candidates if t is not None]
        assert upcoming, "the machine is stuck: nothing in flight and no deadline"
        now = max(now, min(upcoming))
        assert now <= max_time, f"no verdict after {max_time} simulated seconds"
        net.run_until(now)
        for item in [t for t in tcp_due if t[0] <= now]:
            tcp_due.remove(item)
            execute(machine.on_tcp_response(item[1], item[2], now), now)
        deadline = machine.next_deadline()
        if not machine.done and deadline is not None and deadline <= now:
            execute(machine.on_timer(now), now)
    return SimRun(machine.report(), machine, actions, received, local, sim_server.requests)


# --- the natprobe/1 report ----------------------------------------------------------------------

REQUIRED_KEYS = {
    "schema",
    "public_address",
    "local_address",
    "nat_detected",
    "mapping",
    "filtering",
    "nat_type",
    "hairpinning",
    "udp_blocked",
    "mapping_lifetime",
    "port_allocation",
    "servers",
    "tests",
}
TEST_KEYS = {
    "name",
    "destination",
    "reply_source",
    "response_origin",
    "rtt_ms",
    "transaction_id",
    "result",
    "expected_source",
    "transmissions",
}


def check_report(r: dict[str, Any]) -> None:
    """Assert the natprobe/1 shape: required keys, value types, per-test evidence."""
    assert r["schema"] == SCHEMA == "natprobe/1"
    assert r.keys() >= REQUIRED_KEYS
    assert r["mapping"] in {b.value for b in Behaviour}
    assert r["filtering"] in {b.value for b in Behaviour}
    assert r["nat_type"] in {t.value for t in NatType}
    assert r["nat_detected"] in (True, False, None)
    assert isinstance(r["udp_blocked"], bool)
    assert r["hairpinning"] in (True, False, None)
    assert isinstance(r["servers"], list) and r["servers"] and "address" in r["servers"][0]
    for test in r["tests"]:
        assert test.keys() >= TEST_KEYS
        assert re.fullmatch(r"[0-9a-f]{24}", test["transaction_id"])
        if test["result"] in ("answered", "error", "wrong-source", "arrived"):
            assert test["rtt_ms"] is not None and test["rtt_ms"] >= 0
            assert test["reply_source"] is not None
        else:
            assert test["rtt_ms"] is None
    json.loads(json.dumps(r))


__all__ = [
    "ALT_IP",
    "ALT_PORT",
    "COTURN_LIKE",
    "DELAY",
    "DROPS_CHANGE",
    "GOOD",
    "IGNORES_CHANGE",
    "LAN_IP",
    "NAT_IP",
    "NO_OTHER_ADDRESS",
    "OTHER",
    "PRIMARY",
    "PRIMARY_IP",
    "PRIMARY_PORT",
    "PUBLIC_HOST_IP",
    "REJECTS_CHANGE",
    "REQUIRED_KEYS",
    "TEST_KEYS",
    "Reply",
    "ServerQuirks",
    "SimRun",
    "SimServer",
    "Tamper",
    "check_report",
    "run_discovery",
]
