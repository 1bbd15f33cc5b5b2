"""NAT behaviour discovery as a sans-IO step machine (RFC 5780, RFC 4787).

The machine asks its driver to open UDP sockets on fresh random ports, to send datagrams and
(for the UDP-blocked check) to make one request over TCP; it is fed what arrives, socket local
addresses and timer ticks, all with ``now``. It never touches a socket or a clock, so tests run
it against a simulated NAT (:mod:`stunturn.nat.sim`) by stepping time.

What it does, and the traps it avoids:

* **Qualify the server first.** A Binding from a fresh socket: does the server answer, is
  OTHER-ADDRESS there and different in both IP and port? Later, are CHANGE-REQUEST replies
  coming from the address they should (checked against the UDP source and RESPONSE-ORIGIN)?
  RESPONSE-PORT and PADDING support is tested too. A verdict that needs a missing feature is
  ``unknown`` with a reason.
* **Never trust any reply.** Every test states the exact source its reply must come from; a
  reply from elsewhere is evidence about the server (it ignores CHANGE-REQUEST), not an answer.
  Late replies to finished tests are dropped (their transaction is gone).
* **One socket per test group** (RFC 5780 section 4.5): filtering on its own fresh socket, which
  never sends to the alternate address (that would open the filter), mapping on another;
  hairpinning, port allocation and lifetime on their own. Groups run concurrently, which is how a
  full verdict fits in about 2.5 s (one timeout) on a lossless path.
* **"No NAT" means the mapped address is one of our interface addresses** with the same port,
  not a comparison with 0.0.0.0.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..stun import (
    Address,
    Message,
    MessageClass,
    Method,
    StunParseError,
    decode,
)
from ..stun.attributes import (
    Attribute,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    XorMappedAddress,
)
from ..stun.transaction import ClientTransaction, RetransmitPolicy
from .classify import Behaviour, NatType, classic_type, outlook

SCHEMA = "natprobe/1"

PROBE_POLICY = RetransmitPolicy(rto=0.5, rc=3, rm=2, reliable_timeout=3.0)
"""natprobe's timing: RFC 8489's RTO of 500 ms doubling, but 3 transmissions and a final wait
of 2 RTO, so a test that gets no answer gives up after 2.5 s instead of 39.5 s."""


# --- what the machine asks of its driver ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenSocket:
    """Open a UDP socket on a fresh random port; report it with :meth:`Discovery.on_opened`."""

    sock: int


@dataclass(frozen=True, slots=True)
class SendDatagram:
    sock: int
    destination: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class TcpRequest:
    """Send ``data`` over a new TCP connection and report the first STUN message that comes
    back (or None) with :meth:`Discovery.on_tcp_response`."""

    request: int
    destination: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseSocket:
    sock: int


Action = OpenSocket | SendDatagram | TcpRequest | CloseSocket


# --- configuration and evidence ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    servers: tuple[Address, ...]
    """One RFC 5780 server, or two plain STUN servers."""
    local_ips: frozenset[str] = frozenset()
    """Our interface addresses: a mapped address among them (same port) means no NAT."""
    policy: RetransmitPolicy = PROBE_POLICY
    hairpin: bool = True
    port_samples: int = 8
    lifetime_max: float | None = None
    """Measure the mapping lifetime up to this many seconds (None: skip)."""
    lifetime_step: float = 10.0
    tcp_check: bool = True
    padding: int = 256


@dataclass(slots=True)
class Evidence:
    """One test's raw evidence, as reported in the JSON output."""

    name: str
    socket: int
    destination: Address
    transaction_id: str
    attributes: list[str] = field(default_factory=list)
    expected_source: Address | None = None
    result: str = "pending"
    """answered | timeout | error | wrong-source | arrived (hairpin)."""
    reply_source: Address | None = None
    response_origin: Address | None = None
    mapped: Address | None = None
    other_address: Address | None = None
    error_code: int | None = None
    rtt_ms: float | None = None
    sent: int = 0
    reply_attributes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        def fmt(a: Address | None) -> str | None:
            if a is None:
                return None
            return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"

        return {
            "name": self.name,
            "socket": self.socket,
            "destination": fmt(self.destination),
            "attributes": self.attributes,
            "expected_source": fmt(self.expected_source),
            "result": self.result,
            "reply_source": fmt(self.reply_source),
            "response_origin": fmt(self.response_origin),
            "mapped_address": fmt(self.mapped),
            "other_address": fmt(self.other_address),
            "error_code": self.error_code,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 2),
            "transmissions": self.sent,
            "reply_attributes": self.reply_attributes,
            "transaction_id": self.transaction_id,
        }


@dataclass(slots=True)
class _Probe:
    evidence: Evidence
    tx: ClientTransaction
    sock: int
    on_done: Callable[[Evidence], None]
    receive_on: int | None = None
    """Socket the answer must arrive on (RESPONSE-PORT and hairpin tests); None: ``sock``."""
    hairpin: bool = False


def fmt_address(a: Address | None) -> str | None:
    if a is None:
        return None
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


class Discovery:
    """The step machine. Create it, call :meth:`start`, then feed events until :attr:`done`."""

    def __init__(self, config: ProbeConfig, rng: random.Random | None = None) -> None:
        if not 1 <= len(config.servers) <= 2:
            raise ValueError("give one RFC 5780 server or two STUN servers")
        self.config = config
        self.rng = rng or random.Random()
        self.done = False
        self.started = 0.0
        self.finished = 0.0
        self._out: list[Action] = []
        self._probes: dict[bytes, _Probe] = {}
        self._sockets: dict[int, str] = {}
        self._local: dict[int, Address] = {}
        self._next_sock = 0
        self._tcp: dict[int, Callable[[bytes | None], None]] = {}
        self._next_tcp = 0
        self.evidence: list[Evidence] = []
        self._pending = 0
        self._timers: list[tuple[float, Callable[[float], None]]] = []
        self.progress_total = 0
        self.progress_done = 0
        # results
        self.primary = config.servers[0]
        self.other: Address | None = None
        self.public: Address | None = None
        self.local: Address | None = None
        self.nat_detected: bool | None = None
        self.udp_blocked = False
        self.tcp_mapped: Address | None = None
        self.mapping = Behaviour.UNKNOWN
        self.filtering = Behaviour.UNKNOWN
        self.mapping_varies: bool | None = None
        self.reasons: dict[str, str] = {}
        self.server_info: dict[str, Any] = {"address": fmt_address(self.primary)}
        self.hairpinning: bool | None = None
        self.hairpin_source: str | None = None
        self.port_allocation: dict[str, Any] | None = None
        self.lifetime: dict[str, Any] | None = None
        self.error: str | None = None
        self._filtering_replies: dict[str, Evidence] = {}
        self._mapping: dict[str, Address | None] = {}
        self._change_honoured: bool | None = None
        self._clock = 0.0
        """``now`` of the event being handled; callbacks that start new tests use it."""

    # --- driver interface ------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        self._clock = now
        self.started = now
        sock = self._open("qualify")
        self._binding("qualify", sock, self.primary, [], now, self._qualified)
        return self._flush()

    def on_opened(self, sock: int, local: Address, now: float) -> list[Action]:
        self._clock = now
        self._local[sock] = local
        return self._flush()

    def on_datagram(self, sock: int, source: Address, data: bytes, now: float) -> list[Action]:
        self._clock = now
        try:
            msg = decode(data)
        except StunParseError:
            return self._flush()
        probe = self._probes.get(msg.transaction_id)
        if probe is None:
            return self._flush()  # late or foreign: never answers a later test
        expected_sock = probe.receive_on if probe.receive_on is not None else probe.sock
        error_here = msg.cls is MessageClass.ERROR and sock == probe.sock
        if sock != expected_sock and not error_here:
            return self._flush()
        ev = probe.evidence
        if probe.hairpin:
            if msg.cls is MessageClass.REQUEST:
                ev.result = "arrived"
                ev.reply_source = source
                self._finish(probe, now)
            return self._flush()
        if msg.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
            return self._flush()
        ev.reply_source = source
        origin = msg.get(ResponseOrigin)
        ev.response_origin = origin.address if origin else None
        other = msg.get(OtherAddress)
        ev.other_address = other.address if other else None
        xor = msg.get(XorMappedAddress)
        plain = msg.get(MappedAddress)
        ev.mapped = xor.address if xor else (plain.address if plain else None)
        ev.reply_attributes = [type(a).__name__ for a in msg.attributes]
        if msg.cls is MessageClass.ERROR:
            code = msg.get(ErrorCode)
            ev.error_code = code.code if code else None
            ev.result = "error"
        elif probe.tx.accepts(source):
            ev.result = "answered"
        else:
            ev.result = "wrong-source"
        self._finish(probe, now)
        return self._flush()

    def on_tcp_response(self, request: int, data: bytes | None, now: float) -> list[Action]:
        self._clock = now
        callback = self._tcp.pop(request, None)
        if callback is not None:
            callback(data)
            self._pending -= 1
            self._maybe_done(now)
        return self._flush()

    def on_timer(self, now: float) -> list[Action]:
        self._clock = now
        for tid, probe in list(self._probes.items()):
            tx = probe.tx
            if now < tx.deadline:
                continue
            data = tx.on_timer(now)
            if data is not None:
                probe.evidence.sent = tx.sent
                self._out.append(SendDatagram(probe.sock, tx.destination, data))
            elif tx.timed_out(now) and tid in self._probes:
                probe.evidence.result = "timeout"
                self._finish(probe, now)
        due = [t for t in self._timers if t[0] <= now]
        self._timers = [t for t in self._timers if t[0] > now]
        for _, callback in sorted(due, key=lambda t: t[0]):
            callback(now)
            self._pending -= 1
        self._maybe_done(now)
        return self._flush()

    def next_deadline(self) -> float | None:
        deadlines = [p.tx.deadline for p in self._probes.values()]
        deadlines += [t[0] for t in self._timers]
        return min(deadlines, default=None)

    # --- plumbing ---------------------------------------------------------------------------

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _open(self, purpose: str) -> int:
        sock = self._next_sock
        self._next_sock += 1
        self._sockets[sock] = purpose
        self._out.append(OpenSocket(sock))
        return sock

    def _after(self, when: float, callback: Callable[[float], None]) -> None:
        self._pending += 1
        self._timers.append((when, callback))

    def _binding(
        self,
        name: str,
        sock: int,
        destination: Address,
        attrs: list[Attribute],
        now: float,
        on_done: Callable[[Evidence], None],
        expect: Address | None = None,
        receive_on: int | None = None,
        hairpin: bool = False,
    ) -> Evidence:
        msg = Message(Method.BINDING, MessageClass.REQUEST, attributes=list(attrs))
        data = msg.encode()
        expected = expect or destination
        tx = ClientTransaction(
            msg.transaction_id,
            data,
            destination,
            self.config.policy,
            sources=frozenset((expected,)),
        )
        ev = Evidence(
            name,
            sock,
            destination,
            msg.transaction_id.hex(),
            [_describe(a) for a in attrs],
            expected if not hairpin else None,
        )
        self.evidence.append(ev)
        self._probes[msg.transaction_id] = _Probe(ev, tx, sock, on_done, receive_on, hairpin)
        self._pending += 1
        self._out.append(SendDatagram(sock, destination, tx.start(now)))
        ev.sent = 1
        return ev

    def _finish(self, probe: _Probe, now: float) -> None:
        self._probes.pop(bytes.fromhex(probe.evidence.transaction_id), None)
        ev = probe.evidence
        if ev.result in ("answered", "error", "wrong-source", "arrived"):
            ev.rtt_ms = (now - probe.tx.started) * 1000
        probe.on_done(ev)
        self._pending -= 1
        self._maybe_done(now)

    def _maybe_done(self, now: float) -> None:
        if self._pending == 0 and not self.done:
            self.done = True
            self.finished = now
            for sock in self._sockets:
                self._out.append(CloseSocket(sock))

    # --- qualification ----------------------------------------------------------------------

    def _qualified(self, ev: Evidence) -> None:
        now = self._clock
        self.server_info["answered"] = ev.result == "answered"
        if ev.result != "answered" or ev.mapped is None:
            self.server_info["answered"] = False
            if self.config.tcp_check:
                self._tcp_check(now)
            else:
                self.error = f"no UDP answer from {fmt_address(self.primary)}"
            return
        self.public = ev.mapped
        self.local = self._local.get(ev.socket)
        self.nat_detected = self._nat_between(ev.socket, ev.mapped)
        if len(self.config.servers) == 2:
            self.server_info["other_address"] = fmt_address(ev.other_address)
            self._two_server_mapping(now)
        else:
            other = ev.other_address
            usable = (
                other is not None and other[0] != self.primary[0] and other[1] != self.primary[1]
            )
            self.server_info["other_address"] = fmt_address(other)
            self.server_info["rfc5780"] = usable
            if usable:
                assert other is not None
                self.other = other
                self._filtering_tests(now)
                self._mapping_tests(now)
            else:
                why = (
                    "the server sent no OTHER-ADDRESS (no RFC 5780 support)"
                    if other is None
                    else f"OTHER-ADDRESS {fmt_address(other)} must differ in IP and port"
                )
                self.reasons["mapping"] = self.reasons["filtering"] = why
            self._response_port_test(ev.socket, now)
            self._padding_test(ev.socket, now)
        if self.config.hairpin:
            self._hairpin_tests(now)
        self._port_allocation_tests(now)

    def _nat_between(self, sock: int, mapped: Address) -> bool:
        local = self._local.get(sock)
        if local is None:
            return True
        if mapped == local:
            return False
        return not (mapped[0] in self.config.local_ips and mapped[1] == local[1])

    def _tcp_check(self, now: float) -> None:
        request = self._next_tcp
        self._next_tcp += 1
        msg = Message(Method.BINDING, MessageClass.REQUEST)
        self._pending += 1

        def done(data: bytes | None) -> None:
            answered = False
            if data is not None:
                try:
                    reply = decode(data)
                except StunParseError:
                    reply = None
                if reply is not None and reply.transaction_id == msg.transaction_id:
                    xor = reply.get(XorMappedAddress)
                    self.tcp_mapped = xor.address if xor else None
                    answered = reply.cls is MessageClass.SUCCESS
            self.server_info["tcp_answered"] = answered
            if answered:
                self.udp_blocked = True
                self.reasons["udp"] = "no UDP answer while TCP to the same server works"
            else:
                self.error = f"no answer from {fmt_address(self.primary)} over UDP or TCP"

        self._tcp[request] = done
        self._out.append(TcpRequest(request, self.primary, msg.encode()))

    # --- filtering (RFC 5780 section 4.4) ---------------------------------------------------

    def _filtering_tests(self, now: float) -> None:
        assert self.other is not None
        sock = self._open("filtering")
        primary, other = self.primary, self.other

        def first(ev: Evidence) -> None:
            if ev.result != "answered":
                self.reasons["filtering"] = f"filtering test I got no answer ({ev.result})"
                return
            # Tests II and III both go to the primary address, so neither opens the filter for
            # the other; run them together.
            self._binding(
                "filtering-II", sock, primary, [ChangeRequest(True, True)], self._clock,
                self._filtering_done, expect=other,
            )  # fmt: skip
            self._binding(
                "filtering-III", sock, primary, [ChangeRequest(False, True)], self._clock,
                self._filtering_done, expect=(primary[0], other[1]),
            )  # fmt: skip

        self._binding("filtering-I", sock, primary, [], now, first)

    def _filtering_done(self, ev: Evidence) -> None:
        # The verdict waits for report(): it combines these with the CHANGE-REQUEST control.
        self._filtering_replies[ev.name] = ev

    def _change_request_evidence(self) -> list[Evidence]:
        names = ("filtering-II", "filtering-III", "change-request-control")
        return [self._filtering_replies[n] for n in names if n in self._filtering_replies]

    def _judge_filtering(self) -> None:
        """Filtering (RFC 5780 section 4.4) from tests II and III and the control.

        A reply from the wrong address, an error, or RESPONSE-ORIGIN disagreeing with the
        source means the server does not honour CHANGE-REQUEST: unknown. A reply from the right
        address proves the filter let it in. Silence alone is only trusted when the control test
        (sent where our filter is known to be open) got its changed-source reply; silence there
        too means the server does not answer CHANGE-REQUEST at all: unknown. Without a control
        (the mapping is not endpoint-independent, so no filter is known to be open) silence is
        read as address-and-port-dependent filtering, and the server's support is "unverified".
        """
        evidence = self._change_request_evidence()
        for test in evidence:
            bad = None
            if test.result == "wrong-source":
                bad = (
                    f"the server ignores CHANGE-REQUEST: the reply to {test.name} came from "
                    f"{fmt_address(test.reply_source)}, not {fmt_address(test.expected_source)}"
                )
            elif test.result == "error":
                bad = f"the server refused CHANGE-REQUEST in {test.name} ({test.error_code})"
            elif test.result == "answered" and test.response_origin not in (
                None,
                test.reply_source,
            ):
                bad = (
                    f"RESPONSE-ORIGIN {fmt_address(test.response_origin)} disagrees with the "
                    f"source {fmt_address(test.reply_source)} of {test.name}"
                )
            if bad is not None:
                self._change_honoured = False
                self.reasons["filtering"] = bad
                return
        if any(t.result == "answered" for t in evidence):
            self._change_honoured = True
        results = {t.name: t.result for t in evidence}
        if "filtering-II" not in results or "filtering-III" not in results:
            return  # the filtering tests did not run (the reason is already recorded)
        if results["filtering-II"] == "answered":
            self.filtering = Behaviour.ENDPOINT_INDEPENDENT
        elif results["filtering-III"] == "answered":
            self.filtering = Behaviour.ADDRESS_DEPENDENT
        elif results.get("change-request-control") == "answered":
            self.filtering = Behaviour.ADDRESS_AND_PORT_DEPENDENT
            self.reasons["filtering_evidence"] = (
                "no reply to CHANGE-REQUEST tests II and III, while the control test (sent "
                "where our filter is open) was answered: the NAT filtered them"
            )
        elif results.get("change-request-control") == "timeout":
            self._change_honoured = False
            self.reasons["filtering"] = (
                "the server does not answer CHANGE-REQUEST: even the control test, sent where "
                "the mapping keeps our filter open, got no reply"
            )
        else:
            self.filtering = Behaviour.ADDRESS_AND_PORT_DEPENDENT
            self.reasons["filtering_evidence"] = (
                "no reply to CHANGE-REQUEST (tests II and III); the server's CHANGE-REQUEST "
                "support could not be verified from behind a mapping that depends on the "
                "destination"
            )

    # --- mapping (RFC 5780 section 4.3) -----------------------------------------------------

    def _mapping_tests(self, now: float) -> None:
        assert self.other is not None
        sock = self._open("mapping")
        primary, other = self.primary, self.other
        alt_ip_primary_port = (other[0], primary[1])

        def first(ev: Evidence) -> None:
            self._mapping["I"] = ev.mapped if ev.result == "answered" else None
            if ev.result != "answered":
                self.reasons["mapping"] = f"mapping test I got no answer ({ev.result})"
                return
            self._binding("mapping-II", sock, alt_ip_primary_port, [], self._clock, second)
            self._binding("mapping-III", sock, other, [], self._clock, third)

        def second(ev: Evidence) -> None:
            self._mapping["II"] = ev.mapped if ev.result == "answered" else None
            self._mapping_done(sock)

        def third(ev: Evidence) -> None:
            self._mapping["III"] = ev.mapped if ev.result == "answered" else None
            self._mapping_done(sock)

        self._binding("mapping-I", sock, primary, [], now, first)

    def _mapping_done(self, sock: int) -> None:
        if len(self._mapping) < 3:
            return
        one, two, three = self._mapping["I"], self._mapping["II"], self._mapping["III"]
        if two is None or three is None:
            self.reasons["mapping"] = "the server did not answer on its alternate address"
            return
        if two == one:
            self.mapping = Behaviour.ENDPOINT_INDEPENDENT
        elif three == two:
            self.mapping = Behaviour.ADDRESS_DEPENDENT
        else:
            self.mapping = Behaviour.ADDRESS_AND_PORT_DEPENDENT
        self.mapping_varies = self.mapping is not Behaviour.ENDPOINT_INDEPENDENT
        if self.mapping is Behaviour.ENDPOINT_INDEPENDENT:
            self._change_request_control(sock)

    def _change_request_control(self, sock: int) -> None:
        """Check the server honours CHANGE-REQUEST, from a socket whose filter is known open.

        The mapping socket has sent to the alternate IP and port (test III); with
        endpoint-independent mapping its one mapping's filter now admits that address whatever
        the filtering behaviour. So a CHANGE-REQUEST(ip+port) sent to the primary address, the
        same path the filtering tests use, must come back from the alternate address.
        """
        assert self.other is not None
        self._binding(
            "change-request-control", sock, self.primary, [ChangeRequest(True, True)],
            self._clock, self._filtering_done, expect=self.other,
        )  # fmt: skip

    # --- two plain servers ------------------------------------------------------------------

    def _two_server_mapping(self, now: float) -> None:
        first, second = self.config.servers
        sock = self._open("mapping")
        results: dict[str, Address | None] = {}

        def done(ev: Evidence) -> None:
            results[ev.name] = ev.mapped if ev.result == "answered" else None
            if len(results) < 2:
                return
            a, b = results["mapping-server-1"], results["mapping-server-2"]
            self.reasons["filtering"] = "filtering needs an RFC 5780 server (CHANGE-REQUEST)"
            if a is None or b is None:
                self.reasons["mapping"] = "one of the two servers did not answer"
                return
            self.mapping_varies = a != b
            same_ip = first[0] == second[0]
            if a == b and not same_ip:
                self.mapping = Behaviour.ENDPOINT_INDEPENDENT
            elif a == b:
                self.reasons["mapping"] = (
                    "the mapping is the same for two ports of one IP: endpoint-independent or "
                    "address-dependent (servers on two IPs would tell)"
                )
            elif same_ip:
                self.mapping = Behaviour.ADDRESS_AND_PORT_DEPENDENT
            else:
                self.reasons["mapping"] = (
                    "the mapping varies by destination; two servers on different IPs cannot "
                    "tell address-dependent from address-and-port-dependent"
                )

        self._binding("mapping-server-1", sock, first, [], now, done)
        self._binding("mapping-server-2", sock, second, [], now, done)

    # --- RESPONSE-PORT and PADDING -----------------------------------------------------------

    def _response_port_test(self, sock: int, now: float) -> None:
        """RESPONSE-PORT: ask for the reply to go to our own mapped port, from another socket.

        The mapping-lifetime test relies on RESPONSE-PORT, so it starts only once this worked.
        """
        assert self.public is not None
        probe_sock = self._open("response-port")

        def done(ev: Evidence) -> None:
            if ev.result == "answered":
                self.server_info["response_port"] = True
                if self.config.lifetime_max:
                    self._lifetime_tests(self._clock)
                return
            self.server_info["response_port"] = False if ev.result == "error" else None
            if self.config.lifetime_max:
                self.reasons["mapping_lifetime"] = (
                    "the lifetime test needs RESPONSE-PORT, which the server "
                    + ("refused" if ev.result == "error" else "did not answer")
                )

        self._binding(
            "response-port", probe_sock, self.primary, [ResponsePort(self.public[1])], now,
            done, receive_on=sock,
        )  # fmt: skip

    def _padding_test(self, sock: int, now: float) -> None:
        def done(ev: Evidence) -> None:
            # Supported when the answer carries PADDING back (RFC 5780 section 6.1).
            answered = ev.result == "answered" and "Padding" in ev.reply_attributes
            self.server_info["padding"] = answered if ev.result != "timeout" else None

        self._binding(
            "padding", sock, self.primary, [Padding(bytes(self.config.padding))], now, done
        )

    # --- hairpinning (RFC 4787 section 6) --------------------------------------------------

    def _hairpin_tests(self, now: float) -> None:
        a, b = self._open("hairpin-a"), self._open("hairpin-b")
        mapped: dict[int, Address | None] = {}
        arrivals: dict[str, Evidence] = {}

        def learned(ev: Evidence) -> None:
            mapped[ev.socket] = ev.mapped if ev.result == "answered" else None
            if len(mapped) < 2:
                return
            if mapped[a] is None or mapped[b] is None:
                self.reasons["hairpinning"] = "could not learn both mappings"
                return
            for src, dst, name in ((a, b, "hairpin-a-to-b"), (b, a, "hairpin-b-to-a")):
                self._binding(
                    name, src, mapped[dst], [], self._clock, arrived, receive_on=dst,  # type: ignore[arg-type]
                    hairpin=True,
                )  # fmt: skip

        def arrived(ev: Evidence) -> None:
            arrivals[ev.name] = ev
            if len(arrivals) < 2:
                return
            got = [e for e in arrivals.values() if e.result == "arrived"]
            self.hairpinning = len(got) == 2
            if got:
                sender = {"hairpin-a-to-b": a, "hairpin-b-to-a": b}
                kinds = set()
                for e in got:
                    source, own = e.reply_source, mapped[sender[e.name]]
                    if source == own:
                        kinds.add("external-mapping")
                    elif source is not None and own is not None and source[0] == own[0]:
                        kinds.add("external-address-new-port")
                    elif source is not None and source[0] in self.config.local_ips:
                        kinds.add("internal-address")
                    else:
                        kinds.add("other")
                self.hairpin_source = "/".join(sorted(kinds))

        self._binding("hairpin-learn-a", a, self.primary, [], now, learned)
        self._binding("hairpin-learn-b", b, self.primary, [], now, learned)

    # --- port allocation --------------------------------------------------------------------

    def _port_allocation_tests(self, now: float) -> None:
        socks = [self._open(f"port-{i}") for i in range(self.config.port_samples)]
        results: dict[int, Address | None] = {}

        def done(ev: Evidence) -> None:
            results[ev.socket] = ev.mapped if ev.result == "answered" else None
            if len(results) == len(socks):
                self._analyse_ports([(self._local.get(s), results[s]) for s in socks])

        for i, sock in enumerate(socks):
            self._binding(f"port-allocation-{i}", sock, self.primary, [], now, done)

    def _analyse_ports(self, pairs: list[tuple[Address | None, Address | None]]) -> None:
        usable = [(loc[1], m[1]) for loc, m in pairs if loc is not None and m is not None]
        if len(usable) < 3:
            self.port_allocation = {"kind": "unknown", "samples": len(usable)}
            return
        locals_, mapped = zip(*usable, strict=True)
        info: dict[str, Any] = {"samples": len(usable), "local_ports": list(locals_)}
        info["mapped_ports"] = list(mapped)
        if all(loc == m for loc, m in usable):
            info["kind"] = "preserved"
            info["prediction"] = "the external port equals the local port"
        else:
            deltas = [b - a for a, b in itertools.pairwise(mapped)]
            mode = statistics.mode(deltas)
            if 0 < abs(mode) <= 16 and deltas.count(mode) >= 0.75 * len(deltas):
                info["kind"] = "sequential"
                info["delta"] = mode
                info["prediction"] = (
                    f"the next mapping is likely at port {mapped[-1] + mode} "
                    f"(last {mapped[-1]} + delta {mode}), if nothing else opened one meanwhile"
                )
            else:
                info["kind"] = "random"
                info["prediction"] = "external ports are not predictable"
        self.port_allocation = info

    # --- mapping lifetime --------------------------------------------------------------------

    def _lifetime_tests(self, now: float) -> None:
        """Many sockets each make a mapping now; socket k is probed once after k steps, from
        another socket, with RESPONSE-PORT naming its mapped port: the reply only reaches it if
        its mapping is still alive. Probing from elsewhere keeps each mapping untouched."""
        assert self.config.lifetime_max is not None
        step = self.config.lifetime_step
        count = max(1, int(self.config.lifetime_max // step))
        prober = self._open("lifetime-prober")
        delays = [step * (k + 1) for k in range(count)]
        alive: dict[float, bool] = {}
        self.progress_total = count

        def made(k: int, sock: int) -> Callable[[Evidence], None]:
            def done(ev: Evidence) -> None:
                if ev.result != "answered" or ev.mapped is None:
                    alive[delays[k]] = False
                    self.progress_done += 1
                    return
                port = ev.mapped[1]

                def fire(when: float) -> None:
                    self._binding(
                        f"lifetime-{int(delays[k])}s", prober, self.primary,
                        [ResponsePort(port)], when, judged(k), receive_on=sock,
                    )  # fmt: skip

                self._after(self._clock + delays[k], fire)

            return done

        def judged(k: int) -> Callable[[Evidence], None]:
            def done(ev: Evidence) -> None:
                alive[delays[k]] = ev.result == "answered"
                self.progress_done += 1
                if len(alive) == count:
                    self._lifetime_result(alive)

            return done

        for k in range(count):
            sock = self._open(f"lifetime-{k}")
            self._binding(f"lifetime-open-{k}", sock, self.primary, [], now, made(k, sock))

    def _lifetime_result(self, alive: dict[float, bool]) -> None:
        lived = [d for d, ok in alive.items() if ok]
        died = [d for d, ok in alive.items() if not ok]
        low = max(lived, default=0.0)
        high = min((d for d in died if d > low), default=None)
        result: dict[str, Any] = {"alive_at": sorted(lived), "gone_at": sorted(died)}
        if high is None:
            result["interval_s"] = [low, None]
            result["summary"] = f"longer than {low:g} s (the longest delay tested)"
            keepalive = max(low * 0.8, 1.0)
        else:
            result["interval_s"] = [low, high]
            result["summary"] = f"between {low:g} and {high:g} s"
            keepalive = max(low * 0.8, 1.0) if low else 1.0
        result["recommended_keepalive_s"] = round(min(keepalive, 25.0), 1)
        self.lifetime = result

    # --- result -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The natprobe/1 JSON object (call when :attr:`done`)."""
        if self.other is not None and self.filtering is Behaviour.UNKNOWN:
            self._judge_filtering()
        nat_type = classic_type(self.nat_detected, self.mapping, self.filtering, self.udp_blocked)
        if (
            nat_type is NatType.UNKNOWN
            and self.nat_detected
            and self.mapping_varies
            and self.mapping is Behaviour.UNKNOWN
        ):
            nat_type = NatType.SYMMETRIC  # varies by destination: symmetric, whatever the rest
        mapping = self.mapping
        if self.nat_detected is False and mapping is Behaviour.UNKNOWN and self.public:
            mapping = Behaviour.ENDPOINT_INDEPENDENT  # no NAT: the "mapping" is the identity
        server = dict(self.server_info)
        server["change_request"] = {True: "honoured", False: "not honoured", None: "unverified"}[
            self._change_honoured
        ]
        look = outlook(nat_type)
        return {
            "schema": SCHEMA,
            "public_address": fmt_address(self.public or self.tcp_mapped),
            "local_address": fmt_address(self.local),
            "nat_detected": self.nat_detected,
            "mapping": mapping.value,
            "filtering": self.filtering.value,
            "mapping_varies_by_destination": self.mapping_varies,
            "nat_type": nat_type.value,
            "udp_blocked": self.udp_blocked,
            "hairpinning": self.hairpinning,
            "hairpinning_source": self.hairpin_source,
            "mapping_lifetime": self.lifetime,
            "port_allocation": self.port_allocation,
            "p2p": {
                "direct_with": [t.value for t in look.direct_with],
                "relay_with": [t.value for t in look.relay_with],
                "summary": look.summary,
            },
            "reasons": self.reasons,
            "servers": [server],
            "tests": [ev.as_dict() for ev in self.evidence],
            "duration_ms": round((self.finished - self.started) * 1000, 1),
            "error": self.error,
        }


def _describe(attr: Attribute) -> str:
    if isinstance(attr, ChangeRequest):
        flags = [f for f, on in (("ip", attr.change_ip), ("port", attr.change_port)) if on]
        return "CHANGE-REQUEST(" + "+".join(flags or ["none"]) + ")"
    if isinstance(attr, ResponsePort):
        return f"RESPONSE-PORT({attr.port})"
    if isinstance(attr, Padding):
        return f"PADDING({len(attr.value)})"
    return type(attr).__name__
