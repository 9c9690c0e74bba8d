"""nginx's consistent-hash ring (`hash KEY consistent;`), reproduced to predict which replica gets a key.

nginx builds a ketama ring from each `server` entry *as written in the config* (`127.0.0.1:50100`): 160 points
per unit of weight, point n being crc32(host, NUL, port, point n-1 as 4 little-endian bytes), sorted; a key goes
to the first point at or above crc32(key), wrapping around (ngx_http_upstream_hash_module.c,
`ngx_http_upstream_init_chash_peer` / `ngx_http_upstream_get_chash_peer`). On a failed peer nginx moves on to
the next point, so a dead replica's keys spread over the others while every other key stays where it was.

The placement depends only on the names and weights, never on load or memory: with a handful of pairs the
ring can put more pairs on one replica than its memory holds. `Ring.owners` shows that before traffic does, so
an operator can change names or weights (the fleet's tests check that nginx really routes as predicted).
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

POINTS_PER_WEIGHT = 160


@dataclass(frozen=True)
class Ring:
    hashes: tuple[int, ...]  # sorted, unique
    servers: tuple[str, ...]  # the server owning each point

    @classmethod
    def nginx(cls, servers: Sequence[str], weights: Mapping[str, int] | None = None) -> Ring:
        """The ring nginx builds for `server` entries `servers` (e.g. "127.0.0.1:50100"), weight 1 unless given."""
        points: list[tuple[int, int, str]] = []
        for order, server in enumerate(servers):
            host, port = _split(server)
            base = host + b"\0" + port
            previous = 0
            for _ in range(POINTS_PER_WEIGHT * (weights or {}).get(server, 1)):
                previous = zlib.crc32(base + struct.pack("<I", previous))
                points.append((previous, order, server))
        # nginx sorts by hash alone (qsort, not stable); equal hashes between servers are vanishingly rare
        # and nginx keeps one of them, so the first in config order is an approximation only there.
        points.sort()
        hashes: list[int] = []
        owners: list[str] = []
        for value, _order, server in points:
            if hashes and hashes[-1] == value:
                continue
            hashes.append(value)
            owners.append(server)
        return cls(tuple(hashes), tuple(owners))

    def owner(self, key: str, down: Iterable[str] = ()) -> str:
        """The server nginx sends `key` to, skipping servers in `down` the way nginx walks past failed peers."""
        skip = set(down)
        start = bisect.bisect_left(self.hashes, zlib.crc32(key.encode()))
        for step in range(len(self.hashes)):
            server = self.servers[(start + step) % len(self.hashes)]
            if server not in skip:
                return server
        raise ValueError("every server is down")

    def owners(self, keys: Iterable[str], down: Iterable[str] = ()) -> dict[str, str]:
        """Each key's server."""
        gone = tuple(down)
        return {key: self.owner(key, gone) for key in keys}


def _split(server: str) -> tuple[bytes, bytes]:
    """nginx's split of a server name: a trailing ":digits" is the port; "unix:PATH" has none."""
    raw = server.encode()
    if raw[:5].lower() == b"unix:":
        return raw[5:], b""
    host, sep, port = raw.rpartition(b":")
    if sep and port.isdigit():
        return host, port
    return raw, b""
