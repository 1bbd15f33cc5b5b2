"""The session events of docs/logging.md, checked against a real server's log.

The documented fields are read from the tables of docs/logging.md itself, so the page and the
server cannot drift apart: a real ``stunturn serve --log-format json`` relays a little traffic,
drains, and every JSON line is parsed; each documented field must be present with the
documented type, and no event may carry a field the page does not list.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

from conftest import StartServer
from turn_client import DataIndication, TurnClient

DOC = Path(__file__).resolve().parent.parent / "docs" / "logging.md"
COMMON = "every line"
EVENTS = ("allocation_created", "allocation_ended", "drain_started", "drain_finished")
PEER_IP = "127.0.0.2"
SENT, RECEIVED = 20, 15
"""Datagrams relayed client to peer and peer to client: more than the log has lines."""

_ROW = re.compile(r"^\| `([a-z_]+)` \| ([a-z\[\]]+) \|")
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "list[str]": (list,),
}


def documented() -> dict[str, dict[str, str]]:
    """{section: {field: type}} from the tables under "### Every line" and "### `event`"."""
    sections: dict[str, dict[str, str]] = {}
    current: str | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            current = None
            if line.startswith("### "):
                current = title.strip("`") if title.startswith("`") else title.lower()
                sections[current] = {}
            continue
        row = _ROW.match(line)
        if row is not None and current is not None:
            sections[current][row.group(1)] = row.group(2)
    return sections


def test_the_page_documents_every_event() -> None:
    doc = documented()
    assert set(doc) == {COMMON, *EVENTS}
    assert all(doc.values()), "a section without a field table"
    for fields in doc.values():
        assert set(fields.values()) <= set(_TYPES), fields


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def check_fields(record: dict[str, Any], fields: dict[str, str]) -> None:
    for name, kind in fields.items():
        assert name in record, f"{record.get('event', record['msg'])}: no {name!r} in {record}"
        value = record[name]
        assert isinstance(value, _TYPES[kind]) and not isinstance(value, bool), (name, value)
        items = record[name] if kind == "list[str]" else []
        assert all(isinstance(item, str) for item in items), (name, value)


def test_json_log_of_a_real_run_matches_the_page(stunturn_server: StartServer) -> None:
    server = stunturn_server(
        "--listen", "127.0.0.1:0", "--no-tcp", "--workers", "1", "--user", "alice:pw",
        "--allow-loopback-peers", "--log-format", "json", "--drain-timeout", "30",
    )  # fmt: skip
    with (
        TurnClient(server.addr("udp"), "alice", "pw") as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
    ):
        peer.bind((PEER_IP, 0))
        peer.settimeout(2.0)
        client.allocate()
        assert client.relayed is not None
        relayed = client.relayed
        local_host, local_port = client.local
        client.create_permission(PEER_IP)
        for i in range(SENT):
            client.send_indication(peer.getsockname(), b"x" * (10 + i))
        for _ in range(SENT):
            peer.recvfrom(2048)
        for i in range(RECEIVED):
            peer.sendto(b"y" * (100 + i), relayed)
        for _ in range(RECEIVED):
            assert isinstance(client.receive(2.0), DataIndication)
        server.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5.0
        while '"drain_started"' not in server.stderr:
            assert time.monotonic() < deadline, server.stderr
            time.sleep(0.02)
        client.refresh(0)
        assert server.stop(sig=None, timeout=10.0) == 0
    records = json_lines(server.stderr)
    doc = documented()
    for record in records:
        check_fields(record, doc[COMMON])
    by_event: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "event" in record:
            by_event.setdefault(record["event"], []).append(record)
    assert {name: len(found) for name, found in by_event.items()} == dict.fromkeys(EVENTS, 1)
    for name, [record] in by_event.items():
        check_fields(record, doc[name])
        extra = set(record) - set(doc[COMMON]) - set(doc[name]) - {"event"}
        assert not extra, f"{name} has fields docs/logging.md does not list: {extra}"
    # Nothing per packet: fewer lines in all than datagrams relayed.
    assert len(records) < RECEIVED, records

    created, ended = by_event["allocation_created"][0], by_event["allocation_ended"][0]
    assert created["client"] == ended["client"] == f"udp:{local_host}:{local_port}"
    assert created["relay"] == ended["relay"] == f"{relayed[0]}:{relayed[1]}"
    assert (created["session"], created["pid"]) == (ended["session"], ended["pid"])
    assert ended["user"] == "alice" and ended["reason"] == "refreshed to 0"
    assert ended["peers"] == [PEER_IP] and ended["peer_count"] == 1
    assert ended["bytes_to_peer"] == sum(10 + i for i in range(SENT))
    assert ended["packets_to_peer"] == SENT
    assert ended["bytes_to_client"] == sum(100 + i for i in range(RECEIVED))
    assert ended["packets_to_client"] == RECEIVED
    assert ended["duration"] > 0
    started, finished = by_event["drain_started"][0], by_event["drain_finished"][0]
    assert started["allocations"] == 1 and started["timeout"] == 30.0
    assert finished["duration"] >= 0


_TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO stunturn\.turn\[\d+\]: allocation (created|ended)"
    r" event=allocation_\1 session=\d+ user=alice "
)


def test_text_log_lines_look_as_documented(stunturn_server: StartServer) -> None:
    server = stunturn_server(
        "--listen", "127.0.0.1:0", "--no-tcp", "--workers", "1", "--user", "alice:pw",
    )  # fmt: skip
    with TurnClient(server.addr("udp"), "alice", "pw") as client:
        client.allocate()
        client.refresh(0)
    server.stop()
    found = [m.group(1) for m in map(_TEXT_LINE.match, server.stderr.splitlines()) if m]
    assert found == ["created", "ended"], server.stderr
