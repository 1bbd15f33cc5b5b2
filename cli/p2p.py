"""``stunturn p2p``: connect two peers through NATs and report the path.

Signaling is either copy and paste (each side prints one line and reads the other's from
stdin) or a directory both sides can see (``--signal-dir``). Parses, calls
:func:`stunturn.p2p.connect`, prints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from stunturn.p2p import Link, connect, parse_turn
from stunturn.stun import Address

BLOB_PREFIX = "stunturn-p2p:v1:"
ROLES = ("offer", "answer")
SCHEMA = "stunturn-p2p/1"
MAX_LINE = 1 << 20
"""Longest signaling line read from stdin."""


def encode_blob(messages: list[dict[str, Any]]) -> str:
    raw = json.dumps(messages, separators=(",", ":")).encode()
    return BLOB_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode()


def decode_blob(text: str) -> list[dict[str, Any]]:
    text = text.strip()
    if not text.startswith(BLOB_PREFIX):
        raise ValueError(f"not a stunturn p2p line (it starts with {BLOB_PREFIX!r})")
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(text[len(BLOB_PREFIX) :]))
        messages = json.loads(raw)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"corrupt stunturn p2p line: {exc}") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("corrupt stunturn p2p line: not a list of messages")
    return messages


class OneShotSignaling:
    """Collects our messages until end-of-candidates, publishes them in one blob, then serves
    the peer's blob message by message.

    With ``fetch_after_publish`` the peer's blob is only asked for once ours is out (so a
    person is asked to paste after being shown what to send).
    """

    def __init__(
        self,
        publish: Callable[[str], Awaitable[None]],
        fetch: Callable[[], Awaitable[str]],
        fetch_after_publish: bool = False,
    ) -> None:
        self._out: list[dict[str, Any]] = []
        self._in: list[dict[str, Any]] | None = None
        self._publish = publish
        self._fetch = fetch
        self._lock = asyncio.Lock()
        self._published = asyncio.Event()
        if not fetch_after_publish:
            self._published.set()

    async def send(self, message: dict[str, Any]) -> None:
        self._out.append(message)
        if message.get("type") == "end-of-candidates":
            await self._publish(encode_blob(self._out))
            self._published.set()

    async def receive(self) -> dict[str, Any]:
        async with self._lock:
            if self._in is None:
                await self._published.wait()
                self._in = decode_blob(await self._fetch())
        if not self._in:
            await asyncio.Event().wait()  # nothing more will come
        return self._in.pop(0)


async def read_stdin_line() -> str:
    """One line from stdin, read in a daemon thread with ``os.read``: an exit (e.g. on a
    timeout) never waits for a line nobody types, and no stdin buffer lock is held."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def deliver(line: str | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(line or "")

    def work() -> None:
        data = b""
        error: BaseException | None = None
        try:
            while b"\n" not in data and len(data) < MAX_LINE:
                chunk = os.read(sys.stdin.fileno(), 65536)
                if not chunk:
                    break
                data += chunk
        except (OSError, ValueError) as exc:
            error = exc
        line = data.partition(b"\n")[0].decode("utf-8", "replace") if data else ""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, line, error)

    threading.Thread(target=work, name="stunturn-p2p-stdin", daemon=True).start()
    return await future


def stdio_signaling() -> OneShotSignaling:
    async def publish(blob: str) -> None:
        click.echo("Send this line to the other side:", err=True)
        click.echo(blob)
        sys.stdout.flush()

    async def fetch() -> str:
        click.echo("Paste the other side's line:", err=True)
        line = await read_stdin_line()
        if not line.strip():
            raise ConnectionError("no signaling input (stdin closed or empty line)")
        return line

    return OneShotSignaling(publish, fetch, fetch_after_publish=True)


def dir_signaling(directory: Path, role: str, timeout: float) -> OneShotSignaling:
    """``ROLE.txt`` is ours, the other role's file the peer's. Our stale file from an earlier
    run is removed at the start and the peer's is removed once read, so a directory can be
    used again."""
    other = "answer" if role == "offer" else "offer"
    with contextlib.suppress(FileNotFoundError):
        (directory / f"{role}.txt").unlink()

    async def publish(blob: str) -> None:
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
        text = path.read_text()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return text

    return OneShotSignaling(publish, fetch)


def parse_hostport(text: str, default_port: int = 3478) -> Address:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise click.BadParameter(f"no host in {text!r}", param_hint="--stun")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise click.BadParameter(f"bad port in {text!r}", param_hint="--stun")
    return host, int(port) if port else default_port


async def exchange(link: Link, count: int, linger: float = 5.0) -> tuple[int, int]:
    """Send ``count`` numbered datagrams (resent until acked), ack the peer's; stop when all
    arrived both ways or after ``linger`` s, then tell the peer with "done". Returns
    (received, acked)."""
    received: set[int] = set()
    acked: set[int] = set()
    peer_done = asyncio.Event()

    async def reader() -> None:
        while True:
            data = await link.recv()
            kind, _, number = data.partition(b" ")
            if kind == b"msg" and number.isdigit():
                received.add(int(number))
                await link.send(b"ack " + number)
            elif kind == b"ack" and number.isdigit():
                acked.add(int(number))
            elif data == b"done":
                peer_done.set()

    task = asyncio.ensure_future(reader())
    try:
        deadline = time.monotonic() + linger
        resend = 0.0
        while (len(received) < count or len(acked) < count) and time.monotonic() < deadline:
            if task.done():
                break  # the path is gone
            if time.monotonic() >= resend:  # UDP: send again what is not acked yet
                resend = time.monotonic() + 0.5
                for i in range(count):
                    if i not in acked:
                        await link.send(b"msg %d" % i)
                    if i % 16 == 15:
                        await asyncio.sleep(0.002)  # pacing
                        if time.monotonic() >= deadline:
                            break
            await asyncio.sleep(0.01)
        for _ in range(5):  # tell the peer we have all we will get; it may linger a bit
            if task.done():
                break
            await link.send(b"done")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer_done.wait(), 0.3)
            if peer_done.is_set():
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
    return len(received), len(acked)


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
        received, acked = await exchange(link, count)
        return {
            "schema": SCHEMA,
            "role": role,
            "path": link.path.as_dict(),
            "connect_ms": round((connected - started) * 1000, 1),
            "sent": count,
            "received": received,
            "acked": acked,
        }


def _check_options(
    hosts: tuple[str, ...],
    turn: tuple[str, ...],
    turn_user: str | None,
    turn_password: str | None,
    relay_only: bool,
    signal_dir: str | None,
) -> None:
    """Refuse bad arguments before anything starts (click prints them as usage errors)."""
    for ip in hosts:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise click.BadParameter(f"{ip!r} is not an IP address", param_hint="--host") from None
    try:
        parse_turn(list(turn), turn_user, turn_password)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--turn") from None
    if relay_only and not turn:
        raise click.UsageError("--relay-only needs a TURN server (--turn)")
    if signal_dir is not None:
        try:
            Path(signal_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.BadParameter(str(exc), param_hint="--signal-dir") from None
        if not os.access(signal_dir, os.W_OK | os.X_OK):
            raise click.BadParameter(f"{signal_dir} is not writable", param_hint="--signal-dir")


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
    _check_options(hosts, turn, turn_user, turn_password, relay_only, signal_dir)

    async def main() -> dict[str, Any]:
        signaling = (
            dir_signaling(Path(signal_dir), role, timeout) if signal_dir else stdio_signaling()
        )
        return await run_p2p(
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

    try:
        report = asyncio.run(main())
    except (ConnectionError, TimeoutError, OSError, ValueError) as exc:
        message = str(exc) or type(exc).__name__
        if as_json:
            click.echo(json.dumps({"schema": SCHEMA, "role": role, "error": message}))
        click.echo(f"stunturn p2p: no connection: {message}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    path = report["path"]
    loc, rem = path["local"], path["remote"]
    rtt = path["rtt_ms"]
    click.echo(f"connected ({path['kind']}) in {report['connect_ms']:.0f} ms")
    click.echo(f"  local  {loc['type']:6} {_hostport(loc['address'])}")
    click.echo(f"  remote {rem['type']:6} {_hostport(rem['address'])}")
    click.echo(f"  rtt    {rtt:.1f} ms" if rtt is not None else "  rtt    -")
    click.echo(
        f"messages: sent {report['sent']}, received {report['received']}, acked {report['acked']}"
    )


def _hostport(address: list[Any]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
