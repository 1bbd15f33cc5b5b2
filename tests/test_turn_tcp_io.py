"""RFC 6062 TCP allocations over real loopback sockets: `stunturn serve` (one worker in a
thread, and a two-worker process) relaying TCP between a client and TCP peers.

The client is a small blocking one written here from the RFC (control connection, Allocate with
REQUESTED-TRANSPORT TCP, Connect / ConnectionAttempt, a second connection for ConnectionBind,
then raw bytes). Peers are plain TCP sockets on 127.0.0.2/127.0.0.3. coturn's
``turnutils_uclient -T`` exercises the same server in test_turn_coturn_stream.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import InProcessServer, ServerProcess

from stunturn.config import build_config
from stunturn.stun import (
    PASSWORD_ALGORITHM_MD5,
    TRANSPORT_TCP,
    Address,
    Attribute,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    decode,
    long_term_key,
    new_transaction_id,
)
from stunturn.stun.attributes import (
    ConnectionId,
    ErrorCode,
    Nonce,
    Realm,
    RequestedTransport,
    Username,
    XorPeerAddress,
    XorRelayedAddress,
)

USER, PASSWORD = "alice", "alice-pw"
TIMEOUT = 5.0


class StreamClient:
    """One TCP connection to the server speaking STUN with long-term credentials."""

    def __init__(self, server: Address, realm: str | None = None, nonce: str | None = None):
        self.sock = socket.create_connection(server, timeout=TIMEOUT)
        self.framer = StreamFramer()
        self.frames: list[bytes] = []
        self.realm = realm
        self.nonce = nonce
        self.rest = b""

    def close(self) -> None:
        self.sock.close()

    def recv_message(self) -> Message:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.frames += self.framer.feed(data)
        return decode(self.frames.pop(0))

    def request(self, method: int, *attrs: Attribute) -> Message:
        """Signed request; learns realm/nonce from a 401/438 and retries once."""
        for _ in range(2):
            tid = new_transaction_id()
            msg = Message(method, MessageClass.REQUEST, tid, list(attrs))
            if self.realm is not None and self.nonce is not None:
                msg.attributes += [Username(USER), Realm(self.realm), Nonce(self.nonce)]
                key = long_term_key(USER, self.realm, PASSWORD, PASSWORD_ALGORITHM_MD5)
                data = msg.encode(key)
            else:
                data = msg.encode()
            self.sock.sendall(data)
            while True:
                response = self.recv_message()
                if response.transaction_id == tid:
                    break
                self.frames.insert(0, response.encode())  # an indication: keep it for later
                if len(self.frames) > 10:
                    raise AssertionError("no response")
            error = response.get(ErrorCode)
            if error is not None and error.code in (401, 438):
                realm, nonce = response.get(Realm), response.get(Nonce)
                assert realm is not None and nonce is not None
                self.realm, self.nonce = realm.value, nonce.value
                continue
            return response
        return response

    def indication(self) -> Message:
        msg = self.recv_message()
        assert msg.cls is MessageClass.INDICATION, msg
        return msg


def code_of(msg: Message) -> int | None:
    error = msg.get(ErrorCode)
    return None if error is None else error.code


class EchoPeer:
    """A TCP peer on ``host``: greets each connection, then echoes (bounded, in a thread)."""

    def __init__(self, host: str, greeting: bytes = b"") -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.address: Address = self.sock.getsockname()[:2]
        self.greeting = greeting
        self.seen: list[Address] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            self.seen.append(addr[:2])
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            if self.greeting:
                conn.sendall(self.greeting)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(TIMEOUT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def server() -> Iterator[InProcessServer]:
    config = build_config(
        {
            "listen": ["127.0.0.1:0"],
            "workers": 1,
            "user": [f"{USER}:{PASSWORD}", "bob:bob-pw"],
            "relay_ip": ["127.0.0.1"],
            "allow_loopback_peers": True,
        }
    )
    with InProcessServer(config) as srv:
        srv.start()
        yield srv


def allocate_tcp(target: Address) -> tuple[StreamClient, Address]:
    control = StreamClient(target)
    response = control.request(Method.ALLOCATE, RequestedTransport(TRANSPORT_TCP))
    assert response.cls is MessageClass.SUCCESS, response
    relayed = response.get(XorRelayedAddress)
    assert relayed is not None
    return control, relayed.address


def bind_data(target: Address, control: StreamClient, conn_id: int) -> StreamClient:
    data = StreamClient(target, control.realm, control.nonce)
    response = data.request(Method.CONNECTION_BIND, ConnectionId(conn_id))
    assert response.cls is MessageClass.SUCCESS, response
    # Peer bytes may have come in the same read as the response: they are raw data.
    data.rest = data.framer.take()
    return data


def read_raw(client: StreamClient, n: int) -> bytes:
    """``n`` bytes of a data connection (first what came with the ConnectionBind response)."""
    head, client.rest = client.rest[:n], client.rest[n:]
    return head + (recv_exactly(client.sock, n - len(head)) if len(head) < n else b"")


def test_connect_bind_and_relay_both_ways(server: InProcessServer) -> None:
    """Connect to a peer that greets first: the greeting waits for the bind, then bytes flow
    both ways unchanged, and the peer sees the relayed address as its client."""
    target = server.addr("tcp")
    peer = EchoPeer("127.0.0.2", greeting=b"hello from the peer")
    try:
        control, relayed = allocate_tcp(target)
        response = control.request(Method.CONNECT, XorPeerAddress(*peer.address))
        assert response.cls is MessageClass.SUCCESS, response
        conn_id = response.get(ConnectionId)
        assert conn_id is not None
        time.sleep(0.1)  # the greeting reaches the server before the bind
        data = bind_data(target, control, conn_id.value)
        assert read_raw(data, 19) == b"hello from the peer"
        payload = bytes(range(256)) * 64  # 16 KiB, not STUN-framed: raw bytes
        data.sock.sendall(payload)
        assert read_raw(data, len(payload)) == payload
        assert peer.seen == [relayed]
        turn = server.worker.core.turn if server.worker else None
        assert turn is not None
        (alloc,) = turn.allocations.values()
        assert alloc.tcp and alloc.bytes_to_peer == len(payload)
        assert alloc.bytes_to_client == len(payload) + 19
        # Closing the data connection closes the peer's; the peer may then be connected again.
        data.close()
        time.sleep(0.2)
        assert not alloc.peer_conns
        again = control.request(Method.CONNECT, XorPeerAddress(*peer.address))
        assert again.cls is MessageClass.SUCCESS, again
        control.close()
    finally:
        peer.close()


def test_connect_to_closed_port_is_447(server: InProcessServer) -> None:
    target = server.addr("tcp")
    closed = socket.socket()
    closed.bind(("127.0.0.2", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    control, _ = allocate_tcp(target)
    response = control.request(Method.CONNECT, XorPeerAddress("127.0.0.2", port))
    assert code_of(response) == 447
    control.close()


def test_inbound_connection_attempt(server: InProcessServer) -> None:
    """A peer with a permission connects to the relayed address: ConnectionAttempt, bind,
    bytes both ways. A peer without one is closed at once."""
    target = server.addr("tcp")
    control, relayed = allocate_tcp(target)
    stranger = socket.create_connection(relayed, timeout=TIMEOUT)
    assert closed_by_server(stranger)
    stranger.close()
    response = control.request(Method.CREATE_PERMISSION, XorPeerAddress("127.0.0.3", 0))
    assert response.cls is MessageClass.SUCCESS, response
    peer = socket.socket()
    peer.bind(("127.0.0.3", 0))
    peer.settimeout(TIMEOUT)
    peer.connect(relayed)
    peer.sendall(b"early bytes")
    attempt = control.indication()
    assert attempt.method == Method.CONNECTION_ATTEMPT
    peer_attr, conn_id = attempt.get(XorPeerAddress), attempt.get(ConnectionId)
    assert peer_attr is not None and conn_id is not None
    assert peer_attr.address == peer.getsockname()[:2]
    data = bind_data(target, control, conn_id.value)
    assert read_raw(data, 11) == b"early bytes"
    data.sock.sendall(b"reply")
    assert recv_exactly(peer, 5) == b"reply"
    # Ending the allocation (closing the control connection) closes the data connections.
    control.close()
    assert closed_by_server(peer)
    assert closed_by_server(data.sock)
    peer.close()
    data.close()


def test_unbound_peer_connection_is_closed_after_the_bind_timeout(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 6062 section 5.3 (30 s, scaled down to 0.5 s here)."""
    monkeypatch.setattr("stunturn.turn.service.BIND_TIMEOUT", 0.5)
    target = server.addr("tcp")
    control, relayed = allocate_tcp(target)
    assert (
        control.request(Method.CREATE_PERMISSION, XorPeerAddress("127.0.0.3", 0)).cls
        is MessageClass.SUCCESS
    )
    peer = socket.create_connection(relayed, timeout=TIMEOUT, source_address=("127.0.0.3", 0))
    attempt = control.indication()
    conn_id = attempt.get(ConnectionId)
    assert conn_id is not None
    started = time.monotonic()
    assert closed_by_server(peer)
    assert 0.3 < time.monotonic() - started < 3
    data = StreamClient(target, control.realm, control.nonce)
    late = data.request(Method.CONNECTION_BIND, ConnectionId(conn_id.value))
    assert code_of(late) == 400
    for sock in (peer, data.sock, control.sock):
        sock.close()


def test_connection_bind_reaches_the_right_worker(stunturn_server: object) -> None:
    """With two workers, a client's data connections come from other source ports than its
    control connection; the kernel steers TCP by source IP (SO_ATTACH_REUSEPORT_CBPF), so every
    ConnectionBind finds the allocation. Ten rounds, each on fresh connections."""
    start = stunturn_server
    assert callable(start)
    proc: ServerProcess = start(
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--user",
        f"{USER}:{PASSWORD}",
        "--relay-ip",
        "127.0.0.1",
        "--allow-loopback-peers",
    )
    target = proc.addr("tcp")
    peer = EchoPeer("127.0.0.2")
    try:
        for round_ in range(10):
            control, _ = allocate_tcp(target)
            response = control.request(Method.CONNECT, XorPeerAddress(*peer.address))
            assert response.cls is MessageClass.SUCCESS, (round_, response)
            conn_id = response.get(ConnectionId)
            assert conn_id is not None
            data = bind_data(target, control, conn_id.value)
            data.sock.sendall(b"ping %d" % round_)
            assert read_raw(data, 5 + len(str(round_))) == b"ping %d" % round_
            data.close()
            control.close()
    finally:
        peer.close()


def test_failed_bind_then_more_requests_in_one_write(server: InProcessServer) -> None:
    """A ConnectionBind that fails (unknown id) followed, in the same write, by a Binding
    request: the connection stays a STUN connection and both get their answers."""
    target = server.addr("tcp")
    control, _ = allocate_tcp(target)
    data = StreamClient(target, control.realm, control.nonce)
    key = long_term_key(USER, control.realm or "", PASSWORD, PASSWORD_ALGORITHM_MD5)
    bind = Message(
        Method.CONNECTION_BIND, MessageClass.REQUEST, new_transaction_id(), [ConnectionId(99)]
    )
    bind.attributes += [Username(USER), Realm(control.realm or ""), Nonce(control.nonce or "")]
    binding = Message(Method.BINDING, MessageClass.REQUEST, new_transaction_id())
    data.sock.sendall(bind.encode(key) + binding.encode())
    first, second = data.recv_message(), data.recv_message()
    assert (first.method, code_of(first)) == (Method.CONNECTION_BIND, 400)
    assert (second.method, second.cls) == (Method.BINDING, MessageClass.SUCCESS)
    data.close()
    control.close()
