"""``stunturn``: the server command and its helpers."""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import click

from stunturn import __version__
from stunturn.aio.tls import make_self_signed
from stunturn.aio.workers import RunResult, StartupError, run_server
from stunturn.config import ConfigError, ServerConfig, build_config, load_toml
from stunturn.logsetup import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stunturn")
def cli() -> None:
    """STUN/TURN server and NAT traversal toolkit."""


def _fail(message: str) -> None:
    click.echo(f"stunturn: error: {message}", err=True)
    sys.exit(2)


@cli.command()
@click.option(
    "--listen",
    multiple=True,
    metavar="HOST:PORT",
    help="UDP and TCP address to serve (repeatable). Default 0.0.0.0:3478 and [::]:3478.",
)
@click.option("--tls-listen", multiple=True, metavar="HOST:PORT", help="TLS address (repeatable).")
@click.option("--cert", type=click.Path(dir_okay=False), help="TLS certificate chain (PEM).")
@click.option("--key", type=click.Path(dir_okay=False), help="TLS private key (PEM).")
@click.option(
    "--alt-address",
    metavar="IP",
    help="Second IP for RFC 5780 NAT behaviour discovery (listens on 2 IPs x 2 ports).",
)
@click.option("--udp/--no-udp", default=None, help="Serve UDP on the listen addresses.")
@click.option("--tcp/--no-tcp", default=None, help="Serve TCP on the listen addresses.")
@click.option("--workers", metavar="N", help="Worker processes (default: number of CPUs).")
@click.option(
    "--response-rate",
    metavar="N",
    help="Responses per second allowed per source IP (0 = unlimited). Default 200.",
)
@click.option("--response-burst", metavar="N", help="Burst size of that budget. Default 400.")
@click.option("--software", metavar="TEXT", help="SOFTWARE attribute to send (default: none).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file.")
@click.option("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info).")
@click.option("--log-format", metavar="FORMAT", help="text or json (default text).")
def serve(config_file: str | None, **options: Any) -> None:
    """Run the STUN server. With no options it serves 0.0.0.0:3478 and [::]:3478."""
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    try:
        layers = [load_toml(config_file)] if config_file else []
        config = build_config(*layers, given)
    except ConfigError as exc:
        _fail(str(exc))
        return
    configure_logging(config.log_level, config.log_format)
    with tempfile.TemporaryDirectory(prefix="stunturn-") as tmp:
        if config.tls_listen and config.cert is None:
            cert, key, fingerprint = make_self_signed(tmp)
            click.echo(f"TLS: self-signed certificate, SHA-256 fingerprint {fingerprint}")
            config = build_config(*layers, given, {"cert": cert, "key": key})
        _run(config)


def _run(config: ServerConfig) -> None:
    def ready(listeners: list[Any]) -> None:
        mode = "on" if config.alt_address else "off"
        click.echo(
            f"stunturn {__version__}: STUN server, {config.workers} worker(s), RFC 5780 {mode}"
        )
        for listener in listeners:
            click.echo(f"listening on {listener}")
        sys.stdout.flush()

    try:
        result: RunResult = run_server(config, ready)
    except StartupError as exc:
        _fail(str(exc))
        return
    counts = ", ".join(f"{k}={v}" for k, v in result.counters.as_dict().items())
    click.echo(f"stopped ({counts})")


def main() -> None:
    cli(prog_name="stunturn")


if __name__ == "__main__":
    main()
