"""A cap on the gRPC connections one peer address holds (--max-connections-per-peer).

grpc bounds connections in all (--max-connections) but not per address, and it tells the
application nothing when it accepts one. Without a cap per address, one client holding
thousands of idle connections fills --max-connections and every other client's new
connection is refused. So the guard looks from outside, once a second: it reads the
kernel's table of the port's established TCP connections (/proc/net/tcp and tcp6), and
when an address holds more than the cap, it shuts down that address's newest
connections among this process's sockets. grpc sees each of them end and frees it.

What it does not stop: an address that reopens connections faster than the guard looks
fills the gaps in between; rate-limit new connections per address in the network
(a firewall or the mesh) for that. Behind a proxy or a mesh sidecar every caller shares
the proxy's address: raise the cap there.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import re
import socket
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rerank_service.observability.logging import CALLER_LOG_INTERVAL, RateLimit, get_logger

_log = get_logger("rerank_service.peer_guard")
ESTABLISHED = "01"
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
CHECK_EVERY = 1.0  # seconds between looks at the table


@dataclass(frozen=True, slots=True)
class Connection:
    peer: str  # the remote address, without its port
    inode: int  # the socket's inode: larger is newer


def established_connections(port: int, tables: Iterable[Path] = TCP_TABLES) -> list[Connection]:
    """Every established connection to local `port`, from the kernel's TCP tables."""
    # One regular expression over the whole table, not a split of every line: the table
    # holds every socket of the network namespace (thousands on a busy host), read once a second.
    rows = _established_rows(port)
    found: list[Connection] = []
    for table in tables:
        try:
            text = table.read_text()
        except OSError:
            continue  # no IPv6, or no /proc: nothing to look at
        found.extend(Connection(_address(remote), int(inode)) for remote, inode in rows.findall(text))
    return found


@functools.lru_cache(maxsize=64)
def _established_rows(port: int) -> re.Pattern[str]:
    """A row of /proc/net/tcp{,6} (`sl: local rem st tx:rx tr:when retrnsmt uid timeout inode`)
    of an established connection to local `port`: its remote address and its inode."""
    # It starts with the local port, a literal the engine finds fast. A remote port equal to
    # it cannot match: a remote address is followed by the state, not by an address.
    return re.compile(rf":{port:04X} ([0-9A-F]+):[0-9A-F]{{4}} {ESTABLISHED}(?: +\S+){{5}} +(\d+)")


def excess(connections: Iterable[Connection], cap: int) -> dict[str, list[int]]:
    """The newest connections (inodes) of each address past `cap`, by address."""
    by_peer: dict[str, list[int]] = defaultdict(list)
    for connection in connections:
        by_peer[connection.peer].append(connection.inode)
    return {peer: sorted(inodes)[cap:] for peer, inodes in by_peer.items() if len(inodes) > cap}


def shut_down(inodes: set[int]) -> int:
    """Shut down this process's sockets among `inodes`; how many it found."""
    shut = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if not target.startswith("socket:[") or int(target[8:-1]) not in inodes:
            continue
        try:
            # On a duplicate: grpc owns the descriptor and closes it once it sees the end.
            with socket.socket(fileno=os.dup(int(name))) as connection:
                connection.shutdown(socket.SHUT_RDWR)
            shut += 1
        except OSError:
            continue
    return shut


class PeerGuard:
    """Keeps each address at `cap` connections to `port` at most, looking once a second."""

    def __init__(self, port: int, cap: int) -> None:
        self.port = port
        self.cap = cap
        self.shut = 0  # connections shut down so far
        self._task: asyncio.Task[None] | None = None
        self._warnings = RateLimit(CALLER_LOG_INTERVAL)  # bounded, whatever the addresses

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="peer-guard")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def check(self) -> int:
        """One look: shut down what is over the cap; how many."""
        over = excess(established_connections(self.port), self.cap)
        if not over:
            return 0
        shut = shut_down({inode for inodes in over.values() for inode in inodes})
        self.shut += shut
        for peer, inodes in over.items():
            left_out = self._warnings.allow(peer)
            if left_out is not None:
                _log.warning(
                    "connections over the cap closed",
                    peer=peer,
                    closed=len(inodes),
                    cap=self.cap,
                    setting="--max-connections-per-peer",
                    left_out=left_out,
                )
        return shut

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # the guard must never take the server down
                _log.exception("peer guard failed")


@functools.lru_cache(maxsize=4096)  # a peer's many connections share its address
def _address(hex_address: str) -> str:
    """/proc/net/tcp's address (32-bit words in host order, hex) as text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
