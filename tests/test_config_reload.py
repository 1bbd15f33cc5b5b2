"""SIGHUP reloads the configuration (`stunturn serve --config FILE`, one worker and two).

Users, quotas and the peer policy change without a restart and without dropping the live
allocations; an invalid file is refused (logged with its problems) and the running
configuration stays; a change that needs a restart (the realm) is logged and ignored.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import StartServer
from helpers import ServerProcess
from turn_client import TurnClient, error_of


def write(path: Path, users: list[str], user_quota: int, extra: str = "") -> None:
    quoted = ", ".join(f'"{u}"' for u in users)
    path.write_text(
        f'user = [{quoted}]\nuser-quota = {user_quota}\nrelay-ip = ["127.0.0.1"]\n'
        f"allow-loopback-peers = true\n{extra}"
    )


def hup_and_wait(server: ServerProcess, text: str, count: int) -> None:
    """SIGHUP, then wait until ``text`` is logged ``count`` more times (once per worker)."""
    before = server.stderr.count(text)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while server.stderr.count(text) < before + count:
        assert time.monotonic() < deadline, server.stderr[-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_users_quotas_and_policy(
    stunturn_server: StartServer, tmp_path: Path, workers: int
) -> None:
    path = tmp_path / "stunturn.toml"
    write(path, ["alice:pw-a"], user_quota=1)
    server = stunturn_server(
        "--config", str(path), "--listen", "127.0.0.1:0", "--workers", str(workers)
    )
    target = server.addr("udp")
    alice = TurnClient(target, "alice", "pw-a")
    alice.allocate()
    with TurnClient(target, "bob", "pw-b") as bob:
        assert error_of(bob.allocate(check=False)) == 401
    with TurnClient(target, "alice", "pw-a") as second:
        assert error_of(second.allocate(check=False)) == 486  # user quota 1

    # bob added, quota raised, alice kept.
    write(path, ["alice:pw-a", "bob:pw-b"], user_quota=3)
    hup_and_wait(server, "configuration reloaded", workers)
    assert "needs a restart" not in server.stderr
    with TurnClient(target, "bob", "pw-b") as bob:
        bob.allocate()
        bob.refresh(0)
    with TurnClient(target, "alice", "pw-a") as second:
        second.allocate()  # the quota is 3 now
        second.refresh(0)
    alice.refresh()  # the live allocation is untouched

    # A broken file is refused; everything keeps working as before.
    path.write_text('user = ["alice:pw-a"]\nuser-quota = -4\nworkers = "many"\n')
    hup_and_wait(server, "configuration reload refused", workers)
    assert "user-quota" in server.stderr and "workers" in server.stderr
    with TurnClient(target, "bob", "pw-b") as bob:
        bob.allocate()
        bob.refresh(0)

    # alice removed; a realm change needs a restart and is ignored.
    write(path, ["bob:pw-b"], user_quota=3, extra='realm = "elsewhere"\n')
    hup_and_wait(server, "configuration reloaded", workers)
    assert "realm changed, which needs a restart" in server.stderr
    with TurnClient(target, "alice", "pw-a") as third:
        assert error_of(third.allocate(check=False)) == 401
    # Her live allocation stays until its next refresh, which is refused.
    assert error_of(alice.refresh(check=False)) == 401
    alice.close()
    assert server.stop() == 0
