"""UDP relay sockets live in one epoll set per worker (stunturn.aio.relay.RelayPoller): each
allocation adds its socket, and ending the allocation takes it out and closes it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from helpers import InProcessServer
from turn_client import DataIndication, TurnClient

from stunturn.config import build_config

USER, PASSWORD = "alice", "alice-pw"
COUNT = 12


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def server(request: pytest.FixtureRequest) -> Iterator[InProcessServer]:
    config = build_config(
        {
            "listen": ["127.0.0.1:0"],
            "workers": 1,
            "user": [f"{USER}:{PASSWORD}"],
            "relay_ip": ["127.0.0.1"],
            "allow_loopback_peers": True,
            "user_quota": 0,
            "ip_quota": 0,
        }
    )
    with InProcessServer(config, use_uvloop=request.param) as srv:
        srv.start()
        yield srv


def open_fds() -> set[int]:
    # The listing's own descriptor is closed once listdir returns: keep the ones still open.
    return {int(fd) for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


def test_sockets_join_and_leave_the_set(server: InProcessServer) -> None:
    worker = server.worker
    assert worker is not None and worker.relay_binder is not None
    poller = worker.relay_binder.poller
    target = server.addr()
    fds_before = open_fds()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    clients = [TurnClient(target, USER, PASSWORD) for _ in range(COUNT)]
    try:
        for client in clients:
            client.allocate()
            client.create_permission("127.0.0.1")
        assert len(poller.handlers) == COUNT
        # Every relay socket is served: a datagram from the peer to each relayed address
        # reaches its own client, also when all of them are ready at once.
        for i, client in enumerate(clients):
            assert client.relayed is not None
            peer.sendto(b"to client %d" % i, client.relayed)
        for i, client in enumerate(clients):
            got = client.receive()
            assert isinstance(got, DataIndication), got
            assert got.data == b"to client %d" % i
        for client in clients:
            client.refresh(0)
        assert poller.handlers == {}
        # The relay sockets are closed, not only forgotten.
        leaked = open_fds() - fds_before - {peer.fileno()} - {c.sock.fileno() for c in clients}
        assert leaked == set()
    finally:
        peer.close()
        for client in clients:
            client.close()
