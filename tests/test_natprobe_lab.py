"""natprobe through real Linux NATs (the namespace lab of tests/lab/netlab.py).

One lab for the module: a LAN per case below (two hosts each), a port-restricted cone with a
20 s UDP timeout for the lifetime measurement, our ``stunturn serve`` on 203.0.113.1:3478
(``--alt-address 203.0.113.2``) and coturn's ``turnserver`` in RFC 5780 mode on ports 3480/3481
of the same two addresses, all in the WAN namespace. For every case natprobe must find the
flavour's designed behaviour; coturn's ``turnutils_natdiscovery -m -f`` must agree with it; and
natprobe against coturn's server must give the same verdicts as against ours, so the client is
not tuned to our own server.

Run time: building the lab ~5 s; all verdict runs in parallel ~8 s; the sequential timing run
~25 s; the lifetime run (~43 s) overlaps both. About 50 s in all.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from lab.netlab import SERVER_IPS, Flavour, Host, Lab, Lan, lab_session
from natsim_driver import check_report

pytestmark = pytest.mark.lab

NATPROBE = [sys.executable, "-m", "stunturn_cli.natprobe"]
NATDISCOVERY = shutil.which("turnutils_natdiscovery")
TURNSERVER = shutil.which("turnserver")
OURS = SERVER_IPS[0]
COTURN_PORT = 3480
COTURN = f"{SERVER_IPS[0]}:{COTURN_PORT}"
RUN_TIMEOUT = 40.0
LIFETIME_UDP_TIMEOUT = 20
LIFETIME_MAX = 40
PROBE_TARGET_S = 3.0
"""natprobe's own duration (mapping + filtering + hairpinning + ports) on the lossless lab."""


@dataclass(frozen=True, slots=True)
class Case:
    flavour: Flavour
    hairpin: bool

    @property
    def id(self) -> str:
        if not self.flavour.nat or not self.flavour.behaviour.udp:
            return self.flavour.value
        return f"{self.flavour.value}-{'hairpin' if self.hairpin else 'no-hairpin'}"


CONES_AND_SYMMETRIC = [
    Flavour.FULL_CONE,
    Flavour.RESTRICTED_CONE,
    Flavour.PORT_RESTRICTED_CONE,
    Flavour.SYMMETRIC,
]
CASES = [
    Case(Flavour.NONE, False),
    Case(Flavour.FIREWALL, False),
    *(Case(f, hairpin) for f in CONES_AND_SYMMETRIC for hairpin in (False, True)),
    Case(Flavour.UDP_BLOCKED, False),
]
IDS = [c.id for c in CASES]
NAT_TYPE = {
    Flavour.NONE: "open-internet",
    Flavour.FIREWALL: "symmetric-udp-firewall",
    Flavour.FULL_CONE: "full-cone",
    Flavour.RESTRICTED_CONE: "restricted-cone",
    Flavour.PORT_RESTRICTED_CONE: "port-restricted-cone",
    Flavour.SYMMETRIC: "symmetric",
    Flavour.UDP_BLOCKED: "udp-blocked",
}


def expected(case: Case) -> dict[str, Any]:
    """The verdict natprobe must give behind ``case``, from the flavour's design."""
    behaviour = case.flavour.behaviour
    if not behaviour.udp:
        return {
            "nat_detected": None,
            "mapping": "unknown",
            "filtering": "unknown",
            "nat_type": "udp-blocked",
            "udp_blocked": True,
            "hairpinning": None,
        }
    assert behaviour.mapping is not None and behaviour.filtering is not None
    return {
        "nat_detected": behaviour.nat,
        "mapping": behaviour.mapping.value,
        "filtering": behaviour.filtering.value,
        "nat_type": NAT_TYPE[case.flavour],
        "udp_blocked": False,
        # Without NAT the "hairpin" is plain routing (both sockets are on the host itself).
        "hairpinning": case.hairpin or not behaviour.nat,
    }


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    return {key: report[key] for key in expected(CASES[0])}


@dataclass
class Labs:
    lab: Lab
    lans: dict[Case, Lan]
    lifetime_lan: Lan
    coturn: bool


def _coturn_ready(lab: Lab, timeout: float = 15.0) -> bool:
    """Wait until turnserver listens on both IPs x both ports (UDP)."""
    wanted = {f"{ip}:{port}" for ip in SERVER_IPS for port in (COTURN_PORT, COTURN_PORT + 1)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.wan.run(["ss", "-Hlun"], check=False).stdout
        if wanted <= set(re.findall(r"(\d+\.\d+\.\d+\.\d+:\d+)", out)):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Labs]:
    with lab_session() as lab:
        lans = {case: lab.add_lan(case.flavour, hosts=2, hairpin=case.hairpin) for case in CASES}
        lifetime_lan = lab.add_lan(
            Flavour.PORT_RESTRICTED_CONE, hosts=1, udp_timeout=LIFETIME_UDP_TIMEOUT
        )
        lab.start_stunturn()
        coturn = False
        if TURNSERVER is not None:
            work = tmp_path_factory.mktemp("coturn")
            # -n: ignore /etc/turnserver.conf (Debian's says no-rfc5780). Two -L addresses of
            # one family switch RFC 5780 on; Binding needs no credentials (--no-auth anyway);
            # -S: STUN only.
            argv = [
                TURNSERVER, "-n", "-S", "--no-auth",
                "-L", SERVER_IPS[0], "-L", SERVER_IPS[1],
                "-p", str(COTURN_PORT), "--alt-listening-port", str(COTURN_PORT + 1),
                "--no-tls", "--no-dtls", "--no-cli", "--no-software-attribute",
                "--db", str(work / "turndb"), "--pidfile", str(work / "turnserver.pid"),
                "--log-file", str(work / "turnserver.log"), "--simple-log",
            ]  # fmt: skip
            lab.wan.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            coturn = _coturn_ready(lab)
        yield Labs(lab, lans, lifetime_lan, coturn)


def _json_run(host: Host, *args: str) -> subprocess.Popen[str]:
    return host.popen([*NATPROBE, "--json", *args])


def _collect(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args!r} did not finish within {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


@dataclass
class Runs:
    ours: dict[Case, dict[str, Any]]
    coturn: dict[Case, dict[str, Any]]
    natdiscovery: dict[Case, str]
    lifetime: subprocess.Popen[str]


@pytest.fixture(scope="module")
def runs(labs: Labs) -> Runs:
    """Every verdict run at once (natprobe vs ours and vs coturn on host 0, natdiscovery on
    host 1 of each LAN), plus the long lifetime run started in the background."""
    lifetime_host = labs.lifetime_lan.hosts[0]
    lifetime = lifetime_host.popen([*NATPROBE, "--json", OURS, "--lifetime", str(LIFETIME_MAX)])
    ours = {case: _json_run(lan.hosts[0], OURS) for case, lan in labs.lans.items()}
    coturn = {}
    if labs.coturn:
        coturn = {case: _json_run(lan.hosts[0], COTURN) for case, lan in labs.lans.items()}
    natdiscovery = {}
    if NATDISCOVERY is not None:
        for case, lan in labs.lans.items():
            host = lan.hosts[1]
            argv = [NATDISCOVERY, "-m", "-f", "-L", host.ip_address, OURS]
            natdiscovery[case] = host.popen(argv)

    def reports(procs: dict[Case, subprocess.Popen[str]]) -> dict[Case, dict[str, Any]]:
        out = {}
        for case, proc in procs.items():
            code, stdout, stderr = _collect(proc)
            report = json.loads(stdout)
            report["_exit"] = code
            report["_stderr"] = stderr
            out[case] = report
        return out

    return Runs(
        reports(ours),
        reports(coturn),
        {case: _collect(proc)[1] for case, proc in natdiscovery.items()},
        lifetime,
    )


# --- natprobe vs our server -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_verdict(runs: Runs, labs: Labs, case: Case) -> None:
    """natprobe behind each flavour finds its designed mapping, filtering, classic type,
    hairpinning, NAT presence and UDP blocking; exit 0; a public address on the router (the
    host's own address without NAT)."""
    report = runs.ours[case]
    assert report["_exit"] == 0, report["_stderr"]
    check_report({k: v for k, v in report.items() if not k.startswith("_")})
    assert verdict(report) == expected(case), report["reasons"]
    lan = labs.lans[case]
    public = lan.public_ip if case.flavour.nat else lan.hosts[0].ip_address
    assert report["public_address"].startswith(f"{public}:")
    if case.hairpin and case.flavour.nat:
        symmetric = case.flavour is Flavour.SYMMETRIC
        kind = "external-address-new-port" if symmetric else "external-mapping"
        assert report["hairpinning_source"] == kind


# --- coturn's natdiscovery as the reference client ----------------------------------------------

_ND_MAPPING = re.compile(r"NAT with (Endpoint Independent|Address Dependent|Address and Port "
                         r"Dependent) Mapping!")  # fmt: skip
_ND_FILTERING = re.compile(r"NAT with (Endpoint Independent|Address Dependent|Address and Port "
                           r"Dependent) Filtering!")  # fmt: skip


def natdiscovery_verdict(out: str) -> tuple[str, str]:
    """(mapping, filtering) in natprobe's vocabulary from ``natdiscovery -m -f`` output;
    "unknown" where it printed none."""

    def word(regex: re.Pattern[str]) -> str:
        m = regex.search(out)
        return m.group(1).lower().replace(" ", "-") if m else "unknown"

    return word(_ND_MAPPING), word(_ND_FILTERING)


@pytest.mark.interop
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_natdiscovery_agrees(runs: Runs, case: Case) -> None:
    """coturn's ``turnutils_natdiscovery -m -f`` from the same LAN finds the same mapping and
    filtering as natprobe (neither says anything under UDP blocking)."""
    if case not in runs.natdiscovery:
        pytest.skip("turnutils_natdiscovery is not installed (apt install coturn)")
    theirs = natdiscovery_verdict(runs.natdiscovery[case])
    ours = runs.ours[case]
    assert theirs == (ours["mapping"], ours["filtering"]), runs.natdiscovery[case]


# --- natprobe vs coturn's server ----------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_verdict_against_coturn_server(runs: Runs, labs: Labs, case: Case) -> None:
    """natprobe with coturn's turnserver (RFC 5780 on two IPs) as the server gives the same
    verdict as with ours."""
    if not labs.coturn:
        pytest.skip("coturn's turnserver is not installed or did not start")
    report = runs.coturn[case]
    assert report["_exit"] == 0, report["_stderr"]
    assert verdict(report) == expected(case), report["reasons"]
    if case.flavour.behaviour.udp:
        assert report["servers"][0]["other_address"] == f"{SERVER_IPS[1]}:{COTURN_PORT + 1}"


# --- timing ---------------------------------------------------------------------------------------


def test_probe_timing(labs: Labs, record_property: Any) -> None:
    """natprobe's duration on the lossless lab, one run at a time: at most about one 2.5 s
    timeout whatever the flavour (groups run concurrently); the numbers are printed and
    recorded (docs/natprobe.md quotes them)."""
    rows = []
    for case, lan in labs.lans.items():
        started = time.monotonic()
        result = lan.hosts[0].run([*NATPROBE, "--json", OURS], timeout=RUN_TIMEOUT, check=False)
        wall = time.monotonic() - started
        report = json.loads(result.stdout)
        rows.append((case.id, report["duration_ms"], wall, report["nat_type"]))
        record_property(f"natprobe_ms[{case.id}]", report["duration_ms"])
    table = "\n".join(f"  {i:32} {ms:8.1f} ms  (wall {w:.2f} s)  {t}" for i, ms, w, t in rows)
    print(f"\nnatprobe duration on the lab (verdict, process wall clock):\n{table}")
    slow = [(i, ms) for i, ms, _, _ in rows if ms > PROBE_TARGET_S * 1000]
    assert not slow, table


# --- mapping lifetime -----------------------------------------------------------------------------


@pytest.mark.slow
def test_lifetime(runs: Runs) -> None:
    """Behind a NAT whose UDP mappings live 20 s (conntrack and map timeouts), ``--lifetime
    40`` (probes at 10, 20, 30, 40 s) reports an interval containing 20 s and a keepalive
    shorter than it."""
    code, out, err = _collect(runs.lifetime, timeout=LIFETIME_MAX + 30)
    assert code == 0, err
    report = json.loads(out)
    life = report["mapping_lifetime"]
    print(f"\nlifetime behind a {LIFETIME_UDP_TIMEOUT} s NAT: {life} ({report['duration_ms']} ms)")
    low, high = life["interval_s"]
    assert high is not None, life
    assert low <= LIFETIME_UDP_TIMEOUT <= high, life
    assert high - low == 10
    assert 10.0 in life["alive_at"] and 30.0 in life["gone_at"] and 40.0 in life["gone_at"]
    assert 0 < life["recommended_keepalive_s"] < LIFETIME_UDP_TIMEOUT
    assert report["nat_type"] == "port-restricted-cone"


def test_lab_description(labs: Labs) -> None:
    """Sanity: one LAN per case, the lifetime LAN has its short timeout, and our server runs
    (print the lab's picture for the log)."""
    assert len(labs.lans) == len(CASES)
    assert labs.lifetime_lan.router.udp_timeout == LIFETIME_UDP_TIMEOUT
    print(labs.lab.describe())
