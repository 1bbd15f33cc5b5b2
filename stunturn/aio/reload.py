"""SIGHUP: read the configuration again and apply what can change while serving.

The worker keeps what it was started from (the configuration file and the command-line
options, a :class:`ReloadSource`) and builds the configuration anew. A configuration that does
not build (a syntax error, a bad value) is refused, logged with every problem, and the running
one stays. Otherwise these apply at once, without touching live allocations or connections:

* credentials: static users, the SQLite user store, TURN REST secrets and their algorithm
  (users added or removed take effect on the next request; a removed user's allocation lives
  until it is refreshed, when the refresh is refused);
* the peer policy (allow/deny lists, loopback, deny-other-peers): new permissions, channels
  and Send indications are checked against it; existing permissions and channels run out
  normally;
* lifetimes and quotas: allocation lifetimes, allocations per user / per IP / in total,
  permissions, channels, bytes per second, RFC 6062 peer connections; TCP/TLS limits
  (connections per IP and in total, timeouts, write buffer);
* the drain settings, the log level, and the TLS certificate and key files.

Anything else (addresses, ports, workers, realm, relay addresses and ports, Redis, metrics) is
fixed for the life of the process: a change is logged as needing a restart and ignored.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from ..auth import Credentials
from ..config import (
    ConfigError,
    ConfigErrors,
    Endpoint,
    ServerConfig,
    build_config,
    load_toml,
)
from ..turn import LongTermAuth
from .turnsetup import credential_sources, limits_of, peer_policy

if TYPE_CHECKING:
    from .server import Worker

log = logging.getLogger("stunturn.server")

ReloadSource = tuple[str | None, dict[str, Any], dict[str, Any]]
"""(configuration file or None, command-line options, values the CLI filled in at start such as
the self-signed certificate's files)."""

RELOADABLE = frozenset(
    {
        "user",
        "user_db",
        "auth_secret",
        "auth_secret_algorithm",
        "allow_peer",
        "deny_peer",
        "allow_loopback_peers",
        "deny_other_peers",
        "default_lifetime",
        "max_lifetime",
        "user_quota",
        "ip_quota",
        "total_quota",
        "permission_quota",
        "channel_quota",
        "max_bps",
        "peer_connection_quota",
        "connection_quota",
        "ip_connection_quota",
        "idle_timeout",
        "handshake_timeout",
        "message_timeout",
        "stream_buffer",
        "drain_timeout",
        "alternate_server",
        "log_level",
        "cert",
        "key",
    }
)
"""ServerConfig fields a SIGHUP applies."""

_FILLED_AT_START = frozenset({"relay_ip", "nonce_secret", "self_signed", "preset"})
"""Filled in or consumed at start: an empty value in the new configuration is not a change."""


def read_configuration(source: ReloadSource) -> ServerConfig:
    """Build the configuration again from where it came from (raises ConfigError)."""
    path, given, filled = source
    layers = [load_toml(path)] if path else []
    return build_config(*layers, given, filled)


def merge(old: ServerConfig, new: ServerConfig) -> tuple[ServerConfig, list[str]]:
    """The configuration to run: ``new`` for reloadable fields, ``old`` for the rest, and the
    names of fields that changed but need a restart."""
    kept: dict[str, Any] = {}
    restart: list[str] = []
    for field in dataclasses.fields(ServerConfig):
        name = field.name
        if name in RELOADABLE:
            continue
        before, after = getattr(old, name), getattr(new, name)
        if not _same(before, after):
            if name not in _FILLED_AT_START or (after and name != "self_signed"):
                restart.append(name.replace("_", "-"))
            kept[name] = before
    if new.cert is None and old.cert is not None and new.self_signed:
        kept.update(cert=old.cert, key=old.key)
    return dataclasses.replace(new, **kept), restart


def _same(before: Any, after: Any) -> bool:
    """Equal, where port 0 in the new configuration ("pick one") matches the port picked."""
    if isinstance(after, Endpoint) and isinstance(before, Endpoint):
        return after.host == before.host and after.port in (0, before.port)
    if isinstance(after, tuple) and isinstance(before, tuple) and len(after) == len(before):
        return all(_same(b, a) for b, a in zip(before, after, strict=True))
    return bool(before == after)


def apply_configuration(worker: Worker, source: ReloadSource) -> bool:
    """Reload from ``source`` into ``worker``; False (and nothing changed) when refused."""
    try:
        new = read_configuration(source)
    except ConfigErrors as exc:
        problems = "; ".join(str(error) for error in exc.errors)
        log.error("configuration reload refused, keeping the current one: %s", problems)
        return False
    except (ConfigError, OSError) as exc:
        log.error("configuration reload refused, keeping the current one: %s", exc)
        return False
    config, restart = merge(worker.config, new)
    turn = worker.core.turn
    if turn is not None:
        try:
            sources = credential_sources(config)
        except (OSError, ValueError) as exc:  # e.g. a user store that cannot be opened
            log.error("configuration reload refused, keeping the current one: %s", exc)
            return False
        # Credential sources the fleet added at start (Redis) stay.
        builtin = {type(s) for s in credential_sources(worker.config)}
        shared = [s for s in turn.auth.credentials.sources if type(s) not in builtin]
        turn.auth = LongTermAuth(
            turn.auth.realm, Credentials([*sources, *shared]), turn.auth.nonces
        )
        turn.policy = peer_policy(config)
        limits = limits_of(config)
        turn.config = dataclasses.replace(
            turn.config,
            default_lifetime=config.default_lifetime,
            max_lifetime=config.max_lifetime,
            limits=limits,
            alternate_servers=tuple((ep.host, ep.port) for ep in config.alternate_server),
        )
        turn.quotas.set_limits(limits)
    worker.config = config
    logging.getLogger("stunturn").setLevel(config.log_level.upper())
    for name in restart:
        log.warning("configuration reload: %s changed, which needs a restart; kept as it was", name)
    log.info("configuration reloaded")
    return True


__all__ = ["RELOADABLE", "ReloadSource", "apply_configuration", "merge", "read_configuration"]
