"""Long-term credential authentication of TURN requests, through the core (RFC 8489 9.2).

Every test drives :class:`ServerCore` with encoded requests from :class:`TurnClient` and
decodes what comes back. Time is a number the test steps.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from turn_helpers import (
    CLIENT,
    CLIENT2,
    PEER,
    PEER6,
    REALM,
    RELAY_PORTS,
    RELAY_V4,
    SERVER,
    Harness,
    TurnClient,
    attribute_types,
    error_code,
    is_success,
    make_server,
)

from stunturn.auth import RestSecrets, features_of, rest_password, rest_username
from stunturn.server import SendTo, Transport
from stunturn.stun import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    TRANSPORT_TCP,
    Attribute,
    Message,
    MessageClass,
    Method,
    UnknownAttribute,
    check_fingerprint,
    check_integrity_sha256,
    decode,
    long_term_key,
)
from stunturn.stun.attributes import (
    ErrorCode,
    Fingerprint,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedTransport,
    Software,
    UnknownAttributes,
    Username,
)
from stunturn.turn.quota import QuotaLimits

OFFERED = PasswordAlgorithms(((PASSWORD_ALGORITHM_SHA256, b""), (PASSWORD_ALGORITHM_MD5, b"")))


def unsigned_allocate(client: TurnClient) -> Message:
    return client.exchange(client.encode(Method.ALLOCATE, RequestedTransport(17), sign=False))


# --- the challenge --------------------------------------------------------------------------


def test_no_integrity_gets_401_with_realm_nonce_and_algorithms() -> None:
    """9.2.4 first bullet: 401 with REALM, a NONCE with the nonce cookie, PASSWORD-ALGORITHMS
    (SHA-256 preferred, then MD5); nothing else: no SOFTWARE, no integrity."""
    server = make_server()
    response = unsigned_allocate(server.client())
    assert (response.method, response.cls) == (Method.ALLOCATE, MessageClass.ERROR)
    assert attribute_types(response) == [ErrorCode, Realm, Nonce, PasswordAlgorithms]
    assert response.get(ErrorCode) == ErrorCode(401, "Unauthenticated")
    assert response.get(Realm) == Realm(REALM)
    assert response.get(PasswordAlgorithms) == OFFERED
    nonce = response.get(Nonce)
    assert nonce is not None
    # 9.2 / 18.1: "obMatJos2" + base64 of the features; only "Password algorithms" (bit 0).
    assert nonce.value.startswith("obMatJos2gAAA")
    assert features_of(nonce.value) == 0x800000
    assert response.get(Software) is None


def test_nonces_differ_per_client_address() -> None:
    """9.2.4: the server MUST NOT choose the same NONCE for two requests unless they have the
    same source IP address and port."""
    server = make_server()
    nonces = {
        unsigned_allocate(server.client(address=addr)).get(Nonce)
        for addr in (CLIENT, CLIENT2, (CLIENT[0], CLIENT[1] + 1))
    }
    assert len(nonces) == 3


@pytest.mark.parametrize("missing", [Username, Realm, Nonce])
def test_integrity_without_username_realm_or_nonce_is_400(missing: type[Attribute]) -> None:
    """9.2.4 second bullet: integrity present but USERNAME/USERHASH, REALM or NONCE missing:
    400, which cannot be signed and carries no REALM or NONCE."""
    server = make_server()
    client = server.client()
    client.login()
    attrs = [a for a in client.auth_attributes() if type(a) is not missing]
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, attributes=[RequestedTransport(17)])
    msg.attributes += attrs
    response = client.exchange(msg.encode(client.key))
    assert error_code(response) == 400
    assert attribute_types(response) == [ErrorCode]
    assert not server.turn.allocations


# --- stale nonces ---------------------------------------------------------------------------


def _assert_stale(response: Message, old_nonce: str) -> str:
    """438 with REALM, a fresh NONCE and PASSWORD-ALGORITHMS (9.2.4 last bullet)."""
    assert error_code(response) == 438
    assert attribute_types(response) == [ErrorCode, Realm, Nonce, PasswordAlgorithms]
    nonce = response.get(Nonce)
    assert nonce is not None and nonce.value != old_nonce
    return nonce.value


def test_nonce_issued_to_another_address_is_stale() -> None:
    """A nonce is bound to the client's IP address: another address gets 438 and a
    nonce of its own, with which its retry succeeds."""
    server = make_server()
    alice = server.client()
    alice.login()
    bob = server.client("bob", address=CLIENT2)
    bob.nonce, bob.offered = alice.nonce, alice.offered
    assert alice.nonce is not None
    stale = bob.exchange(bob.encode(Method.ALLOCATE, RequestedTransport(17)))
    _assert_stale(stale, alice.nonce)
    bob.learn(stale)
    assert is_success(bob.exchange(bob.encode(Method.ALLOCATE, RequestedTransport(17))))


def test_nonce_is_accepted_from_another_port_of_the_same_ip() -> None:
    """RFC 6062 clients sign ConnectionBind, sent from a new connection (a new port), with the
    nonce of their control connection: the nonce is bound to the IP, not the port."""
    server = make_server()
    alice = server.client()
    alice.login()
    other = server.client(address=(CLIENT[0], CLIENT[1] + 7))
    other.nonce, other.offered = alice.nonce, alice.offered
    assert is_success(other.exchange(other.encode(Method.ALLOCATE, RequestedTransport(17))))


@pytest.mark.parametrize("where", [13, 20, 30])
def test_forged_nonce_is_stale(where: int) -> None:
    """A NONCE we did not issue (one character of the expiry or MAC changed) is stale: 438
    with a fresh nonce."""
    server = make_server()
    client = server.client()
    client.login()
    assert client.nonce is not None
    good = client.nonce
    forged = good[:where] + ("A" if good[where] != "A" else "B") + good[where + 1 :]
    client.nonce = forged
    response = client.exchange(client.encode(Method.ALLOCATE, RequestedTransport(17)))
    assert _assert_stale(response, forged) == good  # same client, same second: same nonce


def test_nonce_without_the_cookie_is_stale() -> None:
    server = make_server()
    client = server.client()
    client.login()
    client.nonce = "0123456789abcdef"
    response = client.exchange(client.encode(Method.ALLOCATE, RequestedTransport(17)))
    assert error_code(response) == 438


def test_nonce_expires_after_its_lifetime() -> None:
    """Nonces live 600 s: valid just before, 438 just after; the retry with the fresh nonce
    works (RFC 8489 9.2.5: the client MUST retry a 438 with the new NONCE)."""
    server = make_server()
    client = server.client()
    client.login()
    old = client.nonce
    assert old is not None
    server.step(599.5)
    assert error_code(client.refresh(None)) == 437  # authenticated; there is no allocation
    assert client.nonce == old
    server.step(1.0)
    response = client.exchange(client.encode(Method.ALLOCATE, RequestedTransport(17)))
    client.learn(response)
    _assert_stale(response, old)
    assert is_success(client.exchange(client.encode(Method.ALLOCATE, RequestedTransport(17))))


def test_stale_nonce_is_checked_after_the_credentials() -> None:
    """RFC 8489 9.2.4 lists the 438 check last, after USERNAME and the integrity check: a
    request with a stale nonce and a wrong password is answered 401, not 438."""
    server = make_server()
    client = server.client(password="wrong")
    client.login()
    server.step(700)
    response = client.exchange(client.encode(Method.ALLOCATE, RequestedTransport(17)))
    assert error_code(response) == 401


# --- wrong credentials ------------------------------------------------------------------------


def test_wrong_password_is_401() -> None:
    """9.2.4: integrity that does not verify: 401 with REALM, NONCE, PASSWORD-ALGORITHMS."""
    server = make_server()
    response = server.client(password="not-the-password").allocate()
    assert error_code(response) == 401
    assert attribute_types(response) == [ErrorCode, Realm, Nonce, PasswordAlgorithms]
    assert not server.turn.allocations


def test_unknown_user_looks_exactly_like_a_wrong_password() -> None:
    """No user enumeration: an unknown user gets the same response shape as a known user with
    a wrong password (same code, reason and attribute list)."""
    server = make_server()
    wrong = server.client("alice", "bad").allocate()
    unknown = server.client("mallory", "bad", address=CLIENT2).allocate()
    assert error_code(wrong) == error_code(unknown) == 401
    assert wrong.get(ErrorCode) == unknown.get(ErrorCode)
    assert attribute_types(wrong) == attribute_types(unknown)
    assert wrong.get(MessageIntegrity) is None and unknown.get(MessageIntegrity) is None


def test_wrong_realm_is_401() -> None:
    server = make_server()
    client = server.client()
    client.login()
    client.realm = "other.example"
    response = client.exchange(client.encode(Method.ALLOCATE, RequestedTransport(17)))
    assert error_code(response) == 401


# --- RFC 5389 and RFC 8489 clients ------------------------------------------------------------


def test_rfc5389_client_md5_key_and_message_integrity() -> None:
    """An RFC 5389 client (no password algorithm attributes, MESSAGE-INTEGRITY with the MD5
    key) is served and gets MESSAGE-INTEGRITY back, not MESSAGE-INTEGRITY-SHA256."""
    server = make_server()
    client = server.client()
    response = client.allocate()
    assert is_success(response)
    assert response.get(MessageIntegrity) is not None
    assert response.get(MessageIntegritySha256) is None
    assert client.verified(response)
    assert server.allocation(client).username == "alice"


def test_rfc8489_client_sha256_key_and_message_integrity_sha256() -> None:
    """An RFC 8489 client echoes PASSWORD-ALGORITHMS, picks SHA-256 in PASSWORD-ALGORITHM and
    signs with MESSAGE-INTEGRITY-SHA256 under the SHA-256 key; the response is signed the same
    way (9.2.4: responses carry MESSAGE-INTEGRITY-SHA256 unless processed as MD5)."""
    server = make_server()
    client = server.client(sha256=True)
    response = client.allocate()
    assert is_success(response)
    assert response.get(MessageIntegritySha256) is not None
    assert response.get(MessageIntegrity) is None
    assert client.verified(response)
    assert check_integrity_sha256(
        response, long_term_key("alice", REALM, "alice-secret", PASSWORD_ALGORITHM_SHA256)
    )


def test_rfc8489_client_with_the_md5_key_fails() -> None:
    """PASSWORD-ALGORITHM SHA-256 means the SHA-256 key: MI-SHA256 under the MD5 key is 401."""
    server = make_server()
    client = server.client(sha256=True)
    client.login()
    md5_key = long_term_key("alice", REALM, "alice-secret", PASSWORD_ALGORITHM_MD5)
    data = client.encode(Method.ALLOCATE, RequestedTransport(17), key=md5_key)
    assert error_code(client.exchange(data)) == 401


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256)], id="algorithm-alone"),
        pytest.param([OFFERED], id="algorithms-alone"),
        pytest.param(
            [
                PasswordAlgorithms(((PASSWORD_ALGORITHM_SHA256, b""),)),
                PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256),
            ],
            id="algorithms-not-as-offered",
        ),
        pytest.param(
            [
                PasswordAlgorithms(
                    ((PASSWORD_ALGORITHM_MD5, b""), (PASSWORD_ALGORITHM_SHA256, b""))
                ),
                PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256),
            ],
            id="algorithms-reordered",
        ),
        pytest.param([OFFERED, PasswordAlgorithm(3)], id="algorithm-not-offered"),
        pytest.param(
            [OFFERED, PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256, b"xx")], id="params-differ"
        ),
    ],
)
def test_mismatched_password_algorithms_are_400(extra: list[Attribute]) -> None:
    """9.2.4: unless both attributes are present, PASSWORD-ALGORITHMS matches what we sent and
    PASSWORD-ALGORITHM is one of its entries: 400."""
    server = make_server()
    client = server.client()
    client.login()
    assert client.nonce is not None
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, attributes=[RequestedTransport(17)])
    msg.attributes += [Username("alice"), Realm(REALM), Nonce(client.nonce), *extra]
    key = long_term_key("alice", REALM, "alice-secret", PASSWORD_ALGORITHM_SHA256)
    response = client.exchange(msg.encode(key, sha1=False, sha256=True))
    assert error_code(response) == 400
    assert not server.turn.allocations


def test_explicit_md5_password_algorithm_works() -> None:
    """A client may pick MD5 from the offered list: PASSWORD-ALGORITHM MD5 + MI-SHA256 under
    the MD5 key."""
    server = make_server()
    client = server.client()
    client.login()
    assert client.nonce is not None
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, attributes=[RequestedTransport(17)])
    msg.attributes += [
        Username("alice"),
        Realm(REALM),
        Nonce(client.nonce),
        OFFERED,
        PasswordAlgorithm(PASSWORD_ALGORITHM_MD5),
    ]
    response = client.exchange(msg.encode(client.key, sha1=False, sha256=True))
    assert is_success(response)
    assert check_integrity_sha256(response, client.key)


@pytest.mark.parametrize("sha256", [False, True])
def test_userhash_login_for_a_static_user(sha256: bool) -> None:
    """USERHASH (RFC 8489 14.4) instead of USERNAME finds the static user."""
    server = make_server()
    client = server.client(use_userhash=True, sha256=sha256)
    response = client.allocate()
    assert is_success(response)
    assert client.verified(response)
    assert server.allocation(client).username == "alice"


def test_userhash_of_an_unknown_user_is_401() -> None:
    server = make_server()
    response = server.client("mallory", "x", use_userhash=True).allocate()
    assert error_code(response) == 401


def test_userhash_of_a_rest_user_is_401() -> None:
    """REST usernames cannot be found from their hash: 401, not a crash."""
    server = make_server(rest=RestSecrets(("s1",)))
    name = rest_username("carol", 10**10)
    response = server.client(name, rest_password("s1", name), use_userhash=True).allocate()
    assert error_code(response) == 401


# --- FINGERPRINT, unknown attributes --------------------------------------------------------


@pytest.mark.parametrize("fingerprint", [False, True])
def test_fingerprint_echoed_when_the_request_had_one(fingerprint: bool) -> None:
    """Responses (the 401, then the signed success) end with a valid FINGERPRINT exactly when
    the request carried one."""
    server = make_server()
    client = server.client(fingerprint=fingerprint)
    challenge = client.login()
    response = client.allocate()
    for msg in (challenge, response):
        assert (msg.get(Fingerprint) is not None) is fingerprint
        assert check_fingerprint(msg) is fingerprint
        if fingerprint:
            assert type(msg.attributes[-1]) is Fingerprint
    assert client.verified(response)


def test_bad_fingerprint_is_dropped_silently() -> None:
    """RFC 8489 7: a message with a bad FINGERPRINT is discarded, never answered."""
    server = make_server()
    client = server.client(fingerprint=True)
    client.login()
    data = bytearray(client.encode(Method.ALLOCATE, RequestedTransport(17)))
    data[-1] ^= 1
    assert client.send(bytes(data)) == []
    assert server.core.counters.bad_fingerprint == 1
    assert not server.turn.allocations


def test_unknown_comprehension_required_attribute_after_authentication() -> None:
    """RFC 8489 6.3: 420 listing the unknown attribute, only once the request authenticated
    (an unauthenticated requester gets 401 first); the 420 is signed."""
    server = make_server()
    client = server.client()
    unknown = UnknownAttribute(0x7ABC, b"\x01\x02")
    first = client.exchange(client.encode(Method.ALLOCATE, unknown, sign=False))
    assert error_code(first) == 401
    client.learn(first)
    response = client.allocate(unknown, UnknownAttribute(0xC001, b""))
    assert error_code(response) == 420
    assert response.get(UnknownAttributes) == UnknownAttributes((0x7ABC,))
    assert client.verified(response)
    assert not server.turn.allocations


# --- errors after authentication are signed -----------------------------------------------


def _437_second_allocate(server: Harness, client: TurnClient) -> Message:
    client.allocate()
    return client.allocate()


def _437_refresh_without_allocation(server: Harness, client: TurnClient) -> Message:
    return client.refresh(600)


def _400_no_transport(server: Harness, client: TurnClient) -> Message:
    return client.request(Method.ALLOCATE)


def _442_tcp(server: Harness, client: TurnClient) -> Message:
    return client.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_TCP))


def _403_private_peer(server: Harness, client: TurnClient) -> Message:
    client.allocate()
    return client.create_permission(("10.0.0.1", 80))


def _443_wrong_family(server: Harness, client: TurnClient) -> Message:
    client.allocate()
    return client.create_permission(PEER6)


def _486_quota(server: Harness, client: TurnClient) -> Message:
    other = server.client(client.username, client.password, address=CLIENT2, sha256=client.sha256)
    other.allocate()
    return client.allocate()


def _508_no_ports(server: Harness, client: TurnClient) -> Message:
    server.binder.take(RELAY_V4, range(RELAY_PORTS[0], RELAY_PORTS[1] + 1))
    return client.allocate()


def _441_other_user(server: Harness, client: TurnClient) -> Message:
    server.client("bob", sha256=client.sha256).allocate()  # same 5-tuple
    return client.refresh(600)


SIGNED_ERRORS: dict[str, tuple[int, Callable[[Harness, TurnClient], Message]]] = {
    "437-allocate": (437, _437_second_allocate),
    "437-refresh": (437, _437_refresh_without_allocation),
    "400": (400, _400_no_transport),
    "442": (442, _442_tcp),
    "403": (403, _403_private_peer),
    "443": (443, _443_wrong_family),
    "486": (486, _486_quota),
    "508": (508, _508_no_ports),
    "441": (441, _441_other_user),
}


@pytest.mark.parametrize("sha256", [False, True], ids=["md5", "sha256"])
@pytest.mark.parametrize("case", list(SIGNED_ERRORS))
def test_errors_after_authentication_are_signed(case: str, sha256: bool) -> None:
    """Once a request authenticated, error responses carry MESSAGE-INTEGRITY (or -SHA256) under
    the requester's key, so the client can trust them (RFC 8489 9.2.5 discards unsigned 400s)."""
    code, scenario = SIGNED_ERRORS[case]
    server = make_server(limits=QuotaLimits(per_user=1))
    client = server.client(sha256=sha256)
    response = scenario(server, client)
    assert error_code(response) == code
    assert client.verified(response)


# --- TURN REST credentials ------------------------------------------------------------------

UNIX = 1_700_000_000


def rest_server() -> Harness:
    return make_server(rest=RestSecrets(("old-secret", "new-secret")), clock_offset=UNIX)


NEW_SECRET = "new-secret"


def rest_client(
    server: Harness, expiry: int, secret: str = NEW_SECRET, *, sha256: bool = False
) -> TurnClient:
    name = rest_username("carol", expiry)
    return server.client(name, rest_password(secret, name), sha256=sha256)


@pytest.mark.parametrize("secret", ["old-secret", "new-secret"])
def test_rest_credentials_from_any_active_secret(secret: str) -> None:
    """During secret rotation a password from either secret works."""
    server = rest_server()
    client = rest_client(server, UNIX + 3600, secret)
    response = client.allocate()
    assert is_success(response) and client.verified(response)


def test_rest_credentials_from_a_retired_secret_fail() -> None:
    server = rest_server()
    assert error_code(rest_client(server, UNIX + 3600, "retired").allocate()) == 401


def test_rest_sha256_client() -> None:
    server = rest_server()
    client = rest_client(server, UNIX + 3600, sha256=True)
    response = client.allocate()
    assert is_success(response) and client.verified(response)


def test_expired_rest_credential_keeps_its_allocation_until_it_ends() -> None:
    """A REST credential past its expiry may no longer Allocate or Refresh (401), but the
    allocation it created keeps working for CreatePermission and ChannelBind until its
    lifetime ends (clock_offset maps ``now`` to Unix time)."""
    server = rest_server()
    client = rest_client(server, UNIX + 100)
    assert is_success(client.allocate())
    server.step(100)  # Unix time == expiry: still valid
    assert is_success(client.refresh(600))  # lifetime now ends at 700
    server.step(0.5)
    assert server.unix_time > UNIX + 100
    refused = client.refresh(600)
    assert error_code(refused) == 401
    assert refused.get(Nonce) is not None and refused.get(Realm) is not None
    other = rest_client(server, UNIX + 100)
    other.address = CLIENT2
    assert error_code(other.allocate()) == 401
    assert not any(a.client == CLIENT2 for a in server.turn)
    assert is_success(client.create_permission(PEER))
    assert is_success(client.channel_bind(0x4000, PEER))
    server.step_to(699.9)
    assert client.five_tuple in server.turn.allocations
    server.step_to(700.0)
    assert client.five_tuple not in server.turn.allocations
    assert error_code(client.channel_bind(0x4000, PEER)) == 437


def test_expired_rest_credential_may_still_delete_its_allocation() -> None:
    """Refresh with LIFETIME 0 is not an extension: an expired REST credential can still end
    its allocation (freeing the quota) instead of leaving it until it times out."""
    server = rest_server()
    client = rest_client(server, UNIX + 100)
    assert is_success(client.allocate())
    server.step(200)
    assert error_code(client.refresh(600)) == 401
    assert is_success(client.refresh(0))
    assert client.five_tuple not in server.turn.allocations


def test_rest_username_that_is_not_a_timestamp_is_unknown() -> None:
    server = rest_server()
    name = "carol"
    response = server.client(name, rest_password("new-secret", name)).allocate()
    assert error_code(response) == 401


def test_rest_username_with_unicode_digits_is_answered_not_crashing() -> None:
    """A USERNAME like '²:x' must be answered (401), never raise out of the core."""
    server = rest_server()
    response = server.client("²:mallory", "whatever").allocate()
    assert error_code(response) == 401


# --- transports ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.TLS])
def test_stream_clients_authenticate_the_same_way(transport: Transport) -> None:
    server = make_server()
    client = server.client(transport=transport)
    response = client.allocate()
    assert is_success(response) and client.verified(response)
    assert server.allocation(client).five_tuple == (transport, CLIENT, SERVER)


def test_responses_go_back_to_the_requester() -> None:
    server = make_server()
    client = server.client()
    actions = client.send(client.encode(Method.ALLOCATE, RequestedTransport(17), sign=False))
    assert len(actions) == 1 and isinstance(actions[0], SendTo)
    assert (actions[0].local, actions[0].remote) == (SERVER, CLIENT)
    assert error_code(decode(actions[0].data)) == 401
