"""The cached-state HMAC gives the standard library's bytes for every key length and digest."""

from __future__ import annotations

import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stunturn.stun import hmacs
from stunturn.stun.hmacs import hmac_digest


@settings(max_examples=400, deadline=None)
@given(
    key=st.binary(min_size=0, max_size=150),
    data=st.binary(max_size=300),
    name=st.sampled_from(["sha1", "sha256"]),
)
def test_matches_stdlib(key: bytes, data: bytes, name: str) -> None:
    assert hmac_digest(key, data, name) == hmac.digest(key, data, name)
    # A second call is served from the kept states and must not be affected by the first.
    assert hmac_digest(key, data, name) == hmac.digest(key, data, name)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 200])
def test_key_lengths_around_the_block_size(size: int) -> None:
    key = bytes(range(size % 256)) * (size // 256 + 1)
    key = key[:size]
    for name in ("sha1", "sha256"):
        assert hmac_digest(key, b"message", name) == hmac.digest(key, b"message", name)


def test_bytearray_data_and_rfc_2202_vector() -> None:
    # RFC 2202 test case 2 (HMAC-SHA1, key "Jefe").
    expected = bytes.fromhex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
    assert hmac_digest(b"Jefe", bytearray(b"what do ya want for nothing?"), "sha1") == expected


def test_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hmacs, "MAX_KEYS", 8)
    monkeypatch.setattr(hmacs, "_STATES", {})
    for i in range(50):
        key = i.to_bytes(4, "big")
        assert hmac_digest(key, b"x", "sha1") == hmac.digest(key, b"x", "sha1")
        assert len(hmacs._STATES) <= 8


def test_unknown_digest_is_refused() -> None:
    with pytest.raises(KeyError):
        hmac_digest(b"k", b"x", "md5")
