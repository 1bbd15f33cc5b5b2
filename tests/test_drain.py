"""Draining (SIGUSR1): no new allocations, live ones keep working, exit once they are gone.

The sans-IO part walks a scripted timeline (:mod:`turn_helpers`); the process part signals a
real ``stunturn serve`` on loopback, with one worker and with two (the supervisor forwards the
signal and exits once every worker has drained).

Behaviour under test (docs/operations.md, "Drain"):

* Allocate gets 300 Try Alternate with ALTERNATE-SERVER of the client's address family when
  ``--alternate-server`` gives one (RFC 8489 sections 10 and 14.15), else 508 Insufficient
  Capacity (RFC 8656 section 7.2); signed, since the request was authenticated first. A
  retransmitted Allocate of an allocation made before the drain still gets its success.
* Refresh, CreatePermission, ChannelBind, data and Binding keep working; a Refresh grants at
  most the time left until the drain deadline.
* The drain ends when the last allocation ends, or at the deadline, which deletes what is left
  ("drain timeout").
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from dataclasses import replace
from typing import Any

import pytest
from conftest import StartServer
from helpers import ServerProcess, binding_request, free_port
from turn_client import TurnClient, error_of
from turn_helpers import (
    CLIENT2,
    PEER,
    SERVER,
    SERVER6,
    Harness,
    error_code,
    is_success,
    make_server,
)

from stunturn.config import ConfigError, Endpoint, build_config
from stunturn.server import SendTo
from stunturn.stun import MessageClass, Method, check_integrity, decode
from stunturn.stun.attributes import AlternateServer, Lifetime, Software, XorMappedAddress

CLIENT6 = ("2001:db8:1::7", 40000)
ALT4 = ("192.0.2.50", 3478)
ALT6 = ("2001:db8::50", 3479)


def draining_server(deadline: float = 100.0, **kwargs: Any) -> tuple[Harness, list[float]]:
    """A harness whose TURN service drains from time 0 until ``deadline``; the list collects
    the times at which it reported being drained."""
    server = make_server(**kwargs)
    drained: list[float] = []
    server.turn.on_drained = lambda: drained.append(server.now)
    return server, drained


def with_alternates(server: Harness, *alternates: tuple[str, int]) -> None:
    server.turn.config = replace(server.turn.config, alternate_servers=alternates)


# --- configuration ------------------------------------------------------------------------------


def test_drain_options() -> None:
    config = build_config(
        {"drain-timeout": "30", "alternate-server": ["192.0.2.50", "[2001:db8::50]:3479"]}
    )
    assert config.drain_timeout == 30.0
    assert config.alternate_server == (Endpoint(*ALT4), Endpoint(*ALT6))
    assert build_config({}).drain_timeout == 600.0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"drain-timeout": 0}, "must be >= 1"),
        ({"drain-timeout": "soon"}, "must be a number"),
        ({"alternate-server": "turn.example.org:3478"}, "not an IP address"),
        ({"alternate-server": "0.0.0.0:3478"}, "not an address clients can reach"),
        ({"alternate-server": "192.0.2.50:0"}, "not an address clients can reach"),
        ({"alternate-server": ["192.0.2.50", "192.0.2.51"]}, "at most one IPv4"),
    ],
)
def test_bad_drain_options_are_refused(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(setting)
    assert info.value.field == next(iter(setting)) and message in str(info.value)


# --- Allocate while draining -----------------------------------------------------------------


def test_allocate_while_draining_is_508_signed() -> None:
    server, _ = draining_server()
    alice = server.client()
    assert is_success(alice.allocate())
    server.turn.start_drain(server.now, 100.0)
    bob = server.client("bob", address=CLIENT2)
    response = bob.allocate()
    assert error_code(response) == 508
    assert bob.verified(response), "the refusal of an authenticated request is signed"
    assert len(server.turn.allocations) == 1
    assert server.core.error_codes[508] == 1


def test_allocate_while_draining_names_the_alternate_server_of_the_clients_family() -> None:
    server, _ = draining_server(relay_ips=("192.0.2.100", "2001:db8::100"))
    with_alternates(server, ALT4, ALT6)
    server.turn.start_drain(server.now, 100.0)
    v4 = server.client()
    response = v4.allocate()
    assert error_code(response) == 300 and v4.verified(response)
    assert response.get(AlternateServer) == AlternateServer(*ALT4)
    v6 = server.client(address=CLIENT6, local=SERVER6)
    response = v6.allocate()
    assert error_code(response) == 300 and v6.verified(response)
    assert response.get(AlternateServer) == AlternateServer(*ALT6)
    assert not server.turn.allocations


def test_no_alternate_of_the_clients_family_is_508() -> None:
    server, _ = draining_server(relay_ips=("192.0.2.100", "2001:db8::100"))
    with_alternates(server, ALT4)
    server.turn.start_drain(server.now, 100.0)
    response = server.client(address=CLIENT6, local=SERVER6).allocate()
    assert error_code(response) == 508
    assert response.get(AlternateServer) is None


def test_unauthenticated_allocate_while_draining_is_still_challenged() -> None:
    """No 300 before authentication: an unsigned redirect could be forged (RFC 8489 sec. 10)."""
    server, _ = draining_server()
    with_alternates(server, ALT4)
    server.turn.start_drain(server.now, 100.0)
    client = server.client()
    response = client.exchange(client.encode(Method.ALLOCATE, sign=False))
    assert error_code(response) == 401 and response.get(AlternateServer) is None


def test_retransmitted_allocate_from_before_the_drain_gets_the_same_success() -> None:
    server, _ = draining_server()
    client = server.client()
    tid = bytes(range(12))
    assert is_success(client.allocate(tid=tid))
    first = client.last_raw
    server.turn.start_drain(server.now, 100.0)
    assert is_success(client.allocate(tid=tid))
    assert client.last_raw == first


# --- what keeps working ------------------------------------------------------------------------


def test_live_allocation_keeps_working_while_draining() -> None:
    server, drained = draining_server()
    client = server.client()
    assert is_success(client.allocate())
    server.turn.start_drain(server.now, 100.0)
    assert is_success(client.create_permission(PEER))
    assert is_success(client.channel_bind(0x4000, PEER))
    [action] = client.channel_data(0x4000, b"media")
    assert action.peer == PEER and action.data == b"media"  # type: ignore[union-attr]
    # Binding is answered as ever, by the fast path and by the general one.
    for attrs in ((), (Software("general path"),)):
        tid, request = binding_request(*attrs)
        [answer] = server.core.handle_udp(request, SERVER, CLIENT2, server.now)
        assert isinstance(answer, SendTo)
        response = decode(answer.data)
        assert response.cls is MessageClass.SUCCESS and response.transaction_id == tid
        assert response.get(XorMappedAddress) == XorMappedAddress(*CLIENT2)
    assert not drained


def test_refresh_while_draining_is_capped_at_the_deadline() -> None:
    server, drained = draining_server()
    client = server.client()
    assert is_success(client.allocate())
    server.turn.start_drain(server.now, 100.0)
    server.step(10.0)
    response = client.refresh(3600)
    assert response.get(Lifetime) == Lifetime(90)
    assert server.allocation(client).expires == 100.0
    assert client.refresh().get(Lifetime) == Lifetime(90)  # the default (600) too
    server.step(89.5)
    assert client.refresh(600).get(Lifetime) == Lifetime(1)  # rounded up, never 0
    assert not drained


def test_refresh_without_drain_is_not_capped() -> None:
    server = make_server()
    client = server.client()
    assert is_success(client.allocate())
    assert client.refresh(3600).get(Lifetime) == Lifetime(3600)


# --- the end of the drain ---------------------------------------------------------------------


def test_drain_ends_with_the_last_allocation(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stunturn.turn")
    server, drained = draining_server()
    alice, bob = server.client(), server.client("bob", address=CLIENT2)
    assert is_success(alice.allocate()) and is_success(bob.allocate())
    server.step(5.0)
    server.turn.start_drain(server.now, 105.0)
    assert is_success(alice.refresh(0))
    assert not drained and not server.turn.drained
    server.step(2.0)
    assert is_success(bob.refresh(0))
    assert drained == [7.0] and server.turn.drained
    events = [r.__dict__ for r in caplog.records if hasattr(r, "event")]
    started = next(e for e in events if e["event"] == "drain_started")
    finished = next(e for e in events if e["event"] == "drain_finished")
    assert (started["allocations"], started["timeout"]) == (2, 100.0)
    assert finished["duration"] == 2.0


def test_deadline_deletes_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stunturn.turn")
    server, drained = draining_server()
    alice, bob = server.client(), server.client("bob", address=CLIENT2)
    assert is_success(alice.allocate()) and is_success(bob.allocate())
    server.turn.start_drain(server.now, 100.0)
    assert server.core.next_deadline() == 100.0  # the one timer covers the deadline
    server.step(99.0)
    assert is_success(alice.refresh())
    assert len(server.turn.allocations) == 2 and not drained
    server.step(1.0)
    assert not server.turn.allocations and drained == [100.0]
    assert not server.binder.bound, "relay sockets closed"
    reasons = [r.__dict__.get("reason") for r in caplog.records if r.msg == "allocation ended"]
    assert reasons == ["drain timeout", "drain timeout"]


def test_expiry_during_the_drain_ends_it() -> None:
    server, drained = draining_server(default_lifetime=600)
    client = server.client()
    assert is_success(client.allocate())
    server.turn.start_drain(server.now, 1000.0)
    server.step(599.0)
    assert not drained
    server.step(1.0)
    assert drained == [600.0]


def test_drain_without_allocations_is_drained_at_once_and_idempotent() -> None:
    server, drained = draining_server()
    server.turn.start_drain(server.now, 50.0)
    assert drained == [0.0] and server.turn.drained
    server.turn.start_drain(server.now, 500.0)  # a second SIGUSR1 changes nothing
    assert drained == [0.0] and server.turn.drain_deadline == 50.0


# --- a real server -------------------------------------------------------------------------------

ALICE = ("alice", "alice-pw")


def serve_args(*extra: str) -> list[str]:
    return [
        "--listen", "127.0.0.1:0", "--no-tcp", "--user", f"{ALICE[0]}:{ALICE[1]}",
        "--allow-loopback-peers", "--log-format", "json", *extra,
    ]  # fmt: skip


def events(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    out = []
    for line in server.stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                out.append(record)
    return out


def wait_events(server: ServerProcess, name: str, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(events(server, name)) < count:
        assert time.monotonic() < deadline, f"{count} x {name} not logged:\n{server.stderr}"
        time.sleep(0.02)


def binding_answered(target: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        tid, request = binding_request()
        for _ in range(3):
            sock.sendto(request, target)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                continue
            msg = decode(data)
            return msg.transaction_id == tid and msg.cls is MessageClass.SUCCESS
    return False


def test_sigusr1_one_worker(stunturn_server: StartServer) -> None:
    server = stunturn_server(*serve_args("--workers", "1", "--drain-timeout", "60"))
    target = server.addr("udp")
    with (
        TurnClient(target, *ALICE) as live,
        TurnClient(target, *ALICE) as late,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
    ):
        peer.bind(("127.0.0.2", 0))  # not the server's own IP
        peer.settimeout(2.0)
        live.allocate()
        server.proc.send_signal(signal.SIGUSR1)
        wait_events(server, "drain_started", 1)
        refused = late.allocate(check=False)
        assert error_of(refused) == 508 and refused.get(AlternateServer) is None
        assert check_integrity(refused, late.key), "signed"
        assert binding_answered(target)
        lifetime = live.refresh(600).get(Lifetime)
        assert lifetime is not None and 55 <= lifetime.seconds <= 60
        live.create_permission("127.0.0.2")
        live.send_indication(peer.getsockname(), b"still relaying")
        assert peer.recvfrom(2048)[0] == b"still relaying"
        assert server.proc.poll() is None
        live.refresh(0)
        assert server.stop(sig=None, timeout=10.0) == 0
    assert len(events(server, "drain_finished")) == 1
    assert "stopped (" in server.stdout


def test_sigusr1_two_workers(stunturn_server: StartServer) -> None:
    """The supervisor passes SIGUSR1 on; a worker whose allocations are gone keeps answering
    Binding (its listener stays in the SO_REUSEPORT group) until every worker has drained,
    then the server exits 0. No worker is restarted."""
    alternate = f"127.0.0.1:{free_port()}"
    server = stunturn_server(*serve_args("--workers", "2", "--alternate-server", alternate))
    target = server.addr("udp")
    clients = [TurnClient(target, *ALICE) for _ in range(4)]
    try:
        for client in clients:
            client.allocate()
        server.proc.send_signal(signal.SIGUSR1)
        wait_events(server, "drain_started", 2)
        assert len({e["pid"] for e in events(server, "drain_started")}) == 2
        with TurnClient(target, *ALICE) as late:
            refused = late.allocate(check=False)
            assert error_of(refused) == 300 and check_integrity(refused, late.key)
            assert refused.get(AlternateServer) == AlternateServer("127.0.0.1", int(alternate[10:]))
        for client in clients[:-1]:
            client.refresh(0)
        # Fresh source ports hash to either worker: all are answered, drained or not.
        assert all(binding_answered(target) for _ in range(8))
        assert server.proc.poll() is None, "exited before the last allocation ended"
        clients[-1].refresh(0)
        assert server.stop(sig=None, timeout=15.0) == 0
    finally:
        for client in clients:
            client.close()
    assert len(events(server, "drain_finished")) == 2
    assert "restarted" not in server.stderr and "exited with code" not in server.stderr


def test_drain_timeout_ends_the_rest(stunturn_server: StartServer) -> None:
    server = stunturn_server(*serve_args("--workers", "1", "--drain-timeout", "1"))
    with TurnClient(server.addr("udp"), *ALICE) as client:
        client.allocate()
        started = time.monotonic()
        server.proc.send_signal(signal.SIGUSR1)
        assert server.stop(sig=None, timeout=10.0) == 0
        assert time.monotonic() - started >= 0.9
    [ended] = events(server, "allocation_ended")
    assert ended["reason"] == "drain timeout"
