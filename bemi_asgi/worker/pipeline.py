"""The capture worker: the source's pgoutput stream in, one `bemi.changes` row per row change out, exactly once.

    source ──► reader task: frames ─► decode ─► per-transaction buffer (spills) ─► committed transactions ─┐
                                                                                                          │ queue
    source ◄── status update (flush LSN) ◄── writer task: COPY batch + last commit LSN in one transaction ◄─┘

The reader decodes while the writer's COPY is in flight (the two overlap on the event loop, and the destination
server works on its own core). A batch is whatever committed transactions queued up while the previous batch was
being written (up to `batch_rows`), so batches grow under load and stay one transaction deep when idle.

Exactly once: a batch and the last commit LSN it covers are committed together in the destination; on start the
worker skips transactions whose commit LSN is at or below the stored one; the source is told (flush LSN) only
what the destination has committed. When nothing is pending the flush LSN follows the walsender's position, so an
idle slot (or one whose traffic is all on untracked tables) does not hold WAL back.

Note: the primary key is read from the source catalog when a Relation message arrives (pgoutput marks every
column as key under REPLICA IDENTITY FULL), so a key changed after the change was made but before the worker read
it is reported with the current definition.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import TextIO, TypeAlias

import asyncpg
import psycopg

from .._dsn import check_dsn, redact
from .._exceptions import BemiError
from .._pgtext import format_lsn
from ..capture.context import MESSAGE_PREFIX
from .config import TrackingConfig
from .destination import BinaryCopy, ChangeRecord, Destination
from .fastpath import RowCodec
from .pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Relation,
    Truncate,
    Unchanged,
    Update,
    Value,
    decode,
)
from .rules import Filters, RowPolicy, check_tables, filter_relation, is_skip_context
from .spill import PendingChange, TransactionBuffer
from .stitching import context_json
from .stream import Keepalive, ReplicationStream, SourceCatalog, parse_frame
from .values import JSONValue, converter_for, encode_json, row_to_dict

__all__ = ["Worker", "WorkerStats"]

logger = logging.getLogger("bemi_asgi.worker")


_encode = encode_json
_START_LSN = struct.Struct(">Q").unpack_from
_RELATION_OID = struct.Struct(">I").unpack_from
_ROW_CHANGES = frozenset(b"IUD")
_COPY_PIECE_ROWS = 1_000
_EMPTY = "{}"
_OWN_TABLES = frozenset({"changes", "worker_state"})
_Row: TypeAlias = "dict[str, JSONValue | Unchanged]"


@dataclass
class WorkerStats:
    """What the worker has done since it started (all sessions)."""

    changes: int = 0
    transactions: int = 0
    last_commit_time: datetime | None = None
    flushed_lsn: int = 0
    reconnects: int = 0


class Worker:
    """Capture changes from `source` (a postgresql:// URL) into `bemi.changes` of `destination` (default: the
    source database), through replication slot `slot` (created when missing, never dropped) and publication
    `publication` (which must exist).

    `await worker.run()` runs until `stop()` (then it finishes the batch in flight, acknowledges it and returns);
    `await worker.run(until_caught_up=True)` returns once everything committed on the source when it started is
    stored. Lost connections are retried with exponential backoff up to `max_backoff` seconds; readiness errors
    (`SourceNotReadyError`, `DestinationNotReadyError`) are raised.

    Tuning: `batch_rows` caps the rows of one destination transaction (except a single larger source
    transaction, which is always written whole); while a backlog is being read the writer waits up to
    `batch_seconds` to fill a batch (when the stream is idle it writes at once); `spill_threshold` is how many
    changes of one open transaction stay in memory before they move to a temporary file; `status_interval` the
    seconds between status updates; `progress` the stream for a progress line every `progress_interval` seconds
    (None: quiet).

    `tracking` (see `bemi_asgi._config.load_config`) leaves tables out, ignores, masks or hashes columns before
    anything is written, and drops no-op updates; transactions under `skip_tracking()` are dropped unless it says
    `honor_skip = false`.
    """

    def __init__(
        self,
        source: str,
        *,
        destination: str | None = None,
        slot: str = "bemi",
        publication: str = "bemi",
        batch_rows: int = 10_000,
        batch_seconds: float = 0.1,
        spill_threshold: int = 20_000,
        status_interval: float = 5.0,
        progress: TextIO | None = None,
        progress_interval: float = 10.0,
        max_backoff: float = 30.0,
        tracking: TrackingConfig | None = None,
    ) -> None:
        check_dsn(source, what="the source URL")
        if destination is not None:
            check_dsn(destination, what="the destination URL")
        self.source = source
        self.destination = destination or source
        self.slot = slot
        self.publication = publication
        self.batch_rows = batch_rows
        self.batch_seconds = batch_seconds
        self.spill_threshold = spill_threshold
        self.status_interval = status_interval
        self.progress = progress
        self.progress_interval = progress_interval
        self.max_backoff = max_backoff
        self.stats = WorkerStats()
        self.tracking = tracking
        self._filters = Filters(tracking) if tracking is not None and tracking.filters_rows else None
        self._honor_skip = tracking.honor_skip if tracking is not None else True
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._pipeline: _Pipeline | None = None

    def stop(self) -> None:
        """Ask `run()` to finish the batch in flight, acknowledge it and return (safe from a signal handler)."""
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self, *, until_caught_up: bool = False) -> None:
        """Capture until `stop()`, or with `until_caught_up` until the source's WAL position at start is stored."""
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        reporter = asyncio.create_task(self._report_progress()) if self.progress is not None else None
        target: int | None = None
        backoff = initial_backoff = 0.25
        try:
            while not self._stopping:
                started, stored_before = time.monotonic(), self.stats.changes
                try:
                    if until_caught_up and target is None:
                        target = await _current_wal_lsn(self.source)
                    await self._session(target)
                    return
                except Exception as exc:
                    if not _is_transient(exc):
                        raise
                    if self.stats.changes > stored_before or time.monotonic() - started > 60:
                        backoff = initial_backoff
                    self.stats.reconnects += 1
                    reason = redact(_one_line(exc), self.source, self.destination)
                    logger.warning("cannot stream right now (%s); retrying in %.1f s", reason, backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
                self._print_progress(await self._lag())

    async def _session(self, target: int | None) -> None:
        """One connection lifetime: connect both sides, stream until stopped, caught up or failed."""
        catalog = await SourceCatalog.connect(self.source)
        try:
            info = await catalog.prepare(slot=self.slot, publication=self.publication)
            if self._filters is not None and self._filters.config.tables:
                await check_tables(self.source, self.publication, self._filters)
            destination = await Destination.connect(self.destination)
            try:
                if self._filters is not None and self._filters.config.tables:
                    await destination.record_rules(info.database, self._filters.config.recorded_rules())
                stored = await destination.last_commit_lsn(self.slot)
                stream = await ReplicationStream.open(self.source, slot=self.slot, publication=self.publication)
                try:
                    pipeline = _Pipeline(self, catalog, destination, stream, info.database, stored, target)
                    pipeline.flushed = max(info.confirmed_flush_lsn, self.stats.flushed_lsn)
                    self._pipeline = pipeline
                    await pipeline.run()
                finally:
                    self._pipeline = None
                    await stream.close()
            finally:
                await destination.close()
        finally:
            await catalog.close()

    async def _sleep(self, seconds: float) -> None:
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def _report_progress(self) -> None:
        last_changes, last_time = self.stats.changes, time.monotonic()
        while True:
            await asyncio.sleep(self.progress_interval)
            now = time.monotonic()
            rate = (self.stats.changes - last_changes) / (now - last_time)
            last_changes, last_time = self.stats.changes, now
            self._print_progress(await self._lag(), rate)

    async def _lag(self) -> tuple[int | None, float]:
        """Lag in bytes (the source's WAL position minus the acknowledged one) and in seconds (age of the oldest
        transaction received but not stored yet)."""
        pipeline = self._pipeline
        if pipeline is None:
            return None, 0.0
        try:
            current = await pipeline.catalog.current_wal_lsn()
        except psycopg.Error:
            current = None
        lag_bytes = None if current is None else max(0, current - pipeline.flush_position())
        return lag_bytes, pipeline.lag_seconds()

    def _print_progress(self, lag: tuple[int | None, float], rate: float | None = None) -> None:
        if self.progress is None:
            return
        lag_bytes, lag_seconds = lag
        stats = self.stats
        parts = [f"bemi-asgi worker: {stats.changes:,} changes in {stats.transactions:,} transactions"]
        if rate is not None:
            parts.append(f"{rate:,.0f} changes/s")
        parts.append(f"lag {'?' if lag_bytes is None else f'{lag_bytes:,}'} bytes / {lag_seconds:.1f} s")
        last = stats.last_commit_time.isoformat(timespec="seconds") if stats.last_commit_time else "none yet"
        parts.append(f"last commit {last}")
        parts.append(f"flushed {format_lsn(stats.flushed_lsn)}")
        print(", ".join(parts), file=self.progress, flush=True)


async def _current_wal_lsn(dsn: str) -> int:
    catalog = await SourceCatalog.connect(dsn)
    try:
        return await catalog.current_wal_lsn()
    finally:
        await catalog.close()


def _is_transient(exc: BaseException) -> bool:
    """Whether a failure is a lost or refused connection (retry) rather than a setup error or a bug (raise)."""
    if isinstance(exc, BemiError | asyncpg.ClientConfigurationError):  # a DSN asyncpg cannot read stays unreadable
        return False
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | psycopg.OperationalError
        | psycopg.errors.InvalidCatalogName
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        # Raised instead of a connection error when the server drops the connection between two commands.
        | asyncpg.InternalClientError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InsufficientResourcesError
        | asyncpg.exceptions.InvalidCatalogNameError,
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(slots=True)
class _RelationInfo:
    """What the reader needs about one relation, from its latest Relation message and the catalog."""

    schema: str
    table: str
    columns: tuple[Column, ...]
    converters: tuple[Callable[[str], JSONValue], ...]
    key: tuple[int, ...]  # positions of the primary key columns, in key order; () without a primary key
    replica_key: tuple[int, ...]  # positions the replica identity sends in a key-only old row
    ignored: bool = False  # the worker's own tables, should a FOR ALL TABLES publication include them
    single_key: int = -1  # the key column's position when the key has one column (the common fast path)
    policy: RowPolicy | None = None  # column rules or no-op dropping (tracking configuration); None: store as is
    codec: RowCodec | None = None  # the fast path, for relations stored as is

    def primary_key(self, values: tuple[Value, ...], old: tuple[Value, ...] | None) -> str | None:
        """The change's `primary_key`: one key column's text, a JSON array of texts for a composite key."""
        key = self.key
        if not key:
            return None
        texts = [values[i] for i in key]
        if old is not None:
            texts = [old[i] if text is UNCHANGED else text for i, text in zip(key, texts, strict=True)]
        if len(texts) == 1:
            text = texts[0]
            return text if isinstance(text, str) else None
        return _encode([text if isinstance(text, str) else None for text in texts])


@dataclass(slots=True)
class _Committed:
    """A committed source transaction waiting for the writer."""

    buffer: TransactionBuffer
    xid: int
    commit_lsn: int
    end_lsn: int
    committed_at: datetime
    queued_at: datetime
    count: int

    def records(self, database: str) -> Iterator[ChangeRecord]:
        """The transaction's `bemi.changes` rows, each segment with its context (the stitching rule)."""
        xid, commit_lsn, committed_at, queued_at = self.xid, self.commit_lsn, self.committed_at, self.queued_at
        for context, chunks in self.buffer.segments():
            for chunk in chunks:
                for key, before, after, schema, table, operation, position, ordinal in chunk:
                    yield (key, before, after, context, database, schema, table, operation, committed_at, queued_at,
                           xid, position, commit_lsn, ordinal)  # fmt: skip


@dataclass(eq=False)
class _Pipeline:
    """One session's reader and writer, and the positions they share."""

    worker: Worker
    catalog: SourceCatalog
    destination: Destination
    stream: ReplicationStream
    database: str
    stored_commit_lsn: int  # transactions at or below it are already in the destination
    target: int | None  # until_caught_up: stop once everything before it is stored
    flushed: int = 0  # the flush LSN last reported (never moves back)
    stored_end: int = 0  # end LSN of the last transaction stored
    seen_end: int = 0  # the walsender's position: keepalives, and ends of transactions with nothing to store
    pending: int = 0  # committed transactions queued or being written
    pending_times: collections.deque[datetime] = field(default_factory=collections.deque)
    relations: dict[int, _RelationInfo] = field(default_factory=dict)
    queue: asyncio.Queue[_Committed | None] = field(default_factory=asyncio.Queue)
    queued_weight: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_status: float = 0.0  # when the last status update went out (monotonic)
    reply_due: bool = False  # the walsender asked for a status update
    last_commit_time: datetime | None = None  # of the last transaction received
    # The open transaction.
    buffer: TransactionBuffer | None = None
    begin: Begin | None = None
    skipping: bool = False
    ordinal: int = 0

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        reader = asyncio.create_task(self._read())
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raise the reader's failure
                self.queue.put_nowait(None)  # stopped or caught up: finish the batches already queued
            await writer
            await self.send_status()
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if self.buffer is not None:
                self.buffer.close()
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if item is not None:
                    item.buffer.close()

    def flush_position(self) -> int:
        """The LSN the source may forget up to: everything stored, or everything seen when nothing is pending."""
        position = self.stored_end
        if self.pending == 0 and self.begin is None:
            position = max(position, self.seen_end)
        self.flushed = max(self.flushed, position)
        return self.flushed

    def lag_seconds(self) -> float:
        oldest = self.pending_times[0] if self.pending_times else self.begin.commit_time if self.begin else None
        return 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())

    def caught_up(self) -> bool:
        return (
            self.target is not None
            and self.begin is None
            and self.pending == 0
            and max(self.stored_end, self.seen_end) >= self.target
        )

    async def send_status(self, *, reply_requested: bool = False) -> None:
        async with self.send_lock:
            position = self.flush_position()
            await self.stream.send_status(position, reply_requested=reply_requested)
            self.worker.stats.flushed_lsn = position
            self.last_status = time.monotonic()

    # -- reader -------------------------------------------------------------------------------------------------

    async def _read(self) -> None:
        worker = self.worker
        self.last_status = time.monotonic()
        while not worker._stopping:
            if self.caught_up():
                return
            frames = await self.stream.read_frames(0.2 if self.target is not None else 1.0)
            if frames:
                await self._handle(frames)
                await asyncio.sleep(0)  # let the writer and the progress line run while data keeps coming
            elif self.target is not None and not self.caught_up():
                # Idle and not caught up: ask the walsender where it is (it answers with a keepalive).
                await self.send_status(reply_requested=True)
                continue
            if self.reply_due or time.monotonic() - self.last_status >= worker.status_interval:
                self.reply_due = False
                # While idle, ask for a keepalive back: its position lets the flush LSN follow the walsender.
                await self.send_status(reply_requested=not frames)

    async def _handle(self, frames: list[memoryview]) -> None:
        relations = self.relations
        for frame in frames:
            if frame[0] != 0x77:  # not 'w': a keepalive
                self._keepalive(frame)
                continue
            if len(frame) > 30 and frame[25] in _ROW_CHANGES and not self.skipping and self.buffer is not None:
                # The fast path: straight from the frame's bytes to the stored JSON (None: take the general path).
                data = bytes(frame)
                rel = relations.get(_RELATION_OID(data, 26)[0])
                if rel is not None and rel.codec is not None:
                    fast = rel.codec.change(data)
                    if fast is not None:
                        self.ordinal += 1
                        self.buffer.append(
                            (fast[0], fast[1], fast[2], rel.schema, rel.table, fast[3], _START_LSN(data, 1)[0],
                             self.ordinal)
                        )  # fmt: skip
                        continue
            message = decode(frame[25:])
            kind = type(message)
            if kind is Insert or kind is Update or kind is Delete:
                if not self.skipping:
                    self._change(message, _START_LSN(frame, 1)[0])  # type: ignore[arg-type]
            elif kind is Begin:
                self._begin(message)  # type: ignore[arg-type]
            elif kind is Commit:
                await self._commit(message)  # type: ignore[arg-type]
            elif kind is Message:
                self._message(message)  # type: ignore[arg-type]
            elif kind is Relation:
                await self._relation(message)  # type: ignore[arg-type]
            elif kind is Truncate and not self.skipping:
                self._truncate(message, _START_LSN(frame, 1)[0])  # type: ignore[arg-type]
            # Type and Origin messages carry nothing the changes need.

    def _keepalive(self, frame: memoryview) -> None:
        keepalive = parse_frame(frame)
        assert isinstance(keepalive, Keepalive)
        # Everything before wal_end was sent, and frames arrive in order: all of it has been read.
        self.seen_end = max(self.seen_end, keepalive.wal_end)
        # The walsender pings while the confirmed position is behind what it sent: WAL it read and had nothing to
        # send for (the worker's own inserts into bemi.changes, untracked tables, other databases). Confirm it now
        # when nothing is pending, or `wait_for` on a position past such WAL waits for the next status interval.
        if keepalive.reply_requested or (keepalive.wal_end > self.flushed and self.pending == 0 and self.begin is None):
            self.reply_due = True

    def _begin(self, message: Begin) -> None:
        self.begin = message
        self.skipping = message.final_lsn <= self.stored_commit_lsn
        self.ordinal = 0
        self.buffer = None if self.skipping else TransactionBuffer(self.worker.spill_threshold)

    async def _commit(self, message: Commit) -> None:
        buffer, begin, self.buffer, self.begin = self.buffer, self.begin, None, None
        self.last_commit_time = message.commit_time
        if buffer is None or buffer.count == 0 or begin is None:
            if buffer is not None:
                buffer.close()
            self.seen_end = max(self.seen_end, message.end_lsn)
            return
        committed = _Committed(
            buffer, begin.xid, message.commit_lsn, message.end_lsn, message.commit_time, datetime.now(UTC), buffer.count
        )
        self.pending += 1
        self.pending_times.append(message.commit_time)
        self.queued_weight += min(buffer.count, self.worker.spill_threshold)
        self.queue.put_nowait(committed)
        while self.queued_weight > self._max_weight:
            self.room.clear()
            await self.room.wait()

    @property
    def _max_weight(self) -> int:
        return max(4 * self.worker.batch_rows, self.worker.spill_threshold)

    def _message(self, message: Message) -> None:
        if message.prefix == MESSAGE_PREFIX and message.transactional and self.buffer is not None:
            context = context_json(message.content)
            if self.worker._honor_skip and is_skip_context(message.content, context):
                # skip_tracking(): nothing of this transaction is stored; its end still moves the progress on.
                self.buffer.close()
                self.buffer, self.skipping = None, True
                return
            self.buffer.add_context(context)

    async def _relation(self, message: Relation) -> None:
        names = [column.name for column in message.columns]
        key_names = await self.catalog.primary_key(message.oid)
        replica_key = tuple(i for i, column in enumerate(message.columns) if column.is_key)
        if key_names is None:
            # Dropped since: trust the message's key flags, which are the primary key unless REPLICA IDENTITY FULL.
            key = replica_key if message.replica_identity != "f" else ()
        elif all(name in names for name in key_names):
            key = tuple(names.index(name) for name in key_names)
        else:
            key = ()
        info = self.relations[message.oid] = _RelationInfo(
            message.namespace or "pg_catalog",
            message.name,
            message.columns,
            tuple(converter_for(column.type_oid) for column in message.columns),
            key,
            replica_key,
            # Storing changes of bemi.changes would feed the worker its own writes, forever.
            ignored=message.namespace == "bemi" and message.name in _OWN_TABLES,
            single_key=key[0] if len(key) == 1 else -1,
        )
        if self.worker._filters is not None and not info.ignored:
            # Tracking configuration: leave the table out, or filter its rows (ignored, masked, hashed columns).
            ancestors = await self.catalog.partition_ancestors(message.oid)
            filter_relation(self.worker._filters, info, ancestors)
            info.single_key = info.key[0] if len(info.key) == 1 else -1
        if info.policy is None and not info.ignored:
            info.codec = RowCodec(info.columns, info.converters, info.key, info.single_key)

    def _add(self, key: str | None, before: str, after: str, rel: _RelationInfo, operation: str, lsn: int) -> None:
        assert self.buffer is not None
        self.ordinal += 1
        change: PendingChange = (key, before, after, rel.schema, rel.table, operation, lsn, self.ordinal)
        self.buffer.append(change)

    def _change(self, message: Insert | Update | Delete, lsn: int) -> None:
        # The hot path: one call per row change, kept flat.
        rel = self.relations[message.relation_oid]
        if rel.ignored:
            return
        policy = rel.policy
        if type(message) is Insert:
            new = message.new if policy is None else policy.row(message.new)
            key = new[rel.single_key] if rel.single_key >= 0 else rel.primary_key(new, None)
            before_json, after_json = _EMPTY, _encode(row_to_dict(rel.columns, new, rel.converters))
            operation = "CREATE"
        elif type(message) is Update:
            old, new = message.old, message.new
            if policy is not None:
                if old is not None and not message.old_is_key_only and policy.drops_update(old, new):
                    return  # only ignored columns changed, or nothing and no-op updates are dropped
                new = policy.row(new)
                old = None if old is None else policy.row(old)
            if old is not None and not message.old_is_key_only:
                before = row_to_dict(rel.columns, old, rel.converters)
                after = _updated_row(rel, before, old, new)
            else:
                after = row_to_dict(rel.columns, new, rel.converters)
                before = self._old_row(rel, old, True) if old is not None else {}
                if UNCHANGED in new:
                    _fill_unchanged(after, before)
            if rel.single_key >= 0:
                key = new[rel.single_key]
                if key is UNCHANGED and old is not None:
                    key = old[rel.single_key]
            else:
                key = rel.primary_key(new, old)
            before_json, after_json = (_encode(before) if before else _EMPTY), _encode(after)
            operation = "UPDATE"
        else:
            assert type(message) is Delete
            old = message.old if policy is None else policy.row(message.old)
            key = old[rel.single_key] if rel.single_key >= 0 else rel.primary_key(old, None)
            before_json, after_json = _encode(self._old_row(rel, old, message.old_is_key_only)), _EMPTY
            operation = "DELETE"
        self.ordinal += 1
        assert self.buffer is not None
        self.buffer.append(
            (key if key.__class__ is str else None, before_json, after_json, rel.schema, rel.table, operation, lsn,
             self.ordinal)
        )  # fmt: skip

    @staticmethod
    def _old_row(rel: _RelationInfo, old: tuple[Value, ...], key_only: bool) -> _Row:
        row = row_to_dict(rel.columns, old, rel.converters)
        if key_only:
            # A 'K' old row sends the replica identity columns; the others are NULL placeholders, not values.
            keep = {rel.columns[i].name for i in rel.replica_key}
            row = {name: value for name, value in row.items() if name in keep}
        return row

    def _truncate(self, message: Truncate, lsn: int) -> None:
        for oid in message.relation_oids:
            rel = self.relations[oid]
            if not rel.ignored:
                self._add(None, _EMPTY, _EMPTY, rel, "TRUNCATE", lsn)

    # -- writer -------------------------------------------------------------------------------------------------

    def _caught_up_in_time(self) -> bool:
        """Whether the last transaction received committed less than `batch_seconds` ago (by this host's clock:
        with a skewed clock the worker only batches more or less eagerly)."""
        if self.last_commit_time is None:
            return True
        age = (datetime.now(UTC) - self.last_commit_time).total_seconds()
        return age < self.worker.batch_seconds

    async def _write(self) -> None:
        worker = self.worker
        queue = self.queue
        while True:
            first = await queue.get()
            if first is None:
                return
            batch, rows, last = [first], first.count, False
            deadline = time.monotonic() + worker.batch_seconds
            while rows < worker.batch_rows:
                if queue.empty():
                    # Small batches cost the destination far more per row, so wait for more while working
                    # through a backlog; but when the reader waits on the socket and the last commit is recent,
                    # we are caught up and waiting would only add latency.
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (self.stream.waiting and self._caught_up_in_time()):
                        break
                    await asyncio.sleep(min(remaining, 0.005))
                    continue
                item = queue.get_nowait()
                if item is None:
                    last = True
                    break
                batch.append(item)
                rows += item.count
            try:
                try:
                    if self.destination.binary:
                        pieces = _binary_copy(batch, self.database)
                        await self.destination.write_binary(worker.slot, pieces, batch[-1].commit_lsn)
                    else:
                        records = chain.from_iterable(item.records(self.database) for item in batch)
                        await self.destination.write(worker.slot, records, batch[-1].commit_lsn)
                except (asyncpg.DataError, UnicodeEncodeError) as exc:
                    # A value jsonb refuses (a NUL or a lone surrogate inside a `json` column): store the batch
                    # again with such characters replaced rather than stop capturing.
                    logger.warning("a row needs cleaning before it can be stored as jsonb (%s)", _one_line(exc))
                    records = chain.from_iterable(item.records(self.database) for item in batch)
                    await self.destination.write(worker.slot, map(_jsonb_safe_record, records), batch[-1].commit_lsn)
            finally:
                for item in batch:
                    item.buffer.close()
            self.stored_end = batch[-1].end_lsn
            self.pending -= len(batch)
            for item in batch:
                self.pending_times.popleft()
                self.queued_weight -= min(item.count, worker.spill_threshold)
            if self.queued_weight <= self._max_weight:
                self.room.set()
            worker.stats.changes += rows
            worker.stats.transactions += len(batch)
            worker.stats.last_commit_time = batch[-1].committed_at
            await self.send_status()
            if last:
                return


def _binary_copy(batch: list[_Committed], database: str) -> Iterator[bytes]:
    """The batch's `bemi.changes` rows as a binary COPY stream, in pieces of about a thousand rows (a few hundred
    kB: larger ones cost memory, not time), so a huge transaction is never held whole. The stitching rule gives
    each segment its context, as in `_Committed.records`."""
    copy = BinaryCopy(database)
    for item in batch:
        copy.transaction(item.committed_at, item.queued_at, item.xid, item.commit_lsn)
        for context, chunks in item.buffer.segments():
            copy.context(context)
            for chunk in chunks:
                for start in range(0, len(chunk), _COPY_PIECE_ROWS):
                    copy.add(chunk[start : start + _COPY_PIECE_ROWS])
                    if copy.rows >= _COPY_PIECE_ROWS:
                        yield copy.take()
    yield copy.end()


def _jsonb_safe_record(record: ChangeRecord) -> ChangeRecord:
    """`record` with its JSON columns rid of what jsonb cannot hold: NUL characters and lone surrogates become
    U+FFFD. Only used to retry a batch the destination refused."""
    key, before, after, context, *rest = record
    return (key, _jsonb_safe_text(before), _jsonb_safe_text(after), _jsonb_safe_text(context), *rest)


def _jsonb_safe_text(text: object) -> object:
    if not isinstance(text, str) or ("\\u0000" not in text and text.isascii()):
        return text
    return _encode(_clean(json.loads(text)))


def _clean(value: JSONValue) -> JSONValue:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_clean(item) for item in value]
    if isinstance(value, dict):
        return {_UNSTORABLE.sub("\ufffd", key): _clean(item) for key, item in value.items()}
    return value


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _updated_row(rel: _RelationInfo, before: _Row, old: tuple[Value, ...], new: tuple[Value, ...]) -> _Row:
    """The new row of an update whose full old row is known: the old row's converted values where the text did
    not change (most columns, usually; and every unchanged TOAST value), converted values where it did."""
    changed = [i for i, value in enumerate(new) if value is not UNCHANGED and value != old[i]]
    after = dict(before)
    if changed:
        columns, converters = rel.columns, rel.converters
        after.update(
            row_to_dict([columns[i] for i in changed], [new[i] for i in changed], [converters[i] for i in changed])
        )
    return after


def _fill_unchanged(after: _Row, before: _Row) -> None:
    """Unchanged TOASTed values are not resent: take them from the old row, or leave them out when it lacks them."""
    for name, value in list(after.items()):
        if value is UNCHANGED:
            if name in before and before[name] is not UNCHANGED:
                after[name] = before[name]
            else:
                del after[name]
