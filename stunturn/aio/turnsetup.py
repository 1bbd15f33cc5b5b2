"""Turning the user-facing configuration into a running TURN service.

Two stages: :func:`prepare` runs once in the parent (default user store, relay addresses, the
nonce secret shared by all workers), :func:`build_turn` runs in each worker and wires the
sans-IO :class:`~stunturn.turn.TurnService` to its relay binder, port share and quotas.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from ..auth import (
    Credentials,
    CredentialSource,
    NonceManager,
    RestCredentials,
    RestSecrets,
    SqliteUsers,
    StaticUsers,
    random_password,
)
from ..config import ServerConfig
from ..fleet import join_fleet
from ..turn import LongTermAuth, PeerPolicy, PortPool, QuotaLimits, Quotas, TurnConfig, TurnService
from ..turn.policy import LOOPBACK, parse_networks
from ..turn.quota import LocalQuotas
from .netif import interface_addresses, route_source
from .relay import UdpRelayBinder

log = logging.getLogger("stunturn.turn")


def default_user_db() -> Path:
    """``$XDG_DATA_HOME/stunturn/users.db`` (``~/.local/share/stunturn/users.db``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "stunturn" / "users.db"


@dataclass(frozen=True, slots=True)
class FirstRun:
    """The user created in a fresh default store; the password is shown only this once."""

    path: Path
    username: str
    password: str


def ensure_default_user(path: Path, realm: str) -> FirstRun | None:
    """Create the default store with one random user if it has no user yet."""
    store = SqliteUsers(path)
    try:
        if store.count():
            return None
        username = "user-" + secrets.token_hex(4)
        password = random_password()
        store.add(username, password, realm)
        return FirstRun(path, username, password)
    finally:
        store.close()


def limits_of(config: ServerConfig) -> QuotaLimits:
    return QuotaLimits(
        per_user=config.user_quota,
        per_client_ip=config.ip_quota,
        total=config.total_quota,
        permissions=config.permission_quota,
        channels=config.channel_quota,
        max_bps=config.max_bps,
        peer_connections=config.peer_connection_quota,
    )


def relay_addresses(config: ServerConfig) -> tuple[str, ...]:
    """``--relay-ip`` as given, else the PRIVATE address of an ``--external-ip PUBLIC/PRIVATE``,
    else the specific listen IPs, else the default-route sources.

    One IPv4 and at most one IPv6 address. With nothing routable (a machine with only
    loopback), 127.0.0.1.
    """
    if config.relay_ip:
        return config.relay_ip
    chosen: dict[bool, str] = {}
    for entry in config.external_ip:
        _, _, private = entry.partition("/")
        if private:
            chosen.setdefault(":" in private, private)
    for ep in config.listen + config.tls_listen:
        if not ep.is_wildcard:
            chosen.setdefault(ep.family_v6, ep.host)
    wildcard = {ep.family_v6 for ep in config.listen + config.tls_listen if ep.is_wildcard}
    for v6 in sorted(wildcard):
        if v6 not in chosen:
            found = route_source(socket.AF_INET6 if v6 else socket.AF_INET)
            if found is not None:
                chosen[v6] = found
    if False not in chosen and True not in chosen:
        chosen[False] = "127.0.0.1"
    return tuple(chosen[v6] for v6 in (False, True) if v6 in chosen)


def prepare(config: ServerConfig) -> ServerConfig:
    """Fill in what every worker must agree on: relay IPs and the nonce secret.

    Idempotent: the supervisor calls it once before spawning workers, and a worker started
    directly (one process, tests) calls it itself.
    """
    if not config.turn or (config.relay_ip and config.nonce_secret):
        return config
    return replace(
        config,
        relay_ip=relay_addresses(config),
        nonce_secret=config.nonce_secret or secrets.token_hex(32),
    )


def external_addresses(config: ServerConfig) -> tuple[tuple[str, str], ...]:
    """``--external-ip`` as (local IP, public IP) pairs for the core.

    ``PUBLIC/PRIVATE`` maps PRIVATE; a bare ``PUBLIC`` maps the relay address of its family
    (unless that address has its own ``PUBLIC/PRIVATE`` entry).
    """
    pairs: dict[str, str] = {}
    bare: list[str] = []
    for entry in config.external_ip:
        public, _, private = entry.partition("/")
        if private:
            pairs[private] = public
        else:
            bare.append(public)
    relays = relay_addresses(config)
    for public in bare:
        local = next((ip for ip in relays if (":" in ip) == (":" in public)), None)
        if local is not None:
            pairs.setdefault(local, public)
    return tuple(pairs.items())


def own_addresses(config: ServerConfig) -> frozenset[str]:
    """The server's own IPs, which the peer policy protects."""
    own = {ep.host for ep in config.listen + config.tls_listen if not ep.is_wildcard}
    own.update(config.relay_ip)
    if config.alt_address:
        own.add(config.alt_address)
    own.update(public for _, public in external_addresses(config))
    if any(ep.is_wildcard for ep in config.listen + config.tls_listen):
        own.update(a.address for a in interface_addresses())
    return frozenset(own)


def peer_policy(config: ServerConfig) -> PeerPolicy:
    allow = list(config.allow_peer) + (list(LOOPBACK) if config.allow_loopback_peers else [])
    return PeerPolicy(
        allow=parse_networks(allow),
        deny=parse_networks(config.deny_peer),
        own_ips=own_addresses(config),
        # Behind a NAT a client names another allocation by its public relayed address.
        relay_ips=frozenset(config.relay_ip)
        | {public for local, public in external_addresses(config) if local in config.relay_ip},
        relay_ports=config.relay_ports,
    )


def credential_sources(config: ServerConfig) -> list[CredentialSource]:
    sources: list[CredentialSource] = []
    if config.user:
        sources.append(StaticUsers(config.user))
    if config.user_db:
        sources.append(SqliteUsers(config.user_db, create=False))
    if config.auth_secret:
        sources.append(
            RestCredentials(RestSecrets(config.auth_secret, config.auth_secret_algorithm))
        )
    return sources


def build_turn(
    config: ServerConfig,
    binder: UdpRelayBinder,
    worker: int = 0,
    workers: int = 1,
    quotas: Quotas | None = None,
) -> TurnService:
    """The TURN service of one worker."""
    assert config.nonce_secret is not None, "prepare() first"
    secret = hashlib.sha256(config.nonce_secret.encode()).digest()
    limits = limits_of(config)
    sources = credential_sources(config)
    quotas = quotas if quotas is not None else LocalQuotas(limits)
    if config.redis:  # users, REST secrets and quotas shared by a fleet (docs/fleet.md)
        shared, quotas = join_fleet(config.redis, config.auth_secret_algorithm, quotas, limits)
        sources += shared
    auth = LongTermAuth(config.realm, Credentials(sources), NonceManager(secret))
    turn_config = TurnConfig(
        relay_ips=config.relay_ip,
        relay_ports=config.relay_ports,
        default_lifetime=config.default_lifetime,
        max_lifetime=config.max_lifetime,
        limits=limits,
        alternate_servers=tuple((ep.host, ep.port) for ep in config.alternate_server),
    )
    ports = PortPool(*config.relay_ports, secret, worker=worker, workers=workers)
    return TurnService(
        turn_config,
        auth,
        peer_policy(config),
        binder,
        ports,
        quotas,
    )
