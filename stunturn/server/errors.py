"""Protocol errors raised by request handlers and turned into error responses in one place."""

from __future__ import annotations

from ..stun import Attribute


class StunError(Exception):
    """The peer's request cannot be served; answer with ERROR-CODE ``code``.

    Raised inside handlers, converted to an error response by the core's single boundary.
    ``attributes`` are added to the error response (e.g. UNKNOWN-ATTRIBUTES for 420, or REALM
    and NONCE for 401). When the request was authenticated, ``key`` is set and the error
    response is signed with it (MESSAGE-INTEGRITY-SHA256 if ``sha256``).
    """

    def __init__(self, code: int, attributes: tuple[Attribute, ...] = (), detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.attributes = attributes
        self.detail = detail
        """Why, for the server's debug log; never sent to the client."""
        self.key: bytes | None = None
        self.sha256 = False
