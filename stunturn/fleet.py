"""A fleet of servers sharing one Redis: users, TURN REST secrets and allocation quotas.

With ``redis = "redis://HOST:PORT/DB"`` every ``stunturn serve`` of the fleet reads the same
user store (long-term keys only, as in the SQLite store), the same TURN REST secrets, and counts
per-user and per-client-IP allocations against one fleet-wide quota. docs/fleet.md explains the
choices; in short:

* **Quotas.** Each worker process of each server is a *member*. It keeps the counts of the
  allocations it holds in memory (the ledger, the truth) and mirrors them into its own Redis
  hash ``stunturn:quota:held:MEMBER``. A sorted set ``stunturn:quota:live`` scores each member
  with the Redis time at which it is presumed dead; a heartbeat thread pushes that forward every
  TTL/3. One Lua script (atomic in Redis) drops the hashes of members past their time, sums the
  field of the user and of the client IP over the live members, and either refuses or counts
  the allocation. A server that is killed stops its heartbeat, so its counts stop being summed
  after at most TTL (15 s by default, ``STUNTURN_REDIS_TTL``) and are then deleted.
* **Redis unreachable.** Quotas fail *open* to the server's own quotas: each server still
  counts its allocations among its workers (shared memory) against the same limits, so a user
  gets at most ``quota x servers`` during an outage. When Redis answers again the heartbeat
  republishes the ledger, so the counts are exact again. Credentials kept in Redis fail
  *closed*: Redis users get 401, and REST secrets read from Redis are forgotten TTL after the
  last successful read. Static users and ``auth-secret`` keep working.
* **Blocking.** The TURN core asks its quota and credential sources synchronously (it is
  sans-IO), so this module uses the synchronous ``redis`` client with short socket timeouts on
  the event loop thread: one round trip per Allocate and per authenticated request, never per
  relayed packet. After a failure the member is marked down and the loop stops calling Redis;
  only the heartbeat thread probes it until it answers again, so an outage costs the event
  loop at most one timeout.

Like :mod:`stunturn.aio`, this module does I/O (sockets, threads, the clock); the sans-IO core
never imports it. The ``redis`` package is an optional extra (``pip install stunturn[redis]``)
imported only when a Redis URL is used.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .auth import CredentialSource, Key, RestCredentials, RestSecrets, UserRecord
from .stun import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256, long_term_key, userhash
from .turn.quota import QuotaLimits, Quotas

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger("stunturn.fleet")

PREFIX = "stunturn:"
REALMS = PREFIX + "realms"
"""SET of the realms that have users."""
SECRETS = PREFIX + "rest-secrets"
"""ZSET of TURN REST secrets, scored by when they were added (Unix time)."""
LIVE = PREFIX + "quota:live"
"""ZSET of quota members, scored by the Redis time (ms) after which a member counts as dead."""
HELD = PREFIX + "quota:held:"
"""+ MEMBER: HASH of ``u:USER`` and ``i:IP`` to the allocations that member holds."""


def users_key(realm: str) -> str:
    """HASH of username to JSON ``{"md5": HEX, "sha256": HEX, "created": UNIX}``."""
    return f"{PREFIX}users:{realm}"


def userhash_key(realm: str) -> str:
    """HASH of USERHASH (32 raw bytes) to username."""
    return f"{PREFIX}userhash:{realm}"


DEFAULT_TTL = 15.0
TTL_ENV = "STUNTURN_REDIS_TTL"
"""Seconds a member's quota counts outlive its last heartbeat (0.5-3600; default 15)."""
DEFAULT_TIMEOUT = 0.5
"""Socket connect and read timeout unless the URL sets ``socket_timeout`` /
``socket_connect_timeout``."""
REPEAT_ERROR = 60.0
"""While Redis stays unreachable, the error is logged again this often."""


class FleetError(Exception):
    """Redis cannot be used (not installed, bad URL, unreachable); the message says why."""


def redact_url(url: str) -> str:
    """The URL without its password and query (which may carry one), for messages."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:***@" + netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def ttl_from_env() -> float:
    """:data:`TTL_ENV` if set to a number in range, else :data:`DEFAULT_TTL`."""
    text = os.environ.get(TTL_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TTL
    except ValueError:
        value = -1.0
    if not 0.5 <= value <= 3600:
        log.warning(
            "%s=%r is not a number of seconds in 0.5-3600; using %g", TTL_ENV, text, DEFAULT_TTL
        )
        return DEFAULT_TTL
    return value


def _redis_module() -> Any:
    try:
        import redis  # noqa: PLC0415 - an optional extra, imported only when used
    except ImportError:
        raise FleetError(
            "the Python package redis is not installed: pip install 'stunturn[redis]'"
        ) from None
    return redis


def connect(url: str, timeout: float = DEFAULT_TIMEOUT) -> Redis:
    """A client for ``url`` with short timeouts and one immediate reconnect attempt.

    Raises:
        FleetError: the package is missing or the URL is not one redis-py understands.
    """
    redis = _redis_module()
    from redis.backoff import NoBackoff  # noqa: PLC0415
    from redis.retry import Retry  # noqa: PLC0415

    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), 1)}
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name not in query:
            options[name] = timeout
    try:
        client: Redis = redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise FleetError(f"{redact_url(url)}: {exc}") from None
    return client


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis cannot be used (unreachable, timeout, refused)."""
    return (_redis_module().RedisError, OSError)


@contextmanager
def fleet_errors(url: str) -> Iterator[None]:
    """Turn Redis errors into :class:`FleetError` naming the (redacted) URL."""
    try:
        yield
    except redis_errors() as exc:
        raise FleetError(f"{redact_url(url)}: {exc}") from None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- the user store ------------------------------------------------------------------------------


class RedisUsers:
    """Users in Redis: the same model as :class:`~stunturn.auth.SqliteUsers` (derived keys and
    USERHASH, never a password). Calls raise the client's errors; the server wraps them."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    def add(self, username: str, password: str, realm: str) -> None:
        """Create or replace a user."""
        record = json.dumps({
            "md5": long_term_key(username, realm, password, PASSWORD_ALGORITHM_MD5).hex(),
            "sha256": long_term_key(username, realm, password, PASSWORD_ALGORITHM_SHA256).hex(),
            "created": int(time.time()),
        })  # fmt: skip
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(users_key(realm), username, record)
            pipe.hset(userhash_key(realm), userhash(username, realm), username)
            pipe.sadd(REALMS, realm)
            pipe.execute()

    def realms(self) -> list[str]:
        return sorted(_text(r) for r in self.client.smembers(REALMS))

    def remove(self, username: str, realm: str | None = None) -> int:
        """Delete a user (in one realm or all); returns how many went."""
        realms = [realm] if realm is not None else self.realms()
        with self.client.pipeline(transaction=True) as pipe:
            for name in realms:
                pipe.hdel(users_key(name), username)
                pipe.hdel(userhash_key(name), userhash(username, name))
            results = pipe.execute()
        return sum(int(n) for n in results[::2])

    def users(self, realm: str | None = None) -> Sequence[UserRecord]:
        out: list[UserRecord] = []
        for name in [realm] if realm is not None else self.realms():
            for user, raw in self.client.hgetall(users_key(name)).items():
                out.append(UserRecord(_text(user), name, int(json.loads(raw)["created"])))
        return sorted(out, key=lambda r: (r.realm, r.username))

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        raw = self.client.hget(users_key(realm), username)
        if raw is None:
            return []
        field = "sha256" if algorithm == PASSWORD_ALGORITHM_SHA256 else "md5"
        return [Key(bytes.fromhex(json.loads(raw)[field]), "redis")]

    def username_for_hash(self, userhash_value: bytes, realm: str) -> str | None:
        found = self.client.hget(userhash_key(realm), userhash_value)
        return None if found is None else _text(found)


# --- TURN REST secrets ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """A secret as ``secrets list`` shows it: a fingerprint, never the secret itself."""

    fingerprint: str
    added: int


def fingerprint(secret: str) -> str:
    """The first 12 hex digits of SHA-256(secret): names a secret without revealing it."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


class RedisSecrets:
    """The fleet's TURN REST secrets (kept in clear: the server needs them for the HMAC)."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    def add(self, secret: str) -> bool:
        """Add a secret; False if it was there already."""
        return bool(self.client.zadd(SECRETS, {secret: int(time.time())}, nx=True))

    def secrets(self) -> tuple[str, ...]:
        return tuple(_text(s) for s in self.client.zrange(SECRETS, 0, -1))

    def listing(self) -> list[SecretInfo]:
        pairs: Any = self.client.zrange(SECRETS, 0, -1, withscores=True)
        return [SecretInfo(fingerprint(_text(s)), int(score)) for s, score in pairs]

    def matching(self, ident: str) -> list[str]:
        """Secrets equal to ``ident`` or whose fingerprint starts with it (6+ hex digits)."""
        everything = self.secrets()
        if ident in everything:
            return [ident]
        if len(ident) < 6:
            return []
        return [s for s in everything if fingerprint(s).startswith(ident.lower())]

    def remove(self, secret: str) -> bool:
        return bool(self.client.zrem(SECRETS, secret))


# --- quotas --------------------------------------------------------------------------------------

ACQUIRE = """
-- KEYS: live zset, own hash. ARGV: held prefix, own id, user field, ip field, user limit,
-- ip limit (0: none). Returns 0 (counted), 1 (user quota reached) or 2 (IP quota reached).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now))
for _, member in ipairs(expired) do
  if member ~= ARGV[2] then redis.call('DEL', ARGV[1] .. member) end
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now))
end
local hashes, self_live = {}, false
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  hashes[#hashes + 1] = ARGV[1] .. member
  if member == ARGV[2] then self_live = true end
end
if not self_live then hashes[#hashes + 1] = KEYS[2] end
for i = 0, 1 do
  local limit = tonumber(ARGV[5 + i])
  if limit > 0 then
    local sum = 0
    for _, h in ipairs(hashes) do
      sum = sum + (tonumber(redis.call('HGET', h, ARGV[3 + i])) or 0)
    end
    if sum >= limit then return i + 1 end
  end
end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
return 0
"""

RELEASE = """
-- KEYS: own hash. ARGV: the fields to decrement.
for i = 1, #ARGV do
  if redis.call('HINCRBY', KEYS[1], ARGV[i], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 0
"""

REFRESH = """
-- KEYS: live zset, own hash. ARGV: own id, ttl (ms). 1: extended; 0: not live (republish).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) < now then return 0 end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

PUBLISH = """
-- KEYS: live zset, own hash. ARGV: own id, ttl (ms), then field, count pairs (the ledger).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
return 1
"""

COUNT = """
-- KEYS: live zset. ARGV: held prefix, field. The field summed over live members.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sum = 0
local live = redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%.0f', now), '+inf')
for _, member in ipairs(live) do
  sum = sum + (tonumber(redis.call('HGET', ARGV[1] .. member, ARGV[2])) or 0)
end
return sum
"""


def quota_field(kind: str, name: str) -> str:
    """``u:USER`` or ``i:IP``."""
    return {"user": "u:", "ip": "i:"}[kind] + name


def quota_count(client: Redis, kind: str, name: str) -> int:
    """Allocations of user or client IP ``name`` over the fleet's live members."""
    return int(client.register_script(COUNT)(keys=[LIVE], args=[HELD, quota_field(kind, name)]))


class Fleet:
    """One worker process's link to the fleet's Redis: its quota member, the heartbeat thread,
    and the up/down state shared by the quota and credential sources it hands out.

    Args:
        url: the Redis URL.
        member: this member's name (unique in the fleet; host, pid and a random part).
        ttl: seconds the member's counts outlive its last heartbeat.
    """

    def __init__(self, url: str, member: str | None = None, ttl: float | None = None) -> None:
        self.url = url
        self.shown = redact_url(url)
        self.client = connect(url)
        self.errors = redis_errors()
        self.member = member or (f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}")
        self.ttl = ttl if ttl is not None else ttl_from_env()
        self.interval = self.ttl / 3
        self.up = False
        """Redis answered the last call and the ledger is published; else the event loop
        does not call Redis (quotas local only, Redis credentials refused)."""
        self.counting = False
        """Whether a :class:`FleetQuotas` counts through this member."""
        self.ledger: Counter[str] = Counter()
        self.lock = threading.Lock()
        """Orders ledger changes with their mirror in Redis (event loop vs heartbeat)."""
        self.own = HELD + self.member
        """This member's hash of held counts."""
        self.acquire_script = self.client.register_script(ACQUIRE)
        self.release_script = self.client.register_script(RELEASE)
        self._refresh = self.client.register_script(REFRESH)
        self._publish = self.client.register_script(PUBLISH)
        self._secrets: tuple[str, ...] = ()
        self._secrets_until = 0.0
        self._ever_up = False
        self._last_error = -REPEAT_ERROR
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- state --------------------------------------------------------------------------

    def failed(self, exc: BaseException, what: str) -> None:
        """A Redis call failed: stop using Redis until the heartbeat sees it again."""
        was_up, self.up = self.up, False
        now = time.monotonic()
        if was_up or now - self._last_error >= REPEAT_ERROR:
            self._last_error = now
            log.error(
                "redis: cannot %s at %s (%s): allocations are admitted under this server's "
                "own quotas; Redis users and REST secrets are refused until it answers",
                what, self.shown, str(exc) or type(exc).__name__,
            )  # fmt: skip

    def rest_secrets(self) -> tuple[str, ...]:
        """The REST secrets last read from Redis; none once that read is older than the TTL."""
        if time.monotonic() >= self._secrets_until:
            return ()
        return self._secrets

    # --- heartbeat ----------------------------------------------------------------------

    def start(self) -> Fleet:
        """Beat once now (so the member exists before the first Allocate), then every
        TTL/3 in a daemon thread; leave the fleet at exit."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="stunturn-redis", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        """Read the REST secrets; extend this member's life, or republish its ledger when it
        is new, lapsed or Redis was down."""
        ttl_ms = int(self.ttl * 1000)
        keys = [LIVE, self.own]
        try:
            started = time.monotonic()
            found = RedisSecrets(self.client).secrets()
            self._secrets, self._secrets_until = found, started + self.ttl
            if self.counting and self.up and self._refresh(keys=keys, args=[self.member, ttl_ms]):
                return
            with self.lock:
                if self.counting:
                    args: list[str | int] = [self.member, ttl_ms]
                    for field, count in self.ledger.items():
                        args += [field, count]
                    self._publish(keys=keys, args=args)
                recovered, self.up = not self.up, True
        except self.errors as exc:
            self.failed(exc, "reach Redis")
            return
        if recovered and self._ever_up:
            log.warning("redis: %s answers again; quota counts republished", self.shown)
        elif recovered:
            log.info(
                "redis: fleet member %s at %s (its counts live %g s after a heartbeat)",
                self.member, self.shown, self.ttl,
            )  # fmt: skip
        self._ever_up = True

    def close(self) -> None:
        """Stop the heartbeat and remove this member's counts (a clean stop frees them at
        once; a crash frees them after the TTL)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2 * DEFAULT_TIMEOUT + 1)
        if self.up and self.counting:
            try:
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.delete(self.own)
                    pipe.zrem(LIVE, self.member)
                    pipe.execute()
            except self.errors:
                pass  # the TTL frees them
        self.up = False
        self.client.close()

    # --- what the TURN service uses ------------------------------------------------------

    def quotas(self, local: Quotas, limits: QuotaLimits) -> Quotas:
        """Fleet-wide per-user and per-IP quotas on top of the server's own ``local`` ones."""
        if not (limits.per_user or limits.per_client_ip):
            return local
        self.counting = True
        return FleetQuotas(self, local, limits)

    def users(self) -> FleetUsers:
        return FleetUsers(self)

    def rest(self, algorithm: str) -> FleetRestCredentials:
        return FleetRestCredentials(self, algorithm)


class FleetQuotas:
    """The core's :class:`~stunturn.turn.quota.Quotas`: the server's own quotas first (total,
    and per user and IP among its workers), then the fleet's per-user and per-IP counts."""

    def __init__(self, fleet: Fleet, local: Quotas, limits: QuotaLimits) -> None:
        self.fleet = fleet
        self.local = local
        self.limits = limits
        self.limits_args = (limits.per_user, limits.per_client_ip)

    def set_limits(self, limits: QuotaLimits) -> None:
        """New limits for this server's own quotas and for the fleet-wide counts it checks."""
        self.local.set_limits(limits)
        self.limits = limits
        self.limits_args = (limits.per_user, limits.per_client_ip)

    def acquire(self, user: str, client_ip: str) -> bool:
        if not self.local.acquire(user, client_ip):
            return False
        fleet = self.fleet
        fields = (quota_field("user", user), quota_field("ip", client_ip))
        with fleet.lock:
            if fleet.up:
                try:
                    args: list[str | int] = [HELD, fleet.member, *fields, *self.limits_args]
                    refused = int(fleet.acquire_script(keys=[LIVE, fleet.own], args=args))
                except fleet.errors as exc:
                    fleet.failed(exc, "count an allocation")
                else:
                    if refused:
                        self.local.release(user, client_ip)
                        return False
            # Counted in Redis, or admitted under the local quotas while Redis is down: in both
            # cases the ledger holds it, and a republish puts it in Redis.
            fleet.ledger.update(fields)
        return True

    def release(self, user: str, client_ip: str) -> None:
        self.local.release(user, client_ip)
        fleet = self.fleet
        fields = (quota_field("user", user), quota_field("ip", client_ip))
        with fleet.lock:
            fleet.ledger.subtract(fields)
            for field in fields:
                if fleet.ledger[field] <= 0:
                    del fleet.ledger[field]
            if fleet.up:
                try:
                    fleet.release_script(keys=[fleet.own], args=list(fields))
                except fleet.errors as exc:
                    fleet.failed(exc, "release an allocation")


class FleetUsers:
    """The Redis user store as a credential source: no user while Redis is down (fail closed)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.store = RedisUsers(fleet.client)

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        if not self.fleet.up:
            return []
        try:
            return self.store.keys(username, realm, algorithm)
        except self.fleet.errors as exc:
            self.fleet.failed(exc, "look up a user")
            return []

    def username_for_hash(self, userhash_value: bytes, realm: str) -> str | None:
        if not self.fleet.up:
            return None
        try:
            return self.store.username_for_hash(userhash_value, realm)
        except self.fleet.errors as exc:
            self.fleet.failed(exc, "look up a USERHASH")
            return None


class FleetRestCredentials:
    """TURN REST credentials from the secrets the heartbeat last read from Redis."""

    def __init__(self, fleet: Fleet, algorithm: str) -> None:
        self.fleet = fleet
        self.algorithm = algorithm
        self._cached = RestCredentials(RestSecrets((), algorithm))

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        current = self.fleet.rest_secrets()
        if not current:
            return []
        if current != self._cached.secrets.secrets:
            self._cached = RestCredentials(RestSecrets(current, self.algorithm))
        return self._cached.keys(username, realm, algorithm)

    def username_for_hash(self, userhash_value: bytes, realm: str) -> str | None:
        return None  # REST usernames are unbounded: a hash cannot be reversed.


def join_fleet(
    url: str, algorithm: str, local: Quotas, limits: QuotaLimits
) -> tuple[list[CredentialSource], Quotas]:
    """Join the fleet at ``url`` as one member (a worker process): its credential sources
    (Redis users, then REST secrets with ``algorithm``) and its quotas on top of ``local``."""
    fleet = Fleet(url)
    quotas = fleet.quotas(local, limits)
    fleet.start()
    return [fleet.users(), fleet.rest(algorithm)], quotas
