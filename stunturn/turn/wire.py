"""Hand-packed TURN data-plane messages: Data indications and ChannelData.

These are built per relayed datagram, so they skip the general encoder; tests check they are
byte-identical to what :meth:`stunturn.stun.Message.encode` produces.
"""

from __future__ import annotations

import os
import random
import socket
import struct

from ..stun import MAGIC_COOKIE, Address, Message, MessageClass, Method
from ..stun.attributes import Data, XorPeerAddress

DATA_INDICATION = 0x0017
"""Message type of a Data indication (method 0x007, class indication)."""
_HEAD_V4 = struct.Struct("!HHI12sHHBBH4sHH")
_CHANNEL = struct.Struct("!HH")
_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")

_rng = random.Random(os.urandom(16))
_getrandbits = _rng.getrandbits


def data_indication(peer: Address, data: bytes) -> bytes:
    """A Data indication carrying ``data`` from ``peer`` (RFC 8656 section 11.4)."""
    host, port = peer
    tid = _getrandbits(96).to_bytes(12, "big")
    if ":" in host:
        msg = Message(Method.DATA, MessageClass.INDICATION, tid, [XorPeerAddress(host, port)])
        msg.attributes.append(Data(data))
        return msg.encode()
    n = len(data)
    xor_ip = (int.from_bytes(socket.inet_aton(host), "big") ^ MAGIC_COOKIE).to_bytes(4, "big")
    head = _HEAD_V4.pack(
        DATA_INDICATION, 12 + 4 + n + (-n & 3), MAGIC_COOKIE, tid,
        0x0012, 8, 0, 1, port ^ 0x2112, xor_ip,
        0x0013, n,
    )  # fmt: skip
    return head + data + _PAD[n & 3]


def channel_data(channel: int, data: bytes, stream: bool = False) -> bytes:
    """A ChannelData message (RFC 8656 section 12.4); padded to 4 bytes over streams."""
    n = len(data)
    frame = _CHANNEL.pack(channel, n) + data
    return frame + _PAD[n & 3] if stream else frame
