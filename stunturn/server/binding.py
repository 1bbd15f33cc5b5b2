"""STUN Binding service (RFC 8489 section 6.3) with NAT behaviour discovery (RFC 5780).

Sans-IO: :meth:`BindingService.respond` turns a decoded request into the bytes to send and the
addresses to send them from and to. :meth:`BindingService.fast_response` answers the common
attribute-less request without decoding it at all.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
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

# Header followed by XOR-MAPPED-ADDRESS (IPv4), or by MAPPED-ADDRESS and XOR-MAPPED-ADDRESS.
_RESP_XOR = struct.Struct("!HHI12sHHBBH4s")
_RESP_MAPPED_XOR = struct.Struct("!HHI12sHHBBH4sHHBBH4s")
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


class BindingService:
    """Answers Binding requests.

    Args:
        rfc5780: the listener grid when the server has a second IP, else None. Without it the
            server sends no OTHER-ADDRESS and answers CHANGE-REQUEST with 420 (RFC 5780
            section 6.1, "a server that does not support ... alternate address").
        software: SOFTWARE value to include, or None (the default: say nothing about ourselves).
        external: local IP -> the public IP it is reached at behind a NAT (``--external-ip``).
            RESPONSE-ORIGIN and OTHER-ADDRESS name the public address (same port), so a client
            outside the NAT can reach and compare them; XOR-MAPPED-ADDRESS is the client's own
            address and never mapped.
    """

    def __init__(
        self,
        rfc5780: AlternateAddresses | None = None,
        software: str | None = None,
        external: Mapping[str, str] | None = None,
    ):
        self.rfc5780 = rfc5780
        self.software = software
        self.external = dict(external or {})
        # Attributes that depend only on the listener the request came in on.
        self._tails: dict[Address, bytes] = {}

    # --- the common case --------------------------------------------------------------------

    def fast_response(
        self, data: bytes | memoryview, local: Address, ip: int, port: int
    ) -> bytes | None:
        """Answer an IPv4 Binding request carrying no attribute, or only FINGERPRINT.

        ``ip`` is the requester's IPv4 address as an integer and ``port`` its port, so the
        batched I/O path never has to make address strings. Returns None when the request
        needs the general path (other attributes, a bad header; a wrong FINGERPRINT is also
        left to the general path, which counts it). The response is one ``struct.pack`` plus
        the attributes cached for the listener.
        """
        n = len(data)
        if n == 20:
            if data[:8] != _BARE_REQUEST:
                return None
            fingerprint = False
        elif n == 28:
            if data[:8] != _FP_REQUEST or data[20:24] != _FP_REQUEST_TAIL:
                return None
            if zlib.crc32(data[:20]) ^ 0x5354554E != int.from_bytes(data[24:28], "big"):
                return None
            fingerprint = True
        else:
            return None
        tail = self._tails.get(local)
        if tail is None:
            tail = self._tails[local] = self._tail(local, local)
        xor_ip = (ip ^ MAGIC_COOKIE).to_bytes(4, "big")
        length = len(tail) + (8 if fingerprint else 0)
        tid = bytes(data[8:20])
        if self.rfc5780 is None:
            out = _RESP_XOR.pack(
                0x0101, 12 + length, MAGIC_COOKIE, tid,
                AttrType.XOR_MAPPED_ADDRESS, 8, 0, FAMILY_IPV4, port ^ 0x2112, xor_ip,
            )  # fmt: skip
        else:
            out = _RESP_MAPPED_XOR.pack(
                0x0101, 24 + length, MAGIC_COOKIE, tid,
                AttrType.MAPPED_ADDRESS, 8, 0, FAMILY_IPV4, port, ip.to_bytes(4, "big"),
                AttrType.XOR_MAPPED_ADDRESS, 8, 0, FAMILY_IPV4, port ^ 0x2112, xor_ip,
            )  # fmt: skip
        out += tail
        if fingerprint:
            out += _FP_ATTR.pack(AttrType.FINGERPRINT, 4, zlib.crc32(out) ^ 0x5354554E)
        return out

    def _tail(self, received_on: Address, sent_from: Address) -> bytes:
        attrs: list[Attribute] = []
        if self.rfc5780 is not None:
            attrs.append(ResponseOrigin(*self.public(sent_from)))
            attrs.append(OtherAddress(*self.public(self.rfc5780.other(received_on))))
        if self.software is not None:
            attrs.append(Software(self.software))
        # Encode through the codec so the bytes are the codec's bytes.
        encoded = Message(Method.BINDING, MessageClass.SUCCESS, b"\x00" * 12, attrs).encode()
        return encoded[20:]

    def public(self, address: Address) -> Address:
        """How ``address``, one of ours, is seen from outside the NAT (itself without one)."""
        host, port = address
        return (self.external.get(host, host), port)

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
            response.attributes.append(ResponseOrigin(*self.public(source)))
            response.attributes.append(OtherAddress(*self.public(self.rfc5780.other(local))))
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
