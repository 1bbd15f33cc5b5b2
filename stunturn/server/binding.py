"""STUN Binding service (RFC 8489 section 6.3) with NAT behaviour discovery (RFC 5780).

Sans-IO: :meth:`BindingService.respond` turns a decoded request into the bytes to send and the
addresses to send them from and to. :meth:`BindingService.fast_response` answers the common
attribute-less request without decoding it at all.
"""

from __future__ import annotations

import socket
import struct
import zlib
from dataclasses import dataclass

from ..stun import (
    FAMILY_IPV4,
    MAGIC_COOKIE,
    Address,
    Attribute,
    AttrType,
    Message,
    MessageClass,
    Method,
)
from ..stun.attributes import (
    ChangeRequest,
    MappedAddress,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    UnknownAttributes,
    XorMappedAddress,
)
from .actions import Transport
from .errors import StunError

_FAST_HEAD = struct.Struct("!HHI12s")
_XOR_V4 = struct.Struct("!HHBBH4s")
_FP_ATTR = struct.Struct("!HHI")
_FP_REQUEST_TAIL = b"\x80\x28\x00\x04"
# Binding request header up to the cookie: type 0x0001, length 0 (or 8 with FINGERPRINT).
_BARE_REQUEST = b"\x00\x01\x00\x00\x21\x12\xa4\x42"
_FP_REQUEST = b"\x00\x01\x00\x08\x21\x12\xa4\x42"


@dataclass(frozen=True, slots=True)
class AlternateAddresses:
    """The RFC 5780 listener grid: two IPs times two ports.

    RFC 5780 section 4.1: the server listens on (primary IP, primary port), (primary IP,
    alternate port), (alternate IP, primary port) and (alternate IP, alternate port).
    """

    primary_ip: str
    alt_ip: str
    primary_port: int
    alt_port: int

    def listeners(self) -> list[Address]:
        return [
            (ip, port)
            for ip in (self.primary_ip, self.alt_ip)
            for port in (self.primary_port, self.alt_port)
        ]

    def source(self, local: Address, change_ip: bool, change_port: bool) -> Address:
        """The listener a response leaves from, for a request that arrived on ``local``."""
        ip, port = local
        if change_ip:
            ip = self.alt_ip if ip == self.primary_ip else self.primary_ip
        if change_port:
            port = self.alt_port if port == self.primary_port else self.primary_port
        return (ip, port)

    def other(self, local: Address) -> Address:
        """OTHER-ADDRESS for a request received on ``local`` (RFC 5780 section 7.4)."""
        return self.source(local, True, True)


def _xor_mapped_v4(remote: Address) -> bytes:
    ip = int.from_bytes(socket.inet_aton(remote[0]), "big") ^ MAGIC_COOKIE
    return _XOR_V4.pack(
        AttrType.XOR_MAPPED_ADDRESS,
        8,
        0,
        FAMILY_IPV4,
        remote[1] ^ 0x2112,
        ip.to_bytes(4, "big"),
    )


def _mapped_v4(remote: Address) -> bytes:
    return _XOR_V4.pack(
        AttrType.MAPPED_ADDRESS, 8, 0, FAMILY_IPV4, remote[1], socket.inet_aton(remote[0])
    )


class BindingService:
    """Answers Binding requests.

    Args:
        rfc5780: the listener grid when the server has a second IP, else None. Without it the
            server sends no OTHER-ADDRESS and answers CHANGE-REQUEST with 420 (RFC 5780
            section 6.1, "a server that does not support ... alternate address").
        software: SOFTWARE value to include, or None (the default: say nothing about ourselves).
    """

    def __init__(self, rfc5780: AlternateAddresses | None = None, software: str | None = None):
        self.rfc5780 = rfc5780
        self.software = software
        # Attributes that depend only on the listener the request came in on.
        self._tails: dict[Address, bytes] = {}

    # --- the common case --------------------------------------------------------------------

    def fast_response(self, data: bytes, local: Address, remote: Address) -> bytes | None:
        """Answer an IPv4 Binding request carrying no attribute, or only FINGERPRINT.

        Returns None when the request needs the general path (other attributes, IPv6,
        a wrong FINGERPRINT is also left to the general path, which counts it).
        """
        n = len(data)
        if n == 20:
            if data[:8] != _BARE_REQUEST:
                return None
            fingerprint = False
        elif n == 28:
            if data[:8] != _FP_REQUEST or data[20:24] != _FP_REQUEST_TAIL:
                return None
            fingerprint = True
        else:
            return None
        if ":" in remote[0]:
            return None
        if fingerprint:
            crc = zlib.crc32(data[:20]) ^ 0x5354554E
            if crc != int.from_bytes(data[24:28], "big"):
                return None
        tail = self._tails.get(local)
        if tail is None:
            tail = self._tail(local, local)
            self._tails[local] = tail
        body = _xor_mapped_v4(remote) + tail
        if self.rfc5780 is not None:
            body = _mapped_v4(remote) + body
        if fingerprint:
            head = _FAST_HEAD.pack(0x0101, len(body) + 8, MAGIC_COOKIE, data[8:20])
            crc = zlib.crc32(head + body) ^ 0x5354554E
            return head + body + _FP_ATTR.pack(AttrType.FINGERPRINT, 4, crc)
        return _FAST_HEAD.pack(0x0101, len(body), MAGIC_COOKIE, data[8:20]) + body

    def _tail(self, received_on: Address, sent_from: Address) -> bytes:
        attrs: list[Attribute] = []
        if self.rfc5780 is not None:
            attrs.append(ResponseOrigin(*sent_from))
            attrs.append(OtherAddress(*self.rfc5780.other(received_on)))
        if self.software is not None:
            attrs.append(Software(self.software))
        # Encode through the codec so the bytes are the codec's bytes.
        encoded = Message(Method.BINDING, MessageClass.SUCCESS, b"\x00" * 12, attrs).encode()
        return encoded[20:]

    # --- everything else -------------------------------------------------------------------

    def respond(
        self,
        request: Message,
        local: Address,
        remote: Address,
        transport: Transport,
        fingerprint: bool = False,
    ) -> tuple[Message, Address, Address]:
        """Build the success response, the listener to send it from and its destination.

        Raises :class:`StunError` for requests the RFCs say to reject.
        """
        change = request.get(ChangeRequest)
        response_port = request.get(ResponsePort)
        padding = request.get(Padding)
        udp = transport is Transport.UDP
        source, dest = local, remote
        if change is not None:
            if self.rfc5780 is None:
                # RFC 5780 section 6: a server without a second address "MUST respond with a
                # 420 (Unknown Attribute) to any Request with a CHANGE-REQUEST attribute".
                raise StunError(420, (UnknownAttributes((AttrType.CHANGE_REQUEST,)),))
            if change.change_ip or change.change_port:
                if not udp:
                    # Section 3: filtering tests apply only to UDP; a stream cannot be answered
                    # from another address. 400, as Stuntman does.
                    raise StunError(400)
                source = self.rfc5780.source(local, change.change_ip, change.change_port)
        if response_port is not None:
            if padding is not None or not udp:
                # Section 7.5: RESPONSE-PORT with PADDING is refused with 400; over a stream a
                # response cannot go to another port.
                raise StunError(400)
            dest = (remote[0], response_port.port)
        response = Message(Method.BINDING, MessageClass.SUCCESS, request.transaction_id)
        if self.rfc5780 is not None:
            # Section 6.1: "The server MUST include both MAPPED-ADDRESS and XOR-MAPPED-ADDRESS",
            # RESPONSE-ORIGIN with the actual source, OTHER-ADDRESS always Ca:Cp.
            response.attributes.append(MappedAddress(*remote))
        response.attributes.append(XorMappedAddress(*remote))
        if self.rfc5780 is not None:
            response.attributes.append(ResponseOrigin(*source))
            response.attributes.append(OtherAddress(*self.rfc5780.other(local)))
        if self.software is not None:
            response.attributes.append(Software(self.software))
        if padding is not None and udp:
            # Section 6.1: the response must carry PADDING. The RFC suggests the outgoing MTU;
            # we size it so the whole response is no larger than the request, so a small
            # request can never draw a large response (no amplification), while a client
            # testing fragmentation still gets a response about as large as what it sent.
            unpadded = len(response.encode(fingerprint=fingerprint))
            size = max(0, (len(request.raw) - unpadded - 4) & ~3)
            response.attributes.append(Padding(bytes(size)))
        return response, source, dest


__all__ = ["AlternateAddresses", "BindingService"]
