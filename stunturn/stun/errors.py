"""Errors raised by the STUN codec."""


class StunParseError(ValueError):
    """Malformed STUN input: the one error type the codec raises for bad bytes.

    Any other exception escaping :func:`stunturn.stun.decode` is a bug.
    """
