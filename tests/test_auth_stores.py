"""Credential sources and nonces (stunturn/auth/): static users, the SQLite store, TURN REST
secrets, and stateless nonces.

Expected keys are written out as literals computed independently (``openssl dgst``) or with
hashlib/hmac directly, never with the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest

from stunturn.auth import (
    COOKIE,
    Credentials,
    Key,
    NonceManager,
    RestCredentials,
    RestSecrets,
    SqliteUsers,
    StaticUsers,
    UserRecord,
    features_of,
    random_password,
    rest_expiry,
    rest_password,
    rest_username,
)
from stunturn.stun import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256, long_term_key

MD5, SHA256 = PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
REALM = "example.org"

# openssl dgst -md5 / -sha256 of "alice:example.org:alice-secret" and of "alice:example.org"
ALICE_MD5 = bytes.fromhex("1fa8787787e5bda046e5ef9af9f82961")
ALICE_SHA256 = bytes.fromhex("672dcdb3deb187c0b3f0297e7523c8ab8e55edf603f5593a5bd71e9fb16f7e56")
ALICE_USERHASH = bytes.fromhex("435b7933096a304d3c734cfb833ec9075bd47ab1c0160321aed31c06a8c7009e")


# --- static users ---------------------------------------------------------------------------


def test_static_users_keys() -> None:
    """RFC 8489 9.2.2: MD5 / SHA-256 of "username:realm:password"."""
    users = StaticUsers([("alice", "alice-secret"), ("bob", "bob-secret")])
    assert len(users) == 2
    assert users.keys("alice", REALM, MD5) == [Key(ALICE_MD5, "static")]
    assert users.keys("alice", REALM, SHA256) == [Key(ALICE_SHA256, "static")]
    assert users.keys("alice", REALM, MD5) == [Key(ALICE_MD5, "static")]  # cached, same
    assert users.keys("carol", REALM, MD5) == []
    other = hashlib.md5(b"alice:other.org:alice-secret", usedforsecurity=False).digest()
    assert users.keys("alice", "other.org", MD5) == [Key(other, "static")]


def test_static_users_userhash() -> None:
    """RFC 8489 14.4: USERHASH = SHA-256(username ":" realm) finds the user, per realm."""
    users = StaticUsers([("alice", "alice-secret"), ("bob", "bob-secret")])
    assert users.username_for_hash(ALICE_USERHASH, REALM) == "alice"
    bob = hashlib.sha256(b"bob:example.org").digest()
    assert users.username_for_hash(bob, REALM) == "bob"
    assert users.username_for_hash(ALICE_USERHASH, "other.org") is None
    assert users.username_for_hash(hashlib.sha256(b"alice:other.org").digest(), "other.org") == (
        "alice"
    )
    assert users.username_for_hash(b"\x00" * 32, REALM) is None


# --- SQLite store ---------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "users.db"


def test_sqlite_add_list_remove(db_path: Path) -> None:
    store = SqliteUsers(db_path)
    try:
        store.add("alice", "alice-secret", REALM)
        store.add("bob", "bob-secret", REALM)
        store.add("alice", "other-secret", "other.org")
        assert store.count() == 3
        assert [(u.username, u.realm) for u in store.users()] == [
            ("alice", REALM),
            ("bob", REALM),
            ("alice", "other.org"),
        ]
        assert [u.username for u in store.users(REALM)] == ["alice", "bob"]
        assert all(isinstance(u, UserRecord) and u.created > 1_600_000_000 for u in store.users())
        assert store.remove("bob", REALM) == 1
        assert store.remove("bob", REALM) == 0
        assert store.remove("alice") == 2
        assert store.count() == 0
    finally:
        store.close()


def test_sqlite_keys_match_the_long_term_key(db_path: Path) -> None:
    store = SqliteUsers(db_path)
    try:
        store.add("alice", "alice-secret", REALM)
        assert store.keys("alice", REALM, MD5) == [Key(ALICE_MD5, "sqlite")]
        assert store.keys("alice", REALM, SHA256) == [Key(ALICE_SHA256, "sqlite")]
        assert store.keys("alice", REALM, MD5)[0].key == long_term_key(
            "alice", REALM, "alice-secret", MD5
        )
        assert store.keys("alice", "other.org", MD5) == []
        assert store.keys("carol", REALM, MD5) == []
        assert store.username_for_hash(ALICE_USERHASH, REALM) == "alice"
        assert store.username_for_hash(ALICE_USERHASH, "other.org") is None
    finally:
        store.close()


def test_sqlite_replace_changes_the_keys(db_path: Path) -> None:
    store = SqliteUsers(db_path)
    try:
        store.add("alice", "old-password", REALM)
        store.add("alice", "alice-secret", REALM)
        assert store.count() == 1
        assert store.keys("alice", REALM, MD5) == [Key(ALICE_MD5, "sqlite")]
    finally:
        store.close()


def test_sqlite_persists_and_create_false(db_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SqliteUsers(db_path, create=False)
    store = SqliteUsers(db_path)
    store.add("alice", "alice-secret", REALM)
    store.close()
    reopened = SqliteUsers(db_path, create=False)
    try:
        assert reopened.keys("alice", REALM, SHA256) == [Key(ALICE_SHA256, "sqlite")]
    finally:
        reopened.close()


def _files_of(db_path: Path) -> list[Path]:
    return sorted(p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name))


def test_sqlite_stores_no_password(db_path: Path) -> None:
    """Only derived keys are stored: the password's bytes appear in no file of the store
    (database, WAL, shared memory), neither while open nor after closing."""
    password = "Very-Distinct-Password-0123456789"
    store = SqliteUsers(db_path)
    try:
        store.add("alice", password, REALM)
        store.add("alice", password, "other.org")
        files = _files_of(db_path)
        assert files
        for path in files:
            data = path.read_bytes()
            assert password.encode() not in data
            assert password.encode("utf-16-le") not in data
    finally:
        store.close()
    assert password.encode() not in db_path.read_bytes()
    assert b"alice" in db_path.read_bytes()  # the scan does look at the data


def test_sqlite_file_mode_is_0600(db_path: Path) -> None:
    store = SqliteUsers(db_path)
    try:
        store.add("alice", "alice-secret", REALM)
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    finally:
        store.close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


def test_sqlite_wal_files_are_private_too(db_path: Path) -> None:
    """Every file of a freshly created store is 0600 while it is open, not just the .db."""
    old = os.umask(0o022)
    try:
        store = SqliteUsers(db_path)
        try:
            store.add("alice", "alice-secret", REALM)
            wal = db_path.with_name(db_path.name + "-wal")
            assert ALICE_MD5 in wal.read_bytes()  # the keys are in the WAL
            for path in _files_of(db_path):
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path.name
        finally:
            store.close()
    finally:
        os.umask(old)


# --- TURN REST ---------------------------------------------------------------------------------


def test_rest_password_known_values() -> None:
    """base64(HMAC(secret, username)), checked against openssl dgst -hmac output."""
    name = "1700000000:alice"
    assert rest_password("north-secret", name) == "g+jb180fcj+xlpA/2mP60OdIgU0="
    assert (
        rest_password("north-secret", name, "sha256")
        == "ZinI73FM5Y7uUjYQ1Yn/1ZBWak8HOG/2jQCqW6gxTg8="
    )
    digest = hmac.new(b"north-secret", name.encode(), hashlib.sha1).digest()
    assert rest_password("north-secret", name) == base64.b64encode(digest).decode()


def test_rest_username_and_expiry() -> None:
    assert rest_username("alice", 1700000000) == "1700000000:alice"
    assert rest_username("", 5) == "5:"
    assert rest_expiry("1700000000:alice") == 1700000000
    assert rest_expiry("1700000000:") == 1700000000
    assert rest_expiry("1700000000:a:b") == 1700000000
    for name in ("alice", ":alice", "abc:alice", "-5:alice", "12345678901234:alice", "1.5:x"):
        assert rest_expiry(name) is None, name


def test_rest_expiry_with_unicode_digits() -> None:
    assert rest_expiry("²:alice") is None


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_rest_credentials_keys_for_every_secret(algorithm: str) -> None:
    """Secret rotation: one key per active secret, each the long-term key of the REST
    password, carrying the username's expiry."""
    name = rest_username("alice", 1700000000)
    creds = RestCredentials(RestSecrets(("new", "old"), algorithm))
    for alg in (MD5, SHA256):
        keys = creds.keys(name, REALM, alg)
        expected = [
            Key(
                long_term_key(name, REALM, rest_password(s, name, algorithm), alg),
                "rest",
                1700000000,
            )
            for s in ("new", "old")
        ]
        assert keys == expected
    assert RestSecrets(("new", "old"), algorithm).passwords(name) == [
        rest_password("new", name, algorithm),
        rest_password("old", name, algorithm),
    ]


def test_rest_credentials_ignore_other_usernames() -> None:
    creds = RestCredentials(RestSecrets(("s",)))
    assert creds.keys("alice", REALM, MD5) == []
    assert creds.username_for_hash(ALICE_USERHASH, REALM) is None


def test_credentials_chain() -> None:
    """Sources are asked in order; keys from all of them are candidates."""
    name = rest_username("alice", 10)
    static = StaticUsers([(name, "static-password"), ("alice", "alice-secret")])
    rest = RestCredentials(RestSecrets(("s",)))
    chain = Credentials([static, rest])
    assert chain and not Credentials([])
    keys = chain.keys(name, REALM, MD5)
    assert [k.source for k in keys] == ["static", "rest"]
    assert chain.keys("alice", REALM, MD5) == [Key(ALICE_MD5, "static")]
    assert chain.username_for_hash(ALICE_USERHASH, REALM) == "alice"
    assert chain.username_for_hash(b"\x01" * 32, REALM) is None


def test_random_password() -> None:
    passwords = {random_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) == 24 and p.isascii() for p in passwords)


# --- nonces -------------------------------------------------------------------------------------

SECRET = b"0123456789abcdef0123456789abcdef"
ME = ("198.51.100.7", 40000)


def test_nonce_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        NonceManager(b"short")


def test_nonce_cookie_and_features() -> None:
    """RFC 8489 9.2 / 18.1: "obMatJos2" + base64 of the 24 feature bits; bit 0 ("Password
    algorithms") is the most significant bit of the first byte: "gAAA"."""
    nonce = NonceManager(SECRET).issue(ME, 0.0)
    assert COOKIE == "obMatJos2gAAA"
    assert nonce.startswith(COOKIE) and len(nonce) > len(COOKIE)
    assert features_of(nonce) == 0x800000
    assert features_of("obMatJos2wAAAxyz") == 0xC00000  # both bits
    assert features_of("obMatJos2QAAA") == 0x400000  # username anonymity only
    assert features_of("obMatJos2AAAC") == 0x000002
    assert features_of("obMatJos2") == 0
    assert features_of("plain-nonce-without-cookie") == 0
    assert features_of("obMatJos2!!!!") == 0


def test_nonce_valid_for_its_client_ip_only() -> None:
    """Bound to the IP (RFC 6062 data connections come from new ports); distinct per port."""
    nonces = NonceManager(SECRET)
    nonce = nonces.issue(ME, 100.0)
    assert nonces.valid(nonce, ME, 100.0)
    assert nonces.valid(nonce, (ME[0], ME[1] + 1), 100.0)
    assert not nonces.valid(nonce, ("198.51.100.8", ME[1]), 100.0)
    assert nonces.issue(ME, 100.0) != nonces.issue((ME[0], ME[1] + 1), 100.0)
    assert NonceManager(SECRET).valid(nonce, ME, 100.0)  # another worker, same secret
    assert not NonceManager(b"another-secret-of-enough-length!").valid(nonce, ME, 100.0)


def test_nonce_expiry() -> None:
    nonces = NonceManager(SECRET, lifetime=600.0)
    nonce = nonces.issue(ME, 1000.0)
    assert nonces.valid(nonce, ME, 1600.0)
    assert not nonces.valid(nonce, ME, 1600.5)
    short = NonceManager(SECRET, lifetime=30.0)
    assert short.valid(short.issue(ME, 0.0), ME, 30.0)
    assert not short.valid(short.issue(ME, 0.0), ME, 31.0)


def test_nonce_tampering() -> None:
    """Changing any character of the cookie or token (to one that changes the decoded bits)
    invalidates the nonce; so do truncation and garbage."""
    nonces = NonceManager(SECRET)
    nonce = nonces.issue(ME, 0.0)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(nonce.rstrip("=")):
        flipped = alphabet[alphabet.index(ch) ^ 32]  # flips the top bit of the 6-bit digit
        assert not nonces.valid(nonce[:i] + flipped + nonce[i + 1 :], ME, 0.0), i
    for bad in (nonce[:-4], COOKIE, COOKIE + "!!!!", "", nonce.replace(COOKIE, "obMatJos2AAAA")):
        assert not nonces.valid(bad, ME, 0.0)
