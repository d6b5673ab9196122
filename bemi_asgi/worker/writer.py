"""The writer: committed source transactions from the reader's queue into `bemi.changes`, in batches.

A batch is whatever committed transactions queued up while the previous batch was being written (up to
`batch_rows`), so batches grow under load and stay one transaction deep when idle. Each batch and the last commit
LSN it covers are committed together in the destination (exactly once), with the batch's link of the hash chain
(`chain.py`); then the progress moves and the source is told.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from typing import Final, Protocol

import asyncpg

from .._pgtext import format_lsn
from .chain import ChainState, Entry, Link
from .destination import COLUMNS, BinaryCopy, ChangeRecord, Destination
from .options import Options
from .progress import Progress
from .spill import TransactionBuffer
from .values import clean_json

__all__ = ["CommitQueue", "Committed", "Writer"]

logger = logging.getLogger("bemi_asgi.worker")

_COPY_PIECE_ROWS: Final = 1_000


@dataclass(slots=True)
class Committed:
    """A committed source transaction waiting for the writer."""

    buffer: TransactionBuffer
    xid: int
    commit_lsn: int
    end_lsn: int
    committed_at: datetime
    queued_at: datetime

    @property
    def count(self) -> int:
        return self.buffer.count

    def records(self, database: str, stream: int) -> Iterator[ChangeRecord]:
        """The transaction's `bemi.changes` rows, each segment with its context (the stitching rule)."""
        xid, commit_lsn, committed_at, queued_at = self.xid, self.commit_lsn, self.committed_at, self.queued_at
        for context, chunks in self.buffer.segments():
            for chunk in chunks:
                for key, before, after, schema, table, operation, position, ordinal in chunk:
                    yield (key, before, after, context, database, schema, table, operation, committed_at, queued_at,
                           xid, position, commit_lsn, ordinal, stream)  # fmt: skip


@dataclass(eq=False)
class CommitQueue:
    """Committed transactions from the reader to the writer, bounded by weight (changes held in memory: a spilled
    transaction weighs its in-memory part), so a slow destination holds the reader back. None ends the queue."""

    max_weight: int
    spill_threshold: int
    _queue: asyncio.Queue[Committed | None] = field(default_factory=asyncio.Queue)
    _weight: int = 0
    _room: asyncio.Event = field(default_factory=asyncio.Event)

    async def put(self, item: Committed) -> None:
        """Queue `item`; wait while the queue is over its weight."""
        self._weight += min(item.count, self.spill_threshold)
        self._queue.put_nowait(item)
        while self._weight > self.max_weight:
            self._room.clear()
            await self._room.wait()

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def get(self) -> Committed | None:
        return await self._queue.get()

    def get_nowait(self) -> Committed | None:
        return self._queue.get_nowait()

    def empty(self) -> bool:
        return self._queue.empty()

    def done(self, items: list[Committed]) -> None:
        """The writer is done with `items`: their weight leaves the queue."""
        for item in items:
            self._weight -= min(item.count, self.spill_threshold)
        if self._weight <= self.max_weight:
            self._room.set()

    def close(self) -> None:
        """Free what is still queued (the session ends)."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                item.buffer.close()


class _Stream(Protocol):
    #: True while the reader waits for the server: everything sent so far has been read.
    waiting: bool


@dataclass(eq=False)
class Writer:
    """Takes batches off the queue and stores them."""

    destination: Destination
    queue: CommitQueue
    progress: Progress
    options: Options
    stream: _Stream
    database: str
    #: The source stream's id in `bemi.streams`.
    stream_id: int
    #: The stream's hash chain as stored (`chain.py`): each batch links its changes to it (None: no chain).
    chain: ChainState | None
    #: The (schema, table, operation) whose digests, computed from the rows as sent, matched the destination's.
    _checked: set[tuple[str, str, str]] = field(default_factory=set)
    #: False once a computed digest differed from the destination's: from then on every batch's are read back.
    _trust_digests: bool = True

    async def run(self) -> None:
        """Write until the queue ends."""
        options, queue = self.options, self.queue
        while True:
            first = await queue.get()
            if first is None:
                return
            batch, rows, last = [first], first.count, False
            deadline = time.monotonic() + options.batch_seconds
            while rows < options.batch_rows:
                if queue.empty():
                    # Small batches cost the destination far more per row, so wait for more while working
                    # through a backlog; but when the reader waits on the socket and the last commit is recent,
                    # we are caught up and waiting would only add latency.
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (self.stream.waiting and self.progress.recent(options.batch_seconds)):
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
                await self._store(batch)
            finally:
                for item in batch:
                    item.buffer.close()
            queue.done(batch)
            self.progress.stored(batch[-1].end_lsn, len(batch), rows, batch[-1].committed_at)
            await self.progress.send_status()
            if last:
                return

    async def _store(self, batch: list[Committed]) -> None:
        stream, database, destination = self.stream_id, self.database, self.destination
        first, last, state = batch[0].commit_lsn, batch[-1].commit_lsn, self.chain
        try:
            if destination.binary:
                # Once a digest differed, the destination's contents are read back: the copy hashes none.
                pending = Link(state) if state is not None and self._trust_digests else None
                copy = BinaryCopy(database, stream, link=pending)

                def unchecked() -> list[Entry]:
                    # The first batches holding each relation's rows check a few of their digests against the
                    # destination's; a difference (a value not sent as jsonb prints it) is reported once.
                    return [entry for key in copy.samples.keys() - self._checked for entry in copy.samples[key]]

                self.chain, differs = await destination.write_binary(
                    stream, copy, _binary_copy(copy, batch), first, last, state, unchecked=unchecked,
                )  # fmt: skip
                if differs is not None:
                    self._trust_digests = False
                    logger.warning(
                        "the hash chain's digest of the change at commit LSN %s, ordinal %d, differs from the one "
                        "the destination computes from what it stored; the chain takes the destination's, for every "
                        "batch from now on (slower). Please report it, with that change's table and column types.",
                        format_lsn(differs[0]),
                        differs[1],
                    )
                else:
                    self._checked |= copy.samples.keys()
            else:
                records = chain.from_iterable(item.records(database, stream) for item in batch)
                self.chain = await destination.write(stream, records, first, last, state)
        except (asyncpg.DataError, UnicodeEncodeError) as exc:
            # A value jsonb refuses (or a character the destination's encoding lacks): store the batch again with
            # such characters replaced rather than stop capturing.
            logger.warning("a row needs cleaning before it can be stored as jsonb (%s)", " ".join(str(exc).split()))
            records = chain.from_iterable(item.records(database, stream) for item in batch)
            clean = functools.partial(_jsonb_safe_record, encoding=destination.encoding)
            self.chain = await destination.write(stream, map(clean, records), first, last, state)


def _binary_copy(copy: BinaryCopy, batch: list[Committed]) -> Iterator[bytes]:
    """The batch's `bemi.changes` rows as `copy`'s binary COPY stream, in pieces of about a thousand rows (a few
    hundred kB: larger ones cost memory, not time), so a huge transaction is never held whole. The stitching rule
    gives each segment its context, as in `Committed.records`."""
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


def _jsonb_safe_record(record: ChangeRecord, encoding: str) -> ChangeRecord:
    """`record` with its text rid of what the destination cannot hold (`values.clean_json`; also the key, schema
    and table names), numbers untouched. Only used to retry a batch the destination refused."""
    return tuple(
        value if not isinstance(value, str) else clean_json(value, encoding) if column in _JSON_COLUMNS
        else value.encode(encoding, errors="replace").decode(encoding)
        for column, value in zip(COLUMNS, record, strict=True)
    )  # fmt: skip


_JSON_COLUMNS: Final = frozenset(("before", "after", "context"))
