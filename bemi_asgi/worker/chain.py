"""Tamper evidence: a hash chain over the stored changes of each stream, computed in the transaction that stores them.

Each stored change gets a chain hash, `h = H(previous h || content)`, where `content` is the change's row as the
worker's binary COPY sends it, followed by its `created_at` (`copy_row.ROW_CONTENT_SQL` prints it from what is
stored): every column but `id`, so its position (commit LSN, ordinal) too. `H` is HMAC-SHA256 with a key the
database does not hold (`BEMI_CHAIN_KEY`), or SHA-256 without one. The worker sends jsonb as the destination
prints it (`jsonb.py`), so it hashes the rows it sends (`BinaryCopy`), without reading them back; `bemi-asgi
verify` reads the contents from what is stored, and the backfill reads its own rows' contents back
(`stored_contents`). The hashes of one destination transaction are stored as one row of `bemi.chain` (a *link*:
the changes' keys and their hashes, and the hash before them), in that same transaction: a change and its hash are
stored together or not at all.

Links record their format (`covered_sql`): format 3 is the one above. Formats 1 and 2 (links written before) covered
a JSON array of the columns (`TEXT_CONTENT_SQL`), which the worker wrote a second time for each row it sent: format
2 hashed `previous || that text`, format 1 `previous || commit_lsn || ordinal || SHA-256(that text)`. `verify`
still reads all three, so a history chained across an upgrade verifies whole.

Two chains per stream: `changes`, the worker's, in commit order (`(commit_lsn, ordinal)`, ordinals from 1), and
`baselines`, those `bemi-asgi backfill` stores in its own transactions (negative ordinals), in the order it writes
them. A backfill that replaces baselines it stored before (a restarted table whose key is hashed) records their
removal in its link (`removal`).

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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import asyncpg

from .._exceptions import ConfigError
from .._hmac import KeyedStates, hmac_sha256, keyed_states
from .copy_row import ROW_CONTENT_SQL

__all__ = [
    "CHAIN_FORMAT",
    "CHAIN_FORMATS",
    "CHAIN_KEY_ENV",
    "CONTENT_SQL",
    "DIGEST_SQL",
    "GENESIS",
    "LINK_CHANGES",
    "READ_BACK_CHANGES",
    "TEXT_CONTENT_SQL",
    "ChainHasher",
    "ChainKind",
    "ChainState",
    "Entry",
    "Link",
    "chain_hasher",
    "chain_key",
    "covered_sql",
    "key_id",
    "link",
    "removal",
    "stored_contents",
    "stored_digests",
]

#: The environment variable holding the chain's HMAC key (the worker, the backfill and verify read it).
CHAIN_KEY_ENV: Final = "BEMI_CHAIN_KEY"
MIN_CHAIN_KEY_BYTES: Final = 16
#: The format of the links written now (`bemi.chain.format`; see the module's docstring).
CHAIN_FORMAT: Final = 3
#: The formats `verify` reads.
CHAIN_FORMATS: Final = (1, 2, 3)
#: The most changes one `bemi.chain` row holds: a larger batch is linked in several (bounded memory while stored).
LINK_CHANGES: Final = 20_000
#: The most changes whose content is read back at once (`stored_contents`, `verify`).
READ_BACK_CHANGES: Final = 5_000
#: The hash before a chain's first change.
GENESIS: Final = bytes(32)

ChainKind = Literal["changes", "baselines"]

#: What links of formats 1 and 2 covered of a change: every column of `bemi.changes` but `id` as of then, as a JSON
#: array's text (jsonb in its canonical form, timestamps as UTC text, the commit LSN and ordinal last), as UTF-8.
TEXT_CONTENT_SQL: Final = (
    'convert_to(jsonb_build_array(primary_key, "before", "after", context, database, "schema", "table",'
    " operation, committed_at AT TIME ZONE 'UTC', queued_at AT TIME ZONE 'UTC', created_at AT TIME ZONE 'UTC',"
    " transaction_id, position, commit_lsn, ordinal)::text, 'UTF8')"
)


def covered_sql(chain_format: int) -> str:
    """What a link of `chain_format` covers of each change, as SQL over a `bemi.changes` row: its content (formats
    2 and 3; a column added later is not covered, so the history stored before it still verifies), or its content's
    SHA-256 (format 1)."""
    if chain_format == 1:
        return f"sha256({TEXT_CONTENT_SQL})"
    return TEXT_CONTENT_SQL if chain_format == 2 else ROW_CONTENT_SQL


#: The content the links written now cover.
CONTENT_SQL: Final = covered_sql(CHAIN_FORMAT)
#: The content's SHA-256: what the worker's own content is checked against.
DIGEST_SQL: Final = f"sha256({CONTENT_SQL})"

_key_bytes: Final = struct.Struct(">qi").pack
_HASH_BYTES: Final = 32
_sha256: Final = hashlib.sha256
_MIN_ORDINAL: Final = -(2**31)  # the first baseline's (`ordinal` is an integer)
#: Format 1's digest of a removal.
_REMOVED_DIGEST: Final = bytes(32)


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


def removal(chain_format: int, commit_lsn: int, ordinal: int) -> bytes:
    """What a link covers for a baseline the backfill replaced (its row is gone by design): never a change's
    content, which is a JSON array (formats 1 and 2) or starts with its field count, a zero byte (format 3)."""
    if chain_format == 1:
        return _REMOVED_DIGEST
    return b"removed %d %d" % (commit_lsn, ordinal)


#: `hash(previous, commit_lsn, ordinal, covered)`: the chain hash of one change after `previous`, `covered` being
#: what its link's format covers (`covered_sql`): its content (which holds the position) or its content's SHA-256
#: (format 1).
ChainHasher = Callable[[bytes, int, int, bytes], bytes]


def _message_hash(key: bytes | None) -> Callable[[bytes], bytes]:
    """HMAC-SHA256 with the key's padded blocks hashed once (`_hmac`), or SHA-256 without a key."""
    if key is None:
        sha256 = hashlib.sha256
        return lambda message: sha256(message).digest()
    return hmac_sha256(key)


@functools.cache
def chain_hasher(key: bytes | None, chain_format: int = CHAIN_FORMAT) -> ChainHasher:
    """The chain hash of links of `chain_format` for `key`."""
    mac = _message_hash(key)
    if chain_format == 1:
        return lambda previous, commit_lsn, ordinal, digest: mac(previous + _key_bytes(commit_lsn, ordinal) + digest)
    return lambda previous, commit_lsn, ordinal, content: mac(previous + content)


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


#: One change of a chain: its commit LSN, ordinal and content (`CONTENT_SQL`), or the content's digest where a
#: digest is compared (`stored_digests`).
Entry = tuple[int, int, bytes]


async def stored_contents(
    conn: asyncpg.Connection,
    stream: int,
    first_commit_lsn: int,
    last_commit_lsn: int,
    *,
    ordinals: tuple[int, int] | None = None,
) -> AsyncIterator[list[Entry]]:
    """The contents of the changes this transaction stored with commit LSNs in `[first_commit_lsn,
    last_commit_lsn]` (positive ordinals, or those in `ordinals`), as the destination prints them (`CONTENT_SQL`),
    in chain order, `READ_BACK_CHANGES` at a time (a huge transaction is never read back whole)."""
    if ordinals is not None:
        # The writer numbered them itself (the backfill, which writes in a savepoint: its rows' xmin is the
        # savepoint's).
        which = f"ordinal BETWEEN {int(ordinals[0])} AND {int(ordinals[1])}"
    else:
        # Only the rows of this transaction: any other row in the range is not the writer's to vouch for.
        which = "ordinal > 0 AND xmin::text::bigint = pg_current_xact_id()::text::bigint % 4294967296"
    # One row per page (arrays): decoding a record per change cost more.
    query = (
        "SELECT array_agg(commit_lsn) AS lsns, array_agg(ordinal) AS ordinals, array_agg(content) AS contents"
        f" FROM (SELECT commit_lsn, ordinal, {CONTENT_SQL} AS content FROM bemi.changes"
        f"        WHERE stream = $1 AND (commit_lsn, ordinal) {{}} ($2, $3) AND commit_lsn <= $4 AND {which}"
        f"        ORDER BY commit_lsn, ordinal LIMIT {READ_BACK_CHANGES}) AS page"
    )
    after, start = (first_commit_lsn, _MIN_ORDINAL), ">="
    while True:
        page = await conn.fetchrow(query.format(start), stream, *after, last_commit_lsn)
        if page is None or page["lsns"] is None:
            return
        entries = list(zip(page["lsns"], page["ordinals"], page["contents"], strict=True))
        yield entries
        if len(entries) < READ_BACK_CHANGES:
            return
        after, start = entries[-1][:2], ">"


async def stored_digests(conn: asyncpg.Connection, stream: int, keys: Sequence[tuple[int, int]]) -> list[Entry]:
    """The digests (`DIGEST_SQL`) of the stored changes whose (commit_lsn, ordinal) are `keys`, computed by the
    destination from what it holds, in chain order."""
    rows = await conn.fetch(
        f"SELECT commit_lsn, ordinal, {DIGEST_SQL} AS digest FROM bemi.changes"
        " WHERE stream = $1 AND (commit_lsn, ordinal) IN (SELECT * FROM unnest($2::bigint[], $3::int[]))"
        " ORDER BY commit_lsn, ordinal",
        stream,
        [key[0] for key in keys],
        [key[1] for key in keys],
    )
    return [(row["commit_lsn"], row["ordinal"], bytes(row["digest"])) for row in rows]


def _array_text(numbers: array[int]) -> str:
    """Integers as an array's text literal: asyncpg's binary encoding of a list checks every element against
    `collections.abc`, which cost the worker more per change than writing this text."""
    return "{" + ",".join(map(str, numbers)) + "}"


class Link:
    """One link being made, in the current format: each change's chain hash as its content comes (the worker
    hashes while it sends the rows, so a batch's contents are never held), kept compactly (44 bytes a change) until
    `store`."""

    __slots__ = ("_keyed", "hashes", "head", "lsns", "ordinals", "removals", "state")

    def __init__(self, state: ChainState) -> None:
        self.state = state
        self.head = state.head
        self._keyed: KeyedStates | None = None if state.key is None else keyed_states(state.key)
        self.lsns = array("q")
        self.ordinals = array("i")
        self.hashes = bytearray()
        self.removals = 0

    def add(self, commit_lsn: int, ordinals: list[int], contents: Sequence[bytes]) -> None:
        """The next changes of the chain, all of one transaction (`commit_lsn`), with their contents: the worker's
        hot path, one call for many changes."""
        head, hashes = self.head, self.hashes
        # `chain_hasher`'s formats 2 and 3, written out: a call per change took a fifth of this loop's time.
        if self._keyed is None:
            for content in contents:
                head = _sha256(head + content).digest()
                hashes += head
        else:
            inner_start, outer_start = self._keyed
            for content in contents:
                inner = inner_start.copy()
                inner.update(head + content)
                outer = outer_start.copy()
                outer.update(inner.digest())
                head = outer.digest()
                hashes += head
        self.head = head
        # The array-to-array and list-to-array forms: extending from an iterator converts each item, a quarter of
        # this loop's cost for ten changes.
        self.lsns.extend(array("q", (commit_lsn,)) * len(ordinals))
        self.ordinals.fromlist(ordinals)

    def extend(self, entries: Iterable[Entry]) -> None:
        """The next changes of the chain (in `(commit_lsn, ordinal)` order) with their contents."""
        for lsn, ordinal, content in entries:
            self.add(lsn, [ordinal], (content,))

    def remove(self, keys: Sequence[tuple[int, int]]) -> None:
        """The baselines the backfill replaced (`removal`): a link records them before any change."""
        if self.lsns:
            raise ValueError("a link records its removals before its changes")
        self.extend((lsn, ordinal, removal(CHAIN_FORMAT, lsn, ordinal)) for lsn, ordinal in keys)
        self.removals = len(keys)

    async def store(self, conn: asyncpg.Connection) -> ChainState:
        """Store the link (in the transaction that stored its changes) as `bemi.chain` rows of at most
        `LINK_CHANGES` changes each; return the chain's state after them, which the caller keeps only once that
        transaction committed."""
        state = self.state
        seq, previous = state.seq, state.head
        for start in range(0, len(self.lsns), LINK_CHANGES):
            end = min(start + LINK_CHANGES, len(self.lsns))
            seq += 1
            hashes = bytes(self.hashes[start * _HASH_BYTES : end * _HASH_BYTES])
            await conn.execute(
                "INSERT INTO bemi.chain (stream, kind, seq, previous, commit_lsns, ordinals, removals, hashes,"
                " key_id, format) VALUES ($1, $2, $3, $4, $5::text::bigint[], $6::text::integer[], $7, $8, $9, $10)",
                state.stream,
                state.kind,
                seq,
                previous,
                _array_text(self.lsns[start:end]),
                _array_text(self.ordinals[start:end]),
                min(max(self.removals - start, 0), end - start),
                hashes,
                key_id(state.key),
                CHAIN_FORMAT,
            )
            previous = hashes[-_HASH_BYTES:]
        return ChainState(state.stream, state.kind, state.key, seq, previous)


async def link(
    conn: asyncpg.Connection,
    state: ChainState,
    stored: AsyncIterator[list[Entry]],
    *,
    removed: Sequence[tuple[int, int]] = (),
) -> ChainState:
    """Chain the changes this transaction stored (`stored`: pages of `stored_contents`) after the `removed` keys;
    return the state after them (kept by the caller only once that transaction committed)."""
    pending = Link(state)
    pending.remove(removed)
    async for page in stored:
        pending.extend(page)
    return await pending.store(conn)
