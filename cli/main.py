"""``stunturn``: the server command and its helpers. Parses, calls the library, prints."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stunturn import __version__
from stunturn.aio.metrics import StatusError, fetch_status
from stunturn.aio.reload import ReloadSource
from stunturn.aio.tls import make_self_signed
from stunturn.aio.turnsetup import default_user_db, ensure_default_user, peer_policy, prepare
from stunturn.aio.workers import RunResult, StartupError, run_server
from stunturn.auth import SqliteUsers, random_password, rest_password, rest_username
from stunturn.config import (
    DEFAULT_METRICS_PORT,
    ConfigError,
    ConfigErrors,
    ServerConfig,
    build_config,
    load_toml,
    parse_metrics_endpoint,
)
from stunturn.fleet import (
    FleetError,
    RedisSecrets,
    RedisUsers,
    connect,
    fingerprint,
    fleet_errors,
    redact_url,
)
from stunturn.logsetup import configure_logging

from .config_cmd import config_group, preset_option
from .p2p import p2p as p2p_command

if TYPE_CHECKING:
    from redis import Redis


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stunturn")
def cli() -> None:
    """STUN/TURN server and NAT traversal toolkit."""


def _fail(message: str) -> None:
    click.echo(f"stunturn: error: {message}", err=True)
    sys.exit(2)


def _options(*specs: tuple[str, dict[str, Any]]) -> Callable[[Callable[..., Any]], Any]:
    def apply(func: Callable[..., Any]) -> Any:
        for name, kwargs in reversed(specs):
            func = click.option(name, **kwargs)(func)
        return func

    return apply


SERVER_OPTIONS = (
    ("--listen", {"multiple": True, "metavar": "HOST:PORT",
                  "help": "UDP and TCP address (repeatable). Default 0.0.0.0:3478, [::]:3478."}),
    ("--tls-listen", {"multiple": True, "metavar": "HOST:PORT",
                      "help": "TLS address (repeatable), e.g. 0.0.0.0:443. Default with a "
                              "certificate: port 5349 of each listen address."}),
    ("--cert", {"type": click.Path(dir_okay=False),
                "help": "TLS certificate chain (PEM); reloaded on SIGHUP."}),
    ("--key", {"type": click.Path(dir_okay=False), "help": "TLS private key (PEM)."}),
    ("--self-signed", {"is_flag": True, "default": None,
                       "help": "Serve TLS with a self-signed certificate made at start."}),
    ("--alt-address", {"metavar": "IP",
                       "help": "Second IP for RFC 5780 (listens on 2 IPs x 2 ports)."}),
    ("--udp/--no-udp", {"default": None, "help": "Serve UDP on the listen addresses."}),
    ("--tcp/--no-tcp", {"default": None, "help": "Serve TCP on the listen addresses."}),
    ("--workers", {"metavar": "N", "help": "Worker processes (default: number of CPUs)."}),
    ("--response-rate", {"metavar": "N",
                         "help": "Responses/s per source IP (0 = unlimited). Default 200."}),
    ("--response-burst", {"metavar": "N", "help": "Burst of that budget. Default 400."}),
    ("--software", {"metavar": "TEXT", "help": "SOFTWARE attribute to send (default none)."}),
    ("--turn/--no-turn", {"default": None, "help": "Serve TURN (default on)."}),
    ("--realm", {"metavar": "REALM", "help": "Long-term credential realm (default stunturn)."}),
    ("--user", {"multiple": True, "metavar": "NAME:PASSWORD", "help": "A TURN user."}),
    ("--user-db", {"metavar": "PATH", "help": "SQLite user store (see `stunturn users`)."}),
    ("--auth-secret", {"multiple": True, "metavar": "SECRET",
                       "help": "TURN REST shared secret (repeatable, for rotation)."}),
    ("--auth-secret-algorithm", {"metavar": "ALG", "help": "sha1 (default) or sha256."}),
    ("--redis", {"metavar": "URL",
                 "help": "Share users, REST secrets and per-user/IP quotas with a fleet "
                         "through this Redis (redis://HOST:PORT/DB; docs/fleet.md)."}),
    ("--relay-ip", {"multiple": True, "metavar": "IP",
                    "help": "Relay address (one IPv4, one IPv6). Default: the listen IP or "
                            "the address of the default route."}),
    ("--relay-ports", {"metavar": "LOW-HIGH", "help": "Relay port range. Default 49152-65535."}),
    ("--allow-peer", {"multiple": True, "metavar": "CIDR", "help": "Allow relaying to it."}),
    ("--deny-peer", {"multiple": True, "metavar": "CIDR", "help": "Deny relaying to it."}),
    ("--allow-loopback-peers", {"is_flag": True, "default": None,
                                "help": "Allow 127.0.0.0/8 and ::1 as peers (tests only)."}),
    ("--deny-other-peers", {"is_flag": True, "default": None,
                            "help": "Relay only to --allow-peer ranges (the sfu preset)."}),
    ("--default-lifetime", {"metavar": "S", "help": "Allocation lifetime. Default 600."}),
    ("--max-lifetime", {"metavar": "S", "help": "Longest allocation lifetime. Default 3600."}),
    ("--user-quota", {"metavar": "N", "help": "Allocations per user (0 = no limit). Def. 10."}),
    ("--ip-quota", {"metavar": "N", "help": "Allocations per client IP. Default 64."}),
    ("--total-quota", {"metavar": "N", "help": "Allocations in total. Default 20000."}),
    ("--permission-quota", {"metavar": "N", "help": "Permissions per allocation. Def. 64."}),
    ("--channel-quota", {"metavar": "N", "help": "Channels per allocation. Default 64."}),
    ("--max-bps", {"metavar": "N", "help": "Bytes/s per allocation each way (0 = no limit)."}),
    ("--nonce-secret", {"metavar": "TEXT", "help": "Nonce HMAC secret (default random)."}),
    ("--peer-connection-quota", {"metavar": "N",
                                 "help": "RFC 6062 TCP peer connections per allocation. "
                                         "Default 64."}),
    ("--connection-quota", {"metavar": "N",
                            "help": "TCP/TLS client connections in total (0 = no limit). "
                                    "Default 10000."}),
    ("--ip-connection-quota", {"metavar": "N",
                               "help": "TCP/TLS connections per client IP (0 = no limit). "
                                       "Default 256."}),
    ("--idle-timeout", {"metavar": "S",
                        "help": "Close a TCP/TLS connection silent this long (one holding an "
                                "allocation lives as long as it). Default 300."}),
    ("--handshake-timeout", {"metavar": "S",
                             "help": "Time for the TLS handshake and the first message. "
                                     "Default 10."}),
    ("--message-timeout", {"metavar": "S",
                           "help": "Time to finish a message once begun. Default 10."}),
    ("--stream-buffer", {"metavar": "BYTES",
                         "help": "Unsent bytes a connection may hold before reading from it "
                                 "pauses (and relayed datagrams for it are dropped). "
                                 "Default 262144."}),
    ("--external-ip", {"multiple": True, "metavar": "PUBLIC[/PRIV]",
                       "help": "Behind a NAT: advertise PUBLIC for the local address PRIV "
                               "(default: the relay address) in XOR-RELAYED-ADDRESS, "
                               "RESPONSE-ORIGIN and OTHER-ADDRESS; ports stay. Repeatable "
                               "(IPv4, IPv6, RFC 5780's second IP)."}),
    ("--drain-timeout", {"metavar": "S",
                         "help": "After SIGUSR1 (drain), exit once the last allocation ends "
                                 "or after S seconds at most. Default 600."}),
    ("--alternate-server", {"multiple": True, "metavar": "IP:PORT",
                            "help": "While draining, answer Allocate with 300 Try Alternate "
                                    "naming this server (one per family) instead of 508."}),
    ("--log-level", {"metavar": "LEVEL", "help": "debug, info, warning or error."}),
    ("--log-format", {"metavar": "FORMAT", "help": "text or json (default text)."}),
    ("--metrics", {"metavar": "HOST:PORT",
                   "help": "Serve /metrics (Prometheus), /live, /ready and /status over HTTP "
                           "there, e.g. 127.0.0.1:9478 (keep it on localhost). Default off."}),
    ("--admin-token", {"metavar": "TOKEN", "envvar": "STUNTURN_ADMIN_TOKEN",
                       "help": "Bearer token for /status (`stunturn status`); also read from "
                               "STUNTURN_ADMIN_TOKEN. Default none: /status is refused."}),
)  # fmt: skip


def _load(config_file: str | None, options: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    layers = [load_toml(config_file)] if config_file else []
    return layers, given


@cli.command()
@_options(*SERVER_OPTIONS)
@preset_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file.")
def serve(config_file: str | None, **options: Any) -> None:
    """Run the STUN/TURN server. With no options: STUN on 0.0.0.0:3478 and [::]:3478, TURN for
    the users of the default user store (created on first run)."""
    try:
        layers, given = _load(config_file, options)
        config = build_config(*layers, given)
        if config.turn and not config.has_credentials:
            path = default_user_db()
            first = ensure_default_user(path, config.realm)
            if first is not None:
                click.echo(f"TURN: created the user store {first.path} with one user:")
                click.echo(f"  username: {first.username}")
                click.echo(f"  password: {first.password}")
                click.echo("  (shown once; manage users with `stunturn users`)")
            given["user_db"] = str(path)
            config = build_config(*layers, given)
    except ConfigErrors as exc:
        # Every problem, one per line (the first names the field as before).
        _fail("\nstunturn: error: ".join(str(error) for error in exc.errors))
        return
    except ConfigError as exc:
        _fail(str(exc))
        return
    configure_logging(config.log_level, config.log_format)
    with tempfile.TemporaryDirectory(prefix="stunturn-") as tmp:
        filled: dict[str, Any] = {}
        if config.self_signed:
            ips = [ep.host for ep in (*config.listen, *config.tls_listen) if not ep.is_wildcard]
            cert, key, fingerprint = make_self_signed(tmp, ips=[*ips, "127.0.0.1", "::1"])
            click.echo(f"TLS: self-signed certificate, SHA-256 fingerprint {fingerprint}")
            filled = {"cert": cert, "key": key, "self_signed": False}
            config = build_config(*layers, given, filled)
        # SIGHUP builds the configuration again from the same file and options.
        _run(config, (config_file, given, filled))


def _run(config: ServerConfig, reload_source: ReloadSource | None = None) -> None:
    def ready(final: ServerConfig, listeners: list[Any]) -> None:
        mode = "on" if final.alt_address else "off"
        turn = "off"
        if final.turn:
            sources = [
                name
                for name, present in (
                    ("static users", final.user),
                    (f"user store {final.user_db}", final.user_db),
                    ("REST secrets", final.auth_secret),
                    (f"fleet Redis {redact_url(final.redis or '')}", final.redis),
                )
                if present
            ]
            turn = (
                f"realm {final.realm!r}, relay {', '.join(final.relay_ip)} "
                f"ports {final.relay_ports[0]}-{final.relay_ports[1]}, {'; '.join(sources)}"
            )
        click.echo(
            f"stunturn {__version__}: STUN server, {final.workers} worker(s), RFC 5780 {mode}"
        )
        click.echo(f"TURN: {turn}")
        for listener in listeners:
            click.echo(f"listening on {listener}")
        if final.metrics is not None:
            click.echo(f"metrics on http://{final.metrics}/metrics")
        sys.stdout.flush()

    try:
        result: RunResult = run_server(config, ready, reload_source)
    except StartupError as exc:
        _fail(str(exc))
        return
    counts = ", ".join(f"{k}={v}" for k, v in result.counters.as_dict().items())
    click.echo(f"stopped ({counts})")


# --- users --------------------------------------------------------------------------------


@cli.group()
def users() -> None:
    """Manage the user store: SQLite, or a fleet's Redis with --redis (either keeps derived
    keys, never passwords)."""


def _db_option(func: Callable[..., Any]) -> Any:
    func = click.option(
        "--redis",
        "redis_url",
        metavar="URL",
        help="The fleet's Redis instead (redis://HOST:PORT/DB; docs/fleet.md).",
    )(func)
    return click.option(
        "--user-db",
        "db",
        metavar="PATH",
        help=f"User store (default {default_user_db()}).",
    )(func)


def _open_store(db: str | None, create: bool) -> SqliteUsers:
    path = Path(db) if db else default_user_db()
    try:
        return SqliteUsers(path, create=create)
    except FileNotFoundError:
        _fail(f"user-db: no such file: {path}")
        raise AssertionError("unreachable") from None


@contextlib.contextmanager
def _redis(url: str) -> Iterator[Redis]:
    """A Redis client for a CLI command; any Redis problem ends it with ``redis: ...``."""
    try:
        client = connect(url)
    except FleetError as exc:
        _fail(f"redis: {exc}")
        raise AssertionError("unreachable") from None
    try:
        with fleet_errors(url):
            yield client
    except FleetError as exc:
        _fail(f"redis: {exc}")
    finally:
        client.close()


@contextlib.contextmanager
def _users_store(
    db: str | None, redis_url: str | None, create: bool
) -> Iterator[tuple[SqliteUsers | RedisUsers, str]]:
    """The store a ``users`` command works on, and how to name it."""
    if redis_url:
        if db:
            _fail("redis: give --user-db or --redis, not both")
        with _redis(redis_url) as client:
            yield RedisUsers(client), redact_url(redis_url)
        return
    store = _open_store(db, create)
    try:
        yield store, str(store.path)
    finally:
        store.close()


@users.command("add")
@click.argument("name")
@click.option("--password", help="Password (default: a random one, printed).")
@click.option("--realm", default="stunturn", show_default=True, help="Realm of the server.")
@_db_option
def users_add(
    name: str, password: str | None, realm: str, db: str | None, redis_url: str | None
) -> None:
    """Add a user, or replace its password."""
    generated = password is None
    password = password or random_password()
    with _users_store(db, redis_url, create=True) as (store, where):
        try:
            store.add(name, password, realm)
        except ValueError as exc:
            _fail(f"password: {exc}")
    click.echo(f"added {name} in realm {realm!r} to {where}")
    if generated:
        click.echo(f"password: {password}")


@users.command("list")
@_db_option
def users_list(db: str | None, redis_url: str | None) -> None:
    """List users (name, realm, when added)."""
    with _users_store(db, redis_url, create=False) as (store, _):
        for record in store.users():
            added = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created))
            click.echo(f"{record.username}\t{record.realm}\t{added}Z")


@users.command("remove")
@click.argument("name")
@click.option("--realm", help="Only in this realm (default: every realm).")
@_db_option
def users_remove(name: str, realm: str | None, db: str | None, redis_url: str | None) -> None:
    """Remove a user."""
    with _users_store(db, redis_url, create=False) as (store, where):
        removed = store.remove(name, realm)
    if not removed:
        _fail(f"no user {name!r} in {where}")
    click.echo(f"removed {name}")


# --- secrets (TURN REST, in a fleet's Redis) ----------------------------------------------


@cli.group("secrets")
def secrets_group() -> None:
    """Manage the TURN REST secrets of a fleet, kept in Redis. Servers started with --redis
    read them every few seconds (docs/fleet.md)."""


_REDIS_REQUIRED = click.option(
    "--redis", "redis_url", required=True, metavar="URL", help="The fleet's Redis URL."
)


@secrets_group.command("add")
@click.argument("secret", required=False)
@_REDIS_REQUIRED
def secrets_add(secret: str | None, redis_url: str) -> None:
    """Add SECRET (`-`: read it from stdin; default: a random one, printed once)."""
    generated = secret is None
    if secret == "-":
        secret = sys.stdin.readline().strip()
    secret = secret or random_password(32)
    if len(secret) < 16:
        _fail("secret: use at least 16 random characters (e.g. `openssl rand -hex 32`)")
    with _redis(redis_url) as client:
        added = RedisSecrets(client).add(secret)
    state = "added" if added else "already present:"
    click.echo(f"{state} secret {fingerprint(secret)} in {redact_url(redis_url)}")
    if generated:
        click.echo(f"secret: {secret}")


@secrets_group.command("list")
@_REDIS_REQUIRED
def secrets_list(redis_url: str) -> None:
    """List the secrets by fingerprint (SHA-256 prefix) and when they were added."""
    with _redis(redis_url) as client:
        for info in RedisSecrets(client).listing():
            added = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.added))
            click.echo(f"{info.fingerprint}\t{added}Z")


@secrets_group.command("remove")
@click.argument("ident", metavar="FINGERPRINT|SECRET")
@_REDIS_REQUIRED
def secrets_remove(ident: str, redis_url: str) -> None:
    """Remove a secret, named by its fingerprint (6+ hex digits) or itself."""
    with _redis(redis_url) as client:
        store = RedisSecrets(client)
        found = store.matching(ident)
        if len(found) > 1:
            _fail(f"secret: {ident!r} matches {len(found)} secrets; give more digits")
        if not found:
            _fail(f"secret: none matches {ident!r} in {redact_url(redis_url)}")
        store.remove(found[0])
    click.echo(f"removed secret {fingerprint(found[0])}")


# --- credentials (TURN REST) --------------------------------------------------------------


@cli.command()
@click.option("--secret", required=True, help="The shared secret the server has (--auth-secret).")
@click.option("--user", default="", help="Who the credential is for (any string).")
@click.option("--ttl", default=86400, show_default=True, type=click.IntRange(1), help="Seconds.")
@click.option(
    "--algorithm", type=click.Choice(["sha1", "sha256"]), default="sha1", show_default=True
)
@click.option("--url", "urls", multiple=True, metavar="URL",
              help="TURN URL for the iceServers snippet (repeatable).")  # fmt: skip
def credentials(secret: str, user: str, ttl: int, algorithm: str, urls: tuple[str, ...]) -> None:
    """Print an ephemeral TURN username and password (TURN REST API) and an iceServers snippet."""
    username = rest_username(user, int(time.time()) + ttl)
    password = rest_password(secret, username, algorithm)
    click.echo(f"username: {username}")
    click.echo(f"password: {password}")
    snippet = {
        "iceServers": [
            {
                "urls": list(urls) or ["turn:YOUR-SERVER:3478?transport=udp"],
                "username": username,
                "credential": password,
            }
        ]
    }
    click.echo(json.dumps(snippet, indent=2))


# --- check-peer ---------------------------------------------------------------------------


@cli.command("check-peer")
@click.argument("address")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file.")
@_options(*(o for o in SERVER_OPTIONS if o[0] in (
    "--listen", "--relay-ip", "--relay-ports", "--allow-peer", "--deny-peer",
    "--allow-loopback-peers",
)))  # fmt: skip
@preset_option
def check_peer(address: str, config_file: str | None, **options: Any) -> None:
    """Say whether the peer policy lets a TURN client reach ADDRESS (IP or IP:PORT)."""
    host, port_text = address, ""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest and not rest.startswith(":"):
            _fail(f"address: expected [IPv6]:PORT, got {address!r}")
        port_text = rest[1:]
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    port = None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
            _fail(f"address: port must be 0-65535, got {port_text!r}")
        port = int(port_text)
    try:
        layers, given = _load(config_file, options)
        config = prepare(build_config(*layers, given, {"user": ["check:peer"]}))
    except ConfigError as exc:
        _fail(str(exc))
        return
    decision = peer_policy(config).check(host, port)
    click.echo(f"{address}: {decision}")
    sys.exit(0 if decision.allowed else 1)


# --- status -------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--metrics",
    "address",
    default=f"127.0.0.1:{DEFAULT_METRICS_PORT}",
    show_default=True,
    metavar="HOST:PORT",
    help="The server's --metrics address.",
)
@click.option(
    "--token",
    envvar="STUNTURN_ADMIN_TOKEN",
    metavar="TOKEN",
    help="The server's --admin-token (default: $STUNTURN_ADMIN_TOKEN).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON document.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 120),
              help="Seconds to wait for the server.")  # fmt: skip
def status(address: str, token: str | None, as_json: bool, timeout: float) -> None:
    """List the live TURN allocations of a running server (user, client, relay, peers, age,
    bytes each way), read from its /status endpoint."""
    try:
        endpoint = parse_metrics_endpoint(address)
        document = fetch_status(endpoint, token, timeout)
    except (ConfigError, StatusError) as exc:
        _fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    for line in _status_lines(document):
        click.echo(line)


def _status_lines(document: dict[str, Any]) -> list[str]:
    def size(n: int) -> str:
        value = float(n)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if value < 1024 or unit == "GiB":
                return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
        raise AssertionError("unreachable")

    def age(seconds: float) -> str:
        s = int(seconds)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    header = ("WORKER", "USER", "CLIENT", "RELAY", "PEERS", "AGE", "TO PEER", "TO CLIENT")
    rows = [header]
    for a in sorted(document["allocations"], key=lambda a: (-a["age"], a["worker"], a["id"])):
        peers = [*a["peers"], *a["tcp_peers"]]
        rows.append((
            str(a["worker"]), a["user"], f"{a['transport']} {a['client']}",
            ",".join(a["relays"]), ",".join(peers) or "-", age(a["age"]),
            size(a["bytes_to_peer"]), size(a["bytes_to_client"]),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows] if len(rows) > 1 else []  # fmt: skip
    workers = document.get("workers", [])
    down = [str(w["worker"]) for w in workers if not w.get("up")]
    truncated = sum(w.get("truncated", 0) for w in workers)
    count = len(rows) - 1
    summary = f"{count} allocation{'s' if count != 1 else ''}, {len(workers)} worker(s)"
    if truncated:
        summary += f", {truncated} more not listed"
    if down:
        summary += f"; no answer from worker {', '.join(down)}"
    return [*lines, summary]


cli.add_command(p2p_command)
cli.add_command(config_group)


def main() -> None:
    cli(prog_name="stunturn")


if __name__ == "__main__":
    main()
