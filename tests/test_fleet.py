"""A fleet (docs/fleet.md): real ``stunturn serve`` processes sharing one real redis-server.

Every Redis here is started by the test on 127.0.0.1 with a random port and a temporary
directory, without persistence, and stopped at the end. The tests that share one Redis use a
database each. ``STUNTURN_REDIS_TTL`` scales the heartbeat down (a member's counts outlive its
last heartbeat by 3 s instead of 15 s) so a killed server's counts expire within the test.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import StartServer
from helpers import ServerProcess, free_port, run_cli
from turn_client import TurnClient, error_of

from stunturn.auth import rest_password, rest_username
from stunturn.config import ConfigError, build_config
from stunturn.fleet import LIVE, TTL_ENV, Fleet, quota_count
from stunturn.turn import QuotaLimits
from stunturn.turn.quota import LocalQuotas

redis = pytest.importorskip("redis", reason="the redis extra is not installed")
if TYPE_CHECKING:
    from redis import Redis

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

PASSWORD = "fleet-password-1"


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` (random by default), in a temporary directory."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="stunturn-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Redis:
        client: Redis = redis.Redis(port=self.port, db=db, socket_timeout=5)
        return client

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir.name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        self.dir.cleanup()


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def short_ttl(monkeypatch: pytest.MonkeyPatch) -> float:
    """Servers started in this test beat every second; counts outlive a beat by 3 s."""
    monkeypatch.setenv(TTL_ENV, "3")
    return 3.0


def serve_pair(
    start: StartServer, url: str, *extra: str, workers: tuple[int, int] = (1, 1)
) -> tuple[ServerProcess, ServerProcess]:
    """Two servers of one fleet, started together (loopback only)."""
    args = ["--listen", "127.0.0.1:0", "--relay-ip", "127.0.0.1", "--redis", url, *extra]
    servers = tuple(start(*args, "--workers", str(n), ready=False) for n in workers)
    for server in servers:
        server.wait_ready()
        assert "fleet Redis redis://127.0.0.1:" in server.stdout
    return servers[0], servers[1]


def add_user(url: str, name: str) -> None:
    result = run_cli("users", "add", name, "--password", PASSWORD, "--redis", url)
    assert result.returncode == 0, result.stderr
    assert f"added {name} in realm 'stunturn' to {url}" in result.stdout


def allocate(
    stack: contextlib.ExitStack,
    server: ServerProcess,
    user: str,
    password: str = PASSWORD,
    host: str = "127.0.0.1",
) -> int | None:
    """Allocate from a new client on ``host``; None on success, else the error code. A client
    that got an allocation stays open (it holds a quota slot) until ``stack`` closes."""
    client = stack.enter_context(TurnClient(server.addr(), user, password, local=(host, 0)))
    return error_of(client.allocate(check=False))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check()`` every 0.1 s until it is true; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def test_users_and_quotas_hold_across_the_fleet(
    stunturn_server: StartServer, shared_redis: RedisServer
) -> None:
    """A user added with `users add --redis` allocates on both servers; per-user quota 2 and
    per-client-IP quota 3 hold across them (486 anywhere); a released allocation frees a slot on
    the other server; Redis holds keys, never the password. B has two workers: each is a member
    of the fleet, and a clean stop takes every member out."""
    url = shared_redis.url(1)
    add_user(url, "alice")
    add_user(url, "bob")
    limits = ("--user-quota", "2", "--ip-quota", "3")
    a, b = serve_pair(stunturn_server, url, *limits, workers=(1, 2))
    client = shared_redis.client(1)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(TurnClient(a.addr(), "alice", PASSWORD))
        first.allocate()
        assert allocate(stack, b, "alice") is None
        assert allocate(stack, a, "alice") == 486
        assert allocate(stack, b, "alice") == 486
        assert quota_count(client, "user", "alice") == 2

        assert allocate(stack, b, "bob") is None  # the third allocation of 127.0.0.1
        assert allocate(stack, a, "bob") == 486  # bob has 1 of 2, but the IP has 3 of 3
        assert allocate(stack, a, "bob", host="127.0.0.2") is None
        assert quota_count(client, "ip", "127.0.0.1") == 3
        assert quota_count(client, "ip", "127.0.0.2") == 1

        first.refresh(0)  # alice's allocation on A ends: B may give her one again
        assert quota_count(client, "user", "alice") == 1
        assert allocate(stack, b, "alice") is None
        assert allocate(stack, a, "alice", "wrong-password") == 401
        assert client.zcard(LIVE) == 3  # A's worker and B's two
    stored = [str(client.hgetall(k)) for k in client.keys("stunturn:user*")]
    assert len(stored) == 2 and not any(PASSWORD in text for text in stored)  # keys only
    for server in (a, b):
        assert server.stop() == 0
        assert "Traceback" not in server.stderr
    # A clean stop takes the server's counts out of Redis at once.
    assert client.zcard(LIVE) == 0
    assert quota_count(client, "user", "alice") == 0


def test_reload_changes_the_fleet_wide_quota_too(
    stunturn_server: StartServer, shared_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGHUP with a new user quota applies to the count checked in Redis as well as to each
    server's own: with the fleet-wide limit left at the old value, the second allocation on
    the other server would still get 486."""
    url = shared_redis.url(5)
    add_user(url, "carol")
    config = tmp_path / "fleet.toml"
    config.write_text("user-quota = 1\n")
    a, b = serve_pair(stunturn_server, url, "--config", str(config))
    client = shared_redis.client(5)
    with contextlib.ExitStack() as stack:
        assert allocate(stack, a, "carol") is None
        assert allocate(stack, b, "carol") == 486  # one for the whole fleet
        config.write_text("user-quota = 2\n")
        for server in (a, b):
            before = server.stderr.count("configuration reloaded")
            server.proc.send_signal(signal.SIGHUP)

            def reloaded(server: ServerProcess = server, before: int = before) -> bool:
                return server.stderr.count("configuration reloaded") > before

            wait_until(reloaded, 10, "the reload to be logged")
        assert allocate(stack, b, "carol") is None
        assert quota_count(client, "user", "carol") == 2
        assert allocate(stack, a, "carol") == 486  # two for the whole fleet now
    for server in (a, b):
        assert server.stop() == 0
        assert "Traceback" not in server.stderr


def test_rest_secret_added_with_the_cli_works_on_every_server(
    stunturn_server: StartServer, shared_redis: RedisServer, short_ttl: float
) -> None:
    """`secrets add --redis` reaches both servers within a refresh; `secrets list` shows only a
    fingerprint; after `secrets remove` the credential is refused again on both."""
    url = shared_redis.url(2)
    servers = serve_pair(stunturn_server, url)
    username = rest_username("carol", int(time.time()) + 3600)

    def outcome(server: ServerProcess, password: str) -> int | None:
        with contextlib.ExitStack() as stack:
            return allocate(stack, server, username, password)

    def admits(server: ServerProcess, password: str) -> Callable[[], bool]:
        return lambda: outcome(server, password) is None

    def refused(client: TurnClient) -> Callable[[], bool]:
        return lambda: error_of(client.refresh(check=False)) == 401

    assert outcome(servers[0], rest_password("not-the-secret-at-all", username)) == 401
    added = run_cli("secrets", "add", "--redis", url)
    assert added.returncode == 0, added.stderr
    secret = added.stdout.split("secret: ")[1].strip()
    fingerprint = re.search(r"added secret ([0-9a-f]{12}) in ", added.stdout)
    assert fingerprint is not None, added.stdout
    listed = run_cli("secrets", "list", "--redis", url)
    assert listed.stdout.startswith(fingerprint.group(1)) and secret not in listed.stdout

    password = rest_password(secret, username)
    with contextlib.ExitStack() as stack:
        clients = []
        for server in servers:
            wait_until(admits(server, password), 3 * short_ttl, "the new secret works")
            client = stack.enter_context(TurnClient(server.addr(), username, password))
            client.allocate()
            clients.append(client)
        removed = run_cli("secrets", "remove", fingerprint.group(1)[:8], "--redis", url)
        assert removed.returncode == 0 and "removed secret" in removed.stdout, removed.stderr
        for client in clients:
            wait_until(refused(client), 3 * short_ttl, "the removed secret is refused")
    gone = run_cli("secrets", "remove", fingerprint.group(1), "--redis", url)
    assert gone.returncode == 2 and gone.stderr.startswith("stunturn: error: secret: none matches")


def test_a_killed_servers_counts_expire_after_the_ttl(
    stunturn_server: StartServer, shared_redis: RedisServer, short_ttl: float
) -> None:
    """SIGKILL stops a server's heartbeat: its two allocations keep counting against alice for
    less than the TTL, then the other server admits her again."""
    url = shared_redis.url(3)
    add_user(url, "alice")
    a, b = serve_pair(stunturn_server, url, "--user-quota", "2")
    client = shared_redis.client(3)
    with contextlib.ExitStack() as stack:
        assert allocate(stack, b, "alice") is None
        assert allocate(stack, b, "alice") is None
        assert allocate(stack, a, "alice") == 486
        b.kill()
        killed = time.monotonic()
        assert allocate(stack, a, "alice") == 486  # the dead server's counts still hold

        def admitted() -> bool:
            code = allocate(stack, a, "alice")
            assert code in (None, 486), code
            return code is None

        wait_until(admitted, short_ttl + 5, "alice admitted once the killed server's TTL ran out")
        waited = time.monotonic() - killed
        assert waited > short_ttl / 3, waited  # not at once: the counts lived until the TTL
        assert client.zcard(LIVE) == 1  # only A's worker is left, B's hash is gone
        assert quota_count(client, "user", "alice") == 1
    assert "Traceback" not in a.stderr


def test_redis_outage_fails_open_for_quotas_and_closed_for_redis_users(
    stunturn_server: StartServer, short_ttl: float
) -> None:
    """Redis stopped: a Redis user gets 401, a static user is admitted under each server's own
    quota (486 on the third), and the server logs one clear error, no traceback. Redis back
    (empty): the servers republish what they hold, so the fleet quota holds again."""
    own = RedisServer()
    try:
        url = own.url()
        add_user(url, "dave")
        static = ("--user", f"static:{PASSWORD}", "--user-quota", "2")
        a, b = serve_pair(stunturn_server, url, *static)
        with contextlib.ExitStack() as stack:
            assert allocate(stack, a, "dave") is None
            own.stop()
            assert allocate(stack, a, "dave") == 401
            assert allocate(stack, a, "static") is None
            assert allocate(stack, a, "static") is None
            assert allocate(stack, a, "static") == 486  # A's own quota still holds
            wait_until(lambda: "redis: cannot" in a.stderr, 5, "A logs the outage")
            error = next(line for line in a.stderr.splitlines() if "redis: cannot" in line)
            assert " ERROR " in error and f"at {url} (" in error
            assert "admitted under this server's own quotas" in error

            own.start()
            client = own.client()
            wait_until(lambda: quota_count(client, "user", "static") == 2, 4 * short_ttl,
                       "A republishes its counts")  # fmt: skip
            assert quota_count(client, "user", "dave") == 1
            wait_until(lambda: client.zcard(LIVE) == 2, 4 * short_ttl, "B is a member again")
            assert allocate(stack, b, "static") == 486  # the fleet quota holds again
            assert allocate(stack, b, "dave") == 401  # the restarted Redis has no users
        assert "answers again; quota counts republished" in a.stderr
        for server in (a, b):
            assert "Traceback" not in server.stderr
    finally:
        own.close()


def test_acquire_is_atomic_across_racing_members(shared_redis: RedisServer) -> None:
    """Four members (as four worker processes would be) race from eight threads for one user's
    five slots: exactly five acquisitions succeed, and releasing them all leaves nothing."""
    url = shared_redis.url(4)
    limits = QuotaLimits(per_user=5, per_client_ip=0, total=0)
    fleets = [Fleet(url, member=f"racer-{i}", ttl=30) for i in range(4)]
    quotas = [f.quotas(LocalQuotas(limits), limits) for f in fleets]
    for fleet in fleets:
        fleet.start()
    won: list[int] = []

    def race(index: int) -> None:
        for _ in range(25):
            if quotas[index % 4].acquire("eve", f"192.0.2.{index}"):
                won.append(index)

    try:
        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(won) == 5
        client = shared_redis.client(4)
        assert quota_count(client, "user", "eve") == 5
        for index in won:
            quotas[index % 4].release("eve", f"192.0.2.{index}")
        assert quota_count(client, "user", "eve") == 0
        assert not any(client.hlen(fleet.own) for fleet in fleets)  # empty hashes are deleted
    finally:
        for fleet in fleets:
            fleet.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379/0", "got scheme 'http'"),
        ("redis://:hunter2-secret@127.0.0.1:99999/0", "the port is not a number"),
        ("redis://:hunter2-secret@127.0.0.1:6379/zero", "the database must be a number"),
        ("redis:///0", "no host"),
    ],
)
def test_config_refuses_bad_redis_urls_without_quoting_them(url: str, message: str) -> None:
    """The `redis` key names itself and the problem; a password in the URL is never echoed."""
    with pytest.raises(ConfigError) as caught:
        build_config({"redis": url, "workers": 1})
    assert caught.value.field == "redis" and message in caught.value.message
    assert "hunter2" not in str(caught.value)
    config = build_config({"redis": "redis://127.0.0.1:6379/2", "workers": 1})
    assert config.redis == "redis://127.0.0.1:6379/2" and config.has_credentials


def test_cli_reports_an_unreachable_redis() -> None:
    """`users` and `secrets` with a Redis nobody listens on: exit 2, one line naming the URL
    without its password, no traceback."""
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    for args in (["users", "list"], ["secrets", "add"]):
        result = run_cli(*args, "--redis", url)
        assert result.returncode == 2, result
        assert result.stderr.startswith("stunturn: error: redis: redis://:***@127.0.0.1:")
        assert "Connection refused" in result.stderr
        assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
