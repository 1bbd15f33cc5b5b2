"""``stunturn p2p``: connect two peers through NATs and report the path.

Signaling is either copy and paste (each side prints one line and reads the other's from
stdin) or a directory both sides can see (``--signal-dir``). Parses, calls
:func:`stunturn.p2p.connect`, prints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import click

from stunturn.p2p import connect
from stunturn.stun import Address

BLOB_PREFIX = "stunturn-p2p:v1:"
ROLES = ("offer", "answer")


def encode_blob(messages: list[dict[str, Any]]) -> str:
    raw = json.dumps(messages, separators=(",", ":")).encode()
    return BLOB_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode()


def decode_blob(text: str) -> list[dict[str, Any]]:
    text = text.strip()
    if not text.startswith(BLOB_PREFIX):
        raise ValueError(f"not a stunturn p2p blob (it starts with {BLOB_PREFIX!r})")
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(text[len(BLOB_PREFIX) :]))
        messages = json.loads(raw)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"corrupt blob: {exc}") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("corrupt blob: not a list of messages")
    return messages


class OneShotSignaling:
    """Collects our messages until end-of-candidates, publishes them in one blob, then serves
    the peer's blob message by message."""

    def __init__(self, publish: Any, fetch: Any) -> None:
        self._out: list[dict[str, Any]] = []
        self._in: list[dict[str, Any]] | None = None
        self._publish = publish
        self._fetch = fetch
        self._lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        self._out.append(message)
        if message.get("type") == "end-of-candidates":
            await self._publish(encode_blob(self._out))

    async def receive(self) -> dict[str, Any]:
        async with self._lock:
            if self._in is None:
                self._in = decode_blob(await self._fetch())
        if not self._in:
            await asyncio.Event().wait()  # nothing more will come
        return self._in.pop(0)


def stdio_signaling() -> OneShotSignaling:
    async def publish(blob: str) -> None:
        click.echo("Send this line to the other side:", err=True)
        click.echo(blob)
        sys.stdout.flush()

    async def fetch() -> str:
        click.echo("Paste the other side's line:", err=True)
        line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line:
            raise ConnectionError("no signaling input (stdin closed)")
        return line

    return OneShotSignaling(publish, fetch)


def dir_signaling(directory: Path, role: str, timeout: float) -> OneShotSignaling:
    other = "answer" if role == "offer" else "offer"

    async def publish(blob: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{role}.{os.getpid()}.tmp"
        tmp.write_text(blob + "\n")
        tmp.replace(directory / f"{role}.txt")  # atomic: the peer never reads half a file

    async def fetch() -> str:
        path = directory / f"{other}.txt"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise ConnectionError(f"no {path} after {timeout:g} s")
            await asyncio.sleep(0.05)
        return path.read_text()

    return OneShotSignaling(publish, fetch)


def parse_hostport(text: str, default_port: int = 3478) -> Address:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise click.BadParameter(f"bad port in {text!r}")
    return host, int(port) if port else default_port


async def run_p2p(
    role: str,
    signaling: OneShotSignaling,
    stun: list[Address],
    turn: list[str],
    turn_user: str | None,
    turn_password: str | None,
    count: int,
    include_loopback: bool,
    hosts: list[str] | None,
    timeout: float,
    relay_only: bool = False,
) -> dict[str, Any]:
    """Connect, exchange ``count`` messages each way, return the report."""
    started = time.monotonic()
    async with connect(
        signaling,
        stun=stun,
        turn=turn,
        turn_username=turn_user,
        turn_password=turn_password,
        controlling=role == "offer",
        include_loopback=include_loopback,
        host_addresses=hosts,
        relay_only=relay_only,
        timeout=timeout,
    ) as link:
        connected = time.monotonic()
        received: set[int] = set()
        peer_done = asyncio.Event()

        async def reader() -> None:
            while True:
                data = await link.recv()
                if data.startswith(b"msg "):
                    received.add(int(data[4:]))
                    await link.send(b"ack " + data[4:])
                elif data == b"done":
                    peer_done.set()

        task = asyncio.ensure_future(reader())
        try:
            for i in range(count):
                await link.send(b"msg %d" % i)
                await asyncio.sleep(0.005)
            deadline = time.monotonic() + 5.0
            while len(received) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for _ in range(5):  # tell the peer we have all we will get; it may linger a bit
                await link.send(b"done")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(peer_done.wait(), 0.3)
                if peer_done.is_set():
                    break
        finally:
            task.cancel()
        return {
            "schema": "stunturn-p2p/1",
            "role": role,
            "path": link.path.as_dict(),
            "connect_ms": round((connected - started) * 1000, 1),
            "sent": count,
            "received": len(received),
        }


@click.command("p2p")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--stun", "stun", multiple=True, metavar="HOST[:PORT]", help="STUN server.")
@click.option("--turn", "turn", multiple=True, metavar="URL",
              help="TURN server, e.g. turn:turn.example.org?transport=udp.")  # fmt: skip
@click.option("--turn-user", metavar="NAME", help="TURN username.")
@click.option("--turn-password", metavar="PASSWORD", help="TURN password.")
@click.option("--signal-dir", type=click.Path(file_okay=False), help="Exchange via files here.")
@click.option("--count", type=click.IntRange(0, 100000), default=10, show_default=True,
              help="Test messages to send each way.")  # fmt: skip
@click.option("--host", "hosts", multiple=True, metavar="IP",
              help="Only these local addresses as host candidates.")  # fmt: skip
@click.option("--include-loopback", is_flag=True, help="Offer loopback addresses too.")
@click.option("--relay-only", is_flag=True, help="Offer relayed candidates only.")
@click.option("--timeout", type=click.FloatRange(1, 600), default=60, show_default=True,
              help="Give up after this many seconds (signaling included).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def p2p(
    role: str,
    stun: tuple[str, ...],
    turn: tuple[str, ...],
    turn_user: str | None,
    turn_password: str | None,
    signal_dir: str | None,
    count: int,
    hosts: tuple[str, ...],
    include_loopback: bool,
    relay_only: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Connect to a peer (ROLE offer or answer) and report the path: direct or relayed."""
    stun_servers = [parse_hostport(s) for s in stun]
    signaling = dir_signaling(Path(signal_dir), role, timeout) if signal_dir else stdio_signaling()
    try:
        report = asyncio.run(
            run_p2p(
                role,
                signaling,
                stun_servers,
                list(turn),
                turn_user,
                turn_password,
                count,
                include_loopback,
                list(hosts) or None,
                timeout,
                relay_only,
            )
        )
    except (ConnectionError, TimeoutError, OSError, ValueError) as exc:
        message = str(exc) or type(exc).__name__
        if as_json:
            click.echo(json.dumps({"schema": "stunturn-p2p/1", "role": role, "error": message}))
        click.echo(f"stunturn p2p: no connection: {message}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    path = report["path"]
    loc, rem = path["local"], path["remote"]
    rtt = path["rtt_ms"]
    click.echo(f"connected ({path['kind']}) in {report['connect_ms']:.0f} ms")
    click.echo(f"  local  {loc['type']:6} {loc['address'][0]}:{loc['address'][1]}")
    click.echo(f"  remote {rem['type']:6} {rem['address'][0]}:{rem['address'][1]}")
    click.echo(f"  rtt    {rtt:.1f} ms" if rtt is not None else "  rtt    -")
    click.echo(f"messages: sent {report['sent']}, received {report['received']}")
