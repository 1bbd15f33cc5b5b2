"""Hand-packed data-plane messages (stunturn/turn/wire.py) against the codec.

``data_indication`` packs IPv4 Data indications by hand for speed; it must be byte-identical to
what :meth:`Message.encode` writes for the same transaction ID, for every padding length and for
IPv6 peers too. ``channel_data`` must be what the stream framer takes apart again.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stunturn.stun import Message, MessageClass, Method, StreamFramer, decode
from stunturn.stun.attributes import Data, XorPeerAddress
from stunturn.turn import channel_data, data_indication
from stunturn.turn.wire import DATA_INDICATION

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)
payloads = st.binary(min_size=0, max_size=200)


def assert_like_the_codec(frame: bytes, peer: tuple[str, int], data: bytes) -> None:
    """Decodes to a Data indication with exactly XOR-PEER-ADDRESS and DATA, and re-encoding
    with the same transaction ID gives the same bytes."""
    msg = decode(frame)
    assert (msg.method, msg.cls) == (Method.DATA, MessageClass.INDICATION)
    [peer_attr, data_attr] = msg.attributes
    assert isinstance(peer_attr, XorPeerAddress) and data_attr == Data(data)
    # inet_ntop may spell an address differently (e.g. "::0.1.0.0" for "::1:0"): compare values
    assert ipaddress.ip_address(peer_attr.host) == ipaddress.ip_address(peer[0])
    assert peer_attr.port == peer[1]
    again = Message(
        Method.DATA,
        MessageClass.INDICATION,
        msg.transaction_id,
        [XorPeerAddress(*peer), Data(data)],
    )
    assert again.encode() == frame
    assert len(frame) % 4 == 0
    assert struct.unpack_from("!HH", frame) == (DATA_INDICATION, len(frame) - 20)


@settings(max_examples=300, deadline=None)
@given(host=ipv4, port=ports, data=payloads)
def test_ipv4_data_indication_is_what_the_codec_writes(host: str, port: int, data: bytes) -> None:
    assert_like_the_codec(data_indication((host, port), data), (host, port), data)


@settings(max_examples=200, deadline=None)
@given(host=ipv6, port=ports, data=payloads)
def test_ipv6_data_indication_is_what_the_codec_writes(host: str, port: int, data: bytes) -> None:
    assert_like_the_codec(data_indication((host, port), data), (host, port), data)


@pytest.mark.parametrize("size", range(9))
@pytest.mark.parametrize("peer", [("93.184.216.34", 5000), ("2606:4700::1111", 8000)])
def test_every_padding_length(peer: tuple[str, int], size: int) -> None:
    data = bytes(range(1, size + 1))
    frame = data_indication(peer, data)
    assert_like_the_codec(frame, peer, data)
    assert frame.endswith(data + b"\x00" * (-size % 4))


def test_message_type_constant() -> None:
    """0x0017: method Data (0x007), class indication."""
    assert Message(Method.DATA, MessageClass.INDICATION).type_code == DATA_INDICATION


def test_transaction_ids_are_fresh() -> None:
    peer = ("8.8.8.8", 53)
    ids = {decode(data_indication(peer, b"x")).transaction_id for _ in range(100)}
    assert len(ids) == 100


def test_ipv4_extremes() -> None:
    for peer in (("0.0.0.0", 0), ("255.255.255.255", 65535)):
        assert_like_the_codec(data_indication(peer, b"abc"), peer, b"abc")


@given(channel=st.integers(0x4000, 0x7FFF), data=st.binary(max_size=300))
def test_channel_data_layout(channel: int, data: bytes) -> None:
    """RFC 8656 12.4: channel number, length (without padding), data; over UDP no padding,
    over streams padded to 4 bytes, and the stream framer gives back the unpadded frame."""
    frame = channel_data(channel, data)
    assert frame == struct.pack("!HH", channel, len(data)) + data
    padded = channel_data(channel, data, stream=True)
    assert padded == frame + b"\x00" * (-len(data) % 4)
    assert len(padded) % 4 == 0
    framer = StreamFramer()
    assert framer.feed(padded + padded) == [frame, frame]
    assert framer.buffered == 0
