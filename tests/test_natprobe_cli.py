"""The ``natprobe`` command on loopback, against our own RFC 5780 server.

The server listens on 127.0.0.1 and 127.0.0.2, ports P and P+1 (``stunturn serve --listen
127.0.0.1:0 --alt-address 127.0.0.2``). Loopback has no NAT and no filter, so every verdict is
"no NAT, open internet"; what these tests check is the command: its text and JSON output, its
options and its exit codes (0: a verdict; 1: no verdict; 2: bad usage or an OS error). Every
run names its servers: natprobe's default public servers are never contacted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import ServerProcess, free_port
from natsim_driver import check_report

from stunturn import __version__

NATPROBE = [sys.executable, "-m", "stunturn_cli.natprobe"]


def natprobe(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run natprobe to completion."""
    return subprocess.run(
        [*NATPROBE, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture(scope="module")
def grid() -> Iterator[tuple[int, int]]:
    """Our RFC 5780 server on 127.0.0.1/127.0.0.2 x (P, P+1); yields (P, P+1)."""
    args = ["--listen", "127.0.0.1:0", "--alt-address", "127.0.0.2", "--workers", "1"]
    with ServerProcess([*args, "--no-turn"]) as server:
        server.wait_ready()
        ports = sorted({lst.port for lst in server.listeners if lst.transport == "udp"})
        assert len(ports) == 2
        yield ports[0], ports[1]


@pytest.fixture(scope="module")
def primary(grid: tuple[int, int]) -> str:
    return f"127.0.0.1:{grid[0]}"


def test_text_output(grid: tuple[int, int], primary: str) -> None:
    """The text report names the server and its RFC 5780 features, the addresses, the
    verdicts (no NAT, endpoint-independent both ways, open internet), hairpinning, port
    allocation, the P2P outlook and the time taken; exit 0, nothing on stderr."""
    result = natprobe(primary)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    expected_prefixes = [
        f"Server            {primary}",
        f"  RFC 5780        yes (OTHER-ADDRESS 127.0.0.2:{grid[1]}; CHANGE-REQUEST honoured; "
        "RESPONSE-PORT yes; PADDING yes)",
        "Local address     127.0.0.1:",
        "Public address    127.0.0.1:",
        "NAT               no",
        "Mapping           endpoint-independent",
        "Filtering         endpoint-independent",
        "NAT type          open-internet",
        "Hairpinning       yes (arrives from the sender's external mapping",
        "Port allocation   preserved",
        "  the external port equals the local port",
        "P2P outlook       Direct connections should work with peers behind any NAT type.",
        "Took              ",
    ]
    assert len(lines) == len(expected_prefixes), result.stdout
    for line, prefix in zip(lines, expected_prefixes, strict=True):
        assert line.startswith(prefix), (line, prefix)
    assert lines[2].split()[-1] == lines[3].split()[-1]  # public = local: no NAT


def test_json_output(grid: tuple[int, int], primary: str) -> None:
    """--json prints one natprobe/1 object with every required key and the evidence of every
    test; on loopback the whole probe takes well under a second (nothing times out)."""
    result = natprobe("--json", primary)
    assert result.returncode == 0, result.stderr
    report = as_json(result)
    check_report(report)
    assert report["nat_detected"] is False
    assert report["public_address"] == report["local_address"]
    assert (report["mapping"], report["filtering"]) == ("endpoint-independent",) * 2
    assert report["nat_type"] == "open-internet"
    assert report["hairpinning"] is True and report["udp_blocked"] is False
    assert report["port_allocation"]["kind"] == "preserved"
    assert report["mapping_lifetime"] is None and report["error"] is None
    server = report["servers"][0]
    assert server["address"] == primary
    assert server["other_address"] == f"127.0.0.2:{grid[1]}"
    assert server["rfc5780"] is True and server["change_request"] == "honoured"
    assert server["response_port"] is True and server["padding"] is True
    tests = {t["name"]: t for t in report["tests"]}
    assert tests["filtering-II"]["reply_source"] == f"127.0.0.2:{grid[1]}"
    assert tests["filtering-III"]["reply_source"] == f"127.0.0.1:{grid[1]}"
    assert tests["mapping-III"]["destination"] == f"127.0.0.2:{grid[1]}"
    assert report["duration_ms"] < 1000


def test_no_hairpin(primary: str) -> None:
    """--no-hairpin: hairpinning null, no hairpin test, "not tested" in text."""
    report = as_json(natprobe("--json", "--no-hairpin", primary))
    assert report["hairpinning"] is None and report["hairpinning_source"] is None
    assert not [t for t in report["tests"] if t["name"].startswith("hairpin")]
    text = natprobe("--no-hairpin", primary).stdout
    assert "Hairpinning       not tested" in text


def test_ports_option(primary: str) -> None:
    """--ports N samples N mappings for the port allocation test."""
    report = as_json(natprobe("--json", "--ports", "3", primary))
    assert report["port_allocation"]["samples"] == 3
    assert len([t for t in report["tests"] if t["name"].startswith("port-allocation")]) == 3


def test_bind(primary: str) -> None:
    """--bind sends from that address."""
    report = as_json(natprobe("--json", "--bind", "127.0.0.1", primary))
    assert report["local_address"].startswith("127.0.0.1:")
    assert report["nat_detected"] is False


def test_bind_address_counts_as_local(primary: str) -> None:
    """A mapped address identical to the socket's own address is never a NAT."""
    report = as_json(natprobe("--json", "--bind", "127.0.0.3", primary))
    assert report["public_address"] == report["local_address"]
    assert report["nat_detected"] is False


@pytest.mark.parametrize("second", ["127.0.0.2:{p}", "127.0.0.1:{q}"], ids=["two-ips", "same-ip"])
def test_two_servers(grid: tuple[int, int], primary: str, second: str) -> None:
    """Two servers: only the mapping can be told (it does not vary: endpoint-independent);
    filtering needs CHANGE-REQUEST, so it is unknown with the reason, in JSON and in text."""
    other = second.format(p=grid[0], q=grid[1])
    result = natprobe("--json", primary, other)
    assert result.returncode == 0, result.stderr
    report = as_json(result)
    check_report(report)
    assert report["mapping"] == "endpoint-independent"
    assert report["mapping_varies_by_destination"] is False
    assert report["filtering"] == "unknown" and "RFC 5780" in report["reasons"]["filtering"]
    names = {t["name"] for t in report["tests"]}
    assert {"mapping-server-1", "mapping-server-2"} <= names
    assert not any(n.startswith("filtering") for n in names)
    text = natprobe(primary, other).stdout
    assert "(filtering: filtering needs an RFC 5780 server" in text


def test_ipv6_plain_server() -> None:
    """An IPv6 server given as [::1]:PORT, without RFC 5780: no NAT (so the mapping is the
    identity), filtering unknown with the reason, still exit 0 (an honest "unknown" is a
    verdict; only a run that got no answer at all is not)."""
    with ServerProcess(["--listen", "[::1]:0", "--workers", "1", "--no-turn"]) as server:
        server.wait_ready()
        port = server.addr("udp", "::1")[1]
        result = natprobe("--json", f"[::1]:{port}")
    assert result.returncode == 0, result.stderr
    report = as_json(result)
    assert report["public_address"].startswith("[::1]:")
    assert report["nat_detected"] is False and report["mapping"] == "endpoint-independent"
    assert report["filtering"] == "unknown" and "OTHER-ADDRESS" in report["reasons"]["filtering"]
    assert report["nat_type"] == "unknown"
    assert report["servers"][0]["rfc5780"] is False


# --- exit codes -----------------------------------------------------------------------------------


def test_exit_1_when_nothing_answers() -> None:
    """A closed port and no TCP fallback: "no verdict" on stderr, nothing on stdout, exit 1,
    after one 2.5 s timeout."""
    result = natprobe("--no-tcp", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "natprobe: no verdict: no UDP answer from 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_exit_1_json_still_prints_the_report() -> None:
    """With --json the report (with its error) is printed before exiting 1; the TCP fallback is
    tried (and refused); --rto 100 shortens the wait."""
    result = natprobe("--json", "--rto", "100", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    report = as_json(result)
    check_report(report)
    assert "over UDP or TCP" in report["error"]
    assert report["servers"][0]["tcp_answered"] is False
    assert report["duration_ms"] < 1000
    assert "no verdict" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["127.0.0.1:99999"], "bad port"),
        (["127.0.0.1:0"], "bad port"),
        (["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], "at most two servers"),
        (["--ports", "2", "127.0.0.1:1"], "--ports"),
        (["--rto", "10", "127.0.0.1:1"], "--rto"),
        (["--lifetime", "5", "127.0.0.1:1"], "--lifetime"),
        (["--bogus", "127.0.0.1:1"], "No such option"),
        ([":3478"], "no host"),
    ],
    ids=["port-99999", "port-0", "three-servers", "ports", "rto", "lifetime", "option", "host"],
)
def test_exit_2_for_bad_usage(args: list[str], message: str) -> None:
    """Bad arguments: exit 2 with click's usage error naming the problem, no traceback, and
    nothing sent anywhere."""
    result = natprobe(*args, timeout=10)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_lifetime_option_takes_an_optional_value(primary: str) -> None:
    """--lifetime has an optional value, so it swallows a following server argument (then
    fails as a bad number, exit 2): write ``natprobe SERVER --lifetime`` or ``--lifetime=N``."""
    result = natprobe("--lifetime", primary, timeout=10)
    assert result.returncode == 2
    assert "--lifetime" in result.stderr


def test_version_and_help() -> None:
    """--version prints the package version; --help documents every option."""
    version = natprobe("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    help_text = natprobe("--help").stdout
    for option in ("--json", "--no-hairpin", "--lifetime", "--ports", "--bind", "--rto"):
        assert option in help_text
    assert "--no-tcp" in help_text


@pytest.mark.slow
def test_lifetime_on_loopback(primary: str) -> None:
    """--lifetime 20 (JSON and text runs in parallel, ~21 s): loopback never expires a
    mapping, so both probes (10 s and 20 s) answer and the lifetime is "longer than 20 s"."""
    procs = [
        subprocess.Popen(
            [*NATPROBE, *args, primary, "--lifetime", "20"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["--json"], [])
    ]
    try:
        outputs = [p.communicate(timeout=40) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    report = json.loads(outputs[0][0])
    check_report(report)
    life = report["mapping_lifetime"]
    assert life["alive_at"] == [10.0, 20.0] and life["gone_at"] == []
    assert life["interval_s"] == [20.0, None]
    assert life["recommended_keepalive_s"] == 16.0
    assert 20_000 <= report["duration_ms"] < 25_000
    line = (
        "Mapping lifetime  longer than 20 s (the longest delay tested); send keepalives every 16 s"
    )
    assert line in outputs[1][0].splitlines()
