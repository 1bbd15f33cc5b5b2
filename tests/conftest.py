"""Fixtures for the loopback tests: servers that are always cleaned up."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Make ``import helpers`` work however pytest was invoked (rootdir, file paths, -p modes).
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Servers started without credentials create the default user store under XDG_DATA_HOME: keep
# that out of the real home directory, in a directory of this test session.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="stunturn-tests-xdg-")

from helpers import InProcessServer, ServerProcess

from stunturn.config import ServerConfig

StartServer = Callable[..., ServerProcess]
StartInProcess = Callable[..., InProcessServer]


@pytest.fixture
def stunturn_server() -> Iterator[StartServer]:
    """Factory: ``stunturn_server(*args, loop=, ready=, new_session=)`` runs ``stunturn serve``.

    Every process started is killed at teardown, whether the test passed or not.
    """
    started: list[ServerProcess] = []

    def start(
        *args: str, loop: str = "uvloop", ready: bool = True, new_session: bool = False
    ) -> ServerProcess:
        server = ServerProcess(list(args), loop=loop, new_session=new_session)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


@pytest.fixture
def inprocess_server() -> Iterator[StartInProcess]:
    """Factory: ``inprocess_server(config, use_uvloop=False)`` runs one worker in a thread."""
    started: list[InProcessServer] = []

    def start(config: ServerConfig, use_uvloop: bool = False) -> InProcessServer:
        server = InProcessServer(config, use_uvloop)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
