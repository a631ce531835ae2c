"""The peer guard's reading of the kernel's TCP tables and its choice of what to close."""

from __future__ import annotations

import socket
from pathlib import Path

from rerank_service.api.grpc.peer_guard import Connection, established_connections, excess

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _row(local: str, remote: str, state: str, inode: int) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n"


def test_established_connections_to_the_port_are_read_with_their_peer_address(tmp_path: Path) -> None:
    tcp = tmp_path / "tcp"
    tcp.write_text(
        HEADER
        + _row("0100007F:C350", "0200007F:D431", "01", 101)  # 127.0.0.2 -> :50000, established
        + _row("0100007F:C350", "0100007F:D432", "01", 102)  # 127.0.0.1
        + _row("0100007F:C350", "00000000:0000", "0A", 103)  # the listening socket
        + _row("0100007F:C351", "0200007F:D433", "01", 104)  # another port
        + _row("0100007F:C350", "0200007F:D434", "06", 105)  # TIME_WAIT
    )
    tcp6 = tmp_path / "tcp6"
    tcp6.write_text(
        HEADER
        # ::ffff:10.1.2.3 (an IPv4 client on a dual-stack socket) and ::1
        + _row("00000000000000000000000001000000:C350", "0000000000000000FFFF00000302010A:D435", "01", 106)
        + _row("00000000000000000000000001000000:C350", "00000000000000000000000001000000:D436", "01", 107)
    )

    found = established_connections(50000, (tcp, tcp6, tmp_path / "missing"))

    assert found == [
        Connection("127.0.0.2", 101),
        Connection("127.0.0.1", 102),
        Connection("10.1.2.3", 106),
        Connection("::1", 107),
    ]


def test_excess_is_each_address_newest_connections_past_the_cap() -> None:
    connections = [Connection("a", inode) for inode in (5, 1, 9, 3)] + [
        Connection("b", 2),
        Connection("b", 4),
    ]

    assert excess(connections, 2) == {"a": [5, 9]}
    assert excess(connections, 4) == {}


def test_this_machines_own_table_shows_a_live_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)):
            accepted, _ = listener.accept()
            with accepted:
                found = established_connections(port)

    assert [connection.peer for connection in found] == ["127.0.0.2"]
