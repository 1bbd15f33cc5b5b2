"""UDP relay sockets live in one epoll set per worker (stunturn.aio.relay.RelayPoller): each
allocation adds its socket, and ending the allocation takes it out and closes it. ChannelData
goes out one datagram at a time (``sendto``) or as a batch (``sendmmsg``) depending on how many
arrived together; both ways deliver every payload, in order."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from helpers import InProcessServer
from turn_client import ChannelData, DataIndication, TurnClient

from stunturn.config import build_config

USER, PASSWORD = "alice", "alice-pw"
PEER_IP = "127.0.0.2"
"""Not the server's address: a peer port on it could fall in the relay range, which the peer
policy refuses as the server's own."""
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
    peer.bind((PEER_IP, 0))
    clients = [TurnClient(target, USER, PASSWORD) for _ in range(COUNT)]
    try:
        for client in clients:
            client.allocate()
            client.create_permission(PEER_IP)
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


def test_channel_data_alone_and_in_bursts(server: InProcessServer) -> None:
    target = server.addr()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((PEER_IP, 0))
    peer.settimeout(2.0)
    client = TurnClient(target, USER, PASSWORD)
    try:
        client.allocate()
        client.channel_bind(0x4001, peer.getsockname())
        assert client.relayed is not None
        sent: list[bytes] = []
        for round_ in range(3):
            # One lone datagram, then a burst that the server reads in one batch or a few.
            single = b"single %d" % round_
            client.send_channel(0x4001, single)
            assert peer.recvfrom(2048) == (single, client.relayed)
            burst = [b"burst %d.%d " % (round_, i) + bytes(i) for i in range(40)]
            for payload in burst:
                client.send_channel(0x4001, payload)
            sent = [peer.recvfrom(2048)[0] for _ in burst]
            assert sent == burst
            # And back: peer to client, alone and in a burst.
            peer.sendto(single, client.relayed)
            got = client.receive()
            assert isinstance(got, ChannelData) and got.data == single
            for payload in burst:
                peer.sendto(payload, client.relayed)
            back = []
            for _ in burst:
                item = client.receive()
                assert isinstance(item, ChannelData), item
                back.append(item.data)
            assert back == burst
        assert server.counters.send_failed == 0
    finally:
        peer.close()
        client.close()
