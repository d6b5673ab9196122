"""The capture worker: the source's pgoutput stream in, one `bemi.changes` row per row change out, exactly once.

    source ──► Reader: frames ─► row changes (Relations) ─► per-transaction buffer (spills) ─► CommitQueue ─┐
                                                                                                          │
    source ◄── status update (Progress: flush LSN) ◄── Writer: COPY batch + last commit LSN in one transaction ◄─┘

`Worker` runs sessions (one connection lifetime each) and retries lost connections; a session runs a `Reader` and
a `Writer` (reader.py, writer.py) sharing a `Progress` (progress.py), all given the same frozen `Options`. The
reader decodes while the writer's COPY is in flight (the two overlap on the event loop, and the destination server
works on its own core).

Exactly once: a batch and the last commit LSN it covers are committed together in the destination; on start the
worker skips transactions whose commit LSN is at or below the stored one; the source is told (flush LSN) only
what the destination has committed. When nothing is pending the flush LSN follows the walsender's position, so an
idle slot (or one whose traffic is all on untracked tables) does not hold WAL back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TextIO

import asyncpg
import psycopg

from .._dsn import check_dsn, redact
from .._exceptions import BemiError, DestinationNotReadyError, SourceNotReadyError
from .._pgtext import format_lsn
from .config import TrackingConfig
from .destination import Destination, SourceStream
from .options import Options
from .progress import Progress, WorkerStats
from .reader import Reader
from .relations import Relations
from .rules import Filters, check_tables
from .stream import ReplicationStream, SourceCatalog, SourceInfo
from .writer import CommitQueue, Writer

__all__ = ["Worker", "WorkerStats"]

logger = logging.getLogger("bemi_asgi.worker")


class Worker:
    """Capture changes from `source` (a postgresql:// URL) into `bemi.changes` of `destination` (default: the
    source database), through replication slot `slot` (created when missing, never dropped) and publication
    `publication` (which must exist).

    `await worker.run()` runs until `stop()` (then it finishes the batch in flight, acknowledges it and returns);
    `await worker.run(until_caught_up=True)` returns once everything committed on the source when it started is
    stored, `await worker.run(until_lsn=lsn)` once everything committed before WAL position `lsn` is. Lost
    connections are retried with exponential backoff up to `max_backoff` seconds; readiness errors
    (`SourceNotReadyError`, `DestinationNotReadyError`) are raised.

    Tuning: `batch_rows` caps the rows of one destination transaction (except a single larger source
    transaction, which is always written whole); while a backlog is being read the writer waits up to
    `batch_seconds` to fill a batch (when the stream is idle it writes at once); `spill_threshold` is how many
    changes of one open transaction stay in memory before they move to a temporary file; `status_interval` the
    seconds between status updates; `progress` the stream for a progress line every `progress_interval` seconds
    (None: quiet).

    `tracking` (see `bemi_asgi.worker.config.load_config`) leaves tables out, ignores, masks or hashes columns before
    anything is written, and drops no-op updates; transactions under `skip_tracking()` are dropped unless it says
    `honor_skip = false`.

    `chain_key` keys the hash chain over the stored changes (HMAC-SHA256; see `chain.py` and `bemi-asgi verify`):
    a key the destination does not hold, so that whoever can write `bemi.changes` cannot forge the chain. Without
    it the chain is plain SHA-256, which shows edits only against a head published elsewhere. `chain=False`
    stores no chain (`verify` then reports the changes stored meanwhile as not in the chain).
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
        chain_key: bytes | None = None,
        chain: bool = True,
    ) -> None:
        check_dsn(source, what="the source URL")
        if destination is not None:
            check_dsn(destination, what="the destination URL")
        self.source = source
        self.destination = destination or source
        self.options = Options(
            slot=slot,
            publication=publication,
            batch_rows=batch_rows,
            batch_seconds=batch_seconds,
            spill_threshold=spill_threshold,
            status_interval=status_interval,
            honor_skip=tracking.honor_skip if tracking is not None else True,
        )
        self.progress = progress
        self.progress_interval = progress_interval
        self.max_backoff = max_backoff
        self.stats = WorkerStats()
        self.tracking = tracking
        self.chain_key = chain_key
        self.chain = chain
        self._filters = Filters(tracking) if tracking is not None and tracking.filters_rows else None
        self._stopping = False
        self._streamed = False  # a session has reached streaming
        self._stop_event: asyncio.Event | None = None
        self._session_state: tuple[SourceCatalog, Progress] | None = None  # while a session streams

    def stop(self) -> None:
        """Ask `run()` to finish the batch in flight, acknowledge it and return (safe from a signal handler)."""
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(
        self, *, until_caught_up: bool = False, until_lsn: int | None = None, give_up_after: float | None = 300.0
    ) -> None:
        """Capture until `stop()`, with `until_caught_up` until the source's WAL position at start is stored, or
        with `until_lsn` until that position is (a fixed end: what the worker's own writes to a destination in the
        source database add to the WAL meanwhile is not waited for).

        Lost and refused connections are retried with backoff: forever when running as a service, for at most
        `give_up_after` seconds without progress when running to a position (then SourceNotReadyError says why).
        A refused password, an unknown role or database, a role without REPLICATION before the first session
        streamed stop it at once (retrying cannot fix them); after, they are retried like a lost connection."""
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        reporter = asyncio.create_task(self._report_progress()) if self.progress is not None else None
        target = until_lsn
        bounded = until_caught_up or until_lsn is not None
        backoff = initial_backoff = 0.25
        failing_since: float | None = None
        try:
            while not self._stopping:
                started, stored_before = time.monotonic(), self.stats.changes
                try:
                    if until_caught_up and target is None:
                        target = await _current_wal_lsn(self.source)
                    await self._session(target)
                    break
                except Exception as exc:
                    # A login refused before the worker ever streamed is a wrong URL or password, which retrying
                    # cannot fix; once it has streamed, the same refusal is maintenance (a database being
                    # restored, a password being rotated) and is retried like a lost connection.
                    if not _is_transient(exc):
                        raise
                    reason = redact(_one_line(exc), self.source, self.destination)
                    if _refused_login(exc) and not self._streamed:
                        raise _refusal(exc, reason) from None
                    now = time.monotonic()
                    if self.stats.changes > stored_before or now - started > 60:
                        backoff, failing_since = initial_backoff, None
                    failing_since = now if failing_since is None else failing_since
                    if bounded and give_up_after is not None and now - failing_since >= give_up_after:
                        raise SourceNotReadyError(
                            f"gave up after {now - failing_since:.0f} s of retries without progress: {reason}"
                        ) from None
                    self.stats.reconnects += 1
                    logger.warning("cannot stream right now (%s); retrying in %.1f s", reason, backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
        stats = self.stats
        flushed = f", flushed {format_lsn(stats.flushed_lsn)}" if stats.flushed_lsn else ""
        self._say(f"stopped: {stats.changes:,} changes in {stats.transactions:,} transactions stored{flushed}")

    async def _session(self, target: int | None) -> None:
        """One connection lifetime: connect both sides, stream until stopped, caught up or failed."""
        options = self.options
        catalog = await SourceCatalog.connect(self.source)
        try:
            info = await catalog.prepare(slot=options.slot, publication=options.publication)
            try:
                destination = await Destination.connect(self.destination)
            except BaseException:
                await self._forget_new_slot(catalog, info)
                raise
            try:
                try:
                    if self._filters is not None and self._filters.config.tables:
                        await check_tables(self.source, options.publication, self._filters)
                        await destination.record_rules(info.database, self._filters.config.recorded_rules())
                    stream_id = await destination.stream(
                        SourceStream(info.system_identifier, info.database, options.slot)
                    )
                    stored = await destination.last_commit_lsn(stream_id)
                    stream = await ReplicationStream.open(
                        self.source, slot=options.slot, publication=options.publication
                    )
                except BaseException:
                    await self._forget_new_slot(catalog, info)
                    raise
                self._streamed = True
                self._say_started(info)
                try:
                    progress = Progress(stream, self.stats, target)
                    progress.flushed = max(info.confirmed_flush_lsn, self.stats.flushed_lsn)
                    queue = CommitQueue(options.max_queued, options.spill_threshold)
                    reader = Reader(
                        stream,
                        Relations(catalog, self._filters),
                        queue,
                        progress,
                        options,
                        stored_commit_lsn=stored,
                        encoding=info.encoding,
                        stopping=lambda: self._stopping,
                    )
                    chain = await destination.chain_state(stream_id, self.chain_key) if self.chain else None
                    writer = Writer(destination, queue, progress, options, stream, info.database, stream_id, chain)
                    self._session_state = catalog, progress
                    try:
                        await _run(reader, writer, queue, progress)
                    finally:
                        self._session_state = None
                finally:
                    await stream.close()
            finally:
                await destination.close()
        finally:
            await catalog.close()

    async def _forget_new_slot(self, catalog: SourceCatalog, info: SourceInfo) -> None:
        """A start that fails before streaming drops the slot it created: a slot nobody reads keeps WAL."""
        if info.slot_created:
            with contextlib.suppress(psycopg.Error):
                await catalog.drop_slot(self.options.slot)

    def _say(self, line: str) -> None:
        if self.progress is not None:
            print(f"bemi-asgi worker: {line}", file=self.progress, flush=True)

    def _say_started(self, info: SourceInfo) -> None:
        slot, position = self.options.slot, format_lsn(info.confirmed_flush_lsn)
        if info.slot_created:
            self._say(f"created slot {slot!r} of database {info.database!r} at {position}: capture starts there")
        else:
            self._say(f"streaming slot {slot!r} of database {info.database!r} from {position}")

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
        if self._session_state is None:
            return None, 0.0
        catalog, progress = self._session_state
        try:
            current = await catalog.current_wal_lsn()
        except psycopg.Error:
            current = None
        lag_bytes = None if current is None else max(0, current - progress.flush_position())
        return lag_bytes, progress.lag_seconds()

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
        if stats.flushed_lsn:  # nothing acknowledged yet: no position to show
            parts.append(f"flushed {format_lsn(stats.flushed_lsn)}")
        print(", ".join(parts), file=self.progress, flush=True)


async def _run(reader: Reader, writer: Writer, queue: CommitQueue, progress: Progress) -> None:
    """Run a session's reader and writer until the reader stops (then the writer finishes what is queued) or
    either fails."""
    writer_task = asyncio.create_task(writer.run())
    reader_task = asyncio.create_task(reader.run())
    try:
        done, _ = await asyncio.wait({reader_task, writer_task}, return_when=asyncio.FIRST_COMPLETED)
        if reader_task in done:
            reader_task.result()  # raise the reader's failure
            queue.end()  # stopped or caught up: finish the batches already queued
        await writer_task
        await progress.send_status()
    finally:
        for task in (reader_task, writer_task):
            task.cancel()
        await asyncio.gather(reader_task, writer_task, return_exceptions=True)
        reader.close()
        queue.close()


async def _current_wal_lsn(dsn: str) -> int:
    catalog = await SourceCatalog.connect(dsn)
    try:
        return await catalog.current_wal_lsn()
    finally:
        await catalog.close()


#: What libpq reports (from the server's FATAL) when it refuses the login itself: a wrong password, an unknown role
#: or database, no pg_hba.conf entry, a role without REPLICATION asking for a WAL sender (PostgreSQL 16+ says
#: "permission denied to start WAL sender", 14-15 "must be superuser or replication role to start walsender").
#: psycopg gives connection failures no SQLSTATE, so the (English) text decides.
_REFUSED_LOGIN = re.compile(
    r"password authentication failed|authentication failed for user|role \S+ does not exist"
    r"|database \S+ does not exist|no pg_hba\.conf entry|password is required|no password supplied"
    r"|permission denied to start WAL sender|must be superuser or replication role"
)


def _refused_login(exc: BaseException) -> bool:
    """Whether the server refused the login itself: a wrong password, an unknown role or database."""
    return isinstance(
        exc,
        asyncpg.InvalidPasswordError
        | asyncpg.InvalidAuthorizationSpecificationError
        | asyncpg.InvalidCatalogNameError
        | psycopg.errors.InvalidCatalogName,
    ) or (isinstance(exc, psycopg.OperationalError) and _REFUSED_LOGIN.search(str(exc)) is not None)


def _refusal(exc: BaseException, reason: str) -> BemiError:
    """A refused login as the error naming its side (psycopg speaks to the source, asyncpg to the destination)."""
    if isinstance(exc, psycopg.Error):
        return SourceNotReadyError(
            f"the source refused the worker ({reason}), which no reconnection fixes: check the source URL "
            "(password, role, database) and that the role has the REPLICATION attribute (ALTER ROLE ... REPLICATION)"
        )
    return DestinationNotReadyError(
        f"the destination refused the worker ({reason}), which no reconnection fixes: check the destination URL "
        "(password, role, database)"
    )


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
