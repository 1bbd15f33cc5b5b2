"""TLS on its default port (5349 when TLS is configured without --tls-listen) and on 443.

These bind fixed ports on 127.0.0.1, so they skip when the port is taken (or, for 443, when
not allowed to bind it: it needs root or CAP_NET_BIND_SERVICE).
"""

from __future__ import annotations

import socket
import ssl

import pytest
from conftest import StartServer
from helpers import binding_request

from stunturn.stun import MessageClass, StreamFramer, decode


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tls_binding(port: int) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=3.0) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(binding_request()[1])
        framer = StreamFramer()
        while True:
            data = tls.recv(4096)
            if not data:
                return False
            frames = framer.feed(data)
            if frames:
                return decode(frames[0]).cls is MessageClass.SUCCESS


def test_self_signed_alone_listens_on_5349(stunturn_server: StartServer) -> None:
    if not port_free(5349):
        pytest.skip("127.0.0.1:5349 is taken")
    server = stunturn_server("--listen", "127.0.0.1:0", "--no-turn", "--self-signed")
    assert server.addr("tls") == ("127.0.0.1", 5349)
    assert tls_binding(5349)


def test_tls_on_443(stunturn_server: StartServer) -> None:
    if not port_free(443):
        pytest.skip("127.0.0.1:443 is taken or not bindable here (needs root)")
    server = stunturn_server(
        "--listen", "127.0.0.1:0", "--no-turn", "--self-signed", "--tls-listen", "127.0.0.1:443"
    )
    assert server.addr("tls") == ("127.0.0.1", 443)
    assert tls_binding(443)
