"""The command-line front end as a user meets it: help, refusals with clear messages and no
traceback, TOML configuration files honoured and overridden, and the natprobe placeholder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import StartServer
from helpers import free_port, run_cli, udp_query

from stunturn import __version__
from stunturn.stun.attributes import Software

BIN = Path(sys.executable).parent


def assert_refused(result: subprocess.CompletedProcess[str], field: str) -> None:
    """Non-zero exit, one clear error line naming ``field``, no traceback, nothing served."""
    assert result.returncode != 0, result
    assert result.stderr.startswith(f"stunturn: error: {field}: "), result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "listening on" not in result.stdout


# --- help ---------------------------------------------------------------------------------------


def test_help_and_version() -> None:
    """`stunturn --help`, `-h`, `serve --help` and `--version` work and describe the options."""
    main = run_cli("--help")
    assert main.returncode == 0 and "serve" in main.stdout and "Usage: stunturn" in main.stdout
    assert run_cli("-h").stdout == main.stdout
    serve = run_cli("serve", "--help")
    assert serve.returncode == 0
    for option in ("--listen", "--tls-listen", "--cert", "--key", "--alt-address", "--workers",
                   "--config", "--response-rate", "--response-burst", "--log-level"):  # fmt: skip
        assert option in serve.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and __version__ in version.stdout


def test_installed_entry_point() -> None:
    """The `stunturn` console script installed with the package runs the same CLI."""
    script = BIN / "stunturn"
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed in this venv)")
    result = subprocess.run(
        [str(script), "serve", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0 and "--alt-address" in result.stdout


def test_natprobe_is_installed_with_help() -> None:
    """The natprobe console script is installed and explains itself (its behaviour is tested
    in tests/test_natprobe_cli.py)."""
    script = BIN / "natprobe"
    if script.exists():
        cmd = [str(script), "--help"]
    else:
        cmd = [sys.executable, "-c", "from stunturn_cli.natprobe import main; main()", "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0
    assert "RFC 5780" in result.stdout


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--listen", "999.1.1.1:1"], "listen"),
        (["--listen", "127.0.0.1:70000"], "listen"),
        (["--listen", "localhost:3478"], "listen"),
        (["--tls-listen", "[::1:5349"], "tls-listen"),
        (["--alt-address", "127.0.0.2"], "alt-address"),
        (["--listen", "0.0.0.0:0", "--alt-address", "127.0.0.2"], "alt-address"),
        (["--listen", "127.0.0.1:0", "--alt-address", "127.0.0.1"], "alt-address"),
        (["--listen", "127.0.0.1:0", "--alt-address", "not-an-ip"], "alt-address"),
        (["--workers", "0"], "workers"),
        (["--workers", "many"], "workers"),
        (["--response-rate", "-5"], "response-rate"),
        (["--response-burst", "0"], "response-burst"),
        (["--log-level", "loud"], "log-level"),
        (["--log-format", "xml"], "log-format"),
        (["--cert", "/nonexistent.pem"], "key"),
        (["--no-udp", "--no-tcp"], "udp"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_options_are_refused(args: list[str], field: str) -> None:
    """Bad command-line values exit non-zero with "stunturn: error: FIELD: ..." and no
    traceback, before binding anything."""
    assert_refused(run_cli("serve", *args), field)


def test_unicode_digit_port_is_refused() -> None:
    """`--listen 127.0.0.1:²` is refused like any other bad port."""
    assert_refused(run_cli("serve", "--listen", "127.0.0.1:²"), "listen")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('colour = "red"\n', "colour"),
        ('workers = "x"\n', "workers"),
        ('listen = ["nonsense"]\n', "listen"),
        ('log-level = "loud"\n', "log-level"),
        ("udp = 1\n", "udp"),
        ('listen = ["127.0.0.1:0"]\nalt-address = "::2"\n', "alt-address"),
        ("workers = 2\nlisten = = 1\n", "config"),
        ("[server]\nworkers = 1\n", "server"),
    ],
    ids=["unknown-key", "workers", "listen", "log-level", "udp", "alt-family", "toml", "table"],
)
def test_bad_config_file_is_refused(tmp_path: Path, text: str, field: str) -> None:
    """A config file with an unknown key, a bad value or invalid TOML stops the server before
    it starts, naming the field (or 'config' and the file for a syntax error)."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_cli("serve", "--config", str(path))
    assert_refused(result, field)
    if field == "config":
        assert str(path) in result.stderr and "line 2" in result.stderr


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    """--config pointing nowhere is refused naming the file."""
    missing = tmp_path / "nope.toml"
    result = run_cli("serve", "--config", str(missing))
    assert_refused(result, "config")
    assert str(missing) in result.stderr


def test_cli_value_is_checked_even_when_file_is_fine(tmp_path: Path) -> None:
    """A good file does not hide a bad command-line value."""
    path = tmp_path / "ok.toml"
    path.write_text('listen = ["127.0.0.1:0"]\nworkers = 1\n')
    assert_refused(run_cli("serve", "--config", str(path), "--workers", "x"), "workers")


# --- a good config file ---------------------------------------------------------------------------


def test_config_file_is_honoured(stunturn_server: StartServer, tmp_path: Path) -> None:
    """listen, workers and software from the file are what the server uses (underscore keys
    accepted too)."""
    port = free_port("127.0.0.1")
    path = tmp_path / "stunturn.toml"
    path.write_text(
        f'listen = ["127.0.0.1:{port}"]\nworkers = 2\nsoftware = "from-file"\n'
        'log-level = "warning"\nresponse_rate = 0\n'
    )
    server = stunturn_server("--config", str(path))
    assert server.workers == 2
    assert {(lst.transport, lst.addr) for lst in server.listeners} == {
        ("udp", ("127.0.0.1", port)),
        ("tcp", ("127.0.0.1", port)),
    }
    msg = udp_query(("127.0.0.1", port))
    assert msg.get(Software) == Software("from-file")
    assert server.stop() == 0


def test_command_line_overrides_file(stunturn_server: StartServer, tmp_path: Path) -> None:
    """Options given on the command line win over the file, key by key: listen and workers
    come from the command line, software still from the file."""
    file_port = free_port("127.0.0.1")
    path = tmp_path / "stunturn.toml"
    path.write_text(f'listen = ["127.0.0.1:{file_port}"]\nworkers = 2\nsoftware = "from-file"\n')
    server = stunturn_server("--config", str(path), "--workers", "1", "--listen", "[::1]:0")
    assert server.workers == 1
    assert {lst.host for lst in server.listeners} == {"::1"}
    msg = udp_query(server.addr("udp", "::1"))
    assert msg.get(Software) == Software("from-file")
    server2 = stunturn_server("--config", str(path), "--workers", "1", "--software", "cli")
    assert udp_query(("127.0.0.1", file_port)).get(Software) == Software("cli")
    assert server2.stop() == 0 and server.stop() == 0
