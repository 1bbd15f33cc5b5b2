"""Sans-IO STUN codec (RFC 8489, RFC 5780, RFC 8656, RFC 6156, RFC 6062, RFC 8445 attributes).

Nothing here opens sockets or reads clocks.
"""

from .attributes import *  # noqa: F403
from .attributes import ATTRIBUTE_CLASSES, Address, Attribute, UnknownAttribute, attribute_type
from .constants import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    MAGIC_COOKIE,
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    REASONS,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AttrType,
    MessageClass,
    Method,
    is_comprehension_required,
)
from .errors import StunParseError
from .framing import FramingError, StreamFramer
from .integrity import (
    CredentialError,
    constant_time_equal,
    long_term_key,
    opaque_string,
    short_term_key,
    userhash,
)
from .message import (
    Message,
    build,
    check_fingerprint,
    check_integrity,
    check_integrity_sha256,
    decode,
    looks_like_stun,
    message_type,
    new_transaction_id,
    split_message_type,
)

__all__ = [
    "ATTRIBUTE_CLASSES",
    "FAMILY_IPV4",
    "FAMILY_IPV6",
    "MAGIC_COOKIE",
    "PASSWORD_ALGORITHM_MD5",
    "PASSWORD_ALGORITHM_SHA256",
    "REASONS",
    "TRANSPORT_TCP",
    "TRANSPORT_UDP",
    "Address",
    "AttrType",
    "Attribute",
    "CredentialError",
    "FramingError",
    "Message",
    "MessageClass",
    "Method",
    "StreamFramer",
    "StunParseError",
    "UnknownAttribute",
    "attribute_type",
    "build",
    "check_fingerprint",
    "check_integrity",
    "check_integrity_sha256",
    "constant_time_equal",
    "decode",
    "is_comprehension_required",
    "long_term_key",
    "looks_like_stun",
    "message_type",
    "new_transaction_id",
    "opaque_string",
    "short_term_key",
    "split_message_type",
    "userhash",
]
