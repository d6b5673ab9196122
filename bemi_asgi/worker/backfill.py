"""`bemi-asgi backfill`: a baseline change (operation SNAPSHOT) for every existing row, consistent with the stream.

How a baseline lines up with the replication stream:

- Every baseline is read in a snapshot exported by `CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`, imported
  with `SET TRANSACTION SNAPSHOT` in a REPEATABLE READ transaction. The rows it shows are exactly the effect of
  the transactions whose commit LSN is below the slot's consistent point L; a slot streams exactly those at or
  above L. (This is how PostgreSQL's own logical replication copies a table before streaming it.)
- When the worker's slot does not exist yet, the backfill creates it that way: the worker then streams from L on.
  When it exists (the worker runs, or ran), a temporary slot only serves to export the snapshot: its consistent
  point L is after the worker's position (a new slot starts at the current end of the WAL), so the worker's stream
  holds every change below L and every change after it, and nothing else is needed.
- A baseline is stored in the stream of that slot (`bemi.streams`), at `commit_lsn` L with a negative `ordinal`
  (counting up from -2^31): the worker's changes have ordinals from 1, so in commit order `(commit_lsn, ordinal)`
  a row's history is its stream changes below L, then its baseline (its state at L), then the stream's changes
  from L on, whatever order they are written in. `(stream, commit_lsn, ordinal)` never collides with a stored
  change, and the worker's progress (`bemi.worker_state`) is not touched: the worker neither skips nor repeats
  anything because of a backfill.
- `committed_at` is the source's clock read right after the slot became consistent: every transaction in the
  snapshot committed before it. `transaction_id` is 0 (no transaction), `position` is L, and `context` is
  `{"bemi_backfill": {"snapshot_lsn": "<L>"}}`.

Batches: keyset pages in primary key order (`WHERE (key) > (last) ORDER BY key LIMIT n`), each written with its
progress (`bemi.backfill_state`) in one destination transaction by binary COPY while the next page is read, so
memory is bounded by two pages and a killed run resumes after the last page stored. A resumed run reads in a new
snapshot (an exported snapshot dies with its transaction): each row's baseline is its state at one exact WAL
position, the snapshot of the run that stored it, and a table is wholly known from the last of its runs' positions.

Each row goes through the worker's own code as the Insert message the stream would carry for it (a `Relation`
read by `relations.Relations`: primary key, tracking rules, value rules, fast path), from the same text PostgreSQL
prints for the stream (the session uses the walsender's settings), so a baseline stores what a CREATE would.

Note: tables without a primary key are skipped (their rows have no identity a history could be found by, and
paging them consistently across runs is not possible). A table whose primary key is hashed keeps no last key in
`bemi.backfill_state` (it would be the key's clear text): a killed run restarts such a table, replacing its
partial baselines in the same transaction as the first new page.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import asyncpg
import psycopg
from psycopg import errors, sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader

from .._exceptions import ConfigError, DestinationNotReadyError, SourceNotReadyError
from .._pgtext import format_lsn, parse_lsn
from .chain import ChainState, link, stored_contents
from .config import TrackingConfig
from .copy_row import BINARY_COLUMNS
from .destination import (
    COLUMNS,
    BinaryCopy,
    ChangeRecord,
    SourceStream,
    missing_tables,
    stream_id,
    takes_binary_copy,
)
from .pgoutput import INSERT, NEW_TUPLE, NULL_VALUE, TEXT_VALUE, Column, Relation
from .relations import RelationInfo, Relations
from .rules import Filters
from .spill import PendingChange
from .stream import XLOG_HEADER_SIZE, SourceCatalog, _with_session_options
from .values import clean_json, encode_json

__all__ = ["BASELINE_CONTEXT_KEY", "FIRST_ORDINAL", "SNAPSHOT", "Backfill", "BackfillStats"]

#: The operation of a baseline change.
SNAPSHOT: Final = "SNAPSHOT"
#: The context key of a baseline: `{"bemi_backfill": {"snapshot_lsn": "0/16B3748"}}`.
BASELINE_CONTEXT_KEY: Final = "bemi_backfill"
#: Baselines take the ordinals from here up (below every ordinal the worker gives, which start at 1).
FIRST_ORDINAL: Final = -(2**31)
_LAST_ORDINAL: Final = -1
_EMPTY: Final = "{}"
_ADVISORY_LOCK: Final = "bemi-asgi backfill"
_COPY_PIECE_ROWS: Final = 1_000


@dataclass(slots=True)
class BackfillStats:
    """What a run did: tables finished, rows stored, tables skipped (with why), the snapshot's position."""

    tables_done: list[str] = field(default_factory=list)
    rows: int = 0
    skipped: list[str] = field(default_factory=list)
    snapshot_lsn: int | None = None
    created_slot: bool = False
    seconds: float = 0.0


@dataclass(slots=True)
class _Table:
    """One table to backfill: what the stream sends of it, how to page through it, and the worker's view of it."""

    schema: str
    table: str
    oid: int
    read_columns: tuple[Column, ...]  # as the stream sends them (published, not generated), in column order
    key_names: tuple[str, ...]
    read_key: tuple[int, ...]  # positions of the key columns in the row as read
    estimate: int  # pg_class.reltuples: for progress only
    #: The worker's own relation: rules, value conversion, fast path; a row becomes the change it would store.
    relation: RelationInfo
    key_hashed: bool = False

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(slots=True)
class _State:
    snapshot_lsn: int
    last_key: list[str] | None
    rows_stored: int
    done: bool


class Backfill:
    """Store the current state of every tracked row of `source` as a baseline change in `bemi.changes`.

    `destination` (default: the source) holds `bemi.changes` and `bemi.backfill_state`; `slot` is the worker's
    replication slot (created with the snapshot when missing), `publication` the worker's; `tables` limits the run
    to these (schema, table) pairs of the publication; `tracking` is the worker's configuration (tables left out,
    columns ignored, masked, hashed). `batch_rows` rows per destination transaction; `rows_per_second` caps the
    read rate (None: as fast as it goes); `progress` receives a line every `progress_interval` seconds.

    `await backfill.run()` returns BackfillStats; run it again after a kill and it continues where it stopped.
    Tables already finished are skipped (delete their row from `bemi.backfill_state` to take a new baseline).
    """

    def __init__(
        self,
        source: str,
        *,
        destination: str | None = None,
        slot: str = "bemi",
        publication: str = "bemi",
        tables: Sequence[tuple[str, str]] | None = None,
        tracking: TrackingConfig | None = None,
        batch_rows: int = 5_000,
        rows_per_second: float | None = None,
        progress: TextIO | None = None,
        progress_interval: float = 2.0,
        chain_key: bytes | None = None,
    ) -> None:
        if batch_rows < 1:
            raise ConfigError("batch_rows must be at least 1")
        self.source = source
        self.destination = destination or source
        self.slot = slot
        self.publication = publication
        self.tables = list(tables) if tables is not None else None
        self.filters = Filters(tracking if tracking is not None else TrackingConfig())
        self.batch_rows = batch_rows
        self.rows_per_second = rows_per_second
        self.progress = progress
        self.progress_interval = progress_interval
        self.chain_key = chain_key
        self.stats = BackfillStats()
        self._stopping = False
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether `stop()` ended the run before every table was done (run again to continue)."""
        return self._stopped

    def stop(self) -> None:
        """Finish the page being written and return (safe from a signal handler); run again to continue."""
        self._stopping = True

    async def run(self) -> BackfillStats:
        started = time.monotonic()
        dest = await asyncpg.connect(self.destination, server_settings={"application_name": "bemi-asgi backfill"})
        try:
            binary = await _check_destination(dest)
            if not await dest.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", _ADVISORY_LOCK):
                raise DestinationNotReadyError(
                    "another bemi-asgi backfill is running on this destination: wait for it to finish (or stop it; "
                    "a run continues where the last one stopped)"
                )
            catalog = await psycopg.AsyncConnection.connect(_with_session_options(self.source), autocommit=True)
            try:
                await self._run(catalog, dest, binary)
            finally:
                await catalog.close()
        finally:
            await dest.close()
        self.stats.seconds = time.monotonic() - started
        return self.stats

    async def _run(self, catalog: psycopg.AsyncConnection[Any], dest: asyncpg.Connection, binary: bool) -> None:
        # The worker's own readiness check (wal_level, the publication, a slot of that name owned elsewhere).
        info, slot = await SourceCatalog(catalog).check(slot=self.slot, publication=self.publication)
        database, version, slot_exists = info.database, info.server_version, slot is not None
        # The baselines belong to the stream of the slot they line up with, as its worker's changes do.
        stream = await stream_id(dest, SourceStream(info.system_identifier, database, self.slot))
        tables = await self._tables(catalog, version)
        states = await _states(dest, stream)
        todo = []
        for table in tables:
            state = states.get((table.schema, table.table))
            if state is not None and state.done:
                self._say(f"{table.name}: already backfilled (snapshot {format_lsn(state.snapshot_lsn)}), skipped")
                continue
            todo.append(table)
        if not todo and slot_exists:
            return
        replication = await psycopg.AsyncConnection.connect(
            _with_session_options(self.source, replication="database"), autocommit=True
        )
        reader = await psycopg.AsyncConnection.connect(_with_session_options(self.source))
        try:
            self._say("creating the snapshot (this waits for the transactions running now to end)")
            lsn, snapshot = await self._create_slot(replication, version, slot_exists)
            # Every transaction the snapshot shows has committed by now: the baselines' commit time.
            row = await (await catalog.execute("SELECT clock_timestamp()")).fetchone()
            assert row is not None
            committed_at: datetime = row[0]
            # psycopg opens the transaction (BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY) before the first
            # statement, which must be the snapshot's import.
            await reader.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await reader.set_read_only(True)
            await reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            await replication.close()  # the snapshot is imported: the (temporary) slot is not needed any more
            self.stats.snapshot_lsn = lsn
            ordinal = await dest.fetchval(
                "SELECT coalesce(max(ordinal) + 1, $2::integer) FROM bemi.changes"
                " WHERE stream = $3 AND commit_lsn = $1 AND ordinal < 0",
                lsn,
                FIRST_ORDINAL,
                stream,
            )
            chain = await ChainState.load(dest, stream, "baselines", self.chain_key)
            writer = _Writer(dest, binary, database, stream, lsn, committed_at, int(ordinal), chain)
            stored = sum(
                state.rows_stored for key, state in states.items() if key in {(t.schema, t.table) for t in todo}
            )
            left = max(sum(t.estimate for t in todo) - stored, 0)
            self._progress = _Progress(self.progress, self.progress_interval, left)
            for table in todo:
                if self._stopping:
                    self._stopped = True
                    break
                await self._backfill(reader, writer, table, states.get((table.schema, table.table)))
            await reader.commit()
            self._progress.finish()
        finally:
            await reader.close()
            await replication.close()

    # -- source ------------------------------------------------------------------------------------------------

    async def _create_slot(
        self, replication: psycopg.AsyncConnection[Any], version: int, slot_exists: bool
    ) -> tuple[int, str]:
        """Create the worker's slot (when missing) or a temporary one, exporting a snapshot; its consistent point
        and the snapshot's name."""
        if slot_exists:
            name = f"bemi_backfill_{os.getpid()}"
            kind = sql.SQL("TEMPORARY LOGICAL")
        else:
            name, kind = self.slot, sql.SQL("LOGICAL")
        option = sql.SQL("(SNAPSHOT 'export')" if version >= 150000 else "EXPORT_SNAPSHOT")
        query = sql.SQL("CREATE_REPLICATION_SLOT {} {} pgoutput {}").format(sql.Identifier(name), kind, option)
        try:
            cursor = await replication.execute(query)
        except errors.DuplicateObject:
            raise SourceNotReadyError(
                f"replication slot {name!r} was created by someone else a moment ago: run the backfill again"
            ) from None
        except (errors.ConfigurationLimitExceeded, errors.ObjectNotInPrerequisiteState) as exc:
            raise SourceNotReadyError(
                f"cannot create replication slot {name!r} for the backfill's snapshot: {exc} (a backfill needs one "
                "free slot and WAL sender while it starts: raise max_replication_slots / max_wal_senders)"
            ) from exc
        row = await cursor.fetchone()
        assert row is not None
        self.stats.created_slot = not slot_exists
        if not slot_exists:
            self._say(f"created replication slot {self.slot!r} at {row[1]}: the worker streams from there")
        return parse_lsn(str(row[1])), str(row[2])

    async def _tables(self, catalog: psycopg.AsyncConnection[Any], version: int) -> list[_Table]:
        """The published tables to backfill, with the columns the stream sends, in name order."""
        # Generated columns are sent from PostgreSQL 18 on only when the publication says so, which
        # pg_publication_tables.attnames then reflects; before 18 they are never sent. Column lists exist from 15.
        if version >= 180000:
            published = "a.attname = ANY (pt.attnames)"
        elif version >= 150000:
            published = "a.attname = ANY (pt.attnames) AND a.attgenerated = ''"
        else:
            published = "a.attgenerated = ''"
        cursor = await catalog.execute(
            f"""
            SELECT n.nspname::text, c.relname::text, c.oid::int8,
                   array(SELECT array[a.attname::text, a.atttypid::text, a.atttypmod::text] FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND {published}
                          ORDER BY a.attnum),
                   array(SELECT a.attname::text
                         FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.n),
                   greatest(c.reltuples, 0)::bigint
              FROM pg_publication_tables pt
              JOIN pg_namespace n ON n.nspname = pt.schemaname
              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             WHERE pt.pubname = %s AND n.nspname <> 'bemi'
             ORDER BY 1, 2
            """,
            [self.publication],
        )
        rows = await cursor.fetchall()
        found = {(schema, table) for schema, table, *_ in rows}
        if self.tables is not None:
            missing = [f"{schema}.{table}" for schema, table in self.tables if (schema, table) not in found]
            if missing:
                raise ConfigError(
                    f"{', '.join(missing)} not in the publication {self.publication!r}: only tracked tables can be "
                    "backfilled (add them with `bemi-asgi sql-migration --table ...`)"
                )
            wanted = set(self.tables)
            rows = [row for row in rows if (row[0], row[1]) in wanted]
        tables: list[_Table] = []
        relations = Relations(SourceCatalog(catalog), self.filters)
        for schema, table, oid, attributes, key_attributes, estimate in rows:
            name = f"{schema}.{table}"
            if not self.filters.tracks(schema, table):
                self.stats.skipped.append(f"{name}: left out by the tracking configuration")
                continue
            if not key_attributes:
                self.stats.skipped.append(f"{name}: no primary key (its rows could not be found by key)")
                continue
            columns = [Column(False, attname, int(oid), int(mod)) for attname, oid, mod in attributes]
            names = [column.name for column in columns]
            key_names = tuple(str(key_name) for key_name in key_attributes)
            for key_name in key_names:
                if key_name not in names:  # a column list leaving the key out: read it anyway, to page by it
                    raise ConfigError(f"{name}: the publication's column list leaves out key column {key_name}")
            read_key = tuple(names.index(key_name) for key_name in key_names)
            # The Relation message the stream would send: the worker's own code reads it (primary key, rules,
            # value conversion, fast path), so a baseline is stored exactly as the worker stores a CREATE.
            relation = await relations.add(Relation(int(oid), schema, table, "f", tuple(columns)))
            if relation.ignored:
                self.stats.skipped.append(f"{name}: left out by the tracking configuration")
                continue
            rules = self.filters.rules(schema, table)
            key_hashed = any(key_name in rules.hash for key_name in key_names)
            tables.append(
                _Table(
                    schema, table, int(oid), tuple(columns), key_names, read_key, int(estimate), relation, key_hashed
                )
            )
        return tables

    # -- one table ---------------------------------------------------------------------------------------------

    async def _backfill(
        self, reader: psycopg.AsyncConnection[Any], writer: _Writer, table: _Table, state: _State | None
    ) -> None:
        for column in table.read_columns:
            reader.adapters.register_loader(column.type_oid, _RawLoader)  # the bytes of the text the stream sends
        last_key = state.last_key if state is not None and not table.key_hashed else None
        # A hashed key's partial run (no last key kept) is replaced: its baselines are all at its one snapshot.
        replace = state.snapshot_lsn if state is not None and state.rows_stored > 0 and last_key is None else None
        rows_before = state.rows_stored if state is not None and replace is None else 0
        if state is not None and replace is None:
            self._say(f"{table.name}: continuing after {rows_before:,} rows")
        elif replace is not None:
            self._say(f"{table.name}: its key is hashed, so it starts over (its partial baselines are replaced)")
        select = sql.SQL(", ").join(sql.Identifier(column.name) for column in table.read_columns)
        keys = sql.SQL(", ").join(sql.Identifier(name) for name in table.key_names)
        source = sql.Identifier(table.schema, table.table)
        first = sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT {}").format(select, source, keys, self.batch_rows)
        # The last key's texts go as parameters of unknown type: the server reads them as the key columns' types.
        params = sql.SQL(", ").join(sql.Placeholder() for _ in table.key_names)
        following = sql.SQL("SELECT {} FROM {} WHERE ({}) > ({}) ORDER BY {} LIMIT {}").format(
            select, source, keys, params, keys, self.batch_rows
        )
        stored = rows_before
        pending: asyncio.Task[None] | None = None
        throttle_start, throttle_rows = time.monotonic(), 0
        try:
            while True:
                cursor = await reader.execute(first if last_key is None else following, last_key)
                rows: list[tuple[bytes | None, ...]] = await cursor.fetchall()
                done = len(rows) < self.batch_rows
                changes = list(_baselines(table, rows))
                if rows:
                    last_key = [(rows[-1][i] or b"").decode() for i in table.read_key]
                if pending is not None:
                    await pending
                stored += len(rows)
                state_key = None if table.key_hashed else last_key
                pending = asyncio.create_task(writer.write(table, changes, state_key, stored, done, replace))
                replace = None
                self.stats.rows += len(rows)
                self._progress.add(table.name, len(rows))
                if done:
                    break
                if self._stopping:
                    self._stopped = True
                    break
                if self.rows_per_second:
                    throttle_rows += len(rows)
                    ahead = throttle_rows / self.rows_per_second - (time.monotonic() - throttle_start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            await pending
            pending = None
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
        if done:
            self.stats.tables_done.append(table.name)

    def _say(self, line: str) -> None:
        if self.progress is not None:
            print(f"bemi-asgi backfill: {line}", file=self.progress, flush=True)


class _RawLoader(Loader):
    """A value as the bytes of its text, undecoded: what a pgoutput TupleData holds."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


_count: Final = struct.Struct(">h").pack
_insert_head: Final = struct.Struct(">BIB").pack  # message type, relation OID, tuple marker
_text_head: Final = struct.Struct(">Bi").pack  # value kind, length
_NULL: Final = bytes([NULL_VALUE])


def _baselines(table: _Table, rows: Iterable[tuple[bytes | None, ...]]) -> Iterator[PendingChange]:
    """Each row as the worker would store its CREATE, with the SNAPSHOT operation (ordinals added by the writer):
    the row goes through the worker's own conversion as the Insert message the stream would carry for it."""
    relation, schema, name = table.relation, table.schema, table.table
    head = bytes(XLOG_HEADER_SIZE) + _insert_head(INSERT, table.oid, NEW_TUPLE) + _count(len(table.read_columns))
    for raws in rows:
        parts = [head]
        for raw in raws:
            if raw is None:
                parts.append(_NULL)
            else:
                parts.append(_text_head(TEXT_VALUE, len(raw)))
                parts.append(raw)
        change = relation.frame_change(b"".join(parts))
        if change is not None:
            primary_key, _before, after, _operation = change
            yield (primary_key, _EMPTY, after, schema, name, SNAPSHOT, 0, 0)


# -- destination -------------------------------------------------------------------------------------------------


async def _check_destination(dest: asyncpg.Connection) -> bool:
    """Raise DestinationNotReadyError unless the destination takes baselines; whether the binary COPY fits."""
    missing = await missing_tables(dest, ["bemi.changes", "bemi.backfill_state", "bemi.streams", "bemi.chain"])
    accepts = await dest.fetchval(
        "SELECT NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = to_regclass('bemi.changes')"
        " AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%''TRUNCATE''%'"
        " AND pg_get_constraintdef(oid) NOT LIKE '%''SNAPSHOT''%')"
    )
    if missing or not accepts:
        what = ", ".join(missing) if missing else "SNAPSHOT among bemi.changes' operations"
        raise DestinationNotReadyError(
            f"the destination database lacks {what}: run `bemi-asgi sql-migration` again (it adds what a backfill "
            "needs and changes nothing else)"
        )
    return await takes_binary_copy(dest)


async def _states(dest: asyncpg.Connection, stream: int) -> dict[tuple[str, str], _State]:
    records = await dest.fetch(
        'SELECT "schema", "table", snapshot_lsn, last_key::text AS last_key, rows_stored, done FROM bemi.backfill_state'
        " WHERE stream = $1",
        stream,
    )
    return {
        (r["schema"], r["table"]): _State(
            r["snapshot_lsn"], None if r["last_key"] is None else json.loads(r["last_key"]), r["rows_stored"], r["done"]
        )
        for r in records
    }


class _Writer:
    """Writes pages of baselines with their progress, one destination transaction each."""

    def __init__(
        self, conn: asyncpg.Connection, binary: bool, database: str, stream: int, lsn: int, committed_at: datetime,
        ordinal: int, chain: ChainState,
    ) -> None:  # fmt: skip
        self.conn = conn
        self.binary = binary
        self.database = database
        self.stream = stream
        self.lsn = lsn
        self.committed_at = committed_at
        #: The baselines' hash chain (`chain.py`): each page links its baselines, and the ones it replaced.
        self.chain = chain
        self.ordinal = ordinal
        self.context = encode_json({BASELINE_CONTEXT_KEY: {"snapshot_lsn": format_lsn(lsn)}})

    def _numbered(self, changes: list[PendingChange]) -> list[PendingChange]:
        first = self.ordinal
        if first + len(changes) - 1 > _LAST_ORDINAL:
            raise ConfigError(
                "this run stored 2^31 baselines at one snapshot, all the ordinals it has: run the backfill again, "
                "it continues with a new snapshot"
            )
        self.ordinal += len(changes)
        lsn = self.lsn
        return [(*change[:6], lsn, first + i) for i, change in enumerate(changes)]

    async def write(
        self, table: _Table, changes: list[PendingChange], last_key: list[str] | None, stored: int, done: bool,
        replace: int | None,
    ) -> None:  # fmt: skip
        """Store a page and the table's progress in one transaction; `replace`: first delete the table's
        baselines stored at that snapshot position (a restarted table whose key is hashed)."""
        numbered = self._numbered(changes)
        conn = self.conn
        removed: list[tuple[int, int]] = []
        async with conn.transaction():
            if replace is not None:
                rows = await conn.fetch(
                    'DELETE FROM bemi.changes WHERE "schema" = $1 AND "table" = $2 AND operation = $3'
                    " AND commit_lsn = $4 AND stream = $5 RETURNING commit_lsn, ordinal",
                    table.schema,
                    table.table,
                    SNAPSHOT,
                    replace,
                    self.stream,
                )
                removed = sorted((row["commit_lsn"], row["ordinal"]) for row in rows)
            if numbered:
                await self._copy(numbered)
            span = (numbered[0][7], numbered[-1][7]) if numbered else (0, -1)
            contents = stored_contents(conn, self.stream, self.lsn, self.lsn, ordinals=span)
            chained = await link(conn, self.chain, contents, removed=removed)
            await conn.execute(
                'INSERT INTO bemi.backfill_state (stream, "schema", "table", snapshot_lsn, last_key, rows_stored, done)'
                " VALUES ($7, $1, $2, $3, $4::text::jsonb, $5, $6)"
                ' ON CONFLICT (stream, "schema", "table") DO UPDATE SET snapshot_lsn = excluded.snapshot_lsn,'
                " last_key = excluded.last_key, rows_stored = excluded.rows_stored, done = excluded.done,"
                " updated_at = now()",
                table.schema,
                table.table,
                self.lsn,
                None if last_key is None else json.dumps(last_key),
                stored,
                done,
                self.stream,
            )
        self.chain = chained

    async def _copy(self, changes: list[PendingChange]) -> None:
        queued_at = datetime.now(UTC)
        if self.binary:
            try:
                async with self.conn.transaction():  # a savepoint: the retry below runs in the same transaction
                    await self.conn.copy_to_table(
                        "changes",
                        schema_name="bemi",
                        columns=[name for name, _ in BINARY_COLUMNS],
                        source=_stream(self._binary(changes, queued_at)),
                        format="binary",
                    )
                return
            except (asyncpg.DataError, UnicodeEncodeError):
                pass  # a value jsonb refuses: stored below with such characters replaced, as the worker does
        records = [self._record(change, queued_at) for change in changes]
        await self.conn.copy_records_to_table("changes", schema_name="bemi", columns=COLUMNS, records=records)

    def _binary(self, changes: list[PendingChange], queued_at: datetime) -> Iterator[bytes]:
        copy = BinaryCopy(self.database, self.stream)
        copy.transaction(self.committed_at, queued_at, 0, self.lsn)
        copy.context(self.context)
        for start in range(0, len(changes), _COPY_PIECE_ROWS):
            copy.add(changes[start : start + _COPY_PIECE_ROWS])
            yield copy.take()
        yield copy.end()

    def _record(self, change: PendingChange, queued_at: datetime) -> ChangeRecord:
        key, before, after, schema, table, operation, position, ordinal = change
        return (key, before, clean_json(after), self.context, self.database, schema, table, operation,
                self.committed_at, queued_at, 0, position, self.lsn, ordinal, self.stream)  # fmt: skip


async def _stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


# -- progress ----------------------------------------------------------------------------------------------------


class _Progress:
    """A progress line on stderr every `interval` seconds: rows, rows/s, and an ETA from the tables' estimates."""

    def __init__(self, out: TextIO | None, interval: float, estimate: int) -> None:
        self.out = out
        self.interval = interval
        self.estimate = estimate
        self.rows = 0
        self.started = self.last = time.monotonic()
        self.table = ""

    def add(self, table: str, rows: int) -> None:
        self.rows += rows
        self.table = table
        now = time.monotonic()
        if self.out is not None and now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def finish(self) -> None:
        if self.out is not None:
            self._print(time.monotonic(), final=True)

    def _print(self, now: float, *, final: bool = False) -> None:
        assert self.out is not None
        elapsed = max(now - self.started, 1e-9)
        rate = self.rows / elapsed
        if final:
            tail = f"done in {elapsed:.1f} s"
        elif self.estimate > self.rows and rate > 0:
            tail = f"{self.table}, ETA {(self.estimate - self.rows) / rate:.0f} s (of about {self.estimate:,} rows)"
        else:
            tail = self.table
        print(f"bemi-asgi backfill: {self.rows:,} rows, {rate:,.0f} rows/s, {tail}", file=self.out, flush=True)
