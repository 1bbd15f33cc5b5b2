"""HMAC (RFC 2104) with the keyed hash states kept between calls.

A TURN server computes several HMACs per request with few distinct keys: the nonce secret,
and the long-term key of each active user. ``hmac.digest`` hashes the padded key again on
every call and, with OpenSSL 3, fetches the digest implementation each time; copying the
two hash states that already absorbed ``key XOR ipad`` and ``key XOR opad`` costs half as
much or less (``bench/micro.py hmac``). The result is the same HMAC, byte for byte
(tests/test_hmacs.py).

The table of keyed states is bounded: when it holds :data:`MAX_KEYS` keys it is emptied and
refilled on demand, so a stream of fresh keys (REST credentials) cannot grow it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

MAX_KEYS = 4096
_BLOCK = 64
"""Block size of MD5, SHA-1 and SHA-256, the only digests STUN uses."""
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
}
_STATES: dict[tuple[bytes, str], tuple[Any, Any]] = {}


def _keyed(key: bytes, name: str) -> tuple[Any, Any]:
    new = _CONSTRUCTORS[name]
    block = new(key).digest() if len(key) > _BLOCK else key
    block = block.ljust(_BLOCK, b"\x00")
    states = (new(block.translate(_IPAD)), new(block.translate(_OPAD)))
    if len(_STATES) >= MAX_KEYS:
        _STATES.clear()
    _STATES[(bytes(key), name)] = states
    return states


def hmac_digest(key: bytes, data: bytes | bytearray, name: str) -> bytes:
    """``hmac.digest(key, data, name)`` for ``name`` in ``"sha1"``, ``"sha256"``."""
    states = _STATES.get((key, name))
    if states is None:
        states = _keyed(key, name)
    inner = states[0].copy()
    inner.update(data)
    outer = states[1].copy()
    outer.update(inner.digest())
    return bytes(outer.digest())
