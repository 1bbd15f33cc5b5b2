"""Metrics, health and status endpoints of ``stunturn serve --metrics`` (docs/metrics.md).

Real ``stunturn serve`` processes on loopback, with one worker (HTTP served on the worker's
event loop) and with two (HTTP served by the supervisor, which asks each worker for a snapshot
over its pipe). A TURN client allocates, relays datagrams to a UDP echo peer on 127.0.0.2 over
Send indications and over a channel, and the counters must move by exactly what was sent. The
exposition is read with prometheus_client's own parser. ``stunturn status`` is run as a
command against the same servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import cast

import pytest
from helpers import STUNTURN, ServerProcess, free_port, run_cli, worker_pids
from prometheus_client.parser import text_string_to_metric_families

from stunturn.aio.metrics import (
    CONTENT_TYPE,
    COUNTER_METRICS,
    LocalSource,
    MetricsServer,
    StatusError,
    WorkerSnapshot,
    bind_metrics,
    fetch_status,
    render_metrics,
)
from stunturn.aio.server import Worker, serve_forever
from stunturn.aio.turnclient import TurnClient
from stunturn.aio.workers import resolve_ports
from stunturn.config import ConfigError, Endpoint, ServerConfig, build_config
from stunturn.server.counters import Counters
from stunturn.stun import Address

TOKEN = "test-admin-token-0123456789"
PEER_IP = "127.0.0.2"
TIMEOUT = 5.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers ----------------------------------------------------------------------------------


def get(
    port: int, path: str, token: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def scrape(port: int) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client, keyed by (name, labels)."""
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over workers of a series (the other labels as given)."""
    wanted = set(labels.items())
    return sum(
        v
        for (n, lbls), v in samples.items()
        if n == name and wanted <= set(lbls) and ("worker" in dict(lbls))
    )


def metrics_port(server: ServerProcess) -> int:
    line = server.wait_for_line(r"^metrics on http://")
    match = re.fullmatch(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
    assert match is not None, line
    return int(match.group(1))


def start(*args: str) -> ServerProcess:
    return ServerProcess(list(args)).wait_ready()


def turn_args(relay_ip: str, workers: int) -> list[str]:
    return [
        "--listen", "127.0.0.1:0", "--workers", str(workers), "--user", "alice:secret",
        "--relay-ip", relay_ip, "--relay-ports", "40000-40999", "--allow-loopback-peers",
        "--metrics", "127.0.0.1:0", "--admin-token", TOKEN,
    ]  # fmt: skip


def status_cli(
    port: int, *args: str, env_token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STUNTURN_ADMIN_TOKEN"}
    if env_token is not None:
        env["STUNTURN_ADMIN_TOKEN"] = env_token
    return subprocess.run(
        [*STUNTURN, "status", "--metrics", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
        env=env,
    )  # fmt: skip


class Echo(asyncio.DatagramProtocol):
    """A UDP peer that sends every datagram back."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's datagram transport does not subclass asyncio.DatagramTransport: no isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def echo_peer() -> tuple[asyncio.DatagramTransport, Address]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(PEER_IP, 0))
    host, port = transport.get_extra_info("sockname")[:2]
    return transport, (host, port)


async def relay_some(client: TurnClient, peer: Address, sizes: list[int]) -> int:
    """Send each payload to the echo peer and wait for it to come back; returns the bytes."""
    for i, size in enumerate(sizes):
        payload = bytes([i % 256]) * size
        client.send(peer, payload)
        source, data = await asyncio.wait_for(client.receive(), TIMEOUT)
        assert (source, data) == (peer, payload)
    return sum(sizes)


SEND_SIZES = [1, 100, 1000]
CHANNEL_SIZES = [3, 50, 500, 1200]
SENT = sum(SEND_SIZES) + sum(CHANNEL_SIZES)
PACKETS = len(SEND_SIZES) + len(CHANNEL_SIZES)


async def allocate_and_relay(server: Address) -> tuple[TurnClient, asyncio.DatagramTransport]:
    """One allocation with a permission and a channel to an echo peer, and traffic both ways
    over Send/Data indications and over ChannelData."""
    transport, peer = await echo_peer()
    client = await TurnClient.connect(
        (server[0], server[1], "udp", False), "alice", "secret", connect_timeout=TIMEOUT
    )
    await client.create_permission(PEER_IP)
    await relay_some(client, peer, SEND_SIZES)
    await client.bind_channel(peer)
    await relay_some(client, peer, CHANNEL_SIZES)
    return client, transport


# --- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single() -> Iterator[tuple[ServerProcess, int]]:
    with start(*turn_args("127.0.0.31", 1)) as server:
        yield server, metrics_port(server)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[ServerProcess, int]]:
    with start(*turn_args("127.0.0.32", 2)) as server:
        yield server, metrics_port(server)


# --- the exposition, without a server --------------------------------------------------------


def test_every_counter_is_exported() -> None:
    exported = {attr for attr, _, _ in COUNTER_METRICS} | {"error_responses"}
    assert exported == {f.name for f in fields(Counters)}


def test_exposition_parses_and_escapes() -> None:
    counters = Counters(received=7, malformed=2, rate_limited=1).as_dict()
    snap = WorkerSnapshot(1, True, allocations=3, counters=counters, error_codes={401: 4, 438: 1})
    text = render_metrics([(0, None), (1, snap)])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["stunturn_worker_up"].type == "gauge"
    up = {s.labels["worker"]: s.value for s in families["stunturn_worker_up"].samples}
    assert up == {"0": 0, "1": 1}
    # A worker that did not answer has no other series.
    assert [s.labels for s in families["stunturn_allocations"].samples] == [{"worker": "1"}]
    assert families["stunturn_malformed_dropped"].type == "counter"
    assert families["stunturn_malformed_dropped"].samples[0].value == 2
    assert families["stunturn_auth_failures"].samples[0].value == 5
    codes = {s.labels["code"]: s.value for s in families["stunturn_error_responses"].samples}
    assert codes == {"401": 4, "438": 1}
    assert text.endswith("\n") and "\n\n" not in text


# --- configuration ----------------------------------------------------------------------------


def test_metrics_and_token_options() -> None:
    assert ServerConfig().metrics is None and ServerConfig().admin_token is None
    assert build_config({"metrics": "9100"}).metrics == Endpoint("127.0.0.1", 9100)
    assert build_config({"metrics": "::1"}).metrics == Endpoint("::1", 9478)
    assert build_config({"metrics": "[::1]:0"}).metrics == Endpoint("::1", 0)
    with pytest.raises(ConfigError, match=r"^metrics: 'localhost' is not an IP address"):
        build_config({"metrics": "localhost:9100"})
    with pytest.raises(ConfigError, match=r"^admin-token: must be at least 16") as caught:
        build_config({"admin-token": "short secret"})
    assert "short secret" not in str(caught.value)  # a secret is never echoed


def test_admin_token_needs_metrics() -> None:
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--workers", "1", "--user", "a:b",
                     "--admin-token", TOKEN)  # fmt: skip
    assert result.returncode == 2
    assert "admin-token" in result.stderr and "--metrics" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--listen", "127.0.0.1:0", "--workers", "1", "--user", "a:b",
                         "--metrics", f"127.0.0.1:{port}")  # fmt: skip
    assert result.returncode == 2
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# --- one worker -------------------------------------------------------------------------------


def test_single_worker_endpoints(single: tuple[ServerProcess, int]) -> None:
    _, port = single
    assert get(port, "/live")[0] == 200
    assert get(port, "/ready")[0] == 200
    samples = scrape(port)
    assert value(samples, "stunturn_worker_up", worker="0") == 1
    assert value(samples, "stunturn_worker_ready", worker="0") == 1
    assert not any(dict(labels).get("worker") == "1" for _, labels in samples)


def test_single_worker_counters_move(single: tuple[ServerProcess, int]) -> None:
    server, port = single
    before = scrape(port)

    async def scenario() -> None:
        client, echo = await allocate_and_relay(server.addr("udp"))
        try:
            during = await asyncio.to_thread(scrape, port)
            assert value(during, "stunturn_allocations", worker="0") == 1
            assert value(during, "stunturn_permissions", worker="0") == 1
            assert value(during, "stunturn_channels", worker="0") == 1
            # The status endpoint and command see the allocation, with its peer and bytes.
            status, _, body = await asyncio.to_thread(get, port, "/status", TOKEN)
            assert status == 200
            [entry] = json.loads(body)["allocations"]
            assert entry["user"] == "alice" and entry["worker"] == 0
            assert entry["client"] == f"127.0.0.1:{client.local_address[1]}"
            assert entry["relays"] == [f"{client.relayed_address[0]}:{client.relayed_address[1]}"]
            assert entry["peers"] == [PEER_IP]
            assert entry["bytes_to_peer"] == entry["bytes_to_client"] == SENT
            assert entry["age"] >= 0
            shown = await asyncio.to_thread(status_cli, port, "--token", TOKEN)
            assert shown.returncode == 0, shown.stderr
            header, row, summary = shown.stdout.splitlines()
            assert header.split()[:3] == ["WORKER", "USER", "CLIENT"]
            assert row.split()[:2] == ["0", "alice"] and PEER_IP in row
            assert summary == "1 allocation, 1 worker(s)"
        finally:
            await client.close()
            echo.close()

    asyncio.run(scenario())
    after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset({"worker": "0", **labels}.items()))
        return after[key] - before.get(key, 0.0)  # a series by code appears with its first

    # The allocation ended (Refresh 0): its bytes stay in the totals.
    assert value(after, "stunturn_allocations", worker="0") == 0
    assert value(after, "stunturn_permissions", worker="0") == 0
    assert moved("stunturn_allocations_created_total") == 1
    assert moved("stunturn_relayed_bytes_total", direction="to_peer") == SENT
    assert moved("stunturn_relayed_bytes_total", direction="to_client") == SENT
    assert moved("stunturn_relayed_packets_total", direction="to_peer") == PACKETS
    assert moved("stunturn_relayed_packets_total", direction="to_client") == PACKETS
    # The client's first Allocate is challenged (401): counted as an auth failure and by code.
    assert moved("stunturn_auth_failures_total") >= 1
    assert moved("stunturn_error_responses_total", code="401") >= 1
    assert moved("stunturn_received_total") > 0


def test_single_worker_malformed_counted(single: tuple[ServerProcess, int]) -> None:
    server, port = single
    before = value(scrape(port), "stunturn_malformed_dropped_total", worker="0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):  # STUN-looking header, wrong magic cookie: not STUN, dropped
            sock.sendto(b"\x00\x01\x00\x00" + b"\x00" * 16, server.addr("udp"))
    deadline = time.monotonic() + TIMEOUT
    while value(scrape(port), "stunturn_malformed_dropped_total", worker="0") < before + 3:
        assert time.monotonic() < deadline, "malformed datagrams not counted"
        time.sleep(0.05)


def test_status_needs_the_token(single: tuple[ServerProcess, int]) -> None:
    _, port = single
    for token in (None, "wrong-token-wrong-token"):
        status, headers, body = get(port, "/status", token)
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")
        assert "allocations" not in json.loads(body)
    endpoint = Endpoint("127.0.0.1", port)
    with pytest.raises(StatusError, match="the admin token is needed"):
        fetch_status(endpoint, None)
    with pytest.raises(StatusError, match="the admin token was not accepted"):
        fetch_status(endpoint, "wrong-token-wrong-token")
    from_env = status_cli(port, "--json", env_token=TOKEN)
    assert from_env.returncode == 0, from_env.stderr
    assert json.loads(from_env.stdout)["workers"][0]["up"] is True


def test_bad_http_requests(single: tuple[ServerProcess, int]) -> None:
    _, port = single
    assert raw_request(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_request(port, b"GET / SPDY/3\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_request(port, b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 431 "
    )
    post = raw_request(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
    assert get(port, "/nowhere")[0] == 404
    status, headers, body = get(port, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert raw_request(port, b"") == b""  # connects and leaves: nothing answered, no harm
    assert get(port, "/live")[0] == 200


def test_status_without_admin_token() -> None:
    with start("--listen", "127.0.0.1:0", "--workers", "1", "--no-turn",
               "--metrics", "127.0.0.1:0") as server:  # fmt: skip
        port = metrics_port(server)
        status, _, body = get(port, "/status", TOKEN)
        assert status == 403 and "no admin token" in json.loads(body)["error"]
        with pytest.raises(StatusError, match="the server has no admin token"):
            fetch_status(Endpoint("127.0.0.1", port), TOKEN)
        assert value(scrape(port), "stunturn_allocations", worker="0") == 0
    unreachable = status_cli(port, "--token", TOKEN, "--timeout", "2")
    assert unreachable.returncode == 2
    assert f"cannot reach http://127.0.0.1:{port}/status" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_ready_follows_the_worker() -> None:
    """/ready: 503 before the worker serves, 200 while it does, 503 while it drains or stops."""

    async def ready(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        return int(line.split()[1])

    async def scenario() -> None:
        config = resolve_ports(build_config({"listen": "127.0.0.1:0", "workers": 1, "turn": False}))
        source = LocalSource()
        sock = bind_metrics(Endpoint("127.0.0.1", 0))
        port = sock.getsockname()[1]
        http_server = MetricsServer(sock, source, None)
        await http_server.start()
        try:
            assert await ready(port) == 503
            started = asyncio.Event()

            def on_ready(worker: Worker) -> None:
                source.worker = worker
                started.set()

            task = asyncio.create_task(
                serve_forever(config, on_ready=on_ready, install_signals=False)
            )
            await asyncio.wait_for(started.wait(), TIMEOUT)
            worker = source.worker
            assert worker is not None
            assert await ready(port) == 200
            worker.draining = True
            assert await ready(port) == 503
            assert not worker.snapshot().serving
            worker.draining = False
            assert await ready(port) == 200
            worker.stop()
            assert await ready(port) == 503
            await asyncio.wait_for(task, TIMEOUT)
        finally:
            await http_server.close()

    asyncio.run(scenario())


# --- two workers: the supervisor serves, workers answer over their pipes ---------------------


def test_two_workers_counters_move(pair: tuple[ServerProcess, int]) -> None:
    server, port = pair
    before = scrape(port)
    assert value(before, "stunturn_worker_up", worker="0") == 1
    assert value(before, "stunturn_worker_up", worker="1") == 1
    assert get(port, "/ready")[0] == 200

    async def scenario() -> None:
        opened = [await allocate_and_relay(server.addr("udp")) for _ in range(3)]
        try:
            during = await asyncio.to_thread(scrape, port)
            assert total(during, "stunturn_allocations") == 3
            assert total(during, "stunturn_channels") == 3
            status, _, body = await asyncio.to_thread(get, port, "/status", TOKEN)
            assert status == 200
            document = json.loads(body)
            assert [w["up"] for w in document["workers"]] == [True, True]
            entries = document["allocations"]
            assert len(entries) == 3
            for worker in ("0", "1"):
                listed = sum(1 for e in entries if str(e["worker"]) == worker)
                assert listed == value(during, "stunturn_allocations", worker=worker)
            assert {e["client"] for e in entries} == {
                f"127.0.0.1:{client.local_address[1]}" for client, _ in opened
            }
            shown = await asyncio.to_thread(status_cli, port, "--token", TOKEN)
            assert shown.returncode == 0, shown.stderr
            assert shown.stdout.splitlines()[-1] == "3 allocations, 2 worker(s)"
            assert shown.stdout.count("alice") == 3
        finally:
            for client, echo in opened:
                await client.close()
                echo.close()

    asyncio.run(scenario())
    after = scrape(port)
    assert total(after, "stunturn_allocations") == 0
    assert (
        total(after, "stunturn_allocations_created_total")
        - total(before, "stunturn_allocations_created_total")
        == 3
    )
    for direction in ("to_peer", "to_client"):
        moved = total(after, "stunturn_relayed_bytes_total", direction=direction) - total(
            before, "stunturn_relayed_bytes_total", direction=direction
        )
        assert moved == 3 * SENT
        moved = total(after, "stunturn_relayed_packets_total", direction=direction) - total(
            before, "stunturn_relayed_packets_total", direction=direction
        )
        assert moved == 3 * PACKETS


def test_two_workers_lifecycle() -> None:
    """/ready is 503 while the workers start and while a dead one is replaced; the counters
    the workers report when they stop still reach the "stopped" line."""
    port = free_port()
    server = ServerProcess(["--listen", "127.0.0.1:0", "--workers", "2", "--no-turn",
                            "--metrics", f"127.0.0.1:{port}"])  # fmt: skip
    with server:
        seen: list[int] = []
        deadline = time.monotonic() + 30
        while not seen or seen[-1] != 200:
            assert time.monotonic() < deadline, f"never ready: {seen}\n{server.stderr}"
            with contextlib.suppress(OSError):  # not listening yet
                seen.append(get(port, "/ready")[0])
            time.sleep(0.02)
        assert seen[0] == 503, seen
        server.wait_ready()
        assert get(port, "/live")[0] == 200

        victim = worker_pids(server.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        states: list[int] = []
        deadline = time.monotonic() + 30
        while 503 not in states or states[-1] != 200:
            assert time.monotonic() < deadline, f"no restart seen: {states}\n{server.stderr}"
            states.append(get(port, "/ready")[0])
            time.sleep(0.02)
        assert get(port, "/live")[0] == 200

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(5):
                sock.sendto(b"\xff" * 20, server.addr("udp"))  # malformed: counted, dropped
        deadline = time.monotonic() + TIMEOUT
        while True:
            samples = scrape(port)
            if total(samples, "stunturn_malformed_dropped_total") == 5:
                break
            assert time.monotonic() < deadline, "malformed datagrams not counted"
            time.sleep(0.05)
        assert value(samples, "stunturn_worker_up", worker="0") == 1
        assert value(samples, "stunturn_worker_up", worker="1") == 1
        received = total(samples, "stunturn_received_total")
        assert server.stop() == 0
        assert server.stopped_counters()["received"] == received
        assert server.stopped_counters()["malformed"] == 5
