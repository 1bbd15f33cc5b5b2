"""SIGHUP reloads the TLS certificate without dropping connections (`stunturn serve`, one
worker and two).

The certificate files are replaced on disk and the server gets SIGHUP: new handshakes present
the new certificate, a connection opened before keeps working (and keeps its session), and an
unreadable new certificate is refused, logged, and the previous one stays in use.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from conftest import StartServer
from helpers import ServerProcess
from helpers import binding_request as binding_pair

from stunturn.aio.tls import make_self_signed
from stunturn.stun import Address, MessageClass, StreamFramer, decode


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test compares fingerprints itself
    return ctx


def open_tls(target: Address) -> ssl.SSLSocket:
    raw = socket.create_connection(target, timeout=5.0)
    return client_context().wrap_socket(raw)


def fingerprint_of(tls: ssl.SSLSocket) -> str:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return hashlib.sha256(der).hexdigest()


def binding_over(tls: ssl.SSLSocket) -> bool:
    tls.sendall(binding_pair()[1])
    framer = StreamFramer()
    while True:
        data = tls.recv(4096)
        if not data:
            return False
        frames = framer.feed(data)
        if frames:
            return decode(frames[0]).cls is MessageClass.SUCCESS


def new_fingerprint_seen(target: Address, want: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open_tls(target) as tls:
            if fingerprint_of(tls) == want:
                return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_certificate(
    stunturn_server: StartServer, tmp_path: Path, workers: int
) -> None:
    first_dir, second_dir, live = (tmp_path / n for n in ("first", "second", "live"))
    for d in (first_dir, second_dir, live):
        d.mkdir()
    cert1, key1, _ = make_self_signed(first_dir, names=("localhost",), ips=("127.0.0.1",))
    cert2, key2, _ = make_self_signed(second_dir, names=("localhost",), ips=("127.0.0.1",))
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(cert1, cert)
    shutil.copy(key1, key)
    server: ServerProcess = stunturn_server(
        "--listen",
        "127.0.0.1:0",
        "--no-turn",
        "--workers",
        str(workers),
        "--tls-listen",
        "127.0.0.1:0",
        "--cert",
        str(cert),
        "--key",
        str(key),
    )
    target = server.addr("tls")
    old = [open_tls(target) for _ in range(4)]  # with two workers, some land on each
    assert {fingerprint_of(t) for t in old} == {file_fingerprint(Path(cert1))}

    shutil.copy(cert2, cert)
    shutil.copy(key2, key)
    server.proc.send_signal(signal.SIGHUP)
    assert new_fingerprint_seen(target, file_fingerprint(Path(cert2)))
    for _ in range(6):  # every worker reloaded: no handshake gets the old one any more
        with open_tls(target) as tls:
            assert fingerprint_of(tls) == file_fingerprint(Path(cert2))
    assert all(binding_over(t) for t in old), "a connection from before the reload broke"

    # A broken certificate, then a certificate with the wrong key, are refused; the current
    # one stays in use.
    for failures, (cert_text, key_text) in enumerate(
        [("not a certificate\n", Path(key2).read_text()),
         (Path(cert1).read_text(), Path(key2).read_text())], start=1
    ):  # fmt: skip
        cert.write_text(cert_text)
        key.write_text(key_text)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5.0
        while server.stderr.count("certificate reload failed") < workers * failures:
            assert time.monotonic() < deadline, server.stderr
            time.sleep(0.05)
        for _ in range(4):
            with open_tls(target) as tls:
                assert fingerprint_of(tls) == file_fingerprint(Path(cert2))
                assert binding_over(tls)
    assert all(binding_over(t) for t in old)
    for tls in old:
        tls.close()
    assert server.stop() == 0
