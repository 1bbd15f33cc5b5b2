"""Wire constants: methods, classes, attribute types and error codes.

Sources: RFC 8489 section 18 (IANA registries), RFC 5780 section 9, RFC 8656 section 18,
RFC 6156, RFC 6062 section 6, RFC 8445 section 16.1, RFC 3489 section 11.2 (legacy codes).
"""

from enum import IntEnum

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = b"\x21\x12\xa4\x42"
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E


class MessageClass(IntEnum):
    """STUN message class (RFC 8489 section 5)."""

    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(IntEnum):
    """STUN/TURN methods (RFC 8489 section 18.2, RFC 8656 section 17, RFC 6062 section 6.1)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009
    CONNECT = 0x00A
    CONNECTION_BIND = 0x00B
    CONNECTION_ATTEMPT = 0x00C


class AttrType(IntEnum):
    """Attribute type codes.

    0x0000-0x7FFF are comprehension-required, 0x8000-0xFFFF comprehension-optional.
    """

    # RFC 8489
    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    # RFC 3489 (legacy; decoded for compatibility, never required)
    RESPONSE_ADDRESS = 0x0002
    SOURCE_ADDRESS = 0x0004
    CHANGED_ADDRESS = 0x0005
    REFLECTED_FROM = 0x000B
    # RFC 5780
    CHANGE_REQUEST = 0x0003
    PADDING = 0x0026
    RESPONSE_PORT = 0x0027
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C
    # RFC 8656 / RFC 6156
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    RESERVATION_TOKEN = 0x0022
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    ICMP = 0x8004
    # RFC 6062
    CONNECTION_ID = 0x002A
    # RFC 8445
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


def is_comprehension_required(attr_type: int) -> bool:
    """True for 0x0000-0x7FFF (RFC 8489 section 14)."""
    return attr_type < 0x8000


# Address families used inside address attributes (RFC 8489 section 14.1) and in
# REQUESTED-ADDRESS-FAMILY (RFC 6156 section 4.1.1).
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# Transport protocol numbers for REQUESTED-TRANSPORT (RFC 8656 section 18.11, RFC 6062).
TRANSPORT_UDP = 17
TRANSPORT_TCP = 6

# Password algorithms (RFC 8489 section 18.5).
PASSWORD_ALGORITHM_MD5 = 0x0001
PASSWORD_ALGORITHM_SHA256 = 0x0002

# Standard reason phrases (RFC 8489 section 14.8, RFC 8656 section 19, RFC 6062, RFC 5780).
REASONS: dict[int, str] = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    405: "Mobility Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    446: "Connection Already Exists",
    447: "Connection Timeout or Failure",
    486: "Allocation Quota Reached",
    487: "Role Conflict",
    500: "Server Error",
    508: "Insufficient Capacity",
}
