"""A simulated network with configurable NATs, for testing without sockets or sleeping.

:class:`SimNat` implements RFC 4787 mapping and filtering behaviours, port allocation styles,
hairpinning and mapping timeouts. :class:`SimNetwork` moves datagrams between sockets on LAN
hosts (behind NATs) and public endpoints (e.g. a STUN server core), with a fixed one-way delay,
as a time-ordered event queue. Everything takes ``now``; nothing sleeps.

It is a model, not an emulation of any product: each behaviour is exactly what RFC 4787 names,
which is what the NAT discovery step machine is tested against.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..stun import Address
from .classify import Behaviour

Deliver = Callable[[Address, Address, bytes, float], None]
"""Receiver of a datagram: (source, destination, data, now)."""


@dataclass(slots=True)
class _Mapping:
    internal: Address
    external_port: int
    allowed_ips: set[str] = field(default_factory=set)
    allowed: set[Address] = field(default_factory=set)
    last_active: float = 0.0


class SimNat:
    """One NAT with a public IP.

    Args:
        public_ip: the NAT's external address.
        mapping / filtering: RFC 4787 behaviours.
        allocation: ``"preserve"`` (external port = internal port when free), ``"sequential"``
            (next free port after the last one, from ``first_port``) or ``"random"``.
        hairpin: whether packets from inside to our own external mappings are looped back.
        hairpin_internal_source: loop them back with the sender's internal address as the
            source (a non-compliant NAT) instead of its external mapping.
        timeout: seconds a mapping survives without outbound traffic (None: forever).
        translate: False makes a stateful firewall, not a NAT: addresses are kept (the host's
            address must then be ``public_ip``), filtering still applies.
    """

    def __init__(
        self,
        public_ip: str,
        mapping: Behaviour = Behaviour.ENDPOINT_INDEPENDENT,
        filtering: Behaviour = Behaviour.ADDRESS_AND_PORT_DEPENDENT,
        *,
        allocation: str = "preserve",
        hairpin: bool = True,
        hairpin_internal_source: bool = False,
        timeout: float | None = None,
        first_port: int = 40000,
        rng: random.Random | None = None,
        translate: bool = True,
    ) -> None:
        self.public_ip = public_ip
        self.translate = translate
        self.mapping = mapping
        self.filtering = filtering
        self.allocation = allocation
        self.hairpin = hairpin
        self.hairpin_internal_source = hairpin_internal_source
        self.timeout = timeout
        self._rng = rng or random.Random(0)
        self._next_port = first_port
        self._by_key: dict[tuple[object, ...], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}

    def _key(self, internal: Address, remote: Address) -> tuple[object, ...]:
        if self.mapping is Behaviour.ENDPOINT_INDEPENDENT:
            return (internal,)
        if self.mapping is Behaviour.ADDRESS_DEPENDENT:
            return (internal, remote[0])
        return (internal, remote)

    def _expire(self, now: float) -> None:
        if self.timeout is None:
            return
        dead = [k for k, m in self._by_key.items() if now - m.last_active > self.timeout]
        for key in dead:
            m = self._by_key.pop(key)
            self._by_port.pop(m.external_port, None)

    def _allocate(self, internal: Address) -> int:
        if not self.translate:
            return internal[1]
        if self.allocation == "preserve" and internal[1] not in self._by_port:
            return internal[1]
        if self.allocation == "random":
            while True:
                port = self._rng.randrange(20000, 65000)
                if port not in self._by_port:
                    return port
        while self._next_port in self._by_port:
            self._next_port += 1
        port = self._next_port
        self._next_port += 1
        return port

    def outbound(self, internal: Address, remote: Address, now: float) -> Address:
        """The external source of a datagram from ``internal`` to ``remote``."""
        self._expire(now)
        key = self._key(internal, remote)
        m = self._by_key.get(key)
        if m is None:
            m = _Mapping(internal, self._allocate(internal))
            self._by_key[key] = m
            self._by_port[m.external_port] = m
        m.allowed_ips.add(remote[0])
        m.allowed.add(remote)
        m.last_active = now
        return (self.public_ip, m.external_port)

    def inbound(self, remote: Address, port: int, now: float) -> Address | None:
        """The internal destination of a datagram from ``remote`` to our ``port``, or None
        when no mapping exists or the filter drops it."""
        self._expire(now)
        m = self._by_port.get(port)
        if m is None:
            return None
        if self.filtering is Behaviour.ADDRESS_DEPENDENT and remote[0] not in m.allowed_ips:
            return None
        if self.filtering is Behaviour.ADDRESS_AND_PORT_DEPENDENT and remote not in m.allowed:
            return None
        return m.internal


@dataclass(order=True, slots=True)
class _Event:
    when: float
    seq: int
    source: Address = field(compare=False)
    destination: Address = field(compare=False)
    data: bytes = field(compare=False)
    lan: SimNat | None = field(default=None, compare=False)
    """Set when the datagram travels inside that NAT's LAN (same LAN, or hairpinned)."""


class SimNetwork:
    """Public endpoints, NATs with LAN hosts behind them, and a delay per hop.

    ``attach_public(address, handler)`` registers a public endpoint; ``add_nat(nat)`` a NAT;
    ``bind(host_ip, port, receiver, nat)`` a socket on a LAN host behind ``nat`` (or a public
    host when ``nat`` is None). ``send`` queues a datagram; ``run_until(now)`` delivers every
    datagram due by then.
    """

    def __init__(self, delay: float = 0.005) -> None:
        self.delay = delay
        self._queue: list[_Event] = []
        self._seq = itertools.count()
        self._public: dict[Address, Deliver] = {}
        self._nats: dict[str, SimNat] = {}
        self._hosts: dict[Address, tuple[Deliver, SimNat | None]] = {}
        self.dropped = 0

    def attach_public(self, address: Address, handler: Deliver) -> None:
        self._public[address] = handler

    def add_nat(self, nat: SimNat) -> SimNat:
        self._nats[nat.public_ip] = nat
        return nat

    def bind(self, address: Address, receiver: Deliver, nat: SimNat | None) -> None:
        self._hosts[address] = (receiver, nat)

    def send(self, source: Address, destination: Address, data: bytes, now: float) -> None:
        """A datagram leaves ``source`` (a host socket or a public endpoint)."""
        host = self._hosts.get(source)
        if host is not None and host[1] is not None:
            nat = host[1]
            if destination[0] == nat.public_ip and nat.translate:
                self._hairpin(nat, source, destination, data, now)
                return
            peer = self._hosts.get(destination)
            if peer is not None and peer[1] is nat and nat.translate:
                # Another host on the same LAN: delivered directly, untranslated.
                heapq.heappush(self._queue, _Event(now + self.delay, next(self._seq), source,
                                                   destination, data, nat))  # fmt: skip
                return
            source = nat.outbound(source, destination, now)
        heapq.heappush(self._queue, _Event(now + self.delay, next(self._seq), source,
                                           destination, data))  # fmt: skip

    def _hairpin(
        self, nat: SimNat, source: Address, destination: Address, data: bytes, now: float
    ) -> None:
        if not nat.hairpin:
            self.dropped += 1
            return
        external = nat.outbound(source, destination, now)
        inside = nat.inbound(external, destination[1], now)
        if inside is None:
            self.dropped += 1
            return
        shown = source if nat.hairpin_internal_source else external
        heapq.heappush(self._queue, _Event(now + self.delay, next(self._seq), shown, inside,
                                           data, nat))  # fmt: skip

    def next_time(self) -> float | None:
        return self._queue[0].when if self._queue else None

    def run_until(self, now: float) -> None:
        """Deliver every datagram due at or before ``now``."""
        while self._queue and self._queue[0].when <= now:
            ev = heapq.heappop(self._queue)
            self._deliver(ev)

    def _deliver(self, ev: _Event) -> None:
        handler = self._public.get(ev.destination)
        if handler is not None:
            handler(ev.source, ev.destination, ev.data, ev.when)
            return
        destination = ev.destination
        through = ev.lan
        nat = self._nats.get(destination[0])
        if nat is not None and ev.lan is None:
            inside = nat.inbound(ev.source, destination[1], ev.when)
            if inside is None:
                self.dropped += 1
                return
            destination = inside
            through = nat
        host = self._hosts.get(destination)
        if host is None or (host[1] is not None and host[1] is not through):
            # A private address is only reachable through its own NAT (or from its own LAN).
            self.dropped += 1
            return
        host[0](ev.source, destination, ev.data, ev.when)
