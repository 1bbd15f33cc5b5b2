"""``stunturn config check FILE``: every problem of a configuration file, or a summary of it."""

from __future__ import annotations

import json
import sys

import click

from stunturn.config import (
    ConfigCheck,
    ConfigError,
    ConfigSyntaxError,
    ServerConfig,
    check_config,
    load_toml,
)
from stunturn.presets import PRESETS


@click.group("config")
def config_group() -> None:
    """Check configuration files and list the presets."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
@click.option("--strict", is_flag=True, help="Treat warnings as problems (exit 1).")
@click.option(
    "--no-file-checks",
    is_flag=True,
    help="Do not require cert, key and user-db to exist here (checking for another machine).",
)
def check(file: str, as_json: bool, strict: bool, no_file_checks: bool) -> None:
    """Explain every problem in FILE, the TOML file `stunturn serve --config` reads.

    Exit status: 0 when the server would start with it (warnings are printed but do not count
    unless --strict), 1 when it has problems (each named by its key), 2 when FILE cannot be
    read.
    """
    try:
        layer = load_toml(file)
    except ConfigSyntaxError as exc:
        result = ConfigCheck(None, (exc,), ())
    except ConfigError as exc:
        click.echo(f"stunturn: error: {exc}", err=True)
        sys.exit(2)
    else:
        result = check_config(layer, check_files=not no_file_checks)
    failed = bool(result.errors) or (strict and bool(result.warnings))
    if as_json:
        report = {
            "file": file,
            "ok": not failed,
            "errors": [{"field": e.field, "message": e.message} for e in result.errors],
            "warnings": [{"field": w.field, "message": w.message} for w in result.warnings],
            "summary": summary(result.config) if result.config else None,
        }
        click.echo(json.dumps(report, indent=2))
    else:
        _print_text(file, result)
    sys.exit(1 if failed else 0)


def _print_text(file: str, result: ConfigCheck) -> None:
    if result.config is not None:
        lines = summary(result.config)
        click.echo(f"ok: {lines[0]}")
        for line in lines[1:]:
            click.echo(f"  {line}")
    else:
        count = len(result.errors)
        click.echo(f"{file}: {count} problem{'s' if count > 1 else ''}")
        for error in result.errors:
            click.echo(f"  {error}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}")


@config_group.command("presets")
def presets() -> None:
    """List the presets and exactly what each sets (options given explicitly override them)."""
    for preset in PRESETS.values():
        click.echo(f"{preset.name}: {preset.summary}")
        for key, value in preset.settings.items():
            click.echo(f"  {key} = {json.dumps(value)}")


def summary(config: ServerConfig) -> list[str]:
    """A few lines saying what the server would do; the first is the gist."""
    transports = "+".join(t for t, on in (("udp", config.udp), ("tcp", config.tcp)) if on)
    stun = []
    if transports and config.listen:
        stun.append(f"{transports} {', '.join(str(ep) for ep in config.listen)}")
    if config.tls_listen:
        stun.append(f"tls {', '.join(str(ep) for ep in config.tls_listen)}")
    gist = f"STUN on {'; '.join(stun)}"
    if config.turn:
        gist += f"; TURN with {_credentials(config)}"
    else:
        gist += "; no TURN"
    if config.preset:
        gist += f" (preset {config.preset})"
    lines = [gist]
    rfc5780 = f"on, alternate {config.alt_address}" if config.alt_address else "off"
    lines.append(f"workers: {config.workers}; RFC 5780: {rfc5780}; log: {config.log_level} "
                 f"{config.log_format}")  # fmt: skip
    if config.tls_enabled:
        cert = f"cert {config.cert}" if config.cert else "self-signed certificate"
        lines.append(f"tls: {cert}")
    if config.turn:
        relay = ", ".join(config.relay_ip) or "chosen at start (listen IP or default route)"
        low, high = config.relay_ports
        lines.append(f"relay: {relay}, ports {low}-{high}; realm {config.realm!r}")
        lines.append(f"peers: {_peers(config)}")
        lines.append(
            f"quotas: {config.user_quota}/user, {config.ip_quota}/client IP, "
            f"{config.total_quota} total allocations"
        )
    return lines


def _credentials(config: ServerConfig) -> str:
    parts = []
    if config.user:
        parts.append(f"{len(config.user)} static user{'s' if len(config.user) > 1 else ''}")
    if config.user_db:
        parts.append(f"user store {config.user_db}")
    if config.auth_secret:
        count = len(config.auth_secret)
        parts.append(f"{count} REST secret{'s' if count > 1 else ''}")
    return " + ".join(parts) or "the default user store, created on first run"


def _peers(config: ServerConfig) -> str:
    allow = ", ".join(config.allow_peer)
    if config.deny_other_peers:
        text = f"only allow-peer {allow} (everything else denied)"
    else:
        text = "public addresses (special-purpose ranges and this server denied)"
        if allow:
            text += f", plus allow-peer {allow}"
        if config.deny_peer:
            text += f", minus deny-peer {', '.join(config.deny_peer)}"
    if config.allow_loopback_peers:
        text += ", plus loopback"
    return text


preset_option = click.option(
    "--preset",
    metavar="NAME",
    help=f"Start from a preset: {', '.join(PRESETS)} (docs/deploy.md); options given win.",
)
"""``--preset NAME`` for commands that build a server configuration."""
