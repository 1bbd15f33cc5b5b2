"""``stunturn p2p``: two processes on loopback, signaling through a directory or through
stdin/stdout pipes (the copy and paste mode, driven by the test).

Every run pins its host candidates with ``--host 127.0.0.1`` (never the machine's other
interfaces); TURN is ``stunturn serve`` on 127.0.0.1. Checked: the text and ``--json`` reports
(selected pair, RTT, N test messages each way), relay-only through our TURN server, reusing a
signal directory, the copy and paste prompts, and the errors: bad arguments (usage error, exit
2), no peer, stdin closed or never answered, garbage pasted (exit 1) - all without a traceback.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import STUNTURN, ServerProcess, run_cli

USER, PASSWORD = "alice", "s3cret"
WAIT = 60.0
"""Upper bound for a whole run (they take about a second)."""

TEXT_REPORT = re.compile(
    r"connected \(direct\) in \d+ ms\n"
    r"  local  host   127\.0\.0\.1:(?P<local>\d+)\n"
    r"  remote host   127\.0\.0\.1:(?P<remote>\d+)\n"
    r"  rtt    (?P<rtt>\d+\.\d) ms\n"
    r"messages: sent 5, received 5, acked 5\n"
)


def blob(messages: list[dict[str, Any]]) -> str:
    """A signaling line as the tool writes it: prefix, then the JSON list of messages,
    zlib-compressed, in URL-safe base64."""
    raw = zlib.compress(json.dumps(messages).encode())
    return "stunturn-p2p:v1:" + base64.urlsafe_b64encode(raw).decode()


def start(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*STUNTURN, "p2p", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = WAIT) -> tuple[int, str, str]:
    """Wait for the exit; (code, stdout, stderr). Killed if it overstays."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"stunturn p2p did not exit\nstdout:\n{out}\nstderr:\n{err}") from None
    return proc.returncode, out, err


def pair(
    directory: Path, offer_args: list[str], answer_args: list[str]
) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """Offer and answer as two processes meeting in ``directory``."""
    common = ["--signal-dir", str(directory), "--host", "127.0.0.1", "--count", "5"]
    offer = start("offer", *common, *offer_args)
    answer = start("answer", *common, *answer_args)
    return finish(offer), finish(answer)


def check_json(out: str, role: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(out)
    assert report["schema"] == "stunturn-p2p/1" and report["role"] == role
    assert (report["sent"], report["received"], report["acked"]) == (5, 5, 5)
    assert report["connect_ms"] > 0
    path = report["path"]
    assert set(path) == {"kind", "local", "remote", "rtt_ms"}
    assert path["rtt_ms"] > 0
    return report


def test_signal_dir_text_and_json(tmp_path: Path) -> None:
    """Offer (text report) and answer (``--json``) meet in a directory: both connect host to
    host, each reports the other's socket as remote, an RTT, and 5 test messages each way,
    received and acknowledged. The signal files are consumed."""
    (code_o, out_o, err_o), (code_a, out_a, err_a) = pair(tmp_path, [], ["--json"])
    assert code_o == 0 and code_a == 0, (err_o, err_a)
    assert "Traceback" not in err_o + err_a
    match = TEXT_REPORT.fullmatch(out_o)
    assert match is not None, out_o
    report = check_json(out_a, "answer")
    path = report["path"]
    assert path["kind"] == "direct"
    assert path["local"] == {"type": "host", "address": ["127.0.0.1", int(match["remote"])]}
    assert path["remote"] == {"type": "host", "address": ["127.0.0.1", int(match["local"])]}
    assert float(match["rtt"]) >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_signal_dir_can_be_used_again(tmp_path: Path) -> None:
    """Two sessions one after the other in the same directory both connect (the first left
    no file behind for the second to mistake for its peer's)."""
    for _ in range(2):
        (code_o, out_o, _), (code_a, out_a, err_a) = pair(tmp_path, ["--json"], ["--json"])
        assert code_o == 0 and code_a == 0, err_a
        offer, answer = check_json(out_o, "offer"), check_json(out_a, "answer")
        assert offer["path"]["local"] == answer["path"]["remote"]


@pytest.fixture(scope="module")
def turn_url() -> Iterator[str]:
    args = [
        "--listen", "127.0.0.1:0", "--workers", "1", "--user", f"{USER}:{PASSWORD}",
        "--relay-ip", "127.0.0.1", "--allow-loopback-peers",
    ]  # fmt: skip
    with ServerProcess(args) as server:
        server.wait_ready()
        host, port = server.addr("udp")
        yield f"turn:{host}:{port}?transport=udp"


def test_relay_only(tmp_path: Path, turn_url: str) -> None:
    """``--relay-only`` on both sides with our TURN server: both JSON reports show a relayed
    path, relay to relay, the local address of one being the remote of the other."""
    relay = ["--turn", turn_url, "--turn-user", USER, "--turn-password", PASSWORD, "--relay-only"]
    (code_o, out_o, err_o), (code_a, out_a, err_a) = pair(
        tmp_path, [*relay, "--json"], [*relay, "--json"]
    )
    assert code_o == 0 and code_a == 0, (err_o, err_a)
    offer, answer = check_json(out_o, "offer"), check_json(out_a, "answer")
    for report in (offer, answer):
        path = report["path"]
        assert path["kind"] == "relayed"
        assert path["local"]["type"] == path["remote"]["type"] == "relay"
    assert offer["path"]["local"] == answer["path"]["remote"]
    assert answer["path"]["local"] == offer["path"]["remote"]


def test_copy_and_paste(tmp_path: Path) -> None:
    """Without ``--signal-dir`` each side prints one line to send (after saying so on
    stderr), then asks for the other side's line on stdin; the test carries the lines
    between the two processes' pipes. Both connect and report."""
    offer = start("offer", "--host", "127.0.0.1", "--count", "5", stdin=subprocess.PIPE)
    answer = start("answer", "--host", "127.0.0.1", "--count", "5", "--json", stdin=subprocess.PIPE)
    try:
        assert offer.stdout is not None and answer.stdout is not None
        assert offer.stdin is not None and answer.stdin is not None
        offer_line = offer.stdout.readline()
        answer_line = answer.stdout.readline()
        assert offer_line.startswith("stunturn-p2p:v1:") and answer_line.startswith(
            "stunturn-p2p:v1:"
        )
        answer.stdin.write(offer_line)
        answer.stdin.flush()
        offer.stdin.write(answer_line)
        offer.stdin.flush()
    except BaseException:
        offer.kill()
        answer.kill()
        raise
    code_o, out_o, err_o = finish(offer)
    code_a, out_a, err_a = finish(answer)
    assert code_o == 0 and code_a == 0, (err_o, err_a)
    for err in (err_o, err_a):
        assert err == "Send this line to the other side:\nPaste the other side's line:\n"
    assert TEXT_REPORT.fullmatch(out_o) is not None, out_o
    check_json(out_a, "answer")


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["middle"], "Invalid value for '{offer|answer}'"),
        (["offer", "--stun", "127.0.0.1:99999"], "Invalid value for --stun: bad port in"),
        (["offer", "--stun", ":3478"], "Invalid value for --stun: no host in"),
        (["offer", "--host", "notanip"], "Invalid value for --host: 'notanip' is not an IP"),
        (["offer", "--turn", "bogus://x"], "Invalid value for --turn: 'bogus://x': scheme must"),
        (["offer", "--turn", "turn:127.0.0.1"], "needs a username and a password"),
        (["offer", "--relay-only"], "--relay-only needs a TURN server (--turn)"),
        (["offer", "--count", "-1"], "Invalid value for '--count'"),
        (["offer", "--timeout", "0"], "Invalid value for '--timeout'"),
        (["offer", "--signal-dir", "/proc/version"], "Invalid value for '--signal-dir'"),
        (["offer", "--signal-dir", "/proc/nonexistent"], "Invalid value for --signal-dir"),
    ],
)
def test_bad_arguments(args: list[str], message: str) -> None:
    """Bad arguments are usage errors: exit 2, a one-line reason, no traceback, nothing
    printed on stdout (and nothing sent: they are refused before anything starts)."""
    result = run_cli("p2p", *args)
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_no_peer(tmp_path: Path) -> None:
    """Nobody answers in the directory: after ``--timeout`` the JSON report carries the
    error, stderr says what was awaited, exit 1."""
    started = time.monotonic()
    proc = start("offer", "--signal-dir", str(tmp_path), "--host", "127.0.0.1", "--timeout", "1",
                 "--json")  # fmt: skip
    code, out, err = finish(proc)
    assert code == 1
    assert json.loads(out) == {
        "schema": "stunturn-p2p/1",
        "role": "offer",
        "error": "no connection after 1 s (waiting for the peer's hello)",
    }
    assert (
        err
        == "stunturn p2p: no connection: no connection after 1 s (waiting for the peer's hello)\n"
    )
    assert time.monotonic() - started < 15.0


def test_stdin_closed() -> None:
    """Copy and paste mode with stdin at end of file: a clear error at once, not a wait for
    the timeout."""
    started = time.monotonic()
    code, out, err = finish(start("offer", "--host", "127.0.0.1", "--timeout", "30"))
    assert code == 1
    assert out.startswith("stunturn-p2p:v1:")
    assert err.endswith(
        "stunturn p2p: no connection: no signaling input (stdin closed or empty line)\n"
    )
    assert "Traceback" not in err
    assert time.monotonic() - started < 15.0


def test_nothing_pasted_exits_at_the_timeout() -> None:
    """Copy and paste mode with stdin open but nothing typed: the process gives up and exits
    at ``--timeout`` (the thread waiting on stdin does not keep it alive)."""
    proc = start("offer", "--host", "127.0.0.1", "--timeout", "1", stdin=subprocess.PIPE)
    try:
        proc.wait(15.0)  # stdin stays open meanwhile
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("stunturn p2p kept waiting for stdin after its timeout") from None
    finally:
        code, _, err = finish(proc)
    assert code == 1
    assert err.endswith("no connection after 1 s (waiting for the peer's hello)\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("hello there\n", "not a stunturn p2p line (it starts with 'stunturn-p2p:v1:')"),
        ("stunturn-p2p:v1:!!!!\n", "corrupt stunturn p2p line"),
        (
            blob([{"type": "hello", "ufrag": "x", "pwd": "y" * 22}]) + "\n",
            "hello with a bad 'ufrag'",
        ),
    ],
    ids=["not-ours", "corrupt", "bad-message"],
)
def test_bad_line_pasted(line: str, message: str) -> None:
    """Something else than the other side's line is pasted: exit 1 with the reason."""
    proc = start("offer", "--host", "127.0.0.1", "--timeout", "30", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(line)
    proc.stdin.flush()
    code, _, err = finish(proc)
    assert code == 1
    assert message in err, err
    assert "Traceback" not in err
