"""Unit tests for stunturn.config: endpoint parsing, layer merging, and validation errors that
always name the field at fault (no sockets, no subprocesses)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stunturn.config import (
    DEFAULT_PORT,
    DEFAULT_TLS_PORT,
    ConfigError,
    ConfigErrors,
    Endpoint,
    ServerConfig,
    build_config,
    check_config,
    load_toml,
    parse_endpoint,
)

# --- parse_endpoint ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3479", Endpoint("127.0.0.1", 3479)),
        ("127.0.0.1", Endpoint("127.0.0.1", 1234)),
        ("  10.0.0.1:0  ", Endpoint("10.0.0.1", 0)),
        ("0.0.0.0:65535", Endpoint("0.0.0.0", 65535)),
        ("[::1]:5349", Endpoint("::1", 5349)),
        ("[::1]", Endpoint("::1", 1234)),
        ("::1", Endpoint("::1", 1234)),
        ("2001:db8::1", Endpoint("2001:db8::1", 1234)),
        ("[2001:0db8:0000::0001]:7", Endpoint("2001:db8::1", 7)),
        ("[::]:0", Endpoint("::", 0)),
    ],
)
def test_parse_endpoint_accepts(text: str, expected: Endpoint) -> None:
    """HOST:PORT, [V6]:PORT, HOST and V6 parse; IPv6 is normalised; the default port fills in."""
    assert parse_endpoint(text, 1234, "listen") == expected


@pytest.mark.parametrize(
    "text",
    [
        "999.1.1.1:1",
        "localhost:3478",
        "example.org",
        "127.0.0.1:70000",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1:3e3",
        "[::1",
        "[::1]3478",
        "[127.0.0.1:80",
        "[nonsense]:1",
        "",
        "nonsense",
    ],
)
def test_parse_endpoint_rejects_naming_the_field(text: str) -> None:
    """Anything that is not an IP literal with an optional 0-65535 port is refused with a
    ConfigError naming the field it came from."""
    with pytest.raises(ConfigError) as info:
        parse_endpoint(text, DEFAULT_PORT, "tls-listen")
    assert info.value.field == "tls-listen"
    assert str(info.value).startswith("tls-listen: ")


@pytest.mark.parametrize("port", ["²", "①"])
def test_parse_endpoint_unicode_digit_port(port: str) -> None:
    """A port made of Unicode 'digits' is a ConfigError, not a crash."""
    with pytest.raises(ConfigError):
        parse_endpoint(f"127.0.0.1:{port}", DEFAULT_PORT, "listen")


@pytest.mark.parametrize("text", ["127.0.0.1:", "[::1]:"])
def test_parse_endpoint_empty_port(text: str) -> None:
    """A colon with no port after it is a typo, not a request for the default port."""
    with pytest.raises(ConfigError):
        parse_endpoint(text, DEFAULT_PORT, "listen")


def test_endpoint_str_and_flags() -> None:
    """Endpoints print as the CLI takes them and know their family and wildcard-ness."""
    assert str(Endpoint("::1", 5)) == "[::1]:5"
    assert str(Endpoint("127.0.0.1", 5)) == "127.0.0.1:5"
    assert Endpoint("::", 1).is_wildcard and Endpoint("0.0.0.0", 1).is_wildcard
    assert not Endpoint("127.0.0.1", 1).is_wildcard
    assert Endpoint("::1", 1).family_v6 and not Endpoint("127.0.0.1", 1).family_v6


# --- build_config: defaults and merging -----------------------------------------------------------


def test_defaults_need_no_configuration() -> None:
    """No layers: both wildcards on 3478, one worker per CPU, rate limiting on, no TLS."""
    config = build_config()
    assert config.listen == (Endpoint("0.0.0.0", DEFAULT_PORT), Endpoint("::", DEFAULT_PORT))
    assert config.tls_listen == () and config.cert is None and config.key is None
    assert config.workers == (os.cpu_count() or 1)
    assert config.udp and config.tcp
    assert config.response_rate == 200.0 and config.response_burst == 400
    assert config.log_level == "info" and config.log_format == "text"
    assert config.software is None and config.alt_address is None


def test_later_layers_win_and_keys_take_dashes_or_underscores() -> None:
    """The CLI layer overrides the file layer key by key; untouched keys keep the file's value;
    'response-rate' and 'response_rate' are the same key."""
    file_layer: dict[str, Any] = {
        "listen": ["127.0.0.1:4000"],
        "workers": 3,
        "response_rate": 5,
        "log-level": "WARNING",
        "software": "from-file",
    }
    cli_layer: dict[str, Any] = {"workers": "2", "response-rate": "7.5", "listen": ("[::1]:1",)}
    config = build_config(file_layer, cli_layer)
    assert config.workers == 2
    assert config.response_rate == 7.5
    assert config.listen == (Endpoint("::1", 1),)
    assert config.log_level == "warning"
    assert config.software == "from-file"


def test_string_values_are_converted() -> None:
    """Values from the command line arrive as strings and are converted and range-checked."""
    config = build_config(
        {
            "listen": "127.0.0.1:9",
            "tls-listen": ["127.0.0.1"],
            "self-signed": True,
            "workers": "4",
            "response-burst": "10",
            "response-rate": "0",
            "log-format": "JSON",
            "alt-address": "127.0.0.2",
        }
    )
    assert config.listen == (Endpoint("127.0.0.1", 9),)
    assert config.tls_listen == (Endpoint("127.0.0.1", DEFAULT_TLS_PORT),)
    assert (config.workers, config.response_burst, config.response_rate) == (4, 10, 0.0)
    assert config.log_format == "json"
    assert config.alt_address == "127.0.0.2"


def test_alt_address_pairs_with_specific_listen_of_same_family() -> None:
    """RFC 5780 pairs the alternate IP with the first specific (non-wildcard) listen address
    of its family; IPv6 alternates work too and are normalised."""
    config = build_config(
        {"listen": ["0.0.0.0:1", "127.0.0.1:3478", "[::1]:5"], "alt-address": "0:0::2"}
    )
    assert config.alt_address == "::2"
    assert config.primary_for(Endpoint("::2", 0)) == Endpoint("::1", 5)
    assert config.primary_for(Endpoint("127.0.0.2", 0)) == Endpoint("127.0.0.1", 3478)


def test_config_is_frozen() -> None:
    """A ServerConfig cannot be changed after validation."""
    config = build_config()
    with pytest.raises(AttributeError):
        config.workers = 9  # type: ignore[misc]


# --- build_config: every validation error names its field ---------------------------------------


def _cert_files(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    return str(cert), str(key)


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"colour": "red"}, "colour"),
    ({"Listen": ["127.0.0.1:1"]}, "Listen"),
    ({"listen": ["nonsense"]}, "listen"),
    ({"listen": "127.0.0.1:99999"}, "listen"),
    ({"listen": 5}, "listen"),
    ({"listen": [5]}, "listen"),
    ({"listen": [""]}, "listen"),
    ({"listen": []}, "listen"),
    ({"tls-listen": ["nonsense"]}, "tls-listen"),
    ({"tls_listen": {"a": 1}}, "tls-listen"),
    ({"workers": "x"}, "workers"),
    ({"workers": 0}, "workers"),
    ({"workers": 257}, "workers"),
    ({"workers": True}, "workers"),
    ({"workers": 1.5}, "workers"),
    ({"response-burst": 0}, "response-burst"),
    ({"response-burst": "many"}, "response-burst"),
    ({"response-rate": -1}, "response-rate"),
    ({"response-rate": "nan"}, "response-rate"),
    ({"response-rate": "fast"}, "response-rate"),
    ({"response-rate": False}, "response-rate"),
    ({"response-rate": [1]}, "response-rate"),
    ({"udp": "yes"}, "udp"),
    ({"tcp": 1}, "tcp"),
    ({"udp": False, "tcp": False}, "udp"),
    ({"log-level": "loud"}, "log-level"),
    ({"log_level": 3}, "log-level"),
    ({"log-format": "xml"}, "log-format"),
    ({"alt-address": "nope"}, "alt-address"),
    ({"alt-address": "127.0.0.2"}, "alt-address"),
    ({"listen": ["0.0.0.0:1"], "alt-address": "127.0.0.2"}, "alt-address"),
    ({"listen": ["[::1]:1"], "alt-address": "127.0.0.2"}, "alt-address"),
    ({"listen": ["127.0.0.1:1"], "alt-address": "127.0.0.1"}, "alt-address"),
    ({"listen": ["127.0.0.1:65535"], "alt-address": "127.0.0.2"}, "listen"),
    ({"software": ""}, "software"),
    ({"software": 5}, "software"),
    ({"cert": "/nonexistent/c.pem"}, "key"),
    ({"key": "/nonexistent/k.pem"}, "cert"),
]


@pytest.mark.parametrize(("layer", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_every_validation_error_names_its_field(layer: dict[str, Any], field: str) -> None:
    """Unknown keys and bad values raise ConfigError whose .field and message prefix name the
    setting as the user spells it (dashes), so the CLI can print it without a traceback."""
    with pytest.raises(ConfigError) as info:
        build_config(layer)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_tls_file_errors_name_their_field(tmp_path: Path) -> None:
    """tls-listen without a certificate names tls-listen; a missing file names cert or key;
    cert and self-signed together name self-signed."""
    cert, key = _cert_files(tmp_path)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls-listen": ["127.0.0.1:0"]}, "tls-listen"),
        ({"cert": cert, "key": key, "self-signed": True}, "self-signed"),
        ({"tls-listen": ["127.0.0.1:0"], "cert": str(tmp_path / "none"), "key": key}, "cert"),
        ({"tls-listen": ["127.0.0.1:0"], "cert": cert, "key": str(tmp_path / "none")}, "key"),
    ]
    for layer, field in cases:
        with pytest.raises(ConfigError) as info:
            build_config(layer)
        assert info.value.field == field, layer
    ok = build_config({"tls-listen": ["127.0.0.1:0"], "cert": cert, "key": key})
    assert ok.cert == cert and ok.key == key


def test_tls_default_ports(tmp_path: Path) -> None:
    """A certificate (or self-signed) without tls-listen serves TLS on port 5349 of every
    listen address; TCP stays on the listen port (3478 by default)."""
    cert, key = _cert_files(tmp_path)
    config = build_config({"cert": cert, "key": key})
    assert config.tls_listen == (
        Endpoint("0.0.0.0", DEFAULT_TLS_PORT),
        Endpoint("::", DEFAULT_TLS_PORT),
    )
    assert config.tcp and config.listen[0].port == DEFAULT_PORT
    config = build_config({"listen": ["192.0.2.1:3478"], "self-signed": True})
    assert config.tls_listen == (Endpoint("192.0.2.1", DEFAULT_TLS_PORT),)
    config = build_config({"self-signed": True, "tls-listen": ["0.0.0.0:443"]})
    assert config.tls_listen == (Endpoint("0.0.0.0", 443),)
    assert build_config({}).tls_listen == ()


def test_tls_only_server_is_valid() -> None:
    """No UDP/TCP listen addresses is fine when a TLS address is given."""
    config = build_config({"listen": [], "tls-listen": ["127.0.0.1:0"], "self-signed": True})
    assert config.listen == () and config.tls_listen == (Endpoint("127.0.0.1", 0),)
    layer = {"udp": False, "tcp": False, "tls-listen": ["[::1]:0"], "self-signed": True}
    assert build_config(layer).tls_listen


def test_software_too_long_is_refused() -> None:
    """A SOFTWARE value longer than RFC 8489 allows is refused at configuration time."""
    with pytest.raises(ConfigError) as info:
        build_config({"software": "x" * 800})
    assert info.value.field == "software"


def test_validate_directly() -> None:
    """ServerConfig.validate checks cross-field rules on hand-built configs too."""
    with pytest.raises(ConfigError) as info:
        ServerConfig(listen=(), tls_listen=()).validate()
    assert info.value.field == "listen"
    config = ServerConfig(listen=(Endpoint("127.0.0.1", 0),), workers=1)
    assert config.validate() is config


# --- load_toml ----------------------------------------------------------------------------------


def test_load_toml_reads_a_file(tmp_path: Path) -> None:
    """A TOML file becomes the raw layer build_config takes."""
    path = tmp_path / "ok.toml"
    path.write_text('listen = ["127.0.0.1:5000"]\nworkers = 2\nlog-level = "debug"\n')
    layer = load_toml(path)
    assert layer == {"listen": ["127.0.0.1:5000"], "workers": 2, "log-level": "debug"}
    config = build_config(layer)
    assert config.listen == (Endpoint("127.0.0.1", 5000),) and config.workers == 2


def test_load_toml_errors_name_config_and_position(tmp_path: Path) -> None:
    """Invalid TOML and unreadable files raise ConfigError for field 'config' naming the file
    (and, for syntax errors, the line)."""
    bad = tmp_path / "bad.toml"
    bad.write_text('workers = 2\nlisten = = 1\nlog-level = "info"\n')
    with pytest.raises(ConfigError) as info:
        load_toml(bad)
    assert info.value.field == "config"
    assert str(bad) in str(info.value) and "line" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path / "missing.toml")
    assert info.value.field == "config" and "missing.toml" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path)
    assert info.value.field == "config"


# --- collecting every problem -------------------------------------------------------------------


def test_validate_reports_every_cross_field_problem() -> None:
    """problems() lists every cross-field problem in a stable order; validate() raises them as
    one ConfigErrors that reads as the first; skip= leaves out checks on unreadable fields."""
    config = ServerConfig(
        listen=(),
        tls_listen=(),
        cert="/nonexistent/c.pem",
        default_lifetime=7200,
        max_lifetime=600,
        relay_ip=("192.0.2.1", "192.0.2.2"),
        workers=1,
    )
    fields = ["listen", "key", "cert", "default-lifetime", "relay-ip"]
    assert [p.field for p in config.problems()] == fields
    with pytest.raises(ConfigErrors) as info:
        config.validate()
    assert info.value.field == "listen" and [e.field for e in info.value.errors] == fields
    assert str(info.value).endswith("(and 4 more problems)")
    skipped = config.problems(skip={"listen", "relay_ip"}, check_files=False)
    assert [p.field for p in skipped] == ["key", "default-lifetime"]


def test_list_values_report_each_bad_item() -> None:
    """Each bad entry of a list setting is its own problem, naming the entry."""
    with pytest.raises(ConfigErrors) as info:
        build_config({"listen": ["nonsense", "127.0.0.1:1", "[::1"], "deny-peer": ["x", "y"]})
    messages = [str(e) for e in info.value.errors]
    assert len(messages) == 4
    assert "'nonsense'" in messages[0] and "'[::1'" in messages[1]
    assert messages[2:] == [
        "deny-peer: 'x' is not an IP network (CIDR)",
        "deny-peer: 'y' is not an IP network (CIDR)",
    ]


def test_check_config_returns_config_or_errors() -> None:
    """check_config gives the config and its warnings when valid, only errors otherwise."""
    good = check_config({"listen": "127.0.0.1:3478", "allow-loopback-peers": True})
    assert good.ok and good.config is not None and good.config.allow_loopback_peers
    assert [w.field for w in good.warnings] == ["allow-loopback-peers"]
    bad = check_config({"workers": 0})
    assert not bad.ok and bad.config is None and bad.warnings == ()


def test_deny_other_peers_becomes_deny_ranges() -> None:
    """deny-other-peers turns into deny-peer ranges covering everything outside allow-peer,
    in both families."""
    config = build_config({"deny-other-peers": True, "allow-peer": ["10.0.0.0/8", "2001:db8::/32"]})
    assert "0.0.0.0/5" in config.deny_peer and "11.0.0.0/8" in config.deny_peer
    assert "10.0.0.0/8" not in config.deny_peer and "::/3" in config.deny_peer
    assert config.allow_peer == ("10.0.0.0/8", "2001:db8::/32")
    assert build_config({"allow-peer": ["10.0.0.0/8"]}).deny_peer == ()
