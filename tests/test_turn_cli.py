"""The TURN commands of the CLI: ``stunturn users``, ``stunturn credentials``,
``stunturn check-peer``, and ``stunturn serve`` refusing bad TURN settings.

``users``, ``credentials`` and ``check-peer`` run in-process through click's test runner (they
only touch files in tmp_path and print); ``serve`` refusals run as a subprocess, so a refusal
that fails to happen cannot leave a server running inside the test process. Where it matters,
what the commands print is checked against a running server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import subprocess
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from conftest import StartServer
from helpers import run_cli
from turn_client import TurnClient, error_of

# The CLI package is installed as ``stunturn_cli`` (mapped from cli/), which mypy cannot follow.
cli: click.Group = importlib.import_module("stunturn_cli.main").cli

SERVE = ["serve", "--listen", "127.0.0.1:0", "--workers", "1", "--relay-ip", "127.0.0.1"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_refused(result: subprocess.CompletedProcess[str] | Result, field: str) -> None:
    """Exit code 2, one error line naming ``field``, no traceback, nothing served."""
    if isinstance(result, subprocess.CompletedProcess):
        code = result.returncode
    else:
        code = result.exit_code
    assert code == 2, (code, result.stdout, result.stderr)
    assert result.stderr.startswith(f"stunturn: error: {field}: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "listening on" not in result.stdout


def hmac_b64(secret: str, message: str, digest: str) -> str:
    mac = hmac.new(secret.encode(), message.encode(), getattr(hashlib, digest)).digest()
    return base64.b64encode(mac).decode()


# --- users --------------------------------------------------------------------------------------


def test_users_add_list_remove(tmp_path: Path) -> None:
    """`users add` without --password prints a random password once; with --password it prints
    none; `users list` shows name, realm and date; the store holds neither password; `users
    remove` removes; removing an unknown user fails with exit 2 and a clear message."""
    db = str(tmp_path / "users.db")
    added = invoke("users", "add", "alice", "--user-db", db)
    assert added.exit_code == 0, added.output
    assert f"added alice in realm 'stunturn' to {db}" in added.stdout
    generated = added.stdout.split("password: ")[1].strip()
    assert len(generated) >= 16

    given = invoke("users", "add", "bob", "--password", "hunter2-long", "--realm", "other",
                   "--user-db", db)  # fmt: skip
    assert given.exit_code == 0 and "password" not in given.stdout

    listed = invoke("users", "list", "--user-db", db)
    assert listed.exit_code == 0
    rows = sorted(line.split("\t") for line in listed.stdout.splitlines())
    assert [(r[0], r[1]) for r in rows] == [("alice", "stunturn"), ("bob", "other")]
    assert all(r[2].endswith("Z") and len(r[2]) == len("2025-01-01 00:00:00Z") for r in rows)

    raw = Path(db).read_bytes()
    assert generated.encode() not in raw and b"hunter2-long" not in raw

    removed = invoke("users", "remove", "bob", "--user-db", db)
    assert removed.exit_code == 0 and "removed bob" in removed.stdout
    assert "bob" not in invoke("users", "list", "--user-db", db).stdout

    unknown = invoke("users", "remove", "carol", "--user-db", db)
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == f"stunturn: error: no user 'carol' in {db}"


def test_users_list_missing_store(tmp_path: Path) -> None:
    """`users list` on a store that does not exist says so (exit 2) and does not create it."""
    db = tmp_path / "missing.db"
    result = invoke("users", "list", "--user-db", str(db))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"stunturn: error: user-db: no such file: {db}"
    assert not db.exists()


def test_users_store_serves_turn(stunturn_server: StartServer, tmp_path: Path) -> None:
    """A user added with `users add` allocates on `serve --user-db`; after `users remove`, the
    running server refuses that user's next Allocate (401)."""
    db = str(tmp_path / "users.db")
    added = invoke("users", "add", "dave", "--user-db", db)
    password = added.stdout.split("password: ")[1].strip()
    server = stunturn_server(*SERVE[1:], "--user-db", db)
    assert f"user store {db}" in server.stdout
    with TurnClient(server.addr("udp"), "dave", password) as client:
        assert error_of(client.allocate(check=False)) is None
    assert invoke("users", "remove", "dave", "--user-db", db).exit_code == 0
    with TurnClient(server.addr("udp"), "dave", password) as client:
        assert error_of(client.allocate(check=False)) == 401


# --- credentials --------------------------------------------------------------------------------


def parse_credentials(output: str) -> tuple[str, str, dict[str, object]]:
    lines = output.splitlines()
    assert lines[0].startswith("username: ") and lines[1].startswith("password: "), output
    snippet = json.loads("\n".join(lines[2:]))
    return lines[0].removeprefix("username: "), lines[1].removeprefix("password: "), snippet


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_credentials(algorithm: str) -> None:
    """`credentials --secret S --user U --ttl 3600` prints username EXPIRY:U with EXPIRY about
    now + 3600, password = base64(HMAC(S, username)) with SHA-1 (default) or --algorithm
    sha256, and an iceServers snippet carrying the same pair and the --url given."""
    extra = [] if algorithm == "sha1" else ["--algorithm", "sha256"]
    before = int(time.time())
    result = invoke("credentials", "--secret", "S3cret", "--user", "U", "--ttl", "3600",
                    "--url", "turn:127.0.0.1:3478?transport=udp", *extra)  # fmt: skip
    after = int(time.time())
    assert result.exit_code == 0, result.output
    username, password, snippet = parse_credentials(result.stdout)
    expiry, user = username.split(":", 1)
    assert user == "U" and before + 3600 <= int(expiry) <= after + 3600
    assert password == hmac_b64("S3cret", username, algorithm)
    assert snippet == {
        "iceServers": [
            {
                "urls": ["turn:127.0.0.1:3478?transport=udp"],
                "username": username,
                "credential": password,
            }
        ]
    }


def test_credentials_defaults_and_bad_ttl() -> None:
    """Without --url the snippet has a placeholder URL; --ttl must be at least 1."""
    result = invoke("credentials", "--secret", "S")
    assert result.exit_code == 0
    _, _, snippet = parse_credentials(result.stdout)
    assert snippet["iceServers"][0]["urls"] == ["turn:YOUR-SERVER:3478?transport=udp"]  # type: ignore[index]
    assert invoke("credentials", "--secret", "S", "--ttl", "0").exit_code == 2
    assert CliRunner().invoke(cli, ["credentials"]).exit_code == 2  # --secret is required


def test_credentials_work_on_server(stunturn_server: StartServer) -> None:
    """Credentials printed by `credentials --algorithm sha256` allocate on a server started with
    the same --auth-secret and --auth-secret-algorithm sha256; SHA-1 ones do not."""
    server = stunturn_server(*SERVE[1:], "--auth-secret", "rotate-me",
                             "--auth-secret-algorithm", "sha256")  # fmt: skip
    for algorithm, expected in (("sha256", None), ("sha1", 401)):
        out = invoke("credentials", "--secret", "rotate-me", "--user", "web", "--ttl", "60",
                     "--algorithm", algorithm).stdout  # fmt: skip
        username, password, _ = parse_credentials(out)
        with TurnClient(server.addr("udp"), username, password) as client:
            assert error_of(client.allocate(check=False)) == expected


# --- check-peer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "allowed", "rule"),
    [
        (["8.8.8.8"], True, "default allow (public address)"),
        (["8.8.8.8:3478"], True, "default allow (public address)"),
        (["10.0.0.1"], False, "special-purpose 10.0.0.0/8 (private-use)"),
        (["169.254.169.254"], False, "special-purpose 169.254.0.0/16 (link-local)"),
        (["::ffff:127.0.0.1"], False, "via IPv4-mapped"),
        (["[::1]:3478"], False, "::1"),
        (["64:ff9b::a00:1"], False, "10.0.0.0/8 (private-use) via NAT64"),
        (["10.0.0.1", "--allow-peer", "10.0.0.0/8"], True, "allow-peer 10.0.0.0/8"),
        (["8.8.8.8", "--deny-peer", "8.8.8.0/24"], False, "deny-peer 8.8.8.0/24"),
        (["8.8.4.4", "--deny-peer", "8.8.8.0/24"], True, "default allow (public address)"),
    ],
)
def test_check_peer(args: list[str], allowed: bool, rule: str) -> None:
    """`check-peer ADDRESS` prints "ADDRESS: allowed|denied (RULE)" and exits 0 or 1."""
    result = invoke("check-peer", *args)
    assert result.exit_code == (0 if allowed else 1), result.output
    verdict = "allowed" if allowed else "denied"
    assert result.stdout.startswith(f"{args[0]}: {verdict} ("), result.stdout
    assert rule in result.stdout


def test_check_peer_own_address_and_relay_ports() -> None:
    """With the server on 127.0.0.1 and loopback peers allowed, its own listening port is
    denied as the server's own address but a relay-range port on the relay IP is allowed
    (that is how two clients of one server reach each other)."""
    base = ["--listen", "127.0.0.1:3478", "--relay-ip", "127.0.0.1", "--relay-ports",
            "50000-50100", "--allow-loopback-peers"]  # fmt: skip
    own = invoke("check-peer", "127.0.0.1:3478", *base)
    assert own.exit_code == 1 and "denied (server's own address 127.0.0.1)" in own.stdout
    relay = invoke("check-peer", "127.0.0.1:50050", *base)
    assert relay.exit_code == 0 and "allowed (allow-peer 127.0.0.0/8)" in relay.stdout
    other = invoke("check-peer", "127.0.0.2:3478", *base)
    assert other.exit_code == 0 and "allowed" in other.stdout


def test_check_peer_config_file(tmp_path: Path) -> None:
    """check-peer reads allow-peer/deny-peer from --config; the command line adds to it."""
    config = tmp_path / "server.toml"
    config.write_text('allow-peer = ["10.0.0.0/8"]\ndeny-peer = ["8.8.8.0/24"]\n')
    allowed = invoke("check-peer", "10.1.2.3", "--config", str(config))
    assert allowed.exit_code == 0 and "allow-peer 10.0.0.0/8" in allowed.stdout
    denied = invoke("check-peer", "8.8.8.8", "--config", str(config))
    assert denied.exit_code == 1 and "deny-peer 8.8.8.0/24" in denied.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('allow-peer = ["10.0.0.0/33"]\n')
    assert_refused(invoke("check-peer", "8.8.8.8", "--config", str(bad)), "allow-peer")


@pytest.mark.parametrize("address", ["8.8.8.8:99999", "8.8.8.8:abc"])
def test_check_peer_refuses_bad_port(address: str) -> None:
    """An address whose port is not 0-65535 is an error (exit 2), not a verdict."""
    result = invoke("check-peer", address)
    assert result.exit_code == 2, result.output


# --- serve refuses bad TURN settings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--allow-peer", "10.0.0.0/33", "allow-peer"),
        ("--deny-peer", "not-a-network", "deny-peer"),
        ("--relay-ports", "5000", "relay-ports"),
        ("--relay-ports", "6000-5000", "relay-ports"),
        ("--relay-ports", "100-200", "relay-ports"),
        ("--relay-ip", "relay.example", "relay-ip"),
        ("--user", "no-colon", "user"),
        ("--auth-secret-algorithm", "md5", "auth-secret-algorithm"),
    ],
)
def test_serve_refuses_bad_turn_setting(option: str, value: str, field: str) -> None:
    """`serve` with a bad TURN setting refuses to start, naming the field, exit 2."""
    result = run_cli(*SERVE, "--user", "a:b", option, value, timeout=20)
    assert_refused(result, field)
    if option != "--user":
        assert repr(value) in result.stderr or value in result.stderr
