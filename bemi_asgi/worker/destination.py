"""The destination side of the worker: `bemi.changes` and `bemi.worker_state`, written with asyncpg.

Each `write` is one destination transaction holding complete source transactions (rows by COPY) and the last
commit LSN they reach, so the stored progress and the stored rows can never disagree.

The worker's batches go as one binary COPY stream built by `BinaryCopy` (each change's values packed once, the
values shared by a transaction or a segment of it packed once for all its rows): asyncpg encoding fourteen values
per record cost the worker more CPU than building the stream. `write` (asyncpg's record encoding) stays for the
retry of a batch the destination refused, and for a `bemi.changes` whose column types differ from the migration's.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from hashlib import sha256
from typing import Any, Final

import asyncpg

from .._changes_table import WRITTEN
from .._exceptions import DestinationNotReadyError
from .chain import ChainState, Entry, Link, link, stored_contents, stored_digests
from .copy_row import BINARY_COLUMNS
from .pgoutput import PG_EPOCH
from .spill import PendingChange
from .stream import python_encoding

__all__ = [
    "COLUMNS",
    "BinaryCopy",
    "ChangeRecord",
    "Destination",
    "SourceStream",
    "missing_tables",
    "stream_id",
    "takes_binary_copy",
]

#: The `bemi.changes` columns the worker writes, in the order of the records it produces.
COLUMNS: Final = WRITTEN

#: One row of `bemi.changes` in `COLUMNS` order (JSON columns as JSON text).
ChangeRecord = tuple[object, ...]

_MICROSECOND: Final = timedelta(microseconds=1)
_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # signature, flags, no header extension
_TRAILER: Final = struct.pack(">h", -1)
_key_head: Final = struct.Struct(">hi").pack  # the field count, then the key's length
_FIELDS: Final = len(BINARY_COLUMNS)
_NULL_KEY: Final = _key_head(_FIELDS, -1)
_jsonb_head: Final = struct.Struct(">ib").pack  # length, then jsonb's binary format version (1: the JSON text)
_numbers: Final = struct.Struct(">iqii").pack  # position (int8), ordinal (int4), each after its length
_length: Final = struct.Struct(">i").pack
_transaction: Final = struct.Struct(">iqiqiqiqii").pack
_timestamp: Final = struct.Struct(">iq").pack  # a timestamptz after its length


def _text(value: str) -> bytes:
    data = value.encode()
    return _length(len(data)) + data


def _microseconds(moment: datetime) -> int:
    return (moment - PG_EPOCH) // _MICROSECOND


async def _stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class BinaryCopy:
    """`bemi.changes` rows as PostgreSQL's binary COPY stream, in `BINARY_COLUMNS` order.

    Call `transaction()` for each source transaction, `context()` for each segment of it, `add()` with the
    segment's changes; `take()` returns the stream so far (so a huge transaction goes out in pieces, never whole
    in memory), `end()` the rest. A value that cannot be UTF-8 encoded raises UnicodeEncodeError.
    """

    def __init__(self, database: str, stream: int, *, link: Link | None = None, samples: int = 8) -> None:
        self._parts: list[bytes] = [_HEADER]
        #: Rows added since the last `take()`.
        self.rows = 0
        self._database = _text(database)
        self._stream = stream
        self._transaction = b""
        self._tail = b""
        self._shared: dict[tuple[str, str, str], bytes] = {}
        #: The hash chain's link for these rows (None: no chain): each row's content (`copy_row`: the row as sent,
        #: then its `created_at`) is added to it.
        self.link = link
        #: Of each (schema, table, operation), the first `samples` segments' first rows, with their contents'
        #: digests (checked against the destination's).
        self.samples: dict[tuple[str, str, str], list[Entry]] = {}
        self._samples = samples
        self._sampled: set[bytes] = set()  # the relations sampled in this segment
        self._created_at = b""
        self._content_tail = b""
        self._commit_lsn = 0

    def created_at(self, moment: datetime) -> None:
        """The rows' `created_at` as the destination sets it (its transaction's start): their contents end with it.
        Set before the first `transaction()`."""
        self._created_at = _timestamp(8, _microseconds(moment))

    def transaction(self, committed_at: datetime, queued_at: datetime, xid: int, commit_lsn: int) -> None:
        committed, queued = _microseconds(committed_at), _microseconds(queued_at)
        self._transaction = _transaction(8, committed, 8, queued, 8, xid, 8, commit_lsn, 4, self._stream)
        self._commit_lsn = commit_lsn

    def context(self, context: str) -> None:
        data = context.encode()
        self._tail = self._database + _jsonb_head(len(data) + 1, 1) + data + self._transaction
        if self.link is not None and not self._created_at:
            raise ValueError("a chained copy's created_at() comes before its rows")
        self._content_tail = self._tail + self._created_at
        self._sampled.clear()

    def add(self, changes: Iterable[PendingChange]) -> None:
        add = self._parts.append
        tail, shared, link = self._tail, self._shared, self.link
        content_tail, sampled = self._content_tail, self._sampled
        # Chained at the end of the call: one call into the link per call, not per row.
        ordinals: list[int] = []
        contents: list[bytes] = []
        rows = 0
        for key, before, after, schema, table, operation, position, ordinal in changes:
            rows += 1
            relation = shared.get((schema, table, operation))
            if relation is None:
                relation = shared[schema, table, operation] = _text(schema) + _text(table) + _text(operation)
            old, new = before.encode(), after.encode()
            if key is None:
                start = _NULL_KEY
            else:
                data = key.encode()
                start = _key_head(_FIELDS, len(data)) + data
            own = b"".join(
                (start, _jsonb_head(len(old) + 1, 1), old, _jsonb_head(len(new) + 1, 1), new,
                 _numbers(8, position, 4, ordinal), relation)
            )  # fmt: skip
            add(own)
            add(tail)
            if link is not None:
                content = own + content_tail
                ordinals.append(ordinal)
                contents.append(content)
                if relation not in sampled:
                    sampled.add(relation)
                    self._sample(schema, table, operation, ordinal, content)
        self.rows += rows
        if link is not None:
            link.add(self._commit_lsn, ordinals, contents)

    def _sample(self, schema: str, table: str, operation: str, ordinal: int, content: bytes) -> None:
        samples = self.samples.setdefault((schema, table, operation), [])
        if len(samples) < self._samples:
            samples.append((self._commit_lsn, ordinal, sha256(content).digest()))

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self.rows = 0
        return data

    def end(self) -> bytes:
        self._parts.append(_TRAILER)
        return self.take()


@dataclass(frozen=True, slots=True)
class SourceStream:
    """What identifies a source stream: the source cluster (`pg_control_system().system_identifier`), its
    database and the replication slot. Two streams never share stored rows or progress."""

    system_identifier: int
    database: str
    slot: str


# The stream's row; else a stream carried over from a destination written before streams were recorded (no system
# identifier, the same slot name, this database or none), which this source claims; else a new one. A concurrent
# registration of the same stream makes the insert a no-op: the caller then finds its row.
_STREAM_ID = """
WITH found AS (
    SELECT id FROM bemi.streams WHERE system_identifier = $1 AND database = $2 AND slot_name = $3
), claimed AS (
    UPDATE bemi.streams SET system_identifier = $1, database = $2
     WHERE id = (SELECT id FROM bemi.streams
                  WHERE system_identifier IS NULL AND slot_name = $3 AND (database IS NULL OR database = $2)
                    AND NOT EXISTS (SELECT FROM found) ORDER BY id LIMIT 1)
    RETURNING id
), added AS (
    INSERT INTO bemi.streams (system_identifier, database, slot_name)
    SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT FROM found) AND NOT EXISTS (SELECT FROM claimed)
    ON CONFLICT DO NOTHING RETURNING id
)
SELECT id FROM found UNION ALL SELECT id FROM claimed UNION ALL SELECT id FROM added
"""


async def stream_id(conn: asyncpg.Connection, source: SourceStream) -> int:
    """The id of `source` in `bemi.streams`, registered (or claimed from a carried-over stream) when new."""
    for _ in range(2):
        found = await conn.fetchval(_STREAM_ID, source.system_identifier, source.database, source.slot)
        if found is not None:
            return int(found)
    raise DestinationNotReadyError(f"cannot register the stream of slot {source.slot!r} in bemi.streams")


#: Columns that destinations migrated by earlier versions lack, by table: `sql-migration` adds them.
ADDED_COLUMNS: Final = (("bemi.chain", "format"),)


async def missing_tables(conn: asyncpg.Connection, names: Sequence[str]) -> list[str]:
    """Which of the tables `names` (`schema.table`) the destination lacks, and which of their `ADDED_COLUMNS`
    (as `schema.table.column`)."""
    added = [(table, column) for table, column in ADDED_COLUMNS if table in names]
    rows = await conn.fetch(
        "SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL"
        " UNION ALL SELECT added.name || '.' || added.column_name"
        " FROM unnest($2::text[], $3::text[]) AS added(name, column_name)"
        " WHERE NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(added.name)"
        "                   AND attname = added.column_name AND NOT attisdropped)",
        names,
        [table for table, _ in added],
        [column for _, column in added],
    )
    return [str(row["name"]) for row in rows]


async def takes_binary_copy(conn: asyncpg.Connection) -> bool:
    """Whether `bemi.changes` has the column types the binary COPY stream is written for."""
    types = await conn.fetch(
        "SELECT attname::text AS name, format_type(atttypid, NULL) AS type FROM pg_attribute"
        " WHERE attrelid = to_regclass('bemi.changes') AND attnum > 0 AND NOT attisdropped"
    )
    found = {row["name"]: row["type"] for row in types}
    return all(found.get(name) == kind for name, kind in BINARY_COLUMNS)


class Destination:
    """One asyncpg connection to the destination database."""

    def __init__(self, conn: asyncpg.Connection, *, binary: bool = False, encoding: str = "utf-8") -> None:
        self._conn = conn
        #: Whether `bemi.changes` has the migration's column types, which `write_binary`'s stream needs.
        self.binary = binary
        #: The destination server's encoding, as a Python codec: what its jsonb can hold.
        self.encoding = encoding

    @classmethod
    async def connect(cls, dsn: str) -> Destination:
        """Connect and check the destination tables exist (DestinationNotReadyError says how to create them)."""
        conn = await asyncpg.connect(dsn, server_settings={"application_name": "bemi-asgi worker"})
        try:
            missing = await missing_tables(conn, ["bemi.changes", "bemi.worker_state", "bemi.streams", "bemi.chain"])
            binary = await takes_binary_copy(conn)
            encoding = python_encoding(await conn.fetchval("SELECT current_setting('server_encoding')"))
        except BaseException:
            await conn.close()
            raise
        if missing:
            await conn.close()
            raise DestinationNotReadyError(
                f"the destination database lacks {', '.join(missing)}: create the tables with `bemi-asgi "
                "sql-migration` (`--only destination` when it is another database) on the destination database"
            )
        return cls(conn, binary=binary, encoding=encoding)

    async def close(self) -> None:
        try:
            await self._conn.close(timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            self._conn.terminate()

    async def record_rules(self, database: str, rules: Mapping[str, Any]) -> None:
        """Record the column rules this run applies (once per distinct set), for revert to read."""
        if await self._conn.fetchval("SELECT to_regclass('bemi.tracking_rules') IS NULL"):
            raise DestinationNotReadyError(
                "the destination database lacks bemi.tracking_rules, where the worker records its column rules "
                "(revert reads them): run `bemi-asgi sql-migration --only destination` on it again"
            )
        await self._conn.execute(
            "INSERT INTO bemi.tracking_rules (database, rules) SELECT $1, $2::jsonb WHERE NOT EXISTS"
            " (SELECT FROM bemi.tracking_rules WHERE database = $1 AND rules = $2::jsonb)",
            database,
            json.dumps(rules),
        )

    async def stream(self, source: SourceStream) -> int:
        """The id of `source`'s stream in `bemi.streams`, registered when new (see `stream_id`)."""
        return await stream_id(self._conn, source)

    async def last_commit_lsn(self, stream: int) -> int:
        """The commit LSN of the last source transaction stored for `stream` (0 when nothing is)."""
        value = await self._conn.fetchval("SELECT last_commit_lsn FROM bemi.worker_state WHERE stream = $1", stream)
        return int(value) if value is not None else 0

    async def chain_state(self, stream: int, key: bytes | None) -> ChainState:
        """Where the stream's chain of changes stands."""
        return await ChainState.load(self._conn, stream, "changes", key)

    async def write(
        self, stream: int, records: Iterable[ChangeRecord], first_commit_lsn: int, last_commit_lsn: int,
        chain: ChainState | None,
    ) -> ChainState | None:  # fmt: skip
        """Store `records`, chain them and move the stream's progress to `last_commit_lsn`, atomically; return the
        chain's state after them (valid once this returns: the transaction committed). The changes' contents are
        read back for the chain: this path sends values as asyncpg encodes them."""
        async with self._conn.transaction():
            await self._conn.copy_records_to_table("changes", schema_name="bemi", columns=COLUMNS, records=records)
            chained = None
            if chain is not None:
                stored = stored_contents(self._conn, stream, first_commit_lsn, last_commit_lsn)
                chained = await link(self._conn, chain, stored)
            await self._save_progress(stream, last_commit_lsn)
        return chained

    async def write_binary(
        self,
        stream: int,
        copy: BinaryCopy,
        chunks: Iterable[bytes],
        first_commit_lsn: int,
        last_commit_lsn: int,
        chain: ChainState | None,
        *,
        unchecked: Callable[[], Sequence[Entry]] = tuple,
    ) -> tuple[ChainState | None, Entry | None]:
        """Store the rows of `copy`'s stream `chunks` (produced while it is sent), their link of the hash `chain`
        (None: no chain) and the stream's progress (`last_commit_lsn`), atomically; return the chain's state after
        them, and None or the first change whose digest `copy` computed differs from the destination's.

        The link holds the hashes of the contents `copy` wrote (its `link`), unless some of the changes
        `unchecked()` returns (asked once the rows are sent) have another digest in the destination. Then, and when
        `copy` has no link, the destination's contents are read back and chained instead."""
        async with self._conn.transaction():
            # First, so the rows' created_at (this transaction's start) is known before their contents are hashed.
            copy.created_at(await self._save_progress(stream, last_commit_lsn))
            await self._conn.copy_to_table(
                "changes",
                schema_name="bemi",
                columns=[name for name, _ in BINARY_COLUMNS],
                source=_stream(chunks),
                format="binary",
            )
            if chain is None:
                return None, None
            pending, differs = copy.link, None
            if pending is not None and (computed := unchecked()):
                keys = [entry[:2] for entry in computed]
                differs = _first_difference(computed, await stored_digests(self._conn, stream, keys))
            if pending is not None and differs is None:
                return await pending.store(self._conn), None
            stored = stored_contents(self._conn, stream, first_commit_lsn, last_commit_lsn)
            return await link(self._conn, chain, stored), differs

    async def _save_progress(self, stream: int, last_commit_lsn: int) -> datetime:
        """Record the stream's progress; return `created_at` of this transaction's rows (its start)."""
        created_at: datetime = await self._conn.fetchval(
            "INSERT INTO bemi.worker_state (stream, last_commit_lsn) VALUES ($1, $2)"
            " ON CONFLICT (stream) DO UPDATE SET last_commit_lsn = excluded.last_commit_lsn, updated_at = now()"
            " RETURNING now()",
            stream,
            last_commit_lsn,
        )
        return created_at


def _first_difference(computed: Sequence[Entry], stored: Sequence[Entry]) -> Entry | None:
    """The first of the `stored` changes whose digest differs from the one `computed` holds for it, if any."""
    mine = {entry[:2]: entry for entry in computed}
    for theirs in stored:
        if mine.get(theirs[:2]) != theirs:
            return theirs
    return None
