"""Typed server configuration: defaults, presets, TOML loading and validation that names the field.

Every command-line option of ``stunturn serve`` is also a key of the TOML file, spelled like the
long option without the dashes in front (``alt-address``); ``alt_address`` is accepted too. Values
given on the command line win over the file, and the file wins over a preset (``preset = "sfu"``,
see :mod:`stunturn.presets`).

Validation collects every problem rather than stopping at the first: :func:`check_config`
returns them all (with warnings about settings that are legal but probably a mistake), and
:func:`build_config` raises :class:`ConfigErrors`, a :class:`ConfigError` that reads as the first
problem (``field: message``) and carries the rest. The server refuses to start on any of them.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .presets import PRESET_NAMES, PRESETS
from .turn.policy import LOOPBACK

DEFAULT_PORT = 3478
DEFAULT_TLS_PORT = 5349
DEFAULT_METRICS_PORT = 9478
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """An invalid configuration value; ``field`` names the option or key at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class ConfigErrors(ConfigError):
    """Several problems at once. Reads as the first (``.field``, ``str()``); ``.errors`` has all."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        flat: list[ConfigError] = []
        for error in errors:
            flat.extend(error.errors if isinstance(error, ConfigErrors) else (error,))
        first = flat[0]
        more = len(flat) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(first.field, first.message + suffix)
        self.errors: tuple[ConfigError, ...] = tuple(flat)


class ConfigSyntaxError(ConfigError):
    """The configuration file is not valid TOML (``field`` is ``config``)."""


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

_TURN_ONLY = (
    "user",
    "user_db",
    "auth_secret",
    "relay_ip",
    "relay_ports",
    "allow_peer",
    "deny_peer",
    "allow_loopback_peers",
    "deny_other_peers",
    "nonce_secret",
    "redis",
)
"""Settings that mean nothing without TURN (a warning names them when TURN is off)."""

_MIN_SECRET = 16


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``stunturn serve`` can be told. Defaults need no configuration at all."""

    preset: str | None = None
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
    redis: str | None = None
    """``redis://HOST:PORT/DB``: users, REST secrets, quotas shared by a fleet (docs/fleet.md)."""
    relay_ip: tuple[str, ...] = ()
    relay_ports: tuple[int, int] = (49152, 65535)
    allow_peer: tuple[str, ...] = ()
    deny_peer: tuple[str, ...] = ()
    allow_loopback_peers: bool = False
    deny_other_peers: bool = False
    """Relay only to ``allow-peer`` ranges. :meth:`with_peer_defaults` (which
    :func:`build_config` calls) turns it into ``deny-peer`` ranges covering everything else."""
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
    # --- drain and NAT (docs/operations.md) -----------------------------------------------
    drain_timeout: float = 600.0
    """After SIGUSR1, the longest wait for live allocations to end before exiting anyway."""
    alternate_server: tuple[Endpoint, ...] = ()
    """While draining, Allocate gets 300 Try Alternate naming this server (one per family)."""
    external_ip: tuple[str, ...] = ()
    """``PUBLIC`` or ``PUBLIC/PRIVATE``: the address the server is reached at behind a NAT."""
    # --- metrics and admin endpoint (docs/metrics.md) ------------------------------------
    metrics: Endpoint | None = None
    """Where to serve /metrics, /live, /ready and /status over HTTP (off by default)."""
    admin_token: str | None = None
    """Bearer token /status asks for; without one, /status is refused."""

    @property
    def has_credentials(self) -> bool:
        """Whether any credential source is configured (else the default user store is used)."""
        return bool(self.user or self.user_db or self.auth_secret or self.redis)

    def validate(self) -> ServerConfig:
        """Cross-field checks; raises :class:`ConfigErrors` listing every problem, else
        returns self so calls can chain."""
        problems = self.problems()
        if problems:
            raise ConfigErrors(problems)
        return self

    def problems(self, skip: Iterable[str] = (), check_files: bool = True) -> list[ConfigError]:
        """Every cross-field problem, in a stable order.

        Args:
            skip: fields whose value could not be read; checks that involve them are left
                out, so one typo does not cascade into complaints about its neighbours.
            check_files: whether cert, key and user-db must exist on this machine.
        """
        bad = set(skip)
        out: list[ConfigError] = []

        def check(*names: str) -> bool:
            return not bad.intersection(names)

        if check("listen", "tls_listen") and not self.listen and not self.tls_listen:
            out.append(ConfigError("listen", "at least one listen or tls-listen address is needed"))
        if check("cert", "key") and (self.cert is None) != (self.key is None):
            out.append(
                ConfigError("cert" if self.cert is None else "key", "give both cert and key")
            )
        if check("cert", "self_signed") and self.cert is not None and self.self_signed:
            out.append(
                ConfigError("self-signed", "give either cert and key or self-signed, not both")
            )
        if (
            check("tls_listen", "cert", "self_signed")
            and self.tls_listen
            and self.cert is None
            and not self.self_signed
        ):
            out.append(
                ConfigError(
                    "tls-listen", "TLS needs a certificate: give cert and key, or self-signed"
                )
            )
        for name in ("cert", "key", "user_db") if check_files else ():
            value = getattr(self, name)
            if check(name) and value is not None and not Path(value).is_file():
                out.append(ConfigError(name.replace("_", "-"), f"no such file: {value}"))
        if (
            check("udp", "tcp", "tls_listen")
            and not self.udp
            and not self.tcp
            and not self.tls_listen
        ):
            out.append(ConfigError("udp", "udp and tcp are both off and there is no tls-listen"))
        if self.alt_address is not None and check("alt_address", "listen"):
            alt = Endpoint(self.alt_address, 0)
            primary = self.primary_for(alt)
            if primary is None:
                out.append(
                    ConfigError(
                        "alt-address",
                        f"needs a listen address of the same family that is a specific IP "
                        f"(not a wildcard) to pair with {self.alt_address}",
                    )
                )
            elif primary.host == alt.host:
                out.append(
                    ConfigError("alt-address", "must differ from the primary listen address")
                )
            elif primary.port == 65535:
                out.append(
                    ConfigError("listen", "RFC 5780 needs port+1; the primary port is 65535")
                )
        if check("default_lifetime", "max_lifetime") and self.default_lifetime > self.max_lifetime:
            out.append(ConfigError("default-lifetime", "must not exceed max-lifetime"))
        if check("relay_ip") and (
            sum(":" in ip for ip in self.relay_ip) > 1
            or sum(":" not in ip for ip in self.relay_ip) > 1
        ):
            out.append(ConfigError("relay-ip", "give at most one IPv4 and one IPv6 relay address"))
        if (
            check("turn", "deny_other_peers", "allow_peer")
            and self.turn
            and self.deny_other_peers
            and not self.allow_peer
        ):
            out.append(
                ConfigError(
                    "allow-peer",
                    f"deny-other-peers is on{self._from_preset('deny_other_peers')}, so TURN "
                    "relays only to allow-peer ranges, and none is given: list the backends "
                    '(e.g. allow-peer = ["10.0.5.0/24"])',
                )
            )
        return out

    def warnings(self) -> list[ConfigError]:
        """Settings that are valid but probably not what was meant (the server still starts)."""
        out = self._turn_warnings() if self.turn else self._unused_turn_settings()
        if self.self_signed:
            out.append(
                ConfigError(
                    "self-signed",
                    "browsers and most TURN clients reject a self-signed certificate; give "
                    "cert and key in production",
                )
            )
        return out

    def _unused_turn_settings(self) -> list[ConfigError]:
        defaults = ServerConfig(workers=1)
        why = f"TURN is off (turn = false{self._from_preset('turn')})"
        return [
            ConfigError(name.replace("_", "-"), f"not used: {why}")
            for name in _TURN_ONLY
            if getattr(self, name) != getattr(defaults, name)
            and not (self.preset and name in _preset_fields(self.preset))
        ]

    def _turn_warnings(self) -> list[ConfigError]:
        out: list[ConfigError] = []
        if self.allow_loopback_peers:
            out.append(
                ConfigError(
                    "allow-loopback-peers",
                    "lets TURN clients reach services on this host's loopback; for tests only",
                )
            )
        for allowed in self.allow_peer:
            denied = next((d for d in self.deny_peer if _inside(allowed, d)), None)
            if denied is not None:
                out.append(
                    ConfigError(
                        "allow-peer",
                        f"{allowed} has no effect: deny-peer {denied} covers it and is "
                        "checked first",
                    )
                )
        low, high = self.relay_ports
        for ep in (*self.listen, *self.tls_listen):
            if low <= ep.port <= high:
                out.append(
                    ConfigError("relay-ports", f"contains the listen port of {ep}; keep them apart")
                )
        secrets = [("auth-secret", s) for s in self.auth_secret]
        secrets += [("nonce-secret", self.nonce_secret)] if self.nonce_secret else []
        for key, value in secrets:
            if len(value) < _MIN_SECRET:
                out.append(
                    ConfigError(
                        key,
                        f"a secret of {len(value)} characters is guessable; use at least "
                        f"{_MIN_SECRET} random ones (e.g. `openssl rand -hex 32`)",
                    )
                )
        return out

    def _from_preset(self, name: str) -> str:
        if self.preset and name in _preset_fields(self.preset):
            return f", from preset {self.preset}"
        return ""

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

    def with_peer_defaults(self) -> ServerConfig:
        """With ``deny-other-peers``: add to ``deny-peer`` every range outside the allow-peer
        ranges (and loopback, with allow-loopback-peers), so the peer policy, which checks
        deny-peer first, relays to those ranges only. Idempotent."""
        if not self.deny_other_peers:
            return self
        allowed = [*self.allow_peer, *(LOOPBACK if self.allow_loopback_peers else ())]
        extra = [str(net) for net in outside_of(allowed)]
        deny = tuple(dict.fromkeys((*self.deny_peer, *extra)))
        return self if deny == self.deny_peer else replace(self, deny_peer=deny)

    def primary_for(self, alt: Endpoint) -> Endpoint | None:
        """The listen address RFC 5780 pairs with the alternate IP."""
        for ep in self.listen:
            if ep.family_v6 == alt.family_v6 and not ep.is_wildcard:
                return ep
        return None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


_N = TypeVar("_N", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _exclude(universe: _N, holes: list[_N]) -> list[_N]:
    remaining = [universe]
    # Collapsed holes are disjoint, and every block left over from earlier holes is a sibling
    # of one of their ancestors: so a block either contains the next hole or misses it.
    for hole in ipaddress.collapse_addresses(holes):
        left: list[_N] = []
        for block in remaining:
            left.extend(block.address_exclude(hole) if hole.subnet_of(block) else (block,))
        remaining = left
    return sorted(remaining)


def outside_of(allowed: Iterable[str]) -> list[IPNetwork]:
    """The smallest list of networks covering every IPv4 and IPv6 address outside ``allowed``.

    With nothing allowed in a family, that family is one network (``0.0.0.0/0`` or ``::/0``).
    """
    nets = [ipaddress.ip_network(text.strip(), strict=False) for text in allowed]
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return [
        *_exclude(ipaddress.IPv4Network("0.0.0.0/0"), v4),
        *_exclude(ipaddress.IPv6Network("::/0"), v6),
    ]


def _inside(inner: str, outer: str) -> bool:
    """Whether network ``inner`` lies within network ``outer`` (same family)."""
    a = ipaddress.ip_network(inner, strict=False)
    b = ipaddress.ip_network(outer, strict=False)
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.subnet_of(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.subnet_of(b)
    return False


def _preset_fields(name: str) -> frozenset[str]:
    preset = PRESETS.get(name)
    return frozenset(k.replace("-", "_") for k in preset.settings) if preset else frozenset()


# --- converters: raw value (TOML or command line) -> typed value, or ConfigError --------------


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


def _each(name: str, items: Iterable[Any], convert: Callable[[str, Any], _T]) -> list[_T]:
    """Convert every item, reporting every bad one (not just the first)."""
    out: list[_T] = []
    errors: list[ConfigError] = []
    for item in items:
        try:
            out.append(convert(name, item))
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigErrors(errors)
    return out


_UNEXPANDED = re.compile(r"\$(\([A-Za-z_][A-Za-z0-9_]*\)|\{[A-Za-z_][A-Za-z0-9_]*\})")


def _as_secret(name: str, value: Any) -> str:
    text = _as_str(name, value)
    if _UNEXPANDED.fullmatch(text):
        # A secret meant to come from the environment (Kubernetes $(VAR), shell ${VAR}) that
        # arrived literally would be a secret anybody can read in the manifest.
        raise ConfigError(name, f"{text} looks like a variable reference that was not expanded")
    return text


def _as_list(name: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(name, f"must be a string or a list of strings, got {value!r}")
    return _each(name, items, _as_str)


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


def _as_user(name: str, item: str) -> tuple[str, str]:
    # The item holds a password, so messages never quote it whole.
    user, sep, password = item.partition(":")
    if not sep:
        raise ConfigError(name, "expected NAME:PASSWORD, got an entry without ':'")
    if not user:
        raise ConfigError(name, "expected NAME:PASSWORD, the name before ':' is empty")
    if not password:
        raise ConfigError(name, f"expected NAME:PASSWORD, the password of {user!r} is empty")
    return (user, password)


def _as_users(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    return tuple(_each(name, _as_list(name, value), _as_user))


def _as_port_range(name: str, value: Any) -> tuple[int, int]:
    text = _as_str(name, value)
    low, sep, high = text.partition("-")
    if not sep or not _PORT.fullmatch(low) or not _PORT.fullmatch(high):
        raise ConfigError(name, f"expected LOW-HIGH, got {text!r}")
    lo, hi = int(low), int(high)
    if not 1024 <= lo <= hi <= 65535:
        raise ConfigError(name, f"need 1024 <= LOW <= HIGH <= 65535, got {text!r}")
    return (lo, hi)


def _as_network(name: str, item: str) -> str:
    try:
        ipaddress.ip_network(item.strip(), strict=False)
    except ValueError:
        raise ConfigError(name, f"{item!r} is not an IP network (CIDR)") from None
    return item.strip()


def _as_networks(name: str, value: Any) -> tuple[str, ...]:
    return tuple(_each(name, _as_list(name, value), _as_network))


def _endpoints(default_port: int) -> Callable[[str, Any], tuple[Endpoint, ...]]:
    def convert(name: str, value: Any) -> tuple[Endpoint, ...]:
        items = _as_list(name, value)
        return tuple(_each(name, items, lambda n, v: parse_endpoint(v, default_port, n)))

    return convert


def _int(low: int, high: int) -> Callable[[str, Any], int]:
    return lambda name, value: _as_int(name, value, low, high)


def _as_preset(name: str, value: Any) -> str:
    text = _as_str(name, value)
    if text not in PRESETS:
        raise ConfigError(name, f"must be one of {', '.join(PRESET_NAMES)}, got {value!r}")
    return text


def _one_per_family(name: str, hosts: Iterable[str], what: str = "entry") -> None:
    seen: set[bool] = set()
    for host in hosts:
        v6 = ":" in host
        if v6 in seen:
            raise ConfigError(name, f"give at most one IPv{6 if v6 else 4} {what}")
        seen.add(v6)


def _as_alternate_servers(name: str, value: Any) -> tuple[Endpoint, ...]:
    """``HOST:PORT`` (port 3478 if left out), at most one per address family.

    RFC 8489 section 14.15: ALTERNATE-SERVER has the family of the request's source address.
    """
    out = tuple(_each(name, _as_list(name, value), lambda n, v: parse_endpoint(v, DEFAULT_PORT, n)))
    for ep in out:
        if ep.is_wildcard or ep.port == 0:
            raise ConfigError(name, f"{ep} is not an address clients can reach")
    _one_per_family(name, (ep.host for ep in out))
    return out


def _as_external_ip(name: str, value: Any) -> str:
    """``PUBLIC`` or ``PUBLIC/PRIVATE``, both IP literals of one family; normalised."""
    text = _as_str(name, value).strip()
    public_text, sep, private_text = text.partition("/")
    ips = []
    for part in (public_text, private_text) if sep else (public_text,):
        try:
            ip = ipaddress.ip_address(part.strip())
        except ValueError:
            raise ConfigError(
                name, f"expected PUBLIC or PUBLIC/PRIVATE (IP addresses), got {text!r}"
            ) from None
        if ip.is_unspecified:
            raise ConfigError(name, f"{ip} is a wildcard, not an address (in {text!r})")
        ips.append(ip)
    if len(ips) == 2 and ips[0].version != ips[1].version:
        raise ConfigError(name, f"PUBLIC and PRIVATE are of different families in {text!r}")
    return "/".join(ip.compressed for ip in ips)


def _as_external_ips(name: str, value: Any) -> tuple[str, ...]:
    """Repeatable: each PRIVATE at most once, at most one bare PUBLIC per family."""
    out = tuple(_each(name, _as_list(name, value), _as_external_ip))
    privates = [e.partition("/")[2] for e in out if "/" in e]
    for private in privates:
        if privates.count(private) > 1:
            raise ConfigError(name, f"{private} is mapped twice")
    _one_per_family(name, (e for e in out if "/" not in e), "PUBLIC without /PRIVATE")
    return out


def parse_metrics_endpoint(text: str, field_name: str = "metrics") -> Endpoint:
    """``HOST:PORT``, ``HOST`` (port 9478) or a bare ``PORT`` (on 127.0.0.1)."""
    text = text.strip()
    if _PORT.fullmatch(text):
        text = f"127.0.0.1:{text}"
    return parse_endpoint(text, DEFAULT_METRICS_PORT, field_name)


def _as_metrics(name: str, value: Any) -> Endpoint:
    return parse_metrics_endpoint(_as_str(name, value), name)


_TOKEN = re.compile(r"[\x21-\x7e]{16,}")


def _as_admin_token(name: str, value: Any) -> str:
    # Never quoted in messages: it is a secret.
    text = _as_secret(name, value)
    if not _TOKEN.fullmatch(text):
        raise ConfigError(
            name,
            "must be at least 16 printable ASCII characters without spaces "
            "(e.g. `openssl rand -hex 32`)",
        )
    return text


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _as_redis_url(name: str, value: Any) -> str:
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://`` (TLS) or
    ``unix:///PATH?db=N``; the redis package must be installed. Never quoted: it may hold a
    password."""
    text = _as_secret(name, value).strip()
    usage = "expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH"
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        raise ConfigError(name, f"{usage} (the port is not a number 0-65535)") from None
    if url.scheme not in _REDIS_SCHEMES:
        raise ConfigError(name, f"{usage}, got scheme {url.scheme or 'none'!r}")
    if url.scheme == "unix":
        if not url.path:
            raise ConfigError(name, f"{usage} (no socket path)")
    elif not url.hostname:
        raise ConfigError(name, f"{usage} (no host)")
    elif url.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}", url.path):
        raise ConfigError(name, f"{usage} (the database must be a number)")
    elif port == 0:
        raise ConfigError(name, f"{usage} (port 0)")
    if importlib.util.find_spec("redis") is None:
        raise ConfigError(name, "needs the Python package redis: pip install 'stunturn[redis]'")
    return text


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "preset": _as_preset,
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
    "auth_secret": lambda name, value: tuple(_each(name, _as_list(name, value), _as_secret)),
    "auth_secret_algorithm": _as_choice(("sha1", "sha256")),
    "redis": _as_redis_url,
    "relay_ip": lambda name, value: tuple(_each(name, _as_list(name, value), _as_ip)),
    "relay_ports": _as_port_range,
    "allow_peer": _as_networks,
    "deny_peer": _as_networks,
    "allow_loopback_peers": _as_bool,
    "deny_other_peers": _as_bool,
    "default_lifetime": _int(60, 86_400),
    "max_lifetime": _int(60, 86_400),
    "user_quota": _int(0, 1_000_000),
    "ip_quota": _int(0, 1_000_000),
    "total_quota": _int(0, 10_000_000),
    "permission_quota": _int(0, 100_000),
    "channel_quota": _int(0, 4096),
    "max_bps": _int(0, 10**12),
    "nonce_secret": _as_secret,
    "peer_connection_quota": _int(0, 100_000),
    "connection_quota": _int(0, 10_000_000),
    "ip_connection_quota": _int(0, 10_000_000),
    "idle_timeout": lambda name, value: _as_seconds(name, value, 1.0, 86_400.0),
    "handshake_timeout": lambda name, value: _as_seconds(name, value, 0.5, 600.0),
    "message_timeout": lambda name, value: _as_seconds(name, value, 0.5, 600.0),
    "stream_buffer": _int(4096, 1 << 30),
    "drain_timeout": lambda name, value: _as_seconds(name, value, 1.0, 86_400.0),
    "alternate_server": _as_alternate_servers,
    "external_ip": _as_external_ips,
    "metrics": _as_metrics,
    "admin_token": _as_admin_token,
}
"""Field name -> converter(display name, raw value); every field of ServerConfig has one."""


def _convert(name: str, value: Any) -> Any:
    """Convert and check one raw value (from TOML or the CLI) for field ``name``."""
    return _CONVERTERS[name](name.replace("_", "-"), value)


FIELD_NAMES = tuple(f.name for f in fields(ServerConfig))
KEYS = tuple(name.replace("_", "-") for name in FIELD_NAMES)
"""Every configuration key as the TOML file spells it."""


@dataclass(frozen=True, slots=True)
class ConfigCheck:
    """What :func:`check_config` found: the config (None when there are errors), every error
    and every warning, each a :class:`ConfigError` naming its field."""

    config: ServerConfig | None
    errors: tuple[ConfigError, ...]
    warnings: tuple[ConfigError, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


def _unknown(raw_key: str, raw_value: Any) -> ConfigError:
    if isinstance(raw_value, dict):
        return ConfigError(
            raw_key, "unknown setting: tables are not used, put the keys at the top level"
        )
    close = difflib.get_close_matches(raw_key.replace("_", "-").lower(), KEYS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(raw_key, f"unknown setting{hint}")


def check_config(*layers: Mapping[str, Any], check_files: bool = True) -> ConfigCheck:
    """Merge layers of raw settings (later wins) onto a preset and the defaults; find every
    problem.

    Keys may use dashes or underscores. The preset is the last ``preset`` value in any layer;
    its settings form the lowest layer. Every value of every layer is checked (a bad value is
    an error even when a later layer overrides it). Cross-field checks run on what could be
    read, skipping those that involve a field with a bad value.

    Args:
        layers: raw settings, lowest precedence first (e.g. the TOML file, then the CLI).
        check_files: whether cert, key and user-db must exist on this machine.
    """
    errors: list[ConfigError] = []
    failed: set[str] = set()

    def add(exc: ConfigError, name: str | None) -> None:
        errors.extend(exc.errors if isinstance(exc, ConfigErrors) else (exc,))
        if name is not None:
            failed.add(name)

    preset_layer: Mapping[str, Any] = {}
    for layer in layers:
        for raw_key, raw_value in layer.items():
            if raw_key.replace("-", "_") == "preset":
                try:
                    preset_layer = PRESETS[_convert("preset", raw_value)].settings
                except ConfigError:
                    preset_layer = {}  # reported below, with the other values
    values: dict[str, Any] = {}
    for layer in (preset_layer, *layers):
        spelled: dict[str, str] = {}
        for raw_key, raw_value in layer.items():
            name = raw_key.replace("-", "_")
            if name not in FIELD_NAMES:
                add(_unknown(raw_key, raw_value), None)
                continue
            if name in spelled:
                add(
                    ConfigError(raw_key, f"given twice, as {spelled[name]} and as {raw_key}"),
                    name,
                )
                continue
            spelled[name] = raw_key
            try:
                values[name] = _convert(name, raw_value)
            except ConfigError as exc:
                add(exc, name)
    config = replace(ServerConfig(), **values).with_tls_defaults()
    errors.extend(config.problems(skip=failed, check_files=check_files))
    if errors:
        return ConfigCheck(None, tuple(errors), ())
    return ConfigCheck(config.with_peer_defaults(), (), tuple(config.warnings()))


def build_config(*layers: Mapping[str, Any]) -> ServerConfig:
    """Merge layers of raw settings (later wins) onto a preset and the defaults, and validate.

    Keys may use dashes or underscores. Unknown keys and bad values raise :class:`ConfigErrors`
    (a :class:`ConfigError` naming the first problem, with ``.errors`` holding all of them).
    """
    result = check_config(*layers)
    if result.config is None:
        raise ConfigErrors(result.errors)
    return result.config


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file; errors name the file and, for syntax errors, the position."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigSyntaxError("config", f"{path} is not valid TOML: {exc}") from None
