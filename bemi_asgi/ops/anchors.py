"""Where `prune` cut the hash chains (`worker/chain.py`): an anchor per chain, so the rest still verifies.

After old changes are deleted, each chain's first link that still covers a stored change is found; the links wholly
before it go, and `bemi.chain_anchors` records where the chain now starts: that link, the entry of its first
remaining change, and the chain hash just before it (the hash of the last pruned change). `bemi-asgi verify` starts
there. An anchor says "what came before was removed", not what it was: the hashes up to it are gone with the links.
"""

from __future__ import annotations

from typing import Any

import psycopg

__all__ = ["anchor_chains"]

_HASH_BYTES = 32


def anchor_chains(conn: psycopg.Connection[Any]) -> int:
    """Anchor every chain whose start was pruned; how many anchors were recorded."""
    if conn.execute("SELECT to_regclass('bemi.chain') IS NULL").fetchone() == (True,):
        return 0
    chains = conn.execute("SELECT DISTINCT stream, kind FROM bemi.chain").fetchall()
    return sum(_anchor(conn, stream, kind) for stream, kind in chains)


def _anchor(conn: psycopg.Connection[Any], stream: int, kind: str) -> int:
    anchor = conn.execute(
        "SELECT seq, entry FROM bemi.chain_anchors WHERE stream = %s AND kind = %s ORDER BY seq DESC, entry DESC"
        " LIMIT 1",
        [stream, kind],
    ).fetchone()
    start_seq, start_entry = anchor if anchor is not None else (1, 0)
    last_head: tuple[int, bytes] | None = None
    links = conn.execute(
        "SELECT seq, previous, hashes FROM bemi.chain WHERE stream = %s AND kind = %s AND seq >= %s ORDER BY seq",
        [stream, kind, start_seq],
    )
    for seq, previous, hashes in links.fetchall():
        # The 0-based entry of the link's first change still stored (removals name no stored change).
        row = conn.execute(
            "SELECT min(k.i) - 1 FROM bemi.chain l, unnest(l.commit_lsns, l.ordinals) WITH ORDINALITY"
            " AS k(key_lsn, key_ordinal, i)"
            " JOIN bemi.changes c ON c.stream = %s AND c.commit_lsn = k.key_lsn AND c.ordinal = k.key_ordinal"
            " WHERE l.stream = %s AND l.kind = %s AND l.seq = %s",
            [stream, stream, kind, seq],
        ).fetchone()
        first = row[0] if row is not None else None
        if first is None:
            last_head = seq, bytes(hashes)[-_HASH_BYTES:]
            continue
        if (seq, first) == (start_seq, start_entry) or (anchor is None and (seq, first) == (1, 0)):
            return 0  # nothing pruned since the last anchor
        before = bytes(previous) if first == 0 else bytes(hashes)[(first - 1) * _HASH_BYTES : first * _HASH_BYTES]
        return _record(conn, stream, kind, seq, first, before)
    if last_head is None:
        return 0
    # Every link's changes are gone: the chain goes on after its last hash.
    seq, head = last_head
    return _record(conn, stream, kind, seq + 1, 0, head)


def _record(conn: psycopg.Connection[Any], stream: int, kind: str, seq: int, entry: int, previous: bytes) -> int:
    with conn.transaction():
        conn.execute(
            "INSERT INTO bemi.chain_anchors (stream, kind, seq, entry, hash) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            [stream, kind, seq, entry, previous],
        )
        conn.execute("DELETE FROM bemi.chain WHERE stream = %s AND kind = %s AND seq < %s", [stream, kind, seq])
    return 1
