"""Tamper evidence: a hash chain over the stored changes of each stream, computed in the transaction that stores them.

Each stored change gets a chain hash, `h = H(previous h || commit_lsn || ordinal || digest)`, where `digest` is the
SHA-256 of the change's stored content as the destination holds it (`DIGEST_SQL`: jsonb and timestamps in their
canonical text, so the worker and `bemi-asgi verify` hash the same bytes whatever the JSON text sent) and `H` is
HMAC-SHA256 with a key the database does not hold (`BEMI_CHAIN_KEY`), or SHA-256 without one. The hashes of one
destination transaction are stored as one row of `bemi.chain` (a *link*: the changes' keys and their hashes, and
the hash before them), in that same transaction: a change and its hash are stored together or not at all.

Two chains per stream: `changes`, the worker's, in commit order (`(commit_lsn, ordinal)`, ordinals from 1), and
`baselines`, those `bemi-asgi backfill` stores in its own transactions (negative ordinals), in the order it writes
them. A backfill that replaces baselines it stored before (a restarted table whose key is hashed) records their
removal in its link: a removal's hash has an all-zero digest.

A stream is one source stream of `bemi.streams` (a source database's slot): each has its own chains, so several
workers storing into one destination never interleave their links.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import asyncpg

from .._exceptions import ConfigError

__all__ = [
    "CHAIN_KEY_ENV",
    "DIGEST_SQL",
    "GENESIS",
    "REMOVED",
    "ChainKind",
    "ChainState",
    "chain_hash",
    "chain_key",
    "key_id",
    "link",
]

#: The environment variable holding the chain's HMAC key (the worker, the backfill and verify read it).
CHAIN_KEY_ENV: Final = "BEMI_CHAIN_KEY"
MIN_CHAIN_KEY_BYTES: Final = 16
#: The hash before a chain's first change.
GENESIS: Final = bytes(32)
#: The digest of a removal (a baseline the backfill replaced).
REMOVED: Final = bytes(32)

ChainKind = Literal["changes", "baselines"]

#: The content a change's digest covers: every column of `bemi.changes` but `id`, as of this chain's version (a
#: column added later is not covered, so the history stored before it still verifies). Timestamps are hashed as UTC
#: text, jsonb in its canonical form: what the worker sent and what verify reads hash alike.
DIGEST_SQL: Final = (
    'sha256(convert_to(jsonb_build_array(primary_key, "before", "after", context, database, "schema", "table",'
    " operation, committed_at AT TIME ZONE 'UTC', queued_at AT TIME ZONE 'UTC', created_at AT TIME ZONE 'UTC',"
    " transaction_id, position, commit_lsn, ordinal)::text, 'UTF8'))"
)

_key_bytes: Final = struct.Struct(">qi").pack
_DIGEST_BYTES: Final = 32


def chain_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The chain key from `BEMI_CHAIN_KEY` (None when unset); ConfigError when it is too short to be secret."""
    value = (os.environ if environ is None else environ).get(CHAIN_KEY_ENV)
    if not value:
        return None
    key = value.encode()
    if len(key) < MIN_CHAIN_KEY_BYTES:
        raise ConfigError(
            f"{CHAIN_KEY_ENV} is {len(key)} bytes long: use at least {MIN_CHAIN_KEY_BYTES} random bytes, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key


def key_id(key: bytes | None) -> bytes:
    """What a link records of its key: enough to tell a wrong key from an edited change, nothing to forge with."""
    if key is None:
        return b""
    return hmac.new(key, b"bemi-asgi chain key id", hashlib.sha256).digest()[:8]


def chain_hash(key: bytes | None, previous: bytes, commit_lsn: int, ordinal: int, digest: bytes) -> bytes:
    """The chain hash of one change after `previous`."""
    message = previous + _key_bytes(commit_lsn, ordinal) + digest
    if key is None:
        return hashlib.sha256(message).digest()
    return hmac.digest(key, message, "sha256")  # the one-shot C implementation


@dataclass(slots=True)
class ChainState:
    """Where a chain stands: its last link's number and hash (0 and `GENESIS` before the first)."""

    stream: int
    kind: ChainKind
    key: bytes | None
    seq: int = 0
    head: bytes = GENESIS

    @classmethod
    async def load(cls, conn: asyncpg.Connection, stream: int, kind: ChainKind, key: bytes | None) -> ChainState:
        """The chain's state as stored; a pruned chain whose links are all gone continues from its anchor."""
        row = await conn.fetchrow(
            "SELECT seq, substring(hashes FROM length(hashes) - 31) AS head, previous FROM bemi.chain"
            " WHERE stream = $1 AND kind = $2 ORDER BY seq DESC LIMIT 1",
            stream,
            kind,
        )
        if row is not None:
            return cls(stream, kind, key, row["seq"], bytes(row["head"] or row["previous"]))
        anchor = await conn.fetchrow(
            "SELECT seq, hash FROM bemi.chain_anchors WHERE stream = $1 AND kind = $2 ORDER BY seq DESC LIMIT 1",
            stream,
            kind,
        )
        if anchor is not None:  # every link was pruned: the next one is the anchor's
            return cls(stream, kind, key, anchor["seq"] - 1, bytes(anchor["hash"]))
        return cls(stream, kind, key)


async def link(
    conn: asyncpg.Connection,
    state: ChainState,
    first_commit_lsn: int,
    last_commit_lsn: int,
    *,
    ordinals: tuple[int, int] | None = None,
    removed: Sequence[tuple[int, int]] = (),
) -> ChainState:
    """Chain the changes this transaction stored with commit LSNs in `[first_commit_lsn, last_commit_lsn]` (the
    ordinals of `state.kind`, or those in `ordinals`) and the `removed` keys, as one `bemi.chain` row; return the
    state after it.

    Run inside the transaction that stored them, after they were written: the digests are read back from what the
    destination holds. The caller keeps the returned state only once that transaction committed."""
    if ordinals is not None:
        # The writer numbered them itself (the backfill, which writes in a savepoint: its rows' xmin is the
        # savepoint's).
        which = f"ordinal BETWEEN {int(ordinals[0])} AND {int(ordinals[1])}"
    else:
        # Only the rows of this transaction: any other row in the range is not the writer's to vouch for.
        which = "ordinal > 0 AND xmin::text::bigint = pg_current_xact_id()::text::bigint % 4294967296"
    # One row for the whole batch (arrays and the digests end to end): decoding a record per change cost more.
    order = "ORDER BY commit_lsn, ordinal"
    found = await conn.fetchrow(
        f"SELECT array_agg(commit_lsn {order}) AS lsns, array_agg(ordinal {order}) AS ordinals,"
        f" string_agg({DIGEST_SQL}, ''::bytea {order}) AS digests FROM bemi.changes"
        f" WHERE stream = $1 AND commit_lsn BETWEEN $2 AND $3 AND {which}",
        state.stream,
        first_commit_lsn,
        last_commit_lsn,
    )
    stored: list[tuple[int, int, bytes]] = []
    if found is not None and found["lsns"] is not None:
        digests = found["digests"]
        stored = [
            (lsn, ordinal, digests[i * _DIGEST_BYTES : (i + 1) * _DIGEST_BYTES])
            for i, (lsn, ordinal) in enumerate(zip(found["lsns"], found["ordinals"], strict=True))
        ]
    entries: Iterable[tuple[int, int, bytes]] = (*((lsn, ordinal, REMOVED) for lsn, ordinal in removed), *stored)
    key, previous = state.key, state.head
    lsns: list[int] = []
    numbers: list[int] = []
    hashes: list[bytes] = []
    head = previous
    for lsn, ordinal, digest in entries:
        head = chain_hash(key, head, lsn, ordinal, digest)
        lsns.append(lsn)
        numbers.append(ordinal)
        hashes.append(head)
    if not hashes:
        return state
    seq = state.seq + 1
    await conn.execute(
        "INSERT INTO bemi.chain (stream, kind, seq, previous, commit_lsns, ordinals, removals, hashes, key_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        state.stream,
        state.kind,
        seq,
        previous,
        lsns,
        numbers,
        len(removed),
        b"".join(hashes),
        key_id(key),
    )
    return ChainState(state.stream, state.kind, key, seq, head)
