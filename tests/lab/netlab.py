"""A real-NAT lab built from Linux network namespaces, veth pairs, bridges and nftables.

The topology (see README.md beside this file for the diagram)::

    WAN namespace "internet": bridge "wan" with 198.51.100.1/24 (the routers' gateway) and the
    server addresses 203.0.113.1/24 and 203.0.113.2/24 (``stunturn serve`` runs here)
        |
        +-- router of LAN N (one namespace): "wan0" = 198.51.100.(10+N)/24, bridge "lan0" =
        |   10.0.N.1/24 (NAT flavours) or a routed public /27 of 192.0.2.0/24 (no NAT)
        |       +-- host namespaces 10.0.N.10, 10.0.N.11, ... (default route via the router)
        +-- optional public hosts 203.0.113.(100+K)/24 on the WAN bridge

Each router runs one NAT *flavour* (:class:`Flavour`), made of real nftables rules (see
:func:`nat_ruleset`, which documents every rule), with hairpinning on or off and an optional short
UDP mapping lifetime.

Running things inside a namespace:

* ``ns.run(argv)`` / ``ns.popen(argv)`` - a program under ``ip netns exec NAME`` (every process
  is killed when the lab closes, including its children, via ``ip netns pids``);
* ``ns.python(code)`` - ``ip netns exec NAME python -c CODE`` with this interpreter;
* ``ns.call(fn, *args)`` - ``fn`` in a short-lived thread of *this* process that first joined the
  namespace with setns(2) (network namespaces are per thread); ``ns.start_thread(fn)`` likewise
  for a long-running thread (an event loop); ``ns.new_socket()``, ``ns.udp_socket()``,
  ``ns.tcp_connect()`` - a socket created in the namespace. A socket belongs to the namespace
  it was created in for its whole life, so one test can drive sockets in many namespaces from
  its own thread.

The lab always cleans up: :class:`Lab` is a context manager, every namespace name carries the
creating PID and a random token (``stlab-PID-TOKEN-ROLE``) so parallel runs never collide, and a
new lab deletes the namespaces of labs whose creating process is dead. Use :func:`require_lab`
first: it skips the test (with the reason) where namespaces cannot be built.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import enum
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import pytest

P = ParamSpec("P")
T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
PREFIX = "stlab"
"""Every lab namespace is called ``stlab-PID-TOKEN-ROLE``."""

CMD_TIMEOUT = 20.0
"""Upper bound for one ``ip``/``nft``/``conntrack`` command or ``call``."""
KILL_TIMEOUT = 5.0
READY_TIMEOUT = 30.0

WAN_GATEWAY = "198.51.100.1"
WAN_PREFIX = "198.51.100"
SERVER_IPS = ("203.0.113.1", "203.0.113.2")
"""The "public" addresses of the WAN namespace: ``--listen 203.0.113.1:3478 --alt-address
203.0.113.2`` serves RFC 5780 on 2 IPs x 2 ports (3478 and 3479)."""
STUN_PORT = 3478
PUBLIC_LAN_BLOCKS = "192.0.2"
"""Routed public LANs (flavours NONE and FIREWALL) get a /27 of 192.0.2.0/24 each (8 at most)."""
PUBLIC_RANGES = ("198.51.100.0/24", "192.0.2.0/24", "203.0.113.0/24")
"""The lab's "Internet": the routers' (NATs') public addresses, the public LANs, and the servers
and public hosts. Documentation ranges, which a TURN server refuses as peers by default, so
:meth:`Lab.start_stunturn` with ``turn=True`` allows them (``--allow-peer``); 203.0.113.0/24
includes the relay address itself, for relay-to-relay paths."""
TURN_USER = "lab"
TURN_PASSWORD = "lab-secret"
"""The TURN user of :meth:`Lab.start_stunturn` with ``turn=True``."""

WAN_IF = "wan0"
LAN_IF = "lan0"
DEFAULT_MAPPING_TIMEOUT = 120
"""Lifetime (s) of the nftables mapping/filtering set elements unless ``udp_timeout`` is given;
the kernel's conntrack defaults (30 s unreplied, 120 s stream) then apply to the flows."""

_CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """A lab command failed (the message has its stderr)."""


# --- NAT flavours ---------------------------------------------------------------------------------


class Mapping(enum.Enum):
    """RFC 4787 section 4.1 mapping behaviour."""

    EIM = "endpoint-independent"
    ADM = "address-dependent"
    APDM = "address-and-port-dependent"


class Filtering(enum.Enum):
    """RFC 4787 section 5 filtering behaviour."""

    EIF = "endpoint-independent"
    ADF = "address-dependent"
    APDF = "address-and-port-dependent"


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What a flavour is designed to show to UDP (mapping/filtering are None if UDP is blocked)."""

    nat: bool
    udp: bool
    mapping: Mapping | None
    filtering: Filtering | None


class Flavour(enum.Enum):
    """The NAT (or no-NAT) behaviours a lab router can have. :func:`nat_ruleset` builds them."""

    NONE = "none"
    """No NAT, no filter: the LAN has public addresses and the router only routes."""
    FIREWALL = "firewall"
    """No NAT, stateful filter dropping unsolicited inbound UDP ("symmetric UDP firewall")."""
    FULL_CONE = "full-cone"
    """EIM + EIF."""
    RESTRICTED_CONE = "restricted-cone"
    """EIM + address-dependent filtering."""
    PORT_RESTRICTED_CONE = "port-restricted-cone"
    """EIM + address-and-port-dependent filtering."""
    SYMMETRIC = "symmetric"
    """APDM (a random external port per 5-tuple) + APDF."""
    MASQUERADE = "masquerade"
    """A stock Linux router: plain ``masquerade``. EIM as long as Linux can keep the source
    port (no two internal endpoints on one port talk to one remote), then APDF."""
    UDP_BLOCKED = "udp-blocked"
    """UDP dropped both ways; TCP is NATed (masquerade)."""

    @property
    def behaviour(self) -> Behaviour:
        return _BEHAVIOUR[self]

    @property
    def nat(self) -> bool:
        return _BEHAVIOUR[self].nat


_BEHAVIOUR = {
    Flavour.NONE: Behaviour(False, True, Mapping.EIM, Filtering.EIF),
    Flavour.FIREWALL: Behaviour(False, True, Mapping.EIM, Filtering.APDF),
    Flavour.FULL_CONE: Behaviour(True, True, Mapping.EIM, Filtering.EIF),
    Flavour.RESTRICTED_CONE: Behaviour(True, True, Mapping.EIM, Filtering.ADF),
    Flavour.PORT_RESTRICTED_CONE: Behaviour(True, True, Mapping.EIM, Filtering.APDF),
    Flavour.SYMMETRIC: Behaviour(True, True, Mapping.APDM, Filtering.APDF),
    Flavour.MASQUERADE: Behaviour(True, True, Mapping.EIM, Filtering.APDF),
    Flavour.UDP_BLOCKED: Behaviour(True, False, None, None),
}

_EIM_CONES = (Flavour.FULL_CONE, Flavour.RESTRICTED_CONE, Flavour.PORT_RESTRICTED_CONE)


def nat_ruleset(
    flavour: Flavour,
    public_ip: str,
    *,
    hairpin: bool = False,
    timeout: int = DEFAULT_MAPPING_TIMEOUT,
    wan: str = WAN_IF,
    lan: str = LAN_IF,
) -> str:
    """The nftables ruleset (one ``table ip lab``) of a router; "" for :attr:`Flavour.NONE`.

    Building blocks, all in the router's own namespace:

    * ``ext2int`` (external UDP port -> internal address . port) and ``int2ext`` (the reverse)
      are dynamic maps learnt *after* source NAT, in a filter chain at postrouting priority
      srcnat+10, from every UDP packet the NAT translated on its way out (``ct direction
      original ct status snat``: outbound flows; ``ct direction reply ct status dnat``: answers
      to inbound flows). Their timeout is refreshed by outbound traffic only (RFC 4787 REQ-6
      allows that). They are the NAT's "mapping table", which conntrack alone does not have.
    * EIM (the three cones): an internal endpoint already in ``int2ext`` is SNATed to that same
      external port whatever the destination; a new one keeps its port (Linux NAT preserves it
      when it can) unless that port is already someone else's external port, in which case it
      gets a random one, so two hosts never share an external port.
    * APDM (symmetric): ``masquerade fully-random``, a fresh random external port per 5-tuple.
    * Filtering: conntrack alone admits only the exact remote of a flow (APDF); full cone adds a
      DNAT of inbound UDP to ``ext2int`` (EIF); restricted cone only for remotes in ``peers``,
      the (remote IP . external port) pairs learnt from outbound packets (ADF).
    * Hairpinning (``hairpin=True``): UDP from the LAN to the public address is DNATed through
      ``ext2int`` and SNATed to the sender's *external* mapping (RFC 4787 REQ-9), so the
      receiver sees the sender as the Internet would. Hairpinned packets are not filtered.
      With ``hairpin=False`` they end in the router's input chain and are dropped.
    * The router itself answers nothing on the public address (tcp/udp to it is dropped
      silently, like most NATs), and forward has policy drop for inbound that is neither an
      answer (``ct state established,related``) nor DNATed (``ct status dnat``).
    """
    p = public_ip
    if flavour is Flavour.NONE:
        return ""
    if flavour is Flavour.FIREWALL:
        return f"""\
table ip lab {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "{wan}" meta l4proto udp drop comment "unsolicited inbound UDP"
    }}
}}
"""
    udp = flavour is not Flavour.UDP_BLOCKED
    maps = ""
    if udp:
        maps = f"""\
    map ext2int {{
        type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {timeout}s;
    }}
    map int2ext {{
        type ipv4_addr . inet_service : inet_service; flags dynamic,timeout; timeout {timeout}s;
    }}
"""
    if flavour is Flavour.RESTRICTED_CONE:
        maps += f"""\
    set peers {{
        type ipv4_addr . inet_service; flags dynamic,timeout; timeout {timeout}s;
    }}
"""
    dnat = "dnat ip to udp dport map @ext2int"
    pre: list[str] = []
    if flavour is Flavour.FULL_CONE:
        pre.append(f'iifname "{wan}" ip daddr {p} udp dport @ext2int {dnat}')
    elif flavour is Flavour.RESTRICTED_CONE:
        pre.append(f'iifname "{wan}" ip daddr {p} ip saddr . udp dport @peers {dnat}')
    if hairpin and udp:
        pre.append(f'iifname "{lan}" ip daddr {p} udp dport @ext2int {dnat}')

    def eim(match: str) -> list[str]:
        return [
            f"{match} ip saddr . udp sport @int2ext snat ip to {p} : ip saddr . udp sport "
            "map @int2ext",
            f"{match} udp sport @ext2int snat ip to {p} random",
        ]

    post: list[str] = []
    if hairpin and udp:
        match = f'iifname "{lan}" oifname "{lan}" ct status dnat'
        if flavour in _EIM_CONES:
            post += eim(match)
        fully = " fully-random" if flavour is Flavour.SYMMETRIC else ""
        post.append(f"{match} meta l4proto udp snat ip to {p}{fully}")
    if flavour in _EIM_CONES:
        post += eim(f'oifname "{wan}"')
    if flavour is Flavour.SYMMETRIC:
        post.append(f'oifname "{wan}" meta l4proto udp masquerade fully-random')
    post.append(f'oifname "{wan}" masquerade')

    learn: list[str] = []
    if udp:
        for direction, status in (("original", "snat"), ("reply", "dnat")):
            internal = f"ct {direction} ip saddr . ct {direction} proto-src"
            match = f"ct direction {direction} ct status {status} meta l4proto udp"
            learn.append(f"{match} update @ext2int {{ udp sport : {internal} }}")
            learn.append(f"{match} update @int2ext {{ {internal} : udp sport }}")
    if flavour is Flavour.RESTRICTED_CONE:
        learn.append(f'oifname "{wan}" meta l4proto udp update @peers {{ ip daddr . udp sport }}')

    forward = ["meta l4proto udp drop"] if not udp else []
    forward += ["ct state established,related accept", f'iifname "{lan}" accept']
    forward.append("ct status dnat accept")

    def chain(name: str, spec: str, rules: list[str]) -> str:
        body = "".join(f"        {rule}\n" for rule in rules)
        return f"    chain {name} {{\n        {spec}\n{body}    }}\n"

    text = "table ip lab {\n" + maps
    if pre:
        text += chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", pre)
    text += chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;", post)
    if learn:
        spec = "type filter hook postrouting priority srcnat + 10; policy accept;"
        text += chain("learn", spec, learn)
    text += chain("forward", "type filter hook forward priority filter; policy drop;", forward)
    input_rules = [f"ip daddr {p} meta l4proto {{ tcp, udp }} drop"]
    text += chain("input", "type filter hook input priority filter; policy accept;", input_rules)
    return text + "}\n"


# --- running commands -----------------------------------------------------------------------------


def run_cmd(
    argv: Sequence[str],
    *,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion (bounded by ``timeout``); LabError if ``check`` and it fails."""
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: no exit within {timeout} s") from exc
    except OSError as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if check and result.returncode != 0:
        message = f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
        if result.stdout.strip():
            message += f"\nstdout: {result.stdout.strip()}"
        raise LabError(message)
    return result


_libc: Any = None


def setns(path: str) -> None:
    """Move the *calling thread* into the network namespace at ``path`` (setns(2))."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def kill_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc``'s process group (it was started in its own session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_TIMEOUT)


# --- namespaces -----------------------------------------------------------------------------------


class Namespace:
    """One network namespace of a lab (``ip netns`` name :attr:`name`)."""

    def __init__(self, lab: Lab, name: str, role: str) -> None:
        self.lab = lab
        self.name = name
        self.role = role

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    @property
    def shell(self) -> str:
        """The command that opens a shell in this namespace (for debugging)."""
        return f"ip netns exec {self.name} bash"

    def _create(self, *, forwarding: bool) -> None:
        run_cmd(["ip", "netns", "add", self.name])
        self.lab._namespaces.append(self)
        settings = {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        if forwarding:
            settings["net.ipv4.ip_forward"] = "1"
            settings["net.ipv4.conf.all.send_redirects"] = "0"
            settings["net.ipv4.conf.default.send_redirects"] = "0"
            # With br_netfilter loaded, bridged frames would cross the IP hooks: keep the
            # bridges plain switches (these files exist only when the module is loaded).
            for family in ("iptables", "ip6tables", "arptables"):
                settings[f"net.bridge.bridge-nf-call-{family}"] = "0"
        self.call(_write_sysctls, settings)
        self.ip("link", "set", "lo", "up")

    # --- commands ---

    def ip(self, *args: str) -> str:
        """``ip -n NAME ARGS``; its stdout."""
        return run_cmd(["ip", "-n", self.name, *args]).stdout

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = CMD_TIMEOUT,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this namespace to completion (bounded by ``timeout``)."""
        return run_cmd(self.exec_argv(argv), timeout=timeout, check=check, input=input)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` in this namespace, in its own session; killed when the lab closes.

        Defaults: no stdin, stdout/stderr piped, text mode (override with ``kwargs``).
        """
        options: dict[str, Any] = {
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "text": True,
            "start_new_session": True,
        }
        options.update(kwargs)
        proc: subprocess.Popen[str] = subprocess.Popen(self.exec_argv(argv), **options)
        self.lab._procs.append(proc)
        return proc

    def python(
        self, code: str, *args: str, timeout: float = CMD_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``python -c CODE ARGS`` (this interpreter, so the venv's packages) in the namespace."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, check=check)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in a new thread of this process that joined the namespace;
        its result or exception. Bounded by :data:`CMD_TIMEOUT`."""
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                setns(self.path)
                result.append(fn(*args, **kwargs))
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=target, name=f"netns {self.name}", daemon=True)
        thread.start()
        thread.join(CMD_TIMEOUT)
        if thread.is_alive():
            raise LabError(f"{fn!r} in {self.name} did not return within {CMD_TIMEOUT} s")
        if error:
            raise error[0]
        return result[0]

    def start_thread(
        self, fn: Callable[P, object], *args: P.args, **kwargs: P.kwargs
    ) -> threading.Thread:
        """Start a daemon thread that joins the namespace and runs ``fn`` (e.g. an event loop
        whose sockets must live here). The caller stops and joins it."""

        def target() -> None:
            setns(self.path)
            fn(*args, **kwargs)

        thread = threading.Thread(target=target, name=f"netns {self.name}", daemon=True)
        thread.start()
        return thread

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into the namespace for the ``with`` block, then back."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(self.path)
            try:
                yield
            finally:
                if _libc.setns(original, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the original namespace")
        finally:
            os.close(original)

    # --- sockets ---

    def new_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
    ) -> socket.socket:
        """A socket created in this namespace (closed when the lab closes, if not before)."""
        sock = self.call(socket.socket, family, kind)
        self.lab._sockets.append(sock)
        return sock

    def udp_socket(self, host: str = "0.0.0.0", port: int = 0) -> socket.socket:
        """A UDP socket of this namespace bound to ``host:port`` (0: any port)."""
        sock = self.new_socket()
        sock.bind((host, port))
        return sock

    def tcp_connect(self, addr: tuple[str, int], timeout: float = 3.0) -> socket.socket:
        """A TCP connection from this namespace to ``addr``."""
        sock = self.new_socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(addr)
        return sock

    # --- state ---

    def sysctl(self, key: str) -> str:
        """The value of ``key`` (dotted) in this namespace."""
        return self.call(_read_sysctl, key)

    def set_sysctl(self, key: str, value: str) -> None:
        self.call(_write_sysctls, {key: value}, strict=True)

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one (``ip netns pids``)."""
        out = run_cmd(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(word) for word in out.split() if word.isdigit()]

    def addresses(self) -> list[str]:
        """IPv4 addresses with prefix, e.g. ``["10.0.1.10/24"]`` (loopback excluded)."""
        out = self.ip("-4", "-o", "addr", "show")
        return [
            m.group(1) for m in re.finditer(r"inet (\S+)", out) if not m.group(1).startswith("127.")
        ]


def _write_sysctls(settings: dict[str, str], strict: bool = False) -> None:
    for key, value in settings.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        if not strict and not path.exists():
            continue
        path.write_text(value)


def _read_sysctl(key: str) -> str:
    return (Path("/proc/sys") / key.replace(".", "/")).read_text().strip()


class Host(Namespace):
    """A host namespace: a LAN host (``eth0``, default route via its router) or a public host."""

    def __init__(self, lab: Lab, name: str, role: str, ip: str, lan: Lan | None) -> None:
        super().__init__(lab, name, role)
        self.ip_address = ip
        self.lan = lan


class Router(Namespace):
    """The router of a LAN: ``wan0`` on the WAN bridge, bridge ``lan0`` for its hosts, and the
    nftables table ``ip lab`` of its flavour."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        role: str,
        *,
        flavour: Flavour,
        public_ip: str,
        lan_ip: str,
        hairpin: bool,
        udp_timeout: int | None,
    ) -> None:
        super().__init__(lab, name, role)
        self.flavour = flavour
        self.public_ip = public_ip
        self.lan_ip = lan_ip
        self.hairpin = hairpin
        self.udp_timeout = udp_timeout

    def ruleset(self) -> str:
        """The nftables ruleset this router runs (see :func:`nat_ruleset`)."""
        timeout = self.udp_timeout or DEFAULT_MAPPING_TIMEOUT
        return nat_ruleset(self.flavour, self.public_ip, hairpin=self.hairpin, timeout=timeout)

    def apply(self) -> None:
        """(Re)load the ruleset atomically; this also empties the mapping maps and sets."""
        text = "table ip lab {}\ndelete table ip lab\n" + self.ruleset()
        self.run(["nft", "-f", "-"], input=text)
        if self.udp_timeout is not None and self.flavour is not Flavour.NONE:
            # Per-namespace conntrack timeouts; the files appear once nf_conntrack is loaded,
            # which the ruleset's ct expressions make sure of (FIREWALL and the NATs).
            for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
                self.set_sysctl(f"net.netfilter.{key}", str(self.udp_timeout))

    def set_hairpin(self, on: bool) -> None:
        """Switch hairpinning; reloads the ruleset (and so forgets the mappings, see reset)."""
        self.hairpin = on
        self.reset()

    def reset(self) -> None:
        """Forget every mapping: reload the ruleset and flush the conntrack table."""
        self.apply()
        if self.flavour is not Flavour.NONE:
            self.run(["conntrack", "-F"], check=False)

    def conntrack(self) -> str:
        """``conntrack -L`` of this router (for debugging)."""
        return self.run(["conntrack", "-L"], check=False).stdout

    def nft_list(self) -> str:
        """``nft list ruleset`` of this router, with the current map and set contents."""
        return self.run(["nft", "list", "ruleset"]).stdout


@dataclass(eq=False)
class Lan:
    """A LAN: its router and hosts. ``subnet`` is private for NATs, public (192.0.2.x/27) for
    the NONE and FIREWALL flavours."""

    lab: Lab
    index: int
    router: Router
    subnet: str
    gateway: str
    hosts: list[Host]

    @property
    def flavour(self) -> Flavour:
        return self.router.flavour

    @property
    def public_ip(self) -> str:
        """The router's WAN address (the NAT's external address for NAT flavours)."""
        return self.router.public_ip

    def add_host(self) -> Host:
        return self.lab._add_lan_host(self)


# --- the lab --------------------------------------------------------------------------------------

_open_labs: set[Lab] = set()


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        with contextlib.suppress(Exception):
            lab.close()


class Lab:
    """The lab: a WAN namespace plus LANs added with :meth:`add_lan`. Use as a context manager
    (or call :meth:`close`); closing kills every process in the lab's namespaces and deletes
    them, whatever happened before."""

    def __init__(self, server_ips: Sequence[str] = SERVER_IPS) -> None:
        self.token = secrets.token_hex(3)
        self.prefix = f"{PREFIX}-{os.getpid()}-{self.token}"
        self.server_ips = tuple(server_ips)
        self.lans: list[Lan] = []
        self.public_hosts: list[Host] = []
        self._namespaces: list[Namespace] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._sockets: list[socket.socket] = []
        self._servers: list[LabServer] = []
        self._public_lans = 0
        self._open = False
        self.wan = Namespace(self, f"{self.prefix}-wan", "wan")

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} lans={len(self.lans)}>"

    # --- building ---

    def open(self) -> Lab:
        """Create the WAN namespace. Deletes stale namespaces of dead labs first."""
        cleanup_stale()
        self._open = True
        _open_labs.add(self)
        try:
            self.wan._create(forwarding=True)
            self.wan.ip("link", "add", "wan", "type", "bridge")
            self.wan.ip("addr", "add", f"{WAN_GATEWAY}/24", "dev", "wan")
            for ip in self.server_ips:
                self.wan.ip("addr", "add", f"{ip}/24", "dev", "wan")
            self.wan.ip("link", "set", "wan", "up")
        except BaseException:
            self.close()
            raise
        return self

    def add_lan(
        self,
        flavour: Flavour,
        hosts: int = 1,
        *,
        hairpin: bool = False,
        udp_timeout: int | None = None,
    ) -> Lan:
        """A router of ``flavour`` with ``hosts`` hosts behind it.

        ``hairpin`` turns hairpinning on (NAT flavours); ``udp_timeout`` (s) shortens the UDP
        mapping lifetime: the conntrack UDP timeouts of the router (per namespace) and the
        lifetime of its mapping/filtering set elements.
        """
        index = len(self.lans) + 1
        if index > 200:
            raise LabError("at most 200 LANs")
        public_ip = f"{WAN_PREFIX}.{10 + index}"
        if flavour.nat:
            subnet, gateway = f"10.0.{index}.0/24", f"10.0.{index}.1"
        else:
            if self._public_lans >= 8:
                raise LabError("at most 8 LANs without NAT (192.0.2.0/24 in /27 blocks)")
            base = 32 * self._public_lans
            self._public_lans += 1
            subnet, gateway = f"{PUBLIC_LAN_BLOCKS}.{base}/27", f"{PUBLIC_LAN_BLOCKS}.{base + 1}"
        router = Router(
            self,
            f"{self.prefix}-r{index}",
            f"router {index}",
            flavour=flavour,
            public_ip=public_ip,
            lan_ip=gateway,
            hairpin=hairpin,
            udp_timeout=udp_timeout,
        )
        router._create(forwarding=True)
        # The veth pair is created straight into the two namespaces: the root namespace never
        # sees it.
        router.ip(*f"link add {WAN_IF} type veth peer name r{index} netns {self.wan.name}".split())
        self.wan.ip("link", "set", f"r{index}", "master", "wan", "up")
        router.ip("addr", "add", f"{public_ip}/24", "dev", WAN_IF)
        router.ip("link", "set", WAN_IF, "up")
        router.ip("route", "add", "default", "via", WAN_GATEWAY)
        router.ip("link", "add", LAN_IF, "type", "bridge")
        prefix_len = subnet.split("/")[1]
        router.ip("addr", "add", f"{gateway}/{prefix_len}", "dev", LAN_IF)
        router.ip("link", "set", LAN_IF, "up")
        if not flavour.nat:
            self.wan.ip("route", "add", subnet, "via", public_ip)
        router.apply()
        lan = Lan(self, index, router, subnet, gateway, [])
        self.lans.append(lan)
        for _ in range(hosts):
            self._add_lan_host(lan)
        return lan

    def _add_lan_host(self, lan: Lan) -> Host:
        i = len(lan.hosts)
        net = lan.subnet.split("/")[0].rsplit(".", 1)[0]
        base = int(lan.subnet.split("/")[0].rsplit(".", 1)[1])
        limit = 244 if lan.flavour.nat else 20
        if i >= limit:
            raise LabError(f"at most {limit} hosts in {lan.subnet}")
        ip = f"{net}.{base + 10 + i}"
        prefix_len = lan.subnet.split("/")[1]
        host = Host(
            self, f"{self.prefix}-l{lan.index}h{i}", f"host {i} of LAN {lan.index}", ip, lan
        )
        host._create(forwarding=False)
        lan.router.ip(
            "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", host.name
        )
        lan.router.ip("link", "set", f"h{i}", "master", LAN_IF, "up")
        host.ip("addr", "add", f"{ip}/{prefix_len}", "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        host.ip("route", "add", "default", "via", lan.gateway)
        lan.hosts.append(host)
        return host

    def add_public_host(self) -> Host:
        """A host on the WAN bridge with its own public address 203.0.113.(100+K)."""
        k = len(self.public_hosts) + 1
        if k > 100:
            raise LabError("at most 100 public hosts")
        ip = f"{self.server_ips[0].rsplit('.', 1)[0]}.{100 + k}"
        host = Host(self, f"{self.prefix}-pub{k}", f"public host {k}", ip, None)
        host._create(forwarding=False)
        self.wan.ip(
            "link", "add", f"p{k}", "type", "veth", "peer", "name", "eth0", "netns", host.name
        )
        self.wan.ip("link", "set", f"p{k}", "master", "wan", "up")
        host.ip("addr", "add", f"{ip}/24", "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        host.ip("route", "add", "default", "via", self.server_ips[0])
        self.public_hosts.append(host)
        return host

    # --- servers ---

    def start_stunturn(self, *args: str, rfc5780: bool = True, turn: bool = False) -> LabServer:
        """``stunturn serve`` in the WAN namespace on 203.0.113.1:3478 (with ``rfc5780``, also
        ``--alt-address 203.0.113.2``: 2 IPs x ports 3478/3479), one worker; ``args`` are
        appended. Waits until it listens.

        Without ``turn``: ``--no-turn``. With it: TURN for user :data:`TURN_USER` /
        :data:`TURN_PASSWORD`, relaying from 203.0.113.1 to peers in :data:`PUBLIC_RANGES`
        (the lab's Internet; LAN-private addresses stay refused, as on a public server)."""
        argv = ["--listen", f"{self.server_ips[0]}:{STUN_PORT}", "--workers", "1"]
        if rfc5780:
            argv += ["--alt-address", self.server_ips[1]]
        if turn:
            argv += ["--user", f"{TURN_USER}:{TURN_PASSWORD}"]
            for cidr in PUBLIC_RANGES:
                argv += ["--allow-peer", cidr]
        else:
            argv.append("--no-turn")
        server = LabServer(self.wan, [*argv, *args])
        self._servers.append(server)
        return server.wait_ready()

    # --- description ---

    @property
    def namespaces(self) -> list[str]:
        return [ns.name for ns in self._namespaces]

    def describe(self) -> str:
        """A text picture of the lab (names, addresses, flavours) for logs and debugging."""
        lines = [
            f"lab {self.prefix}",
            f"  {self.wan.name}: gateway {WAN_GATEWAY}, servers {', '.join(self.server_ips)}",
        ]
        for lan in self.lans:
            r = lan.router
            extra = (" hairpin" if r.hairpin else "") + (
                f" udp-timeout={r.udp_timeout}s" if r.udp_timeout else ""
            )
            lines.append(
                f"  {r.name}: {lan.flavour.value}{extra}, wan0 {r.public_ip}, lan0 {lan.gateway} "
                f"({lan.subnet})"
            )
            lines += [f"    {h.name}: {h.ip_address}" for h in lan.hosts]
        lines += [f"  {h.name}: {h.ip_address} (public)" for h in self.public_hosts]
        return "\n".join(lines)

    # --- cleaning up ---

    def close(self) -> None:
        """Close sockets, kill every process of the lab, delete its namespaces. Idempotent."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()
        for server in self._servers:
            server.close()
        self._servers.clear()
        for proc in self._procs:
            kill_process_group(proc)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        errors: list[str] = []
        for ns in reversed(self._namespaces):
            try:
                delete_namespace(ns.name)
            except LabError as exc:
                errors.append(str(exc))
        self._namespaces.clear()
        self._open = False
        _open_labs.discard(self)
        if errors:
            raise LabError("lab cleanup: " + "; ".join(errors))

    def __enter__(self) -> Lab:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def kill_namespace_processes(name: str) -> None:
    """SIGKILL every process in namespace ``name`` (never this process) and wait for them."""
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        out = run_cmd(["ip", "netns", "pids", name], check=False).stdout
        pids = [int(w) for w in out.split() if w.isdigit() and int(w) != os.getpid()]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise LabError(f"processes {pids} in {name} survive SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def delete_namespace(name: str) -> None:
    """Kill the processes of namespace ``name``, then ``ip netns del`` it (if it exists)."""
    if not (NETNS_DIR / name).exists():
        return
    kill_namespace_processes(name)
    run_cmd(["ip", "netns", "del", name])


def cleanup_stale() -> list[str]:
    """Delete the lab namespaces whose creating process is gone (a run killed by SIGKILL).
    Returns their names."""
    if not NETNS_DIR.is_dir():
        return []
    stale: list[str] = []
    for entry in sorted(NETNS_DIR.iterdir()):
        match = re.match(rf"^{PREFIX}-(\d+)-[0-9a-f]+-", entry.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            stale.append(entry.name)
        except PermissionError:
            continue
    for name in stale:
        with contextlib.suppress(LabError):
            delete_namespace(name)
    return stale


# --- the STUN server in the WAN -------------------------------------------------------------------


class LabServer:
    """``stunturn serve`` running in a lab namespace (see :meth:`Lab.start_stunturn`)."""

    def __init__(self, ns: Namespace, args: Sequence[str]) -> None:
        self.ns = ns
        self.args = list(args)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = ns.popen([sys.executable, "-m", "stunturn_cli", "serve", *self.args], env=env)
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: Any) -> None:
        if stream is None:
            return
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                with self._cond:
                    self._lines.append(line.rstrip("\n"))
                    self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    @property
    def listeners(self) -> list[str]:
        """The "listening on ..." lines, e.g. ``udp 203.0.113.1:3478``."""
        with self._cond:
            return [
                ln[len("listening on ") :] for ln in self._lines if ln.startswith("listening on ")
            ]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> LabServer:
        """Wait for the "listening on" lines (all printed and flushed together)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(ln.startswith("listening on ") for ln in self._lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    output = "\n".join(self._lines)
                    raise LabError(
                        f"stunturn serve {' '.join(self.args)} in {self.ns.name} is not ready "
                        f"(exit code {self.proc.poll()}):\n{output}"
                    )
                self._cond.wait(min(remaining, 0.1))
        time.sleep(0.2)  # the rest of the block of lines, should the pipe have split it
        return self

    def close(self) -> None:
        kill_process_group(self.proc)
        for thread in self._threads:
            thread.join(KILL_TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --- availability ---------------------------------------------------------------------------------

_unavailable: str | None = None
_checked = False


def lab_unavailable() -> str | None:
    """Why no lab can be built here (None if it can). Checked once per process."""
    global _unavailable, _checked
    if not _checked:
        _unavailable = _probe()
        _checked = True
    return _unavailable


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns add, nft)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (apt install {package})"
    name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        run_cmd(["ip", "netns", "add", name])
    except LabError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        run_cmd(
            ["ip", "-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"]
        )
        run_cmd(["ip", "-n", name, "link", "add", "probebr", "type", "bridge"])
        run_cmd(
            ["ip", "netns", "exec", name, "nft", "-f", "-"],
            input=nat_ruleset(Flavour.RESTRICTED_CONE, "192.0.2.1", hairpin=True),
        )
    except LabError as exc:
        return f"cannot build the NAT lab here: {exc}"
    finally:
        with contextlib.suppress(LabError):
            delete_namespace(name)
    return None


def require_lab() -> None:
    """Skip the calling test (with the reason) where the NAT lab cannot be built."""
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def lab_session(server_ips: Sequence[str] = SERVER_IPS) -> Iterator[Lab]:
    """``require_lab()`` (skip if impossible), then a :class:`Lab` that is closed at the end
    whatever happens: ``with lab_session() as lab: ...; yield lab`` in a fixture (see
    tests/test_lab.py and README.md)."""
    require_lab()
    with Lab(server_ips) as lab:
        yield lab


@contextlib.contextmanager
def loopback_namespace(role: str = "lo") -> Iterator[Namespace]:
    """``require_lab()`` (skip if impossible), then one bare namespace ``stlab-PID-TOKEN-ROLE``
    with nothing but ``lo`` up (127.0.0.1/8): no other interface, no route, IPv6 disabled as in
    every lab namespace, so nothing started in it can send a packet anywhere but loopback.

    It is a :class:`Namespace` of a :class:`Lab` that has no WAN (never opened): ``popen``,
    ``start_thread``, ``call``, ``new_socket`` ... work as usual, and at the end, whatever
    happened, every process started with ``popen`` (its process group) and every other process
    still in the namespace is killed, its sockets are closed and the namespace is deleted.
    Stale namespaces of dead runs are deleted first, as :meth:`Lab.open` does."""
    require_lab()
    lab = Lab()
    cleanup_stale()
    lab._open = True
    _open_labs.add(lab)
    try:
        ns = Namespace(lab, f"{lab.prefix}-{role}", role)
        ns._create(forwarding=False)
        yield ns
    finally:
        lab.close()


# --- small UDP helpers for tests ------------------------------------------------------------------


def recv_from(sock: socket.socket, timeout: float) -> tuple[bytes, tuple[str, int]] | None:
    """One datagram (data, source) within ``timeout`` seconds, or None."""
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return None
    data, src = sock.recvfrom(65536)
    return data, (src[0], src[1])


def drain(sock: socket.socket) -> None:
    """Discard whatever is queued on ``sock``."""
    while recv_from(sock, 0) is not None:
        pass


def local_addr(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return name[0], name[1]


# --- a lab to poke at by hand -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``cd tests && python -m lab.netlab -f symmetric -f full-cone``: build a lab, print its
    namespaces and how to enter them, keep it until Ctrl-C or ``--hold`` seconds, clean up."""

    parser = argparse.ArgumentParser(prog="python -m lab.netlab", description=main.__doc__)
    choices = [f.value for f in Flavour]
    parser.add_argument(
        "-f",
        "--flavour",
        action="append",
        choices=choices,
        metavar="FLAVOUR",
        help=f"a LAN of this flavour (repeatable): {', '.join(choices)}",
    )
    parser.add_argument("--hosts", type=int, default=2, help="hosts per LAN (default 2)")
    parser.add_argument("--hairpin", action="store_true", help="hairpinning on")
    parser.add_argument("--udp-timeout", type=int, metavar="S", help="short UDP mapping lifetime")
    parser.add_argument("--no-server", action="store_true", help="no stunturn in the WAN")
    parser.add_argument(
        "--turn",
        action="store_true",
        help=f"the server serves TURN too (user {TURN_USER}, password {TURN_PASSWORD})",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=1800.0,
        metavar="S",
        help="delete the lab after this many seconds (default 1800)",
    )
    args = parser.parse_args(argv)
    reason = lab_unavailable()
    if reason is not None:
        print(f"no lab: {reason}", file=sys.stderr)
        return 1
    with Lab() as lab:
        for value in args.flavour or [Flavour.PORT_RESTRICTED_CONE.value]:
            lab.add_lan(
                Flavour(value), args.hosts, hairpin=args.hairpin, udp_timeout=args.udp_timeout
            )
        if not args.no_server:
            server = lab.start_stunturn(turn=args.turn)
            print("stunturn serve in the WAN:", ", ".join(server.listeners))
        print(lab.describe())
        print("\nenter a namespace:  ip netns exec NAME bash")
        print(
            f"e.g.                ip netns exec {lab.lans[0].hosts[0].name} "
            f"turnutils_natdiscovery -m -f {lab.server_ips[0]}"
        )
        print(f"router state:       ip netns exec {lab.lans[0].router.name} nft list ruleset")
        print(f"\nholding for {args.hold:.0f} s; Ctrl-C deletes the lab now", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.hold)
    print("lab deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
