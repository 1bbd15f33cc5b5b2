"""P2P through the NAT lab: two peers on two LANs behind two real NATs, our STUN/TURN server
on the WAN, every pair of NAT flavours.

Used by ``tests/test_p2p_lab.py`` and ``bench/p2p_matrix.py``. The layout::

    WAN: stunturn serve --listen 203.0.113.1:3478 (STUN + TURN, user lab, peers allowed in the
         lab's public ranges) ... one LAN per peer, so every flavour pair has its own two NATs:

    pair (A, B) ---- router A (flavour A) -- host A  runs  python -m lab.p2p_peer offer
                \\--- router B (flavour B) -- host B  runs  python -m lab.p2p_peer answer

Pairs share nothing but the WAN and the server, so they all run at once. Each peer is a real
process (``ip netns exec HOST python -m lab.p2p_peer``) that calls :func:`stunturn.p2p.connect`
with trickle signaling through files, and reports the selected path and monotonic timestamps
(see p2p_peer.py). :func:`run_pairs` starts them, collects both reports and derives a
:class:`PairResult`: connected or not, direct or relayed, candidate types, time to connect or to
fail, counted from the moment both peers are running.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netlab import (
    SERVER_IPS,
    STUN_PORT,
    TURN_PASSWORD,
    TURN_USER,
    Flavour,
    Host,
    Lab,
    LabError,
    LabServer,
    kill_process_group,
)

TESTS_DIR = Path(__file__).resolve().parent.parent

NAT_FLAVOURS = (
    Flavour.NONE,
    Flavour.FULL_CONE,
    Flavour.RESTRICTED_CONE,
    Flavour.PORT_RESTRICTED_CONE,
    Flavour.SYMMETRIC,
)
"""The five flavours of the acceptance matrix (no NAT and the four classic NAT types)."""

FlavourPair = tuple[Flavour, Flavour]
PAIRS: list[FlavourPair] = list(itertools.combinations_with_replacement(NAT_FLAVOURS, 2))
"""The 15 unordered pairs; the first flavour is the offerer's (controlling)."""

SHORT = {
    Flavour.NONE: "none",
    Flavour.FIREWALL: "firewall",
    Flavour.FULL_CONE: "full",
    Flavour.RESTRICTED_CONE: "restricted",
    Flavour.PORT_RESTRICTED_CONE: "port-restricted",
    Flavour.SYMMETRIC: "symmetric",
    Flavour.MASQUERADE: "masquerade",
    Flavour.UDP_BLOCKED: "udp-blocked",
}

STUN_SERVER = f"{SERVER_IPS[0]}:{STUN_PORT}"
TURN_URL = f"turn:{SERVER_IPS[0]}:{STUN_PORT}?transport=udp"

PEER_TIMEOUT = 30.0
"""Upper bound for one peer process (signaling, ICE, data exchange)."""
FAILURE_TIMEOUT = 10.0
"""ICE's own failure timeout (the agent's default), passed explicitly."""


def pair_id(pair: FlavourPair) -> str:
    return f"{SHORT[pair[0]]}/{SHORT[pair[1]]}"


def direct_path_exists(a: Flavour, b: Flavour) -> bool:
    """Whether UDP hole punching can work between flavours ``a`` and ``b``.

    A symmetric NAT uses a fresh external port towards the peer, which the peer learns only as
    a peer-reflexive candidate when the first check arrives. The peer's NAT must let that check
    in from a port it has never sent to: no NAT, full cone (EIF) and restricted cone (ADF) do;
    port-restricted cone and symmetric (APDF) do not, so those two pairs need the relay.
    """
    if Flavour.SYMMETRIC in (a, b):
        other = b if a is Flavour.SYMMETRIC else a
        return other in (Flavour.NONE, Flavour.FULL_CONE, Flavour.RESTRICTED_CONE)
    return True


# --- reports ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerReport:
    """One peer's JSON report (see p2p_peer.py), plus its exit code and stderr."""

    role: str
    raw: dict[str, Any]
    returncode: int | None
    stderr: str
    log: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.raw.get("ok"))

    @property
    def started(self) -> float | None:
        value = self.raw.get("started")
        return float(value) if value is not None else None

    @property
    def connected(self) -> float | None:
        value = self.raw.get("connected")
        return float(value) if value is not None else None

    @property
    def failed(self) -> float | None:
        value = self.raw.get("failed")
        return float(value) if value is not None else None

    @property
    def path(self) -> dict[str, Any] | None:
        path = self.raw.get("path")
        return path if isinstance(path, dict) else None

    @property
    def local_type(self) -> str | None:
        return self.path["local"]["type"] if self.path else None

    @property
    def remote_type(self) -> str | None:
        return self.path["remote"]["type"] if self.path else None

    @property
    def error(self) -> str | None:
        value = self.raw.get("error")
        return str(value) if value is not None else None

    def describe(self) -> str:
        if self.path:
            loc, rem = self.path["local"], self.path["remote"]
            return (
                f"{self.role}: {loc['type']} {loc['address'][0]}:{loc['address'][1]} -> "
                f"{rem['type']} {rem['address'][0]}:{rem['address'][1]}"
            )
        return f"{self.role}: no path ({self.error}; exit {self.returncode})"


@dataclass(slots=True)
class PairResult:
    """The outcome of one flavour pair: both reports and what they mean together."""

    pair: FlavourPair
    turn: bool
    offer: PeerReport
    answer: PeerReport
    workdir: Path
    hosts: tuple[str, str] = ("", "")

    @property
    def connected(self) -> bool:
        return self.offer.ok and self.answer.ok

    @property
    def failed(self) -> bool:
        """Both sides gave up."""
        return not self.offer.ok and not self.answer.ok

    @property
    def relayed(self) -> bool | None:
        if not self.connected:
            return None
        assert self.offer.path is not None
        return bool(self.offer.path["kind"] == "relayed")

    @property
    def kind(self) -> str:
        if not self.connected:
            return "failed" if self.failed else "half-connected"
        return "relayed" if self.relayed else "direct"

    @property
    def types(self) -> str:
        """Candidate types of the selected pair seen by the offerer: ``srflx -> prflx``."""
        if self.offer.path is None:
            return "-"
        return f"{self.offer.local_type} -> {self.offer.remote_type}"

    @property
    def consistent(self) -> bool:
        """Both ends selected the same pair (each one's remote is the other's local).

        One exception, from the kernel and not the agents: when both peers' first checks cross
        in a NAT, Linux conntrack may find the endpoint-independent mapping taken by the
        inbound check's entry and give the outbound flow a second port. The side whose own
        check went out through that port learns it as a peer-reflexive local candidate and
        reports it, while the other side reached it through the first port. Same public IP,
        same base and remote: the same pair, seen through two mappings of one NAT.
        """
        a, b = self.offer.path, self.answer.path
        if a is None or b is None:
            return False

        def same(local: dict[str, Any], seen: dict[str, Any]) -> bool:
            return bool(
                local["address"] == seen["address"]
                or (local["type"] == "prflx" and local["address"][0] == seen["address"][0])
            )

        return same(a["local"], b["remote"]) and same(b["local"], a["remote"])

    @property
    def both_running(self) -> float | None:
        """When both peers were running (their hellos written): the clock starts here."""
        starts = [self.offer.started, self.answer.started]
        return max(s for s in starts if s is not None) if None not in starts else None

    @property
    def time_to_connect(self) -> float | None:
        """Seconds from :attr:`both_running` until both sides were connected."""
        t0 = self.both_running
        ends = [self.offer.connected, self.answer.connected]
        if t0 is None or None in ends:
            return None
        return max(e for e in ends if e is not None) - t0

    @property
    def time_to_failure(self) -> float | None:
        """Seconds from :attr:`both_running` until both sides had given up."""
        t0 = self.both_running
        ends = [self.offer.failed, self.answer.failed]
        if t0 is None or None in ends:
            return None
        return max(e for e in ends if e is not None) - t0

    @property
    def data_ok(self) -> bool:
        """Every test datagram arrived and was acknowledged, both ways."""
        for report in (self.offer, self.answer):
            data = report.raw.get("data")
            if not data or not data["sent"] or data["received"] != data["sent"]:
                return False
            if data["acked"] != data["sent"]:
                return False
        return True

    def describe(self) -> str:
        """Everything needed to understand a failure, for assertion messages."""
        lines = [
            f"{pair_id(self.pair)} turn={'on' if self.turn else 'off'}: {self.kind}, "
            f"ttc={self.time_to_connect}, ttf={self.time_to_failure}, hosts {self.hosts}",
            "  " + self.offer.describe(),
            "  " + self.answer.describe(),
        ]
        for report in (self.offer, self.answer):
            lines.append(f"  {report.role} report: {json.dumps(report.raw)[:3000]}")
            if report.stderr.strip():
                lines.append(f"  {report.role} stderr: {report.stderr.strip()[-2000:]}")
            log = [ln for ln in report.log.splitlines() if " asyncio " not in ln]
            if log:
                lines.append(f"  {report.role} log (last {min(len(log), 30)} lines):")
                lines += [f"    {ln}" for ln in log[-30:]]
        lines.append(f"  files in {self.workdir} (deleted at the end unless kept)")
        return "\n".join(lines)


# --- the lab -------------------------------------------------------------------------------------


@dataclass(slots=True)
class P2PLab:
    """A lab with our STUN/TURN server and, per flavour pair, two LANs with one host each;
    plus, per flavour, a LAN with two hosts for the same-NAT case."""

    lab: Lab
    server: LabServer
    pairs: dict[FlavourPair, tuple[Host, Host]] = field(default_factory=dict)
    same_nat: dict[Flavour, tuple[Host, Host]] = field(default_factory=dict)

    def reset_nats(self) -> None:
        """Forget every NAT mapping and flow (between runs that must not see each other)."""
        for lan in self.lab.lans:
            lan.router.reset()


def build_p2p_lab(
    lab: Lab,
    pairs: Sequence[FlavourPair] = PAIRS,
    same_nat: Sequence[Flavour] = NAT_FLAVOURS,
    server_args: Sequence[str] = (),
) -> P2PLab:
    """Add the LANs to an open ``lab`` and start ``stunturn serve`` with TURN in its WAN
    (``server_args`` appended). Every peer allocates as the same user, all at once: no
    per-user quota (the default of 10 would refuse the 11th allocation with 486)."""
    server = lab.start_stunturn("--user-quota", "0", *server_args, turn=True, rfc5780=False)
    p2p = P2PLab(lab, server)
    for pair in pairs:
        a = lab.add_lan(pair[0], hosts=1).hosts[0]
        b = lab.add_lan(pair[1], hosts=1).hosts[0]
        p2p.pairs[pair] = (a, b)
    for flavour in same_nat:
        hosts = lab.add_lan(flavour, hosts=2).hosts
        p2p.same_nat[flavour] = (hosts[0], hosts[1])
    return p2p


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    """A temporary directory for signaling files and logs (kept if ``keep``)."""
    path = Path(tempfile.mkdtemp(prefix="stunturn-p2p-lab-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def peer_argv(role: str, signal_dir: Path, *, turn: bool, extra: Sequence[str] = ()) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "lab.p2p_peer",
        role,
        "--signal-dir",
        str(signal_dir),
        "--stun",
        STUN_SERVER,
        "--timeout",
        str(PEER_TIMEOUT),
        "--failure-timeout",
        str(FAILURE_TIMEOUT),
        "--log",
        str(signal_dir / f"{role}.log"),
    ]
    if turn:
        argv += ["--turn", TURN_URL, "--turn-user", TURN_USER, "--turn-password", TURN_PASSWORD]
    return [*argv, *extra]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        PYTHONPATH=str(TESTS_DIR) + (os.pathsep + path if path else ""),
        PYTHONUNBUFFERED="1",
    )


@dataclass(slots=True)
class _Running:
    key: Any
    pair: FlavourPair
    turn: bool
    hosts: tuple[Host, Host]
    directory: Path
    procs: tuple[subprocess.Popen[str], subprocess.Popen[str]]
    started: float


def _collect(
    proc: subprocess.Popen[str], role: str, directory: Path, deadline: float
) -> PeerReport:
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        out, err = proc.communicate()
        err += f"\n(killed: no exit within {PEER_TIMEOUT + 10:g} s)"
    raw: dict[str, Any] = {}
    for line in reversed(out.strip().splitlines()):
        with contextlib.suppress(ValueError):
            raw = json.loads(line)
            break
    log_path = directory / f"{role}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    return PeerReport(role, raw, proc.returncode, err, log)


def run_pairs(
    jobs: Sequence[tuple[Any, FlavourPair, tuple[Host, Host], bool]],
    base: Path,
    *,
    parallel: int = 8,
) -> dict[Any, PairResult]:
    """Run each job ``(key, flavour pair, (offer host, answer host), turn)``: two peer
    processes, at most ``parallel`` pairs at once. Returns ``{key: PairResult}``."""
    results: dict[Any, PairResult] = {}
    queue = list(jobs)
    running: list[_Running] = []
    env = _env()
    hard_deadline = time.monotonic() + (len(jobs) + 1) * (PEER_TIMEOUT + 15)
    while queue or running:
        while queue and len(running) < parallel:
            key, pair, hosts, turn = queue.pop(0)
            base.mkdir(parents=True, exist_ok=True)
            name = f"{pair_id(pair).replace('/', '-')}-{'turn' if turn else 'noturn'}-"
            directory = Path(tempfile.mkdtemp(prefix=name, dir=base))
            procs = (
                hosts[0].popen(peer_argv("offer", directory, turn=turn), env=env),
                hosts[1].popen(peer_argv("answer", directory, turn=turn), env=env),
            )
            running.append(_Running(key, pair, turn, hosts, directory, procs, time.monotonic()))
        if time.monotonic() > hard_deadline:
            raise LabError("P2P runs did not finish in time")
        done = [r for r in running if all(p.poll() is not None for p in r.procs)]
        if not done:
            time.sleep(0.05)
            oldest = running[0]
            # A peer must not outlive its own --timeout by much; collect() kills it then.
            if time.monotonic() - oldest.started < PEER_TIMEOUT + 10:
                continue
            done = [oldest]
        for run in done:
            running.remove(run)
            deadline = run.started + PEER_TIMEOUT + 10
            offer = _collect(run.procs[0], "offer", run.directory, deadline)
            answer = _collect(run.procs[1], "answer", run.directory, deadline)
            results[run.key] = PairResult(
                run.pair,
                run.turn,
                offer,
                answer,
                run.directory,
                (run.hosts[0].name, run.hosts[1].name),
            )
    return results
