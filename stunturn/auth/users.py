"""Long-term credential sources: static users, an SQLite user store, TURN REST secrets.

A source answers two questions for the TURN core: which keys could ``username`` have in
``realm`` (several for REST secrets being rotated), and which username has this USERHASH. The
SQLite store keeps only the derived long-term keys (MD5 and SHA-256, RFC 8489 section 9.2.2)
and the USERHASH, never a password, so a leaked database does not reveal passwords that may be
reused elsewhere (the MD5 key still lets an attacker act as that user on this realm, as with
every TURN server that stores keys).

Lookups are synchronous: a static dict, or one indexed SQLite query on a local file, done only for
authenticated requests, never per relayed packet.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..stun import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    long_term_key,
    userhash,
)
from .rest import RestSecrets, rest_expiry


@dataclass(frozen=True, slots=True)
class Key:
    """A candidate long-term key for a user, and when the credential stops being valid."""

    key: bytes
    source: str
    expires: int | None = None
    """Unix time after which Allocate and Refresh are refused (REST credentials)."""


class CredentialSource(Protocol):
    """What the TURN core asks of a user store."""

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        """Candidate keys for ``username``; empty when the user is unknown."""
        ...

    def username_for_hash(self, userhash: bytes, realm: str) -> str | None:
        """The username whose USERHASH this is, if the source can tell."""
        ...


class StaticUsers:
    """Users given on the command line or in the config file (``NAME:PASSWORD``)."""

    def __init__(self, users: Iterable[tuple[str, str]]) -> None:
        self._passwords = dict(users)
        self._cache: dict[tuple[str, str, int], bytes] = {}
        self._hashes: dict[tuple[bytes, str], str] = {}

    def __len__(self) -> int:
        return len(self._passwords)

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        password = self._passwords.get(username)
        if password is None:
            return []
        cache_key = (username, realm, algorithm)
        key = self._cache.get(cache_key)
        if key is None:
            key = self._cache[cache_key] = long_term_key(username, realm, password, algorithm)
        return [Key(key, "static")]

    def username_for_hash(self, userhash_value: bytes, realm: str) -> str | None:
        if not any(r == realm for _, r in self._hashes):
            for name in self._passwords:
                self._hashes[(userhash(name, realm), realm)] = name
        return self._hashes.get((userhash_value, realm))


class RestCredentials:
    """Ephemeral credentials from shared secrets; the username carries its expiry."""

    def __init__(self, secrets_: RestSecrets) -> None:
        self.secrets = secrets_

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        expiry = rest_expiry(username)
        if expiry is None:
            return []
        return [
            Key(long_term_key(username, realm, password, algorithm), "rest", expiry)
            for password in self.secrets.passwords(username)
        ]

    def username_for_hash(self, userhash_value: bytes, realm: str) -> str | None:
        return None  # REST usernames are unbounded: a hash cannot be reversed.


SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username   TEXT NOT NULL,
    realm      TEXT NOT NULL,
    key_md5    BLOB NOT NULL,
    key_sha256 BLOB NOT NULL,
    userhash   BLOB NOT NULL,
    created    INTEGER NOT NULL,
    PRIMARY KEY (username, realm)
);
CREATE INDEX IF NOT EXISTS users_by_hash ON users (userhash, realm);
PRAGMA user_version = 1;
"""


@dataclass(frozen=True, slots=True)
class UserRecord:
    username: str
    realm: str
    created: int


class SqliteUsers:
    """The SQLite user store (``--user-db PATH``), shared by the server and ``stunturn users``."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no user database at {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Create the file 0600 before SQLite opens it: SQLite gives its -wal and -shm files
            # the database file's mode, and they hold keys too.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=2000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, username: str, password: str, realm: str) -> None:
        """Create or replace a user; stores the derived keys only."""
        self._db.execute(
            "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, CAST(strftime('%s') AS INTEGER))",
            (
                username,
                realm,
                long_term_key(username, realm, password, PASSWORD_ALGORITHM_MD5),
                long_term_key(username, realm, password, PASSWORD_ALGORITHM_SHA256),
                userhash(username, realm),
            ),
        )

    def remove(self, username: str, realm: str | None = None) -> int:
        """Delete a user (in one realm or all); returns how many rows went."""
        if realm is None:
            cur = self._db.execute("DELETE FROM users WHERE username = ?", (username,))
        else:
            cur = self._db.execute(
                "DELETE FROM users WHERE username = ? AND realm = ?", (username, realm)
            )
        return cur.rowcount

    def users(self, realm: str | None = None) -> Sequence[UserRecord]:
        query = "SELECT username, realm, created FROM users"
        rows = (
            self._db.execute(query + " WHERE realm = ? ORDER BY username", (realm,))
            if realm is not None
            else self._db.execute(query + " ORDER BY realm, username")
        )
        return [UserRecord(*row) for row in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        column = "key_sha256" if algorithm == PASSWORD_ALGORITHM_SHA256 else "key_md5"
        row = self._db.execute(
            f"SELECT {column} FROM users WHERE username = ? AND realm = ?",  # noqa: S608
            (username, realm),
        ).fetchone()
        return [] if row is None else [Key(bytes(row[0]), "sqlite")]

    def username_for_hash(self, userhash_value: bytes, realm: str) -> str | None:
        row = self._db.execute(
            "SELECT username FROM users WHERE userhash = ? AND realm = ?", (userhash_value, realm)
        ).fetchone()
        return None if row is None else str(row[0])


class Credentials:
    """Several sources used together, asked in order."""

    def __init__(self, sources: Iterable[CredentialSource]) -> None:
        self.sources = list(sources)

    def __bool__(self) -> bool:
        return bool(self.sources)

    def keys(self, username: str, realm: str, algorithm: int) -> list[Key]:
        found: list[Key] = []
        for source in self.sources:
            found += source.keys(username, realm, algorithm)
        return found

    def username_for_hash(self, userhash_value: bytes, realm: str) -> str | None:
        for source in self.sources:
            name = source.username_for_hash(userhash_value, realm)
            if name is not None:
                return name
        return None


def random_password(nbytes: int = 18) -> str:
    """A URL-safe random password (24 characters for the default 18 bytes)."""
    return secrets.token_urlsafe(nbytes)
