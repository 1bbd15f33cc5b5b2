"""Typed server configuration: defaults, TOML loading and validation that names the field.

Every command-line option of ``stunturn serve`` is also a key of the TOML file, spelled like the
long option without the dashes in front (``alt-address``); ``alt_address`` is accepted too. Values
given on the command line win over the file. Anything unknown or invalid raises
:class:`ConfigError` whose message starts with the field name, and the server refuses to start.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_PORT = 3478
DEFAULT_TLS_PORT = 5349
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """An invalid configuration value; ``field`` names the option or key at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP literal and a port."""

    host: str
    port: int

    @property
    def family_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_v6 else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")


def parse_endpoint(text: str, default_port: int, field_name: str) -> Endpoint:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``V6``; HOST must be an IP literal."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(field_name, f"missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(field_name, f"expected ':PORT' after ']' in {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(field_name, f"{host!r} is not an IP address (in {text!r})") from None
    port = default_port
    if port_text or (text.endswith(":") and text.count(":") == 1) or text.endswith("]:"):
        if not _PORT.fullmatch(port_text) or not 0 <= int(port_text) <= 65535:
            raise ConfigError(field_name, f"port must be 0-65535, got {port_text!r} in {text!r}")
        port = int(port_text)
    return Endpoint(ip.compressed, port)


_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``stunturn serve`` can be told. Defaults need no configuration at all."""

    listen: tuple[Endpoint, ...] = (
        Endpoint("0.0.0.0", DEFAULT_PORT),
        Endpoint("::", DEFAULT_PORT),
    )
    tls_listen: tuple[Endpoint, ...] = ()
    cert: str | None = None
    key: str | None = None
    self_signed: bool = False
    alt_address: str | None = None
    udp: bool = True
    tcp: bool = True
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    log_level: str = "info"
    log_format: str = "text"
    response_rate: float = 200.0
    response_burst: int = 400
    software: str | None = None
    # --- TURN -----------------------------------------------------------------------------
    turn: bool = True
    realm: str = "stunturn"
    user: tuple[tuple[str, str], ...] = ()
    user_db: str | None = None
    auth_secret: tuple[str, ...] = ()
    auth_secret_algorithm: str = "sha1"
    relay_ip: tuple[str, ...] = ()
    relay_ports: tuple[int, int] = (49152, 65535)
    allow_peer: tuple[str, ...] = ()
    deny_peer: tuple[str, ...] = ()
    allow_loopback_peers: bool = False
    default_lifetime: int = 600
    max_lifetime: int = 3600
    user_quota: int = 10
    ip_quota: int = 64
    total_quota: int = 20_000
    permission_quota: int = 64
    channel_quota: int = 64
    max_bps: int = 0
    nonce_secret: str | None = None
    peer_connection_quota: int = 64
    # --- TCP and TLS connections ----------------------------------------------------------
    connection_quota: int = 10_000
    ip_connection_quota: int = 256
    idle_timeout: float = 300.0
    handshake_timeout: float = 10.0
    message_timeout: float = 10.0
    stream_buffer: int = 256 * 1024

    @property
    def has_credentials(self) -> bool:
        """Whether any credential source is configured (else the default user store is used)."""
        return bool(self.user or self.user_db or self.auth_secret)

    def validate(self) -> ServerConfig:
        """Cross-field checks; returns self so calls can chain."""
        if not self.listen and not self.tls_listen:
            raise ConfigError("listen", "at least one listen or tls-listen address is needed")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert" if self.cert is None else "key", "give both cert and key")
        if self.cert is not None and self.self_signed:
            raise ConfigError("self-signed", "give either cert and key or self-signed, not both")
        if self.tls_listen and self.cert is None and not self.self_signed:
            raise ConfigError(
                "tls-listen", "TLS needs a certificate: give cert and key, or self-signed"
            )
        for name in ("cert", "key", "user_db"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(name.replace("_", "-"), f"no such file: {value}")
        if not self.udp and not self.tcp and not self.tls_listen:
            raise ConfigError("udp", "udp and tcp are both off and there is no tls-listen")
        if self.alt_address is not None:
            alt = Endpoint(self.alt_address, 0)
            primary = self.primary_for(alt)
            if primary is None:
                raise ConfigError(
                    "alt-address",
                    f"needs a listen address of the same family that is a specific IP "
                    f"(not a wildcard) to pair with {self.alt_address}",
                )
            if primary.host == alt.host:
                raise ConfigError("alt-address", "must differ from the primary listen address")
            if primary.port == 65535:
                raise ConfigError("listen", "RFC 5780 needs port+1; the primary port is 65535")
        if self.default_lifetime > self.max_lifetime:
            raise ConfigError("default-lifetime", "must not exceed max-lifetime")
        if (
            sum(":" in ip for ip in self.relay_ip) > 1
            or sum(":" not in ip for ip in self.relay_ip) > 1
        ):
            raise ConfigError("relay-ip", "give at most one IPv4 and one IPv6 relay address")
        return self

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_listen or self.cert is not None or self.self_signed)

    def with_tls_defaults(self) -> ServerConfig:
        """With a certificate (or ``self-signed``) but no ``tls-listen``: TLS on port 5349 of
        every listen address."""
        if self.tls_listen or not (self.cert is not None or self.self_signed):
            return self
        tls = tuple(dict.fromkeys(Endpoint(ep.host, DEFAULT_TLS_PORT) for ep in self.listen))
        return replace(self, tls_listen=tls)

    def primary_for(self, alt: Endpoint) -> Endpoint | None:
        """The listen address RFC 5780 pairs with the alternate IP."""
        for ep in self.listen:
            if ep.family_v6 == alt.family_v6 and not ep.is_wildcard:
                return ep
        return None


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {number}")
    return number


def _as_float(name: str, value: Any, low: float) -> float:
    if isinstance(value, bool):
        raise ConfigError(name, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"must be a number, got {value!r}") from None
    if not number >= low:  # also refuses NaN
        raise ConfigError(name, f"must be >= {low}, got {value!r}")
    return number


def _as_seconds(name: str, value: Any, low: float, high: float) -> float:
    number = _as_float(name, value, low)
    if number > high:
        raise ConfigError(name, f"must be <= {high:g}, got {value!r}")
    return number


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(name, f"must be true or false, got {value!r}")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"must be a non-empty string, got {value!r}")
    return value


def _as_list(name: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(name, f"must be a string or a list of strings, got {value!r}")
    return [_as_str(name, v) for v in items]


def _as_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def convert(name: str, value: Any) -> str:
        text = _as_str(name, value).lower()
        if text not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    return convert


def _as_ip(name: str, value: Any) -> str:
    text = _as_str(name, value)
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ConfigError(name, f"{text!r} is not an IP address") from None


def _as_software(name: str, value: Any) -> str:
    text = _as_str(name, value)
    if len(text) >= 128 or len(text.encode()) > 763:
        raise ConfigError(name, "must be fewer than 128 characters (RFC 8489 section 14.14)")
    return text


def _as_users(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for item in _as_list(name, value):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ConfigError(name, f"expected NAME:PASSWORD, got {item!r}")
        out.append((user, password))
    return tuple(out)


def _as_port_range(name: str, value: Any) -> tuple[int, int]:
    text = _as_str(name, value)
    low, sep, high = text.partition("-")
    if not sep or not _PORT.fullmatch(low) or not _PORT.fullmatch(high):
        raise ConfigError(name, f"expected LOW-HIGH, got {text!r}")
    lo, hi = int(low), int(high)
    if not 1024 <= lo <= hi <= 65535:
        raise ConfigError(name, f"need 1024 <= LOW <= HIGH <= 65535, got {text!r}")
    return (lo, hi)


def _as_networks(name: str, value: Any) -> tuple[str, ...]:
    items = _as_list(name, value)
    for item in items:
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ConfigError(name, f"{item!r} is not an IP network (CIDR)") from None
    return tuple(item.strip() for item in items)


def _endpoints(default_port: int) -> Callable[[str, Any], tuple[Endpoint, ...]]:
    def convert(name: str, value: Any) -> tuple[Endpoint, ...]:
        return tuple(parse_endpoint(v, default_port, name) for v in _as_list(name, value))

    return convert


def _int(low: int, high: int) -> Callable[[str, Any], int]:
    return lambda name, value: _as_int(name, value, low, high)


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "listen": _endpoints(DEFAULT_PORT),
    "tls_listen": _endpoints(DEFAULT_TLS_PORT),
    "cert": _as_str,
    "key": _as_str,
    "self_signed": _as_bool,
    "alt_address": _as_ip,
    "udp": _as_bool,
    "tcp": _as_bool,
    "workers": _int(1, 256),
    "log_level": _as_choice(LOG_LEVELS),
    "log_format": _as_choice(LOG_FORMATS),
    "response_rate": lambda name, value: _as_float(name, value, 0.0),
    "response_burst": _int(1, 1_000_000_000),
    "software": _as_software,
    "turn": _as_bool,
    "realm": _as_software,
    "user": _as_users,
    "user_db": _as_str,
    "auth_secret": lambda name, value: tuple(_as_list(name, value)),
    "auth_secret_algorithm": _as_choice(("sha1", "sha256")),
    "relay_ip": lambda name, value: tuple(_as_ip(name, v) for v in _as_list(name, value)),
    "relay_ports": _as_port_range,
    "allow_peer": _as_networks,
    "deny_peer": _as_networks,
    "allow_loopback_peers": _as_bool,
    "default_lifetime": _int(60, 86_400),
    "max_lifetime": _int(60, 86_400),
    "user_quota": _int(0, 1_000_000),
    "ip_quota": _int(0, 1_000_000),
    "total_quota": _int(0, 10_000_000),
    "permission_quota": _int(0, 100_000),
    "channel_quota": _int(0, 4096),
    "max_bps": _int(0, 10**12),
    "nonce_secret": _as_str,
    "peer_connection_quota": _int(0, 100_000),
    "connection_quota": _int(0, 10_000_000),
    "ip_connection_quota": _int(0, 10_000_000),
    "idle_timeout": lambda name, value: _as_seconds(name, value, 1.0, 86_400.0),
    "handshake_timeout": lambda name, value: _as_seconds(name, value, 0.5, 600.0),
    "message_timeout": lambda name, value: _as_seconds(name, value, 0.5, 600.0),
    "stream_buffer": _int(4096, 1 << 30),
}
"""Field name -> converter(display name, raw value); every field of ServerConfig has one."""


def _convert(name: str, value: Any) -> Any:
    """Convert and check one raw value (from TOML or the CLI) for field ``name``."""
    return _CONVERTERS[name](name.replace("_", "-"), value)


FIELD_NAMES = tuple(f.name for f in fields(ServerConfig))


def build_config(*layers: Mapping[str, Any]) -> ServerConfig:
    """Merge layers of raw settings (later wins) onto the defaults and validate.

    Keys may use dashes or underscores. Unknown keys and bad values raise :class:`ConfigError`.
    """
    values: dict[str, Any] = {}
    for layer in layers:
        for raw_key, raw_value in layer.items():
            name = raw_key.replace("-", "_")
            if name not in FIELD_NAMES:
                raise ConfigError(raw_key, "unknown setting")
            values[name] = _convert(name, raw_value)
    return replace(ServerConfig(), **values).with_tls_defaults().validate()


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file; errors name the file and, for syntax errors, the position."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
