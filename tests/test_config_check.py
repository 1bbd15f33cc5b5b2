"""``stunturn config check`` and presets: every problem of a configuration listed at once, each
naming its field; warnings for legal-but-doubtful settings; what each preset sets, how explicit
options override it, and the peer policy the sfu preset produces.

Library and ``config`` commands run in-process (click's runner; no sockets). Two tests start a
real server to show ``serve --preset`` does what the summary says.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from conftest import StartServer
from helpers import free_port, run_cli, udp_query
from hypothesis import given
from hypothesis import strategies as st

from stunturn.aio.turnsetup import peer_policy
from stunturn.config import (
    KEYS,
    ConfigError,
    ConfigErrors,
    build_config,
    check_config,
    outside_of,
)
from stunturn.presets import PRESETS

cli: click.Group = importlib.import_module("stunturn_cli.main").cli
ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def check_file(tmp_path: Path, text: str, *options: str) -> Result:
    path = tmp_path / "stunturn.toml"
    path.write_text(text)
    return invoke("config", "check", *options, str(path))


def problem_lines(result: Result) -> list[str]:
    """The indented problem lines of a failed check, without the indent."""
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("  ")]


# --- every problem, not just the first ------------------------------------------------------------

MANY_PROBLEMS = """\
colour = "red"
listen = ["nonsense", "127.0.0.1:99999", "127.0.0.1:3478"]
workers = 0
response-rate = "fast"
udp = "yes"
log-level = "loud"
log_level = "info"
user = ["alice", "bob:", ":pw", "carol:s3cret-long-enough"]
relay-prots = "1-2"
relay-ports = "80-90"
relay-ip = ["192.0.2.1", "192.0.2.2"]
default-lifetime = 7200
max-lifetime = 600
cert = "/nonexistent/cert.pem"
alt-address = "127.0.0.2"
allow-peer = ["10.0.0.0/33"]
auth-secret = "$(TURN_SECRET)"
software = 5
preset = "fast"

[server]
workers = 1
"""

EXPECTED = [
    ("colour", "unknown setting"),
    ("listen", "'nonsense' is not an IP address"),
    ("listen", "port must be 0-65535, got '99999'"),
    ("workers", "must be between 1 and 256, got 0"),
    ("response-rate", "must be a number, got 'fast'"),
    ("udp", "must be true or false, got 'yes'"),
    ("log-level", "must be one of debug, info, warning, error, got 'loud'"),
    ("log_level", "given twice, as log-level and as log_level"),
    ("user", "got an entry without ':'"),
    ("user", "the password of 'bob' is empty"),
    ("user", "the name before ':' is empty"),
    ("relay-prots", "unknown setting (did you mean relay-ports?)"),
    ("relay-ports", "need 1024 <= LOW <= HIGH <= 65535, got '80-90'"),
    ("allow-peer", "'10.0.0.0/33' is not an IP network (CIDR)"),
    ("auth-secret", "$(TURN_SECRET) looks like a variable reference that was not expanded"),
    ("software", "must be a non-empty string, got 5"),
    ("preset", "must be one of public-p2p, sfu, stun-only, got 'fast'"),
    ("server", "tables are not used, put the keys at the top level"),
    ("key", "give both cert and key"),
    ("cert", "no such file: /nonexistent/cert.pem"),
    ("default-lifetime", "must not exceed max-lifetime"),
    ("relay-ip", "give at most one IPv4 and one IPv6 relay address"),
]


def test_check_lists_every_problem(tmp_path: Path) -> None:
    """A file with 22 problems of every kind (unknown keys, wrong types, bad values, a key given
    twice, conflicting options) gets all 22 listed, each as "field: what is wrong", exit 1."""
    result = check_file(tmp_path, MANY_PROBLEMS)
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[0].endswith(f"stunturn.toml: {len(EXPECTED)} problems")
    lines = problem_lines(result)
    assert len(lines) == len(EXPECTED), "\n".join(lines)
    for (field, fragment), line in zip(EXPECTED, lines, strict=True):
        assert line.startswith(f"{field}: "), (field, line)
        assert fragment in line, (fragment, line)
    assert "Traceback" not in result.output


def test_check_never_echoes_a_password(tmp_path: Path) -> None:
    """A malformed user entry is described without quoting the password in it."""
    result = check_file(tmp_path, 'user = ["hunter2-secret", "alice:"]\n')
    assert result.exit_code == 1
    assert "hunter2-secret" not in result.output


def test_cascades_are_suppressed() -> None:
    """A bad value does not drag in complaints about the checks that depend on it: with an
    unreadable listen, alt-address (which pairs with listen) is not judged; with a valid listen
    it is."""
    result = check_config({"listen": ["nonsense"], "alt-address": "127.0.0.2"})
    assert [e.field for e in result.errors] == ["listen"]
    result = check_config({"listen": ["0.0.0.0:3478"], "alt-address": "127.0.0.2"})
    assert [e.field for e in result.errors] == ["alt-address"]
    result = check_config({"max-lifetime": "long", "default-lifetime": 7200})
    assert [e.field for e in result.errors] == ["max-lifetime"]


def test_bad_value_in_a_lower_layer_is_still_reported() -> None:
    """A bad value in the file is an error even when the command line overrides it (the file
    would break the next start without that option)."""
    result = check_config({"workers": "x"}, {"workers": "2"})
    assert [e.field for e in result.errors] == ["workers"]


def test_build_config_raises_all_problems_as_one_error() -> None:
    """build_config (what serve uses) raises ConfigErrors: it reads as the first problem
    ("field: message (and N more problems)") and carries all of them."""
    with pytest.raises(ConfigErrors) as info:
        build_config({"workers": 0, "udp": "yes", "colour": 1})
    error = info.value
    assert isinstance(error, ConfigError) and error.field == "workers"
    assert str(error) == "workers: must be between 1 and 256, got 0 (and 2 more problems)"
    assert [e.field for e in error.errors] == ["workers", "udp", "colour"]
    with pytest.raises(ConfigErrors) as info:
        build_config({"workers": 0})
    assert str(info.value) == "workers: must be between 1 and 256, got 0"
    with pytest.raises(ValueError, match="at least one"):
        ConfigErrors([])


def test_serve_lists_every_problem(tmp_path: Path) -> None:
    """`serve` refuses with one line per problem, each naming its field."""
    path = tmp_path / "bad.toml"
    path.write_text('workers = 0\nudp = "yes"\n')
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "stunturn: error: workers: must be between 1 and 256, got 0",
        "stunturn: error: udp: must be true or false, got 'yes'",
    ]


# --- a valid file: the summary, warnings, options -------------------------------------------------


def test_valid_file_summary(tmp_path: Path) -> None:
    """Exit 0 and a summary whose first line says what is served."""
    result = check_file(
        tmp_path,
        'listen = ["127.0.0.1:3478"]\nworkers = 2\nuser = ["a:password-1", "b:password-2"]\n'
        'auth-secret = ["0123456789abcdef0123"]\nrealm = "example.org"\n',
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "ok: STUN on udp+tcp 127.0.0.1:3478; TURN with 2 static users + 1 REST secret"
    )
    assert "  workers: 2; RFC 5780: off; log: info text" in lines
    relay = "  relay: chosen at start (listen IP or default route), ports 49152-65535; realm "
    assert relay + "'example.org'" in lines
    assert any(line.startswith("  peers: public addresses") for line in lines)
    assert not any(line.startswith("warning:") for line in lines)


def test_summary_of_stun_only_and_tls(tmp_path: Path) -> None:
    """No TURN lines for a STUN-only server; TLS and RFC 5780 are described."""
    result = check_file(
        tmp_path,
        'preset = "stun-only"\nlisten = ["127.0.0.1:3478"]\nalt-address = "127.0.0.2"\n'
        'tls-listen = ["127.0.0.1:5349"]\nself-signed = true\n',
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "ok: STUN on udp+tcp 127.0.0.1:3478; tls 127.0.0.1:5349; no TURN (preset stun-only)"
    )
    assert any("RFC 5780: on, alternate 127.0.0.2" in line for line in lines)
    assert "  tls: self-signed certificate" in lines
    assert not any(line.startswith(("  relay", "  peers")) for line in lines)
    assert lines[-1].startswith("warning: self-signed: ")


WARNINGS: list[tuple[str, str, str]] = [
    ('turn = false\nuser = ["a:b"]\nallow-peer = ["10.0.0.0/8"]\n', "user", "not used: TURN"),
    ('preset = "stun-only"\nauth-secret = "0123456789abcdef"\n', "auth-secret",
     "TURN is off (turn = false, from preset stun-only)"),
    ("allow-loopback-peers = true\n", "allow-loopback-peers", "for tests only"),
    ('allow-peer = ["10.0.5.0/24"]\ndeny-peer = ["10.0.0.0/8"]\n', "allow-peer",
     "10.0.5.0/24 has no effect: deny-peer 10.0.0.0/8 covers it"),
    ('listen = ["0.0.0.0:50000"]\n', "relay-ports", "contains the listen port of 0.0.0.0:50000"),
    ('auth-secret = "short"\n', "auth-secret", "a secret of 5 characters is guessable"),
    ('nonce-secret = "short"\n', "nonce-secret", "a secret of 5 characters is guessable"),
    ("self-signed = true\n", "self-signed", "give cert and key in production"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "field", "fragment"), WARNINGS, ids=[w[1] for w in WARNINGS])
def test_warnings_do_not_fail_unless_strict(
    tmp_path: Path, text: str, field: str, fragment: str
) -> None:
    """Legal but doubtful settings are printed as "warning: field: ..." with exit 0; --strict
    makes them fail (exit 1). serve still starts with them (build_config does not raise)."""
    result = check_file(tmp_path, text)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert any(w.startswith(f"warning: {field}: ") and fragment in w for w in warnings), warnings
    assert check_file(tmp_path, text, "--strict").exit_code == 1
    build_config(tomllib.loads(text))


def test_turn_off_warns_only_about_settings_given() -> None:
    """With TURN off, only the TURN settings actually given are reported as unused."""
    result = check_config({"turn": False, "relay-ports": "50000-50100", "realm": "x"})
    assert [w.field for w in result.warnings] == ["relay-ports"]


def test_json_report(tmp_path: Path) -> None:
    """--json prints a machine-readable report with the same content."""
    result = check_file(tmp_path, "workers = 0\ncolour = 1\n", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["summary"] is None
    assert [e["field"] for e in report["errors"]] == ["workers", "colour"]
    result = check_file(tmp_path, 'auth-secret = "short"\n', "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["ok"] is True
    assert report["summary"][0].startswith("STUN on udp+tcp 0.0.0.0:3478, [::]:3478; TURN with")
    assert [w["field"] for w in report["warnings"]] == ["auth-secret"]


def test_syntax_errors_and_unreadable_files(tmp_path: Path) -> None:
    """Invalid TOML is a problem of the file (exit 1, with the line); a file that cannot be
    read is an error of the command (exit 2, on stderr)."""
    result = check_file(tmp_path, "workers = 2\nlisten = = 1\n")
    assert result.exit_code == 1
    assert problem_lines(result)[0].startswith("config: ") and "line 2" in result.stdout
    missing = tmp_path / "missing.toml"
    result = invoke("config", "check", str(missing))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"stunturn: error: config: cannot read {missing}")


def test_no_file_checks(tmp_path: Path) -> None:
    """--no-file-checks accepts cert, key and user-db paths that exist only on the server."""
    text = 'cert = "/etc/srv/cert.pem"\nkey = "/etc/srv/key.pem"\nuser-db = "/var/srv/u.db"\n'
    assert problem_lines(check_file(tmp_path, text)) == [
        "cert: no such file: /etc/srv/cert.pem",
        "key: no such file: /etc/srv/key.pem",
        "user-db: no such file: /var/srv/u.db",
    ]
    result = check_file(tmp_path, text, "--no-file-checks")
    assert result.exit_code == 0, result.output
    assert "  tls: cert /etc/srv/cert.pem" in result.stdout.splitlines()


def test_every_key_is_known_and_suggestions_use_dashes() -> None:
    """Close misspellings (any case, underscores) get a suggestion spelled as in the file."""
    assert "relay-ports" in KEYS and "preset" in KEYS and "deny-other-peers" in KEYS
    result = check_config({"Relay_Port": "1-2", "xyzzy": 1})
    assert [str(e) for e in result.errors] == [
        "Relay_Port: unknown setting (did you mean relay-ports?)",
        "xyzzy: unknown setting",
    ]


# --- presets --------------------------------------------------------------------------------------


def test_presets_set_exactly_what_they_say() -> None:
    """Each preset's settings are valid keys and land in the config as given (sfu needs an
    allow-peer range to be valid at all)."""
    for name, preset in PRESETS.items():
        extra = {"allow-peer": ["10.0.5.0/24"]} if name == "sfu" else {}
        config = build_config({"preset": name, **extra})
        assert config.preset == name
        for key, value in preset.settings.items():
            got = getattr(config, key.replace("-", "_"))
            if key == "deny-peer" or (key == "allow-peer" and extra):
                continue  # deny-peer grows with sfu; allow-peer was given explicitly
            assert got == (tuple(value) if isinstance(value, list) else value), (name, key)


def test_preset_values_are_overridden_by_explicit_options() -> None:
    """File over preset, command line over file; the last preset named wins."""
    assert build_config({"preset": "stun-only"}).turn is False
    assert build_config({"preset": "stun-only", "turn": True}).turn is True
    assert build_config({"preset": "stun-only"}, {"turn": True}).turn is True
    config = build_config({"preset": "sfu", "allow-peer": "10.0.5.0/24"}, {"preset": "public-p2p"})
    assert config.preset == "public-p2p" and not config.deny_other_peers
    config = build_config({"preset": "sfu", "allow-peer": "10.0.5.0/24", "tcp": False})
    assert config.deny_other_peers and not config.tcp


def test_sfu_requires_allow_peer() -> None:
    """sfu without allow-peer cannot relay anywhere: an error naming allow-peer and the preset;
    with TURN explicitly off it is not an error."""
    result = check_config({"preset": "sfu"})
    assert [e.field for e in result.errors] == ["allow-peer"]
    assert "from preset sfu" in str(result.errors[0])
    assert check_config({"deny-other-peers": True}).errors[0].field == "allow-peer"
    assert check_config({"preset": "sfu", "turn": False}).ok


def _policy(layer: dict[str, Any]) -> Any:
    # A specific listen and relay IP: the policy needs no interface or route lookup.
    base = {"listen": "192.0.2.1:3478", "relay-ip": "192.0.2.1", "user": "a:b"}
    return peer_policy(build_config({**base, **layer}))


@pytest.mark.parametrize(
    ("peer", "sfu", "public"),
    [
        ("10.0.5.7", True, False),  # the backend: only sfu relays to it
        ("10.0.6.1", False, False),  # another private address
        ("8.8.8.8", False, True),  # a public address: only public-p2p relays to it
        ("2001:4860:4860::8888", False, True),
        ("::ffff:10.0.5.7", False, False),  # IPv4-mapped backend: denied (documented)
        ("169.254.169.254", False, False),  # cloud metadata
        ("192.0.2.1", False, False),  # the server itself
    ],
)
def test_sfu_relays_only_to_backends(peer: str, sfu: bool, public: bool) -> None:
    """The sfu preset denies every peer outside allow-peer; public-p2p keeps the default
    policy (public addresses only)."""
    assert _policy({"preset": "sfu", "allow-peer": "10.0.5.0/24"}).allowed(peer) is sfu
    assert _policy({"preset": "public-p2p"}).allowed(peer) is public


def test_sfu_with_loopback_backends() -> None:
    """allow-loopback-peers (tests) still works under deny-other-peers."""
    policy = _policy({"preset": "sfu", "allow-peer": "10.0.5.0/24", "allow-loopback-peers": True})
    assert policy.allowed("127.0.0.1") and policy.allowed("::1")
    assert not policy.allowed("8.8.8.8")


def test_with_peer_defaults_is_idempotent() -> None:
    """Building twice (serve rebuilds after creating the user store) adds nothing twice; the
    user's own deny-peer entries come first and stay."""
    config = build_config({"deny-other-peers": True, "allow-peer": "10.0.5.0/24",
                           "deny-peer": "10.0.5.9/32"})  # fmt: skip
    assert config.deny_peer[0] == "10.0.5.9/32"
    assert config.with_peer_defaults() is config
    assert len(set(config.deny_peer)) == len(config.deny_peer)


networks = st.one_of(
    st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
              st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
              st.integers(0, 2**128 - 1), st.integers(0, 128)),
)  # fmt: skip
addresses = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
)


@given(st.lists(networks, max_size=5), st.lists(addresses, max_size=20))
def test_outside_of_is_the_exact_complement(
    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    probes: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    """An address is in outside_of(allowed) exactly when it is in no allowed network; the
    result's networks do not overlap."""
    outside = outside_of(str(n) for n in allowed)
    # Probe the edges of every allowed network too, where off-by-one errors live.
    edges = [a for n in allowed for a in (n.network_address, n.broadcast_address)]
    for address in [*probes, *edges]:
        inside = any(address in n for n in allowed if n.version == address.version)
        hits = [n for n in outside if n.version == address.version and address in n]
        assert len(hits) == (0 if inside else 1), (address, allowed, hits)


# --- the command line -----------------------------------------------------------------------------


def test_config_presets_lists_exactly_the_preset_values() -> None:
    """`stunturn config presets` prints every preset and each key = value it sets."""
    result = invoke("config", "presets")
    assert result.exit_code == 0
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.summary}" in result.stdout
        for key, value in preset.settings.items():
            assert f"  {key} = {json.dumps(value)}" in result.stdout


def test_docs_list_exactly_what_each_preset_sets() -> None:
    """docs/deploy.md has one table row per preset setting, matching PRESETS."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \| `([a-z-]+)` \| `([^`]*)` \|", text, re.M))
    expected = {
        (name, key, json.dumps(value))
        for name, preset in PRESETS.items()
        for key, value in preset.settings.items()
    }
    assert rows == expected


def test_serve_help_has_preset() -> None:
    result = invoke("serve", "--help")
    assert "--preset NAME" in result.stdout and "public-p2p, sfu, stun-only" in result.stdout


def test_check_peer_takes_a_preset() -> None:
    """check-peer shows what the sfu preset does to a peer."""
    base = ["check-peer", "--preset", "sfu", "--allow-peer", "10.0.5.0/24"]
    assert invoke(*base, "10.0.5.7").exit_code == 0
    denied = invoke(*base, "8.8.8.8")
    assert denied.exit_code == 1 and "denied (deny-peer" in denied.stdout


def test_serve_refuses_sfu_without_backends() -> None:
    """serve --preset sfu without allow-peer stops before binding, naming allow-peer."""
    result = run_cli("serve", "--preset", "sfu", "--listen", "127.0.0.1:0", "--workers", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("stunturn: error: allow-peer: deny-other-peers is on")
    assert "listening on" not in result.stdout


def test_serve_stun_only_preset(stunturn_server: StartServer) -> None:
    """serve --preset stun-only serves STUN with TURN off (no user store is created)."""
    port = free_port("127.0.0.1")
    server = stunturn_server("--preset", "stun-only", "--listen", f"127.0.0.1:{port}",
                             "--workers", "1")  # fmt: skip
    assert "TURN: off" in server.stdout and "password" not in server.stdout
    assert udp_query(("127.0.0.1", port)) is not None
    assert server.stop() == 0
