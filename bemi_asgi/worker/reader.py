"""The reader: frames from the replication stream into committed transactions for the writer.

Per frame: a keepalive moves the seen position; Begin opens a transaction buffer (or skips a transaction already
stored); each Insert, Update or Delete becomes its stored change (`relations.Relations.row_change`) and joins the
buffer; `_bemi` messages cut the buffer into segments (the stitching rule), schema change messages join it as
changes (`schema_changes`); Commit hands the buffer to the writer's queue. The reader also sends the periodic
status updates, and stops when asked or, with a target, caught up.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from ..capture.context import MESSAGE_PREFIX
from .options import Options
from .pgoutput import DELETE, INSERT, UPDATE, Begin, Commit, Message, Relation, Truncate, decode
from .progress import Progress
from .relations import Relations
from .rules import is_skip_context
from .schema_changes import SCHEMA_CHANGE_PREFIX, schema_change
from .spill import TransactionBuffer
from .stitching import context_json
from .stream import KEEPALIVE, XLOG_HEADER_SIZE, Keepalive, parse_frame, xlog_start_lsn
from .writer import CommitQueue, Committed

__all__ = ["Reader"]

_ROW_CHANGES: Final = frozenset((INSERT, UPDATE, DELETE))
_start_lsn: Final = struct.Struct(">Q").unpack_from  # `xlog_start_lsn` without the call, on the hot path
_EMPTY: Final = "{}"


class _Stream(Protocol):
    async def read_frames(self, wait: float, limit: int = 4096) -> list[memoryview]: ...


@dataclass(slots=True)
class _Open:
    """The transaction being read."""

    begin: Begin
    buffer: TransactionBuffer | None  # None: skipped (already stored, or under skip_tracking())
    ordinal: int = 0


class Reader:
    """Reads one session's stream until stopped, caught up or failed."""

    def __init__(
        self,
        stream: _Stream,
        relations: Relations,
        queue: CommitQueue,
        progress: Progress,
        options: Options,
        *,
        stored_commit_lsn: int,
        encoding: str = "utf-8",
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._stream = stream
        self._relations = relations
        self._queue = queue
        self._progress = progress
        self._options = options
        self._stored_commit_lsn = stored_commit_lsn  # transactions at or below it are already in the destination
        self._encoding = encoding  # of logical message contents
        self._stopping = stopping
        self._open: _Open | None = None
        self._reply_due = False  # the walsender asked for a status update

    def close(self) -> None:
        """Free the open transaction's buffer (the session ends)."""
        if self._open is not None and self._open.buffer is not None:
            self._open.buffer.close()
        self._open = None

    async def run(self) -> None:
        progress, status_interval = self._progress, self._options.status_interval
        progress.last_status = time.monotonic()
        while not self._stopping():
            if progress.caught_up():
                return
            frames = await self._stream.read_frames(0.2 if progress.target is not None else 1.0)
            if frames:
                await self.handle(frames)
                await asyncio.sleep(0)  # let the writer and the progress line run while data keeps coming
            elif progress.target is not None and not progress.caught_up():
                # Idle and not caught up: ask the walsender where it is (it answers with a keepalive).
                await progress.send_status(reply_requested=True)
                continue
            if self._reply_due or time.monotonic() - progress.last_status >= status_interval:
                self._reply_due = False
                # While idle, ask for a keepalive back: its position lets the flush LSN follow the walsender.
                await progress.send_status(reply_requested=not frames)

    async def handle(self, frames: list[memoryview]) -> None:
        row_change = self._relations.row_change
        for frame in frames:
            if frame[0] == KEEPALIVE:
                self._keepalive(frame)
                continue
            data = bytes(frame)
            if len(data) > XLOG_HEADER_SIZE and data[XLOG_HEADER_SIZE] in _ROW_CHANGES:
                # Most frames: a row change joins the open transaction's buffer (inline, as it runs per change).
                current = self._open
                if current is not None and current.buffer is not None and (found := row_change(data)) is not None:
                    rel, (key, before, after, operation) = found
                    current.ordinal = ordinal = current.ordinal + 1
                    current.buffer.append((key, before, after, rel.schema, rel.table, operation,
                                           _start_lsn(data, 1)[0], ordinal))  # fmt: skip
                continue
            message = decode(data[XLOG_HEADER_SIZE:])
            if type(message) is Begin:
                self._begin(message)
            elif type(message) is Commit:
                await self._commit(message)
            elif type(message) is Message:
                self._message(message)
            elif type(message) is Relation:
                await self._relations.add(message)
            elif type(message) is Truncate:
                self._truncate(message, xlog_start_lsn(data))
            # Type and Origin messages carry nothing the changes need.

    def _keepalive(self, frame: memoryview) -> None:
        keepalive = parse_frame(frame)
        assert isinstance(keepalive, Keepalive)
        progress = self._progress
        # Everything before wal_end was sent, and frames arrive in order: all of it has been read.
        progress.seen(keepalive.wal_end)
        # The walsender pings while the confirmed position is behind what it sent: WAL it read and had nothing to
        # send for (the worker's own inserts into bemi.changes, untracked tables, other databases). Confirm it now
        # when nothing is pending, or `wait_for` on a position past such WAL waits for the next status interval.
        if keepalive.reply_requested or (keepalive.wal_end > progress.flushed and progress.idle):
            self._reply_due = True

    def _begin(self, message: Begin) -> None:
        if self._open is not None and self._open.buffer is not None:
            self._open.buffer.close()
        skip = message.final_lsn <= self._stored_commit_lsn
        self._open = _Open(message, None if skip else TransactionBuffer(self._options.spill_threshold))
        self._progress.open_since = message.commit_time

    async def _commit(self, message: Commit) -> None:
        current, self._open = self._open, None
        progress = self._progress
        progress.open_since = None
        progress.last_commit_time = message.commit_time
        buffer = current.buffer if current is not None else None
        if current is None or buffer is None or buffer.count == 0:
            if buffer is not None:
                buffer.close()
            progress.seen(message.end_lsn)
            return
        committed = Committed(
            buffer, current.begin.xid, message.commit_lsn, message.end_lsn, message.commit_time, datetime.now(UTC)
        )
        progress.queued(message.commit_time)
        await self._queue.put(committed)

    def _message(self, message: Message) -> None:
        current = self._open
        if not message.transactional or current is None or current.buffer is None:
            return
        if message.prefix == SCHEMA_CHANGE_PREFIX:
            self._schema_change(message, current)
            return
        if message.prefix != MESSAGE_PREFIX:
            return
        context = context_json(message.content, self._encoding)
        if self._options.honor_skip and is_skip_context(message.content, context):
            # skip_tracking(): nothing of this transaction is stored; its end still moves the progress on.
            current.buffer.close()
            current.buffer = None
            return
        current.buffer.add_context(context)

    def _schema_change(self, message: Message, current: _Open) -> None:
        assert current.buffer is not None
        change = schema_change(message.content, self._encoding, message.lsn, current.ordinal + 1)
        if change is not None and self._relations.tracks(change[3], change[4]):
            current.ordinal += 1
            current.buffer.append(change)

    def _truncate(self, message: Truncate, lsn: int) -> None:
        current = self._open
        if current is None or current.buffer is None:
            return
        for rel in self._relations.truncated(message):
            current.ordinal += 1
            current.buffer.append((None, _EMPTY, _EMPTY, rel.schema, rel.table, "TRUNCATE", lsn, current.ordinal))
