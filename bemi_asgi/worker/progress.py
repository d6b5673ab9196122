"""How far one streaming session has come: the positions the reader and the writer share, and the status updates.

The reader moves `seen_end` (keepalives, transactions with nothing to store) and counts transactions handed to the
writer (`queued`); the writer moves `stored_end` as batches commit (`stored`). `flush_position` is what the source
may forget: everything stored, or everything seen when nothing is pending. It never moves back.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Progress", "StatusSink", "WorkerStats"]


class StatusSink(Protocol):
    """Where status updates go (the replication stream)."""

    async def send_status(self, flush_lsn: int, *, reply_requested: bool = False) -> None: ...


@dataclass
class WorkerStats:
    """What the worker has done since it started (all sessions)."""

    changes: int = 0
    transactions: int = 0
    last_commit_time: datetime | None = None
    flushed_lsn: int = 0
    reconnects: int = 0


@dataclass(eq=False)
class Progress:
    """The positions of one session, and the status updates that report them."""

    sink: StatusSink
    stats: WorkerStats
    target: int | None = None  # until_caught_up: stop once everything before it is stored
    flushed: int = 0  # the flush LSN last reported (never moves back)
    stored_end: int = 0  # end LSN of the last transaction stored
    seen_end: int = 0  # the walsender's position: keepalives, and ends of transactions with nothing to store
    open_since: datetime | None = None  # commit time of the transaction being read, if any
    last_commit_time: datetime | None = None  # of the last transaction received
    last_status: float = field(default_factory=time.monotonic)  # when the last status update went out
    _pending: collections.deque[datetime] = field(default_factory=collections.deque)  # commit times queued
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pending(self) -> int:
        """Committed transactions handed to the writer and not stored yet."""
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """Nothing is being read or waiting to be stored."""
        return not self._pending and self.open_since is None

    def seen(self, end_lsn: int) -> None:
        self.seen_end = max(self.seen_end, end_lsn)

    def queued(self, commit_time: datetime) -> None:
        """A committed transaction went to the writer."""
        self._pending.append(commit_time)

    def stored(self, end_lsn: int, transactions: int, changes: int, last_commit_time: datetime) -> None:
        """The writer committed `transactions` (the oldest pending ones) ending at `end_lsn`."""
        self.stored_end = end_lsn
        for _ in range(transactions):
            self._pending.popleft()
        stats = self.stats
        stats.changes += changes
        stats.transactions += transactions
        stats.last_commit_time = last_commit_time

    def flush_position(self) -> int:
        """The LSN the source may forget up to: everything stored, or everything seen when nothing is pending."""
        position = self.stored_end
        if self.idle:
            position = max(position, self.seen_end)
        self.flushed = max(self.flushed, position)
        return self.flushed

    def lag_seconds(self) -> float:
        """Age of the oldest transaction received but not stored yet."""
        oldest = self._pending[0] if self._pending else self.open_since
        return 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())

    def caught_up(self) -> bool:
        """With a target: everything before it is stored (or had nothing to store)."""
        return self.target is not None and self.idle and max(self.stored_end, self.seen_end) >= self.target

    def recent(self, seconds: float) -> bool:
        """Whether the last transaction received committed less than `seconds` ago (by this host's clock: with a
        skewed clock the worker only batches more or less eagerly)."""
        if self.last_commit_time is None:
            return True
        return (datetime.now(UTC) - self.last_commit_time).total_seconds() < seconds

    async def send_status(self, *, reply_requested: bool = False) -> None:
        """Report the flush position to the source."""
        async with self._lock:
            position = self.flush_position()
            await self.sink.send_status(position, reply_requested=reply_requested)
            self.stats.flushed_lsn = position
            self.last_status = time.monotonic()
