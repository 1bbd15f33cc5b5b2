"""One P2P peer for the NAT lab: ``python -m lab.p2p_peer ROLE --signal-dir DIR ...``.

Run inside a lab host namespace (``ip netns exec NS python -m lab.p2p_peer ...``, with
``tests/`` on ``PYTHONPATH``). It calls :func:`stunturn.p2p.connect` with a *trickle* signaling
channel made of two JSON-lines files in DIR (``offer.jsonl`` and ``answer.jsonl``; each side
appends its own messages and tails the other's), exchanges a few test datagrams each way over
the selected path, and prints one JSON report on stdout (``stunturn-lab-peer/1``): the path
(candidate types and addresses at both ends), timestamps on the machine-wide monotonic clock
(``time.monotonic()`` is the same clock in every namespace, so the caller can compare the two
peers), the candidates gathered and received, and on failure the reason plus every candidate
pair's state. The offerer controls. Every wait is bounded by ``--timeout``.

``stunturn p2p --signal-dir`` (the CLI) signals in one shot after gathering; this driver
trickles, as apps do, and records when checks can start (the peer's credentials arrive).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from stunturn.p2p import Link, connect
from stunturn.stun import Address

SCHEMA = "stunturn-lab-peer/1"
POLL = 0.01
"""Signaling file poll interval (s)."""


class FileSignaling:
    """Trickle signaling through two JSON-lines files: ours is appended to, the peer's tailed.

    Only complete lines are read, so a half-written line is never parsed. ``hello_at`` is the
    monotonic time the peer's hello (its ICE credentials) was handed to ICE: checks start then.
    """

    def __init__(self, directory: Path, role: str, timeout: float) -> None:
        self.ours = directory / f"{role}.jsonl"
        self.theirs = directory / f"{'answer' if role == 'offer' else 'offer'}.jsonl"
        self.timeout = timeout
        self.hello_at: float | None = None
        self.received: list[dict[str, Any]] = []
        self._offset = 0
        self._pending: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        with self.ours.open("a") as out:
            out.write(json.dumps(message) + "\n")

    async def receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while not self._pending:
            self._read()
            if self._pending:
                break
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"nothing from the peer in {self.theirs} for {self.timeout} s"
                )
            await asyncio.sleep(POLL)
        message = self._pending.pop(0)
        self.received.append(message)
        if message.get("type") == "hello" and self.hello_at is None:
            self.hello_at = time.monotonic()
        return message

    def _read(self) -> None:
        try:
            with self.theirs.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for line in data[: end + 1].splitlines():
            if line.strip():
                self._pending.append(json.loads(line))


def _hostport(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _pairs(link_or_conn: Any) -> list[dict[str, Any]]:
    agent = link_or_conn.agent
    return [
        {"pair": p.describe(), "state": str(p.state), "nominated": p.nominated}
        for p in sorted(agent.pairs.values(), key=lambda p: p.priority, reverse=True)
    ]


async def exchange(link: Link, count: int, linger: float) -> dict[str, int]:
    """Send ``count`` numbered datagrams, answer the peer's with acks, until we have all the
    peer's messages and all our acks (or ``linger`` s); then "done" until the peer says it too."""
    got: set[int] = set()
    acked: set[int] = set()
    peer_done = asyncio.Event()

    async def reader() -> None:
        while True:
            data = await link.recv()
            if data.startswith(b"msg "):
                got.add(int(data[4:]))
                await link.send(b"ack " + data[4:])
            elif data.startswith(b"ack "):
                acked.add(int(data[4:]))
            elif data == b"done":
                peer_done.set()

    task = asyncio.ensure_future(reader())
    try:
        deadline = time.monotonic() + linger
        for i in range(count):
            await link.send(b"msg %d" % i)
        resend = time.monotonic() + 0.5
        while (len(got) < count or len(acked) < count) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            if time.monotonic() > resend:  # UDP: resend what is not acked yet
                resend = time.monotonic() + 0.5
                for i in range(count):
                    if i not in acked:
                        await link.send(b"msg %d" % i)
        for _ in range(10):
            await link.send(b"done")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer_done.wait(), 0.1)
            if peer_done.is_set():
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {"sent": count, "received": len(got), "acked": len(acked)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(args.signal_dir)
    signaling = FileSignaling(directory, args.role, args.timeout)
    started = time.monotonic()
    report: dict[str, Any] = {"schema": SCHEMA, "role": args.role, "started": started}
    try:
        async with connect(
            signaling,
            stun=[_hostport(s) for s in args.stun],
            turn=args.turn,
            turn_username=args.turn_user,
            turn_password=args.turn_password,
            controlling=args.role == "offer",
            host_addresses=args.host or None,
            timeout=args.timeout,
            failure_timeout=args.failure_timeout,
        ) as link:
            connected = time.monotonic()
            path = link.path
            report.update(
                ok=True,
                connected=connected,
                path=path.as_dict(),
                pairs=_pairs(link.connection),
                local_candidates=[
                    c.candidate.to_sdp() for c in link.connection.agent.local_candidates
                ],
            )
            report["data"] = await exchange(link, args.count, args.linger)
    except (ConnectionError, TimeoutError, OSError) as exc:
        report.update(ok=False, failed=time.monotonic(), error=str(exc) or type(exc).__name__)
    report["checks_started"] = signaling.hello_at
    report["remote_candidates"] = [
        m["candidate"] for m in signaling.received if m.get("type") == "candidate"
    ]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.p2p_peer", description=__doc__)
    parser.add_argument("role", choices=("offer", "answer"))
    parser.add_argument("--signal-dir", required=True)
    parser.add_argument("--stun", action="append", default=[], metavar="IP:PORT")
    parser.add_argument("--turn", action="append", default=[], metavar="URL")
    parser.add_argument("--turn-user")
    parser.add_argument("--turn-password")
    parser.add_argument("--host", action="append", default=[], metavar="IP")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--linger", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--failure-timeout", type=float, default=10.0)
    parser.add_argument("--log", metavar="FILE", help="stunturn debug log")
    args = parser.parse_args(argv)
    if args.log:
        logging.basicConfig(
            filename=args.log,
            level=logging.DEBUG,
            format="%(created).3f %(name)s %(levelname)s %(message)s",
        )
    report = asyncio.run(run(args))
    print(json.dumps(report), flush=True)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
