"""Prometheus metrics, health endpoints and the admin status endpoint, over HTTP.

``stunturn serve --metrics HOST:PORT`` serves, on one small HTTP/1.1 listener:

* ``/metrics``: the Prometheus text exposition format 0.0.4, one series per worker
  (``worker="0"``); labels are bounded (worker, direction, error code), never per user;
* ``/live``: 200 while the process runs;
* ``/ready``: 200 once every worker is serving, 503 while starting, restarting a worker,
  stopping or draining (:attr:`Worker.draining` and :attr:`Supervisor.draining` are the hook);
* ``/status``: the live allocations as JSON, for ``stunturn status``; only with
  ``--admin-token``, sent as ``Authorization: Bearer TOKEN`` (403 without a token configured,
  401 for a missing or wrong one).

Everything is read when a request comes, never per relayed packet: a worker's
:class:`WorkerSnapshot` sums the byte and packet counters of its live allocations and adds the
running totals of those that ended (:class:`RelayTotals`, updated once per allocation, when
it ends). With one worker the HTTP server runs on the worker's own event loop; with several,
the supervisor serves it from a thread and asks each worker for a snapshot over the worker's
pipe (:mod:`stunturn.aio.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http.client
import ipaddress
import json
import logging
import operator
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import __version__
from ..config import Endpoint
from ..server.keys import IPV6_KEY_BIT
from ..stun import Address
from ..turn import Allocation

if TYPE_CHECKING:
    from .server import Worker

log = logging.getLogger("stunturn.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUS_LIMIT = 1000
"""Most allocations one worker lists in ``/status`` (the rest are counted as truncated)."""
SNAPSHOT_TIMEOUT = 2.0
"""How long the supervisor waits for each worker's snapshot before reporting it down."""
REQUEST_TIMEOUT = 5.0
"""Time for a client to send its whole request."""
MAX_CONNECTIONS = 64
MAX_HEADERS = 64
LINE_LIMIT = 8192


# --- what a worker reports ------------------------------------------------------------------


@dataclass(slots=True)
class RelayTotals:
    """Running totals of the allocations that ended in one worker."""

    allocations: int = 0
    bytes_to_peer: int = 0
    bytes_to_client: int = 0
    packets_to_peer: int = 0
    packets_to_client: int = 0

    def add(self, alloc: Allocation) -> None:
        """An allocation ends: keep what it relayed (called once per allocation)."""
        self.allocations += 1
        self.bytes_to_peer += alloc.bytes_to_peer
        self.bytes_to_client += alloc.bytes_to_client
        self.packets_to_peer += alloc.packets_to_peer
        self.packets_to_client += alloc.packets_to_client


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker's gauges and counters at one moment (picklable: it crosses the pipe)."""

    worker: int
    serving: bool
    allocations: int = 0
    permissions: int = 0
    channels: int = 0
    tcp_peer_connections: int = 0
    stream_connections: int = 0
    allocations_created: int = 0
    bytes_to_peer: int = 0
    bytes_to_client: int = 0
    packets_to_peer: int = 0
    packets_to_client: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    error_codes: dict[int, int] = field(default_factory=dict)
    sessions: tuple[dict[str, Any], ...] | None = None
    """The live allocations (for ``/status``), when asked for."""
    sessions_truncated: int = 0
    """Allocations left out of ``sessions`` beyond :data:`STATUS_LIMIT`."""


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip_of_key(key: int) -> str:
    """The IP address string of a :func:`stunturn.server.keys.ip_key`."""
    if key & IPV6_KEY_BIT:
        return str(ipaddress.IPv6Address(key ^ IPV6_KEY_BIT))
    return str(ipaddress.IPv4Address(key))


def _session(alloc: Allocation, worker: int, now: float) -> dict[str, Any]:
    transport, client, _ = alloc.five_tuple
    return {
        "worker": worker,
        "id": alloc.id,
        "user": alloc.username,
        "transport": transport.value,
        "client": format_address(client),
        "relays": [format_address(relay.address) for relay in alloc.relays],
        "relay_transport": "tcp" if alloc.tcp else "udp",
        "peers": sorted(_ip_of_key(key) for key in alloc.permissions),
        "channels": [
            {"number": number, "peer": format_address(channel.peer)}
            for number, channel in sorted(alloc.channels.items())
        ],
        "tcp_peers": [format_address(peer) for peer in alloc.peer_conns],
        "age": round(max(0.0, now - alloc.created), 3),
        "expires_in": round(max(0.0, alloc.expires - now), 3),
        "bytes_to_peer": alloc.bytes_to_peer,
        "bytes_to_client": alloc.bytes_to_client,
        "packets_to_peer": alloc.packets_to_peer,
        "packets_to_client": alloc.packets_to_client,
    }


def worker_ready(worker: Worker) -> bool:
    """Serving, and neither the worker nor its TURN service is draining."""
    turn = worker.core.turn
    # getattr: TurnService grows its own drain state (SIGUSR1); either kind takes us out.
    turn_draining = turn is not None and bool(getattr(turn, "draining", False))
    return worker.serving and not worker.draining and not turn_draining


def take_snapshot(worker: Worker, sessions: bool = False) -> WorkerSnapshot:
    """Read ``worker``'s counters and sum its live allocations (on the worker's event loop)."""
    ended = worker.ended
    allocations = permissions = channels = tcp_peers = 0
    to_peer, to_client = ended.bytes_to_peer, ended.bytes_to_client
    packets_to_peer, packets_to_client = ended.packets_to_peer, ended.packets_to_client
    listed: list[dict[str, Any]] = []
    turn = worker.core.turn
    now = worker.loop.time()
    if turn is not None:
        for alloc in turn.allocations.values():
            allocations += 1
            permissions += len(alloc.permissions)
            channels += len(alloc.channels)
            tcp_peers += len(alloc.peer_conns)
            to_peer += alloc.bytes_to_peer
            to_client += alloc.bytes_to_client
            packets_to_peer += alloc.packets_to_peer
            packets_to_client += alloc.packets_to_client
            if sessions and len(listed) < STATUS_LIMIT:
                listed.append(_session(alloc, worker.index, now))
    return WorkerSnapshot(
        worker=worker.index,
        serving=worker_ready(worker),
        allocations=allocations,
        permissions=permissions,
        channels=channels,
        tcp_peer_connections=tcp_peers,
        stream_connections=len(worker.connections),
        allocations_created=ended.allocations + allocations,
        bytes_to_peer=to_peer,
        bytes_to_client=to_client,
        packets_to_peer=packets_to_peer,
        packets_to_client=packets_to_client,
        counters=worker.core.counters.as_dict(),
        error_codes=dict(worker.core.error_codes),
        sessions=tuple(listed) if sessions else None,
        sessions_truncated=allocations - len(listed) if sessions else 0,
    )


WorkerView = tuple[int, WorkerSnapshot | None]
"""A worker index and its snapshot, or None when it did not answer in time."""


class SnapshotSource(Protocol):
    """Where the HTTP server gets its answers: one in-process worker, or the supervisor."""

    def is_ready(self) -> bool:
        """Whether every worker is serving (and nothing is draining)."""
        ...

    def snapshots(self, sessions: bool) -> Awaitable[list[WorkerView]]:
        """Every worker's snapshot (with the allocation list when ``sessions``)."""
        ...


# --- the exposition format -------------------------------------------------------------------

COUNTER_METRICS: tuple[tuple[str, str, str], ...] = (
    # (Counters field, metric name, help)
    ("received", "stunturn_received_total",
     "Datagrams and stream frames handed to the STUN/TURN core (ChannelData relayed on the "
     "UDP fast path is not counted here)."),
    ("malformed", "stunturn_malformed_dropped_total",
     "Packets dropped because they were not valid STUN or ChannelData (never answered)."),
    ("bad_fingerprint", "stunturn_bad_fingerprint_dropped_total",
     "STUN messages dropped because their FINGERPRINT did not match."),
    ("ignored", "stunturn_ignored_total",
     "Valid messages that need no answer: responses, unknown indications, ChannelData for no "
     "channel."),
    ("rate_limited", "stunturn_rate_limited_total",
     "Responses withheld because the source IP spent its response budget."),
    ("binding_ok", "stunturn_binding_responses_total", "Binding success responses sent."),
    ("send_failed", "stunturn_send_failed_total",
     "Datagrams the kernel refused to send (full buffer, unreachable destination)."),
    ("stream_refused", "stunturn_stream_refused_total",
     "TCP/TLS connections closed at once: the per-IP or total connection limit was reached."),
    ("stream_timeouts", "stunturn_stream_timeouts_total",
     "TCP/TLS connections closed for silence, a slow handshake or a half-sent message."),
    ("stream_dropped", "stunturn_stream_dropped_total",
     "Relayed datagrams dropped for a TCP/TLS client that does not read fast enough."),
)  # fmt: skip
"""Every :class:`~stunturn.server.counters.Counters` field but ``error_responses``, which
``stunturn_error_responses_total`` reports by code."""

GAUGE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("allocations", "stunturn_allocations", "Live TURN allocations."),
    ("permissions", "stunturn_permissions", "Permissions of the live allocations."),
    ("channels", "stunturn_channels", "Channel bindings of the live allocations."),
    ("tcp_peer_connections", "stunturn_tcp_peer_connections",
     "RFC 6062 TCP peer connections of the live allocations."),
    ("stream_connections", "stunturn_stream_connections",
     "Open TCP and TLS client connections."),
)  # fmt: skip

AUTH_FAILURE_CODES = (401, 438)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in pairs) + "}"


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Sequence[tuple[Sequence[tuple[str, str]], int | float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _counter(name: str) -> Callable[[WorkerSnapshot], int]:
    return lambda snap: snap.counters.get(name, 0)


def render_metrics(views: Sequence[WorkerView]) -> str:
    """The Prometheus text exposition (format 0.0.4) of every worker's snapshot."""
    out = _Exposition()
    out.family(
        "stunturn_build_info", "gauge", "Always 1; the version label says what is running.",
        [((("version", __version__),), 1)],
    )  # fmt: skip
    out.family(
        "stunturn_worker_up",
        "gauge",
        "1 when the worker answered this scrape, 0 when it did not (starting, restarting or "
        "too busy); a worker that did not answer has no other series in this scrape.",
        [((("worker", str(index)),), int(snap is not None)) for index, snap in views],
    )
    snaps = [snap for _, snap in views if snap is not None]

    def per_worker(get: Callable[[WorkerSnapshot], int]) -> list[Any]:
        return [((("worker", str(s.worker)),), get(s)) for s in snaps]

    out.family(
        "stunturn_worker_ready",
        "gauge",
        "1 while the worker serves, 0 while it starts, drains or stops.",
        per_worker(lambda s: int(s.serving)),
    )
    for attr, name, help_text in GAUGE_METRICS:
        out.family(name, "gauge", help_text, per_worker(operator.attrgetter(attr)))
    out.family(
        "stunturn_allocations_created_total",
        "counter",
        "TURN allocations created (live and ended).",
        per_worker(lambda s: s.allocations_created),
    )
    for unit, what in (("bytes", "Payload bytes"), ("packets", "Datagrams")):
        samples: list[Any] = []
        for s in snaps:
            worker = ("worker", str(s.worker))
            samples.append(((worker, ("direction", "to_peer")), getattr(s, f"{unit}_to_peer")))
            samples.append(((worker, ("direction", "to_client")), getattr(s, f"{unit}_to_client")))
        out.family(
            f"stunturn_relayed_{unit}_total",
            "counter",
            f"{what} relayed by TURN allocations, live and ended; direction to_peer (client to "
            "peer) or to_client (peer to client).",
            samples,
        )
    out.family(
        "stunturn_auth_failures_total",
        "counter",
        "Requests refused for authentication: 401 and 438 responses. Includes the 401 "
        "challenge that answers every client's first, unsigned request.",
        per_worker(lambda s: sum(s.error_codes.get(code, 0) for code in AUTH_FAILURE_CODES)),
    )
    out.family(
        "stunturn_error_responses_total",
        "counter",
        "STUN/TURN error responses sent, by error code.",
        [
            ((("worker", str(s.worker)), ("code", str(code))), count)
            for s in snaps
            for code, count in sorted(s.error_codes.items())
        ],
    )
    for attr, name, help_text in COUNTER_METRICS:
        out.family(name, "counter", help_text, per_worker(_counter(attr)))
    return out.text()


def render_status(views: Sequence[WorkerView]) -> dict[str, Any]:
    """The ``/status`` document: per-worker availability and every listed allocation."""
    workers: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    for index, snap in views:
        if snap is None:
            workers.append({"worker": index, "up": False})
            continue
        listed = snap.sessions or ()
        workers.append(
            {
                "worker": index,
                "up": True,
                "serving": snap.serving,
                "allocations": snap.allocations,
                "truncated": snap.sessions_truncated,
            }
        )
        sessions.extend(listed)
    return {"version": __version__, "workers": workers, "allocations": sessions}


# --- the HTTP server --------------------------------------------------------------------------


class BadRequest(Exception):
    """The client sent something that is not a request we can read."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _text(status: int, text: str, *headers: tuple[str, str]) -> Response:
    return Response(status, (text + "\n").encode(), headers=headers)


def _json(status: int, document: object, *headers: tuple[str, str]) -> Response:
    body = (json.dumps(document, indent=1) + "\n").encode()
    return Response(status, body, "application/json", (("Cache-Control", "no-store"), *headers))


def bind_metrics(endpoint: Endpoint) -> socket.socket:
    """A listening TCP socket for the metrics server; raises OSError (e.g. address in use)."""
    family = socket.AF_INET6 if endpoint.family_v6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class MetricsServer:
    """The HTTP endpoints on an already bound socket, served on the running event loop."""

    def __init__(self, sock: socket.socket, source: SnapshotSource, token: str | None) -> None:
        self.sock = sock
        self.source = source
        self.token = token.encode() if token else None
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, sock=self.sock, limit=LINE_LIMIT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return  # closed without a word: somebody is flooding the port
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    method, path, headers = await _read_request(reader)
            except BadRequest as exc:
                await _send(writer, _text(400, f"bad request: {exc}"), head=False)
                return
            except (ValueError, asyncio.LimitOverrunError):
                await _send(writer, _text(431, "request line or header too long"), head=False)
                return
            if method not in ("GET", "HEAD"):
                response = _text(405, "only GET and HEAD", ("Allow", "GET, HEAD"))
            else:
                response = await self.respond(path, headers)
            async with asyncio.timeout(REQUEST_TIMEOUT):  # a client that does not read
                await _send(writer, response, head=method == "HEAD")
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away or stalled: nothing to answer
        except Exception:
            log.exception("metrics request failed")
            with contextlib.suppress(Exception):
                await _send(writer, _text(500, "internal error"), head=False)
        finally:
            self._open -= 1
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except Exception:
                writer.transport.abort()  # unsent bytes of a client that stopped reading

    async def respond(self, path: str, headers: dict[str, str]) -> Response:
        """The answer to a GET of ``path``."""
        if path == "/live":
            return _text(200, "live")
        if path == "/ready":
            return _text(200, "ready") if self.source.is_ready() else _text(503, "not ready")
        if path == "/metrics":
            views = await self.source.snapshots(False)
            return Response(200, render_metrics(views).encode(), CONTENT_TYPE)
        if path == "/status":
            refused = self._refuse(headers.get("authorization", ""))
            if refused is not None:
                return refused
            return _json(200, render_status(await self.source.snapshots(True)))
        return _text(404, "not found; try /metrics, /live, /ready or /status")

    def _refuse(self, authorization: str) -> Response | None:
        if self.token is None:
            return _json(403, {"error": "no admin token is configured (serve --admin-token)"})
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), self.token
        ):
            challenge = ("WWW-Authenticate", 'Bearer realm="stunturn"')
            return _json(401, {"error": "missing or wrong admin token"}, challenge)
        return None


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("closed before a request")
    try:
        method, target, version = line.decode("ascii").split()
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("expected METHOD PATH HTTP/1.x") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest(f"unsupported version {version!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise BadRequest("malformed header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise BadRequest("too many header lines")
    return method, target.partition("?")[0], headers


async def _send(writer: asyncio.StreamWriter, response: Response, head: bool) -> None:
    reason = _REASONS.get(response.status, "")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(response.body)
    await writer.drain()


class LocalSource:
    """The one worker of ``--workers 1``, read on its own event loop."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        """Set once the worker serves."""

    def is_ready(self) -> bool:
        return self.worker is not None and worker_ready(self.worker)

    async def snapshots(self, sessions: bool) -> list[WorkerView]:
        worker = self.worker
        if worker is None:
            return [(0, None)]
        return [(worker.index, worker.snapshot(sessions))]


class MetricsThread:
    """A :class:`MetricsServer` on its own event loop in a thread (for the supervisor, whose
    main thread blocks waiting on its workers)."""

    def __init__(self, sock: socket.socket, source: SnapshotSource, token: str | None) -> None:
        self.server = MetricsServer(sock, source, token)
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10.0)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop finished meanwhile
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(5.0)


# --- the client side of /status (for ``stunturn status``) -------------------------------------


class StatusError(Exception):
    """``/status`` could not be read; the message says why, for people."""


def fetch_status(endpoint: Endpoint, token: str | None, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``/status`` from a server's metrics address; raises :class:`StatusError`."""
    url = f"http://{endpoint}/status"
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", "/status", headers=headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise StatusError(
            f"cannot reach {url}: {reason} (is `stunturn serve --metrics {endpoint}` running?)"
        ) from None
    finally:
        conn.close()
    if response.status == 403:
        raise StatusError(f"{url} refused: the server has no admin token (serve --admin-token)")
    if response.status == 401:
        hint = "was not accepted" if token else "is needed (--token or STUNTURN_ADMIN_TOKEN)"
        raise StatusError(f"{url} refused: the admin token {hint}")
    if response.status != 200:
        raise StatusError(f"{url} answered {response.status} {response.reason}")
    try:
        document = json.loads(body)
    except ValueError:
        raise StatusError(f"{url} did not answer with JSON: not a stunturn server?") from None
    if not isinstance(document, dict) or not isinstance(document.get("allocations"), list):
        raise StatusError(f"{url} answered JSON without allocations: not a stunturn server?")
    return document


__all__ = [
    "CONTENT_TYPE",
    "LocalSource",
    "MetricsServer",
    "MetricsThread",
    "RelayTotals",
    "SnapshotSource",
    "StatusError",
    "WorkerSnapshot",
    "WorkerView",
    "bind_metrics",
    "fetch_status",
    "render_metrics",
    "render_status",
    "take_snapshot",
]
