"""Tamper evidence: a hash chain over the stored changes of each stream, computed in the transaction that stores them.

Each stored change gets a chain hash, `h = H(previous h || commit_lsn || ordinal || digest)`, where `digest` is the
SHA-256 of the change's stored content as the destination prints it (`DIGEST_SQL`: jsonb and timestamps in their
canonical text) and `H` is HMAC-SHA256 with a key the database does not hold (`BEMI_CHAIN_KEY`), or SHA-256
without one. The worker sends jsonb as the destination prints it (`jsonb.py`), so it computes each digest from the
text it sent (`BinaryCopy`), without reading the rows back; `bemi-asgi verify` computes it from what is stored, and
the backfill reads its own rows' digests back (`stored_digests`). The hashes of one
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

import functools
import hashlib
import hmac
import os
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Literal

import asyncpg

from .._exceptions import ConfigError
from .._hmac import hmac_sha256
from .pgoutput import PG_EPOCH

__all__ = [
    "CHAIN_KEY_ENV",
    "DIGEST_SQL",
    "GENESIS",
    "LINK_CHANGES",
    "REMOVED",
    "ChainHasher",
    "ChainKind",
    "ChainState",
    "Entry",
    "Link",
    "chain_hasher",
    "chain_key",
    "digest_timestamp",
    "key_id",
    "link",
    "stored_digests",
]

#: The environment variable holding the chain's HMAC key (the worker, the backfill and verify read it).
CHAIN_KEY_ENV: Final = "BEMI_CHAIN_KEY"
MIN_CHAIN_KEY_BYTES: Final = 16
#: The most changes one `bemi.chain` row holds: a larger batch is linked in several (bounded memory while stored).
LINK_CHANGES: Final = 20_000
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


#: `hash(previous, commit_lsn, ordinal, digest)`: the chain hash of one change after `previous`.
ChainHasher = Callable[[bytes, int, int, bytes], bytes]


@functools.cache
def chain_hasher(key: bytes | None) -> ChainHasher:
    """The chain hash for `key`: HMAC-SHA256 with the key's padded blocks hashed once (`_hmac`: a third of
    `hmac.digest`'s cost on the worker's hot path), or SHA-256 without a key."""
    if key is None:

        def plain(previous: bytes, commit_lsn: int, ordinal: int, digest: bytes) -> bytes:
            return hashlib.sha256(previous + _key_bytes(commit_lsn, ordinal) + digest).digest()

        return plain
    mac = hmac_sha256(key)

    def keyed(previous: bytes, commit_lsn: int, ordinal: int, digest: bytes) -> bytes:
        return mac(previous + _key_bytes(commit_lsn, ordinal) + digest)

    return keyed


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


#: One change of a chain: its commit LSN, ordinal and digest.
Entry = tuple[int, int, bytes]


@functools.lru_cache(maxsize=64)
def _second_text(seconds: int) -> str:
    return (PG_EPOCH + timedelta(seconds=seconds)).isoformat()[:-6]  # without "+00:00"


def digest_timestamp(microseconds: int) -> str:
    """A timestamptz, given in microseconds since 2000-01-01 UTC (PostgreSQL's epoch), as the digest's text holds
    it (`to_jsonb(moment AT TIME ZONE 'UTC')`): ISO 8601 without offset, the fraction without trailing zeros. The
    worker calls it twice per transaction, for moments a few seconds apart: each second is written once."""
    seconds, fraction = divmod(microseconds, 1_000_000)
    if not fraction:
        return f'"{_second_text(seconds)}"'
    return f'"{_second_text(seconds)}.{f"{fraction:06d}".rstrip("0")}"'


async def stored_digests(
    conn: asyncpg.Connection,
    stream: int,
    first_commit_lsn: int = 0,
    last_commit_lsn: int = 0,
    *,
    ordinals: tuple[int, int] | None = None,
    keys: Sequence[tuple[int, int]] = (),
) -> list[Entry]:
    """The digests of the changes this transaction stored with commit LSNs in `[first_commit_lsn,
    last_commit_lsn]` (positive ordinals, or those in `ordinals`), or of the changes whose (commit_lsn, ordinal)
    are `keys`, computed by the destination from what it holds (`DIGEST_SQL`), in chain order."""
    arguments: tuple[object, ...] = (stream, first_commit_lsn, last_commit_lsn)
    if keys:
        which = "(commit_lsn, ordinal) IN (SELECT * FROM unnest($2::bigint[], $3::int[]))"
        arguments = (stream, [key[0] for key in keys], [key[1] for key in keys])
    elif ordinals is not None:
        # The writer numbered them itself (the backfill, which writes in a savepoint: its rows' xmin is the
        # savepoint's).
        which = f"commit_lsn BETWEEN $2 AND $3 AND ordinal BETWEEN {int(ordinals[0])} AND {int(ordinals[1])}"
    else:
        # Only the rows of this transaction: any other row in the range is not the writer's to vouch for.
        which = (
            "commit_lsn BETWEEN $2 AND $3 AND ordinal > 0"
            " AND xmin::text::bigint = pg_current_xact_id()::text::bigint % 4294967296"
        )
    # One row for the whole batch (arrays and the digests end to end): decoding a record per change cost more.
    order = "ORDER BY commit_lsn, ordinal"
    found = await conn.fetchrow(
        f"SELECT array_agg(commit_lsn {order}) AS lsns, array_agg(ordinal {order}) AS ordinals,"
        f" string_agg({DIGEST_SQL}, ''::bytea {order}) AS digests FROM bemi.changes WHERE stream = $1 AND {which}",
        *arguments,
    )
    if found is None or found["lsns"] is None:
        return []
    digests = found["digests"]
    return [
        (lsn, ordinal, digests[i * _DIGEST_BYTES : (i + 1) * _DIGEST_BYTES])
        for i, (lsn, ordinal) in enumerate(zip(found["lsns"], found["ordinals"], strict=True))
    ]


def _array_text(numbers: array[int]) -> str:
    """Integers as an array's text literal: asyncpg's binary encoding of a list checks every element against
    `collections.abc`, which cost the worker more per change than writing this text (1,700 instructions of the
    chain's 46,700, by callgrind)."""
    return "{" + ",".join(map(str, numbers)) + "}"


class Link:
    """One link being made: each change's chain hash as its digest comes (the worker hashes while it sends the
    rows, so a batch's digests are never held), kept compactly (44 bytes a change) until `store`."""

    __slots__ = ("_hash", "hashes", "head", "lsns", "ordinals", "removals", "state")

    def __init__(self, state: ChainState) -> None:
        self.state = state
        self.head = state.head
        self._hash = chain_hasher(state.key)
        self.lsns = array("q")
        self.ordinals = array("i")
        self.hashes = bytearray()
        self.removals = 0

    def extend(self, entries: Iterable[Entry]) -> None:
        """The next changes of the chain (in `(commit_lsn, ordinal)` order) with their digests."""
        chain_hash, head = self._hash, self.head
        add_lsn, add_ordinal, hashes = self.lsns.append, self.ordinals.append, self.hashes
        for lsn, ordinal, digest in entries:
            head = chain_hash(head, lsn, ordinal, digest)
            add_lsn(lsn)
            add_ordinal(ordinal)
            hashes += head
        self.head = head

    async def store(self, conn: asyncpg.Connection) -> ChainState:
        """Store the link (in the transaction that stored its changes) as `bemi.chain` rows of at most
        `LINK_CHANGES` changes each; return the chain's state after them, which the caller keeps only once that
        transaction committed."""
        state = self.state
        seq, previous = state.seq, state.head
        for start in range(0, len(self.lsns), LINK_CHANGES):
            end = min(start + LINK_CHANGES, len(self.lsns))
            seq += 1
            hashes = bytes(self.hashes[start * _DIGEST_BYTES : end * _DIGEST_BYTES])
            await conn.execute(
                "INSERT INTO bemi.chain (stream, kind, seq, previous, commit_lsns, ordinals, removals, hashes,"
                " key_id) VALUES ($1, $2, $3, $4, $5::text::bigint[], $6::text::integer[], $7, $8, $9)",
                state.stream,
                state.kind,
                seq,
                previous,
                _array_text(self.lsns[start:end]),
                _array_text(self.ordinals[start:end]),
                min(max(self.removals - start, 0), end - start),
                hashes,
                key_id(state.key),
            )
            previous = hashes[-_DIGEST_BYTES:]
        return ChainState(state.stream, state.kind, state.key, seq, previous)


async def link(
    conn: asyncpg.Connection, state: ChainState, stored: Sequence[Entry], *, removed: Sequence[tuple[int, int]] = ()
) -> ChainState:
    """Chain the changes this transaction stored (`stored`, in chain order, their digests read back with
    `stored_digests`) after the `removed` keys, as one `bemi.chain` row; return the state after it (kept by the
    caller only once that transaction committed)."""
    pending = Link(state)
    pending.extend((lsn, ordinal, REMOVED) for lsn, ordinal in removed)
    pending.removals = len(removed)
    pending.extend(stored)
    return await pending.store(conn)
