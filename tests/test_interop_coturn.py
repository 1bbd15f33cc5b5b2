"""Interop with coturn 4.6.1's client tools, run against `stunturn serve` on loopback.

What coturn can and cannot do here:

* ``turnutils_stunclient`` speaks STUN Binding over UDP only (its options are ``-p -L -f``; the
  source opens a SOCK_DGRAM socket and nothing else). With a server that sends OTHER-ADDRESS it
  also sends CHANGE-REQUEST + RESPONSE-PORT and CHANGE-REQUEST + PADDING requests.
* ``turnutils_natdiscovery`` is UDP only too (RFC 5780 mapping/filtering discovery).
* No coturn tool sends a STUN *Binding* request over TCP or TLS. The only coturn client that
  speaks STUN framing over a stream is ``turnutils_uclient -t`` (``-S`` for TLS), which sends
  a TURN Allocate. Our STUN-only server answers it with 400 (Bad Request); uclient reading and
  reporting that 400 from the TCP/TLS byte stream is the stream interop shown here. Binding
  over TCP with a real third-party client is covered by aioice (test_interop_aioice.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from conftest import StartServer
from helpers import STREAM_LOOPS, ServerProcess

pytestmark = pytest.mark.interop

STUNCLIENT = shutil.which("turnutils_stunclient")
NATDISCOVERY = shutil.which("turnutils_natdiscovery")
UCLIENT = shutil.which("turnutils_uclient")

needs_stunclient = pytest.mark.skipif(
    STUNCLIENT is None, reason="coturn's turnutils_stunclient is not installed (apt install coturn)"
)
needs_natdiscovery = pytest.mark.skipif(
    NATDISCOVERY is None,
    reason="coturn's turnutils_natdiscovery is not installed (apt install coturn)",
)
needs_uclient = pytest.mark.skipif(
    UCLIENT is None, reason="coturn's turnutils_uclient is not installed (apt install coturn)"
)

_REFLEXIVE = re.compile(r"UDP reflexive addr: ?(\S+):(\d+)")
_ORIGIN = re.compile(r"Response origin: : (\S+):(\d+)")
_OTHER = re.compile(r"Other addr: : (\S+):(\d+)")
_LOCAL = re.compile(r"Local addr: : (\S+):(\d+)")


def run_tool(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a coturn tool; it blocks forever if no answer comes, hence the hard timeout."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{args[0]} got no answer within {timeout} s: {exc.stdout!r}"
        ) from None


def blocks(output: str) -> list[str]:
    """Split coturn output into its "RFC 5780 response N" blocks."""
    return re.split(r"RFC 5780 response \d+", output)[1:]


@pytest.fixture(scope="module")
def plain() -> Iterator[ServerProcess]:
    with ServerProcess(["--listen", "127.0.0.1:0", "--listen", "[::1]:0", "--workers", "1"]) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def grid() -> Iterator[ServerProcess]:
    args = ["--listen", "127.0.0.1:0", "--alt-address", "127.0.0.2", "--workers", "1"]
    with ServerProcess(args) as s:
        s.wait_ready()
        yield s


@needs_stunclient
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_stunclient_udp_mapped_address(plain: ServerProcess, host: str) -> None:
    """coturn's stunclient gets a Binding response over UDP whose XOR-MAPPED-ADDRESS it reads
    as its own loopback address; it sees no OTHER-ADDRESS, so it does not try RFC 5780."""
    assert STUNCLIENT is not None
    port = plain.addr("udp", host)[1]
    result = run_tool(STUNCLIENT, "-p", str(port), "-L", host, host)
    assert result.returncode == 0, result
    found = _REFLEXIVE.findall(result.stdout)
    assert found, result.stdout
    for ip, mapped_port in found:
        assert ip == host and 1024 <= int(mapped_port) <= 65535
    assert "RFC 5780" not in result.stdout
    assert "error" not in result.stdout.lower()


@needs_stunclient
def test_stunclient_rfc5780_requests(grid: ServerProcess) -> None:
    """Against --alt-address 127.0.0.2, stunclient sees OTHER-ADDRESS and runs its RFC 5780
    sequence: a plain request (answered from the primary address), CHANGE-REQUEST(ip, port) +
    RESPONSE-PORT=local+1, then CHANGE-REQUEST + 1500 bytes of PADDING from the new socket.
    Every answer arrives; RESPONSE-ORIGIN/OTHER-ADDRESS are as RFC 5780 says, and the mapped
    port follows the socket the request came from (local, local, local+1)."""
    assert STUNCLIENT is not None
    port = grid.addr("udp", "127.0.0.1")[1]
    result = run_tool(STUNCLIENT, "-p", str(port), "-L", "127.0.0.1", "127.0.0.1")
    assert result.returncode == 0, result
    first, second, third = blocks(result.stdout)
    assert _ORIGIN.search(first).groups() == ("127.0.0.1", str(port))  # type: ignore[union-attr]
    assert _OTHER.search(first).groups() == ("127.0.0.2", str(port + 1))  # type: ignore[union-attr]
    for block in (second, third):
        origin = _ORIGIN.search(block)
        assert origin is not None and origin.groups() == ("127.0.0.2", str(port + 1))
    mapped = [int(_REFLEXIVE.findall(b)[-1][1]) for b in (first, second, third)]
    assert mapped[0] == mapped[1] and mapped[2] == mapped[0] + 1, mapped
    assert all(_REFLEXIVE.findall(b)[-1][0] == "127.0.0.1" for b in (first, second, third))


@needs_natdiscovery
@pytest.mark.parametrize("padding", [False, True], ids=["plain", "padding"])
def test_natdiscovery_mapping_and_filtering(grid: ServerProcess, padding: bool) -> None:
    """coturn's natdiscovery -m -f completes both RFC 5780 discoveries against our server and
    finds what loopback is: no NAT, endpoint-independent mapping and filtering, no ALG
    (MAPPED-ADDRESS == XOR-MAPPED-ADDRESS). With -P every request carries 1500 bytes of
    PADDING and the result is the same."""
    assert NATDISCOVERY is not None
    port = grid.addr("udp", "127.0.0.1")[1]
    args = [NATDISCOVERY, "-m", "-f", "-L", "127.0.0.1", "-p", str(port)]
    result = run_tool(*args, *(["-P"] if padding else []), "127.0.0.1")
    out = result.stdout
    assert result.returncode == 0, result
    assert "-= Mapping Behavior Discovery =-" in out and "-= Filtering Behavior Discovery =-" in out
    assert "No NAT! (Endpoint Independent Mapping)" in out
    mapping, filtering = out.split("-= Filtering Behavior Discovery =-")
    assert "Endpoint Independent Mapping!" in mapping
    assert "NAT with Endpoint Independent Filtering!" in filtering
    assert "Dependent" not in out
    assert "ALG detected" not in out and "No ALG" in out
    assert "Cannot read" not in out and "error" not in out.lower()
    assert len(blocks(out)) == 4
    reflexive = _REFLEXIVE.findall(out)
    local = _LOCAL.findall(out)
    assert reflexive and set(reflexive) <= set(local)


@needs_natdiscovery
def test_natdiscovery_sees_no_rfc5780_on_single_address_server(plain: ServerProcess) -> None:
    """Without --alt-address the server sends no OTHER-ADDRESS, so natdiscovery correctly
    finds no RFC 5780 support and gives no filtering verdict (instead of a wrong one)."""
    assert NATDISCOVERY is not None
    port = plain.addr("udp", "127.0.0.1")[1]
    result = run_tool(NATDISCOVERY, "-m", "-f", "-L", "127.0.0.1", "-p", str(port), "127.0.0.1")
    assert result.returncode == 0, result
    assert "RFC 5780 response" not in result.stdout
    assert "Filtering!" not in result.stdout
    assert "No NAT!" in result.stdout


@needs_uclient
@pytest.mark.parametrize("loop", STREAM_LOOPS)
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_uclient_reads_our_error_over_streams(
    stunturn_server: StartServer, loop: str, tls: bool
) -> None:
    """Labelled honestly: coturn has no STUN Binding client for TCP/TLS. Its TURN client
    ``turnutils_uclient -t`` (``-S`` for TLS) sends an Allocate over the stream; our server
    with TURN switched off (``--no-turn``) answers 400, and uclient parses that error out of the
    TCP/TLS byte stream and reports "error 400 (Bad Request)" (it then exits non-zero, having
    no relay)."""
    assert UCLIENT is not None
    args = ["--listen", "127.0.0.1:0", "--workers", "1", "--no-turn"]
    server = stunturn_server(
        *args, *(["--tls-listen", "127.0.0.1:0", "--self-signed"] if tls else []), loop=loop
    )
    port = server.addr("tls" if tls else "tcp", "127.0.0.1")[1]
    flags = ["-t", "-S"] if tls else ["-t"]
    result = run_tool(
        UCLIENT, *flags, "-n", "1", "-m", "1", "-p", str(port), "-e", "127.0.0.1", "-r", "9",
        "127.0.0.1", timeout=20,
    )  # fmt: skip
    assert "error 400 (Bad Request)" in result.stdout, result
    server.stop()
    counters = server.stopped_counters()
    assert counters["error_responses"] >= 1 and counters["malformed"] == 0
