"""``natprobe``: what does my NAT do? Parses arguments, runs the probe, prints the report."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from stunturn import __version__
from stunturn.aio.probe import DEFAULT_SERVERS, ProbeRunner, resolve
from stunturn.nat.discovery import PROBE_POLICY, ProbeConfig
from stunturn.stun.transaction import RetransmitPolicy


def _split(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 literal."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise click.BadParameter(f"bad port in {text!r}", param_hint="SERVER")
    if not host:
        raise click.BadParameter(f"no host in {text!r}", param_hint="SERVER")
    return host, int(port) if port else 3478


def _fmt_list(items: list[Any]) -> str:
    return ", ".join(str(i) for i in items) if items else "-"


def render_text(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = []
    server = report["servers"][0]
    lines.append(f"Server            {server.get('address')}")
    if server.get("rfc5780") is not None:
        rfc = "yes" if server.get("rfc5780") else "no"
        lines.append(
            f"  RFC 5780        {rfc} (OTHER-ADDRESS {server.get('other_address') or '-'}; "
            f"CHANGE-REQUEST {server.get('change_request')}; RESPONSE-PORT "
            f"{_yes_no(server.get('response_port'))}; PADDING {_yes_no(server.get('padding'))})"
        )
    lines.append(f"Local address     {report['local_address'] or '-'}")
    lines.append(f"Public address    {report['public_address'] or '-'}")
    nat = report["nat_detected"]
    lines.append(f"NAT               {'yes' if nat else 'no' if nat is False else 'unknown'}")
    if report["udp_blocked"]:
        lines.append("UDP               blocked (TCP to the same server works)")
    lines.append(f"Mapping           {report['mapping']}")
    lines.append(f"Filtering         {report['filtering']}")
    lines.append(f"NAT type          {report['nat_type']}")
    for key, why in report["reasons"].items():
        lines.append(f"  ({key}: {why})")
    hp = report["hairpinning"]
    hp_text = "not tested" if hp is None else "yes" if hp else "no"
    if report.get("hairpinning_source"):
        sources = [_HAIRPIN_SOURCES.get(k, k) for k in report["hairpinning_source"].split("/")]
        hp_text += f" (arrives from {' and '.join(sources)})"
    lines.append(f"Hairpinning       {hp_text}")
    ports = report["port_allocation"]
    if ports:
        kind = ports.get("kind")
        extra = f", delta {ports['delta']}" if "delta" in ports else ""
        lines.append(f"Port allocation   {kind}{extra}")
        if ports.get("prediction"):
            lines.append(f"  {ports['prediction']}")
    life = report["mapping_lifetime"]
    if life:
        lines.append(
            f"Mapping lifetime  {life['summary']}; send keepalives every "
            f"{life['recommended_keepalive_s']:g} s"
        )
    p2p = report["p2p"]
    lines.append(f"P2P outlook       {p2p['summary']}")
    lines.append(f"Took              {report['duration_ms'] / 1000:.1f} s")
    return "\n".join(lines)


_HAIRPIN_SOURCES = {
    "external-mapping": "the sender's external mapping, as RFC 4787 asks",
    "external-address-new-port": "the NAT's address with a new port",
    "internal-address": "the sender's internal address (not RFC 4787 compliant)",
    "other": "an unexpected address",
}


def _yes_no(value: object) -> str:
    return "yes" if value is True else "no" if value is False else "unknown"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="natprobe")
@click.argument("servers", nargs=-1, metavar="[SERVER[:PORT] [SERVER2[:PORT]]]")
@click.option("--json", "as_json", is_flag=True, help="Print the natprobe/1 JSON report.")
@click.option("--no-hairpin", is_flag=True, help="Skip the hairpinning test.")
@click.option(
    "--lifetime",
    type=click.IntRange(10, 3600),
    is_flag=False,
    flag_value=300,
    default=None,
    metavar="[MAX_SECONDS]",
    help="Also measure the mapping lifetime, up to MAX_SECONDS (default 300), 10 s resolution.",
)
@click.option("--ports", type=click.IntRange(3, 64), default=8, show_default=True,
              help="Parallel mappings sampled for the port allocation test.")  # fmt: skip
@click.option("--bind", "bind_ip", metavar="IP", help="Local address to send from.")
@click.option("--rto", type=click.IntRange(50, 5000), default=int(PROBE_POLICY.rto * 1000),
              show_default=True, help="Initial retransmission timeout (ms).")  # fmt: skip
@click.option("--no-tcp", is_flag=True, help="Do not fall back to TCP to tell 'UDP blocked'.")
def main(
    servers: tuple[str, ...],
    as_json: bool,
    no_hairpin: bool,
    lifetime: int | None,
    ports: int,
    bind_ip: str | None,
    rto: int,
    no_tcp: bool,
) -> None:
    """Tell what your NAT does: mapping and filtering behaviour (RFC 5780), the classic type,
    hairpinning, port allocation, optionally the mapping lifetime.

    Give one RFC 5780 server, or two plain STUN servers (then only whether the mapping varies
    by destination can be told). With none, a public RFC 5780 server is used.
    """
    if len(servers) > 2:
        raise click.UsageError("give at most two servers")
    targets = [_split(s) for s in (servers or DEFAULT_SERVERS)]
    policy = RetransmitPolicy(rto=rto / 1000, rc=PROBE_POLICY.rc, rm=PROBE_POLICY.rm,
                              reliable_timeout=PROBE_POLICY.reliable_timeout)  # fmt: skip
    progress = _Progress(enabled=lifetime is not None and sys.stderr.isatty())
    try:
        report = asyncio.run(_run(targets, policy, not no_hairpin, lifetime, ports, bind_ip,
                                  not no_tcp, progress))  # fmt: skip
    except OSError as exc:
        click.echo(f"natprobe: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("natprobe: interrupted", err=True)
        sys.exit(130)
    progress.finish()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not report.get("error"):
        click.echo(render_text(report))
    if report.get("error"):
        click.echo(f"natprobe: no verdict: {report['error']}", err=True)
        sys.exit(1)


class _Progress:
    """A one-line progress bar on stderr for the lifetime test."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or not total:
            return
        width = 30
        filled = width * done // total
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\rmapping lifetime [{bar}] {done}/{total} probes")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


async def _run(
    targets: list[tuple[str, int]],
    policy: RetransmitPolicy,
    hairpin: bool,
    lifetime: int | None,
    ports: int,
    bind_ip: str | None,
    tcp_check: bool,
    progress: _Progress,
) -> dict[str, Any]:
    resolved = tuple([await resolve(host, port) for host, port in targets])
    config = ProbeConfig(
        servers=resolved,
        policy=policy,
        hairpin=hairpin,
        port_samples=ports,
        lifetime_max=float(lifetime) if lifetime else None,
        tcp_check=tcp_check,
    )
    return await ProbeRunner(config, bind_ip, progress).run()


if __name__ == "__main__":
    main()
