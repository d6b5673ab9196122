"""Retention: delete the changes committed before a cutoff, while the worker keeps storing new ones.

`prune` works in small steps so that it never holds locks for long on a live table:

- On a table partitioned by month (`sql-migration --partition-by-month`), a partition whose whole range is before
  the cutoff is dropped: instant, and no dead rows left to vacuum. Dropping a partition briefly takes an
  exclusive lock on `bemi.changes` (PostgreSQL's rule), so it runs with a short `lock_timeout` and retries rather
  than queueing every reader and the worker behind a long query.
- The remaining rows before the cutoff (the month that straddles it, the default partition, or all of an
  unpartitioned table) are deleted in batches of `batch_size`, oldest first in commit order (the primary key),
  each batch its own transaction. The worker's COPY only inserts, so the two never wait on each other's rows.
- On a partitioned table, the partitions of the coming months are created (`bemi.create_changes_partitions`), so
  the worker's rows keep landing in monthly partitions rather than in the default one.

Each hash chain that lost its start gets an anchor (`ops.anchors`), so `bemi-asgi verify` checks the rest.

The cutoff is exact: rows with `committed_at < before` go, rows at or after it stay. Deleting history never makes
the worker store anything again: it skips by its own progress (`bemi.worker_state`), not by the stored rows.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TextIO

import psycopg
from psycopg import sql

from .._exceptions import ConfigError
from .anchors import anchor_chains

__all__ = ["ACCEPTED_AGE_UNITS", "PruneResult", "create_partitions", "cutoff_for_age", "maintain", "prune"]

# The spellings people write for a retention, each to its unit. A bare `m` (or `M`) is refused: minutes to some,
# months to others, and a retention typo must never delete history.
_UNIT_SPELLINGS = {
    "seconds": ("s", "sec", "secs", "second", "seconds"),
    "minutes": ("min", "mins", "minute", "minutes"),
    "hours": ("h", "hr", "hrs", "hour", "hours"),
    "days": ("d", "day", "days"),
    "weeks": ("w", "wk", "wks", "week", "weeks"),
    "months": ("mo", "mon", "mons", "month", "months"),
    "years": ("y", "yr", "yrs", "year", "years"),
}
_UNITS = {spelling: unit for unit, spellings in _UNIT_SPELLINGS.items() for spelling in spellings}
_AGE = re.compile(r"^\s*(\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
ACCEPTED_AGE_UNITS = "s, min, h, d, w, mo, y (or the words: seconds, minutes, hours, days, weeks, months, years)"


def cutoff_for_age(age: str, now: datetime) -> datetime:
    """The moment `age` before `now`: `90d`, `2w`, `6mo`, `1y`, `12h`, `30min`, `3 months`. Months and years are
    calendar ones (2026-03-31 minus 1mo is 2026-02-28). Ambiguous or unknown units are a ConfigError."""
    match = _AGE.match(age)
    if match is None:
        raise ConfigError(
            f"{age!r} is not an age: write a number and a unit, e.g. 90d, 6mo or 1y ({ACCEPTED_AGE_UNITS})"
        )
    count, spelling = int(match[1]), match[2]
    if spelling.lower() == "m":
        raise ConfigError(
            f"{age!r} is ambiguous (minutes or months?): write {count}min or {count}mo ({ACCEPTED_AGE_UNITS})"
        )
    unit = _UNITS.get(spelling.lower())
    if unit is None:
        raise ConfigError(f"{age!r} has an unknown unit {spelling!r}: use one of {ACCEPTED_AGE_UNITS}")
    if unit in ("months", "years"):
        return _months_before(now, count * 12 if unit == "years" else count)
    return now - timedelta(**{unit: count})


def _months_before(moment: datetime, months: int) -> datetime:
    """The same day and time `months` calendar months earlier, the day clamped to the month's last."""
    year, month = divmod(moment.year * 12 + moment.month - 1 - months, 12)
    if year < 1:
        raise ConfigError(f"{months} months before {moment.date()} is before year 1")
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


@dataclass
class PruneResult:
    """What `prune` did (or, with `dry_run`, would do)."""

    cutoff: datetime
    deleted: int = 0  # changes deleted, including those of dropped partitions
    dropped_partitions: list[str] = field(default_factory=list)
    created_partitions: list[str] = field(default_factory=list)
    #: Hash chains anchored where the deleted changes ended (`ops.anchors`).
    anchors: int = 0


def prune(
    dsn: str,
    *,
    before: datetime,
    batch_size: int = 1000,
    dry_run: bool = False,
    months_ahead: int = 3,
    progress: TextIO | None = None,
    lock_timeout: float = 2.0,
) -> PruneResult:
    """Delete the changes of `bemi.changes` committed before `before` (timezone-aware); see the module docstring."""
    if before.tzinfo is None:
        raise ConfigError("the cutoff must be timezone-aware (e.g. datetime.now(UTC) - timedelta(days=90))")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    result = PruneResult(before)
    with psycopg.connect(dsn, autocommit=True) as conn:
        partitioned = _is_partitioned(conn)
        if partitioned:
            for name, rows in _partitions_before(conn, before):
                if not dry_run:
                    _drop_partition(conn, name, lock_timeout, progress)
                result.dropped_partitions.append(name)
                result.deleted += rows
                _say(progress, f"{'would drop' if dry_run else 'dropped'} partition bemi.{name} ({rows:,} changes)")
        if dry_run:
            row = conn.execute("SELECT count(*) FROM bemi.changes WHERE committed_at < %s", [before]).fetchone()
            assert row is not None
            result.deleted += int(row[0])
        else:
            result.deleted += _delete_in_batches(conn, before, batch_size, progress)
            # The hash chains lost their start: record where they go on, so the rest verifies.
            result.anchors = anchor_chains(conn)
        if partitioned and not dry_run:
            result.created_partitions = create_partitions(conn, months_ahead)
    verb = "would delete" if dry_run else "deleted"
    _say(progress, f"{verb} {result.deleted:,} changes committed before {before.isoformat()}")
    return result


def create_partitions(conn: psycopg.Connection[Any], months_ahead: int = 3) -> list[str]:
    """Create the partitions of this month and the next `months_ahead` that are missing; their names."""
    rows = conn.execute("SELECT bemi.create_changes_partitions(%s)", [months_ahead]).fetchall()
    return [str(row[0]) for row in rows]


def maintain(dsn: str, months_ahead: int = 3) -> list[str]:
    """Create the coming months' partitions of a partitioned `bemi.changes`; their names."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not _is_partitioned(conn):
            raise ConfigError("bemi.changes is not partitioned (sql-migration --partition-by-month)")
        return create_partitions(conn, months_ahead)


def _is_partitioned(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'bemi' AND c.relname = 'changes'"
    ).fetchone()
    if row is None:
        raise ConfigError("bemi.changes does not exist in this database: give the destination database's URL")
    return bool(row[0] == "p")


def _partitions_before(conn: psycopg.Connection[Any], before: datetime) -> list[tuple[str, int]]:
    """The range partitions whose upper bound is at or before `before` (all their rows are older), with row counts."""
    rows = conn.execute(
        r"""
        SELECT c.relname::text,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'bemi.changes'::regclass AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
        ORDER BY upper
        """
    ).fetchall()
    found = []
    for name, upper in rows:
        if upper is not None and upper <= before:
            count = conn.execute(sql.SQL("SELECT count(*) FROM bemi.{}").format(sql.Identifier(name))).fetchone()
            assert count is not None
            found.append((str(name), int(count[0])))
    return found


def _drop_partition(conn: psycopg.Connection[Any], name: str, lock_timeout: float, progress: TextIO | None) -> None:
    statement = sql.SQL("DROP TABLE bemi.{}").format(sql.Identifier(name))
    for attempt in range(1, 31):
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout * 1000)}ms"])
                conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            _say(progress, f"bemi.{name} is busy (attempt {attempt}), retrying")
            time.sleep(min(0.1 * attempt, 2.0))
    raise ConfigError(f"could not lock bemi.{name} to drop it: a long query holds bemi.changes; try again later")


#: One batch: the next `size` changes in commit order (the primary key) after the last one looked at, those of them
#: committed before the cutoff deleted. It reads only the rows it looks at, never the ones earlier batches deleted.
_BATCH = """
WITH batch AS (
    SELECT commit_lsn, ordinal, stream, committed_at FROM bemi.changes
     WHERE (commit_lsn, ordinal, stream) > (%(lsn)s::bigint, %(ordinal)s::integer, %(stream)s::integer)
     ORDER BY commit_lsn, ordinal, stream LIMIT %(size)s),
gone AS (
    DELETE FROM bemi.changes c USING batch b
     WHERE b.committed_at < %(before)s AND c.commit_lsn = b.commit_lsn AND c.ordinal = b.ordinal
       AND c.stream = b.stream AND c.committed_at = b.committed_at
    RETURNING 1)
SELECT (SELECT count(*) FROM gone), (SELECT bool_or(committed_at >= %(before)s) FROM batch), last.commit_lsn,
       last.ordinal, last.stream
  FROM (SELECT commit_lsn, ordinal, stream FROM batch ORDER BY commit_lsn DESC, ordinal DESC, stream DESC LIMIT 1)
       AS last
"""

#: The older changes stored after the walk's end, `size` at a time: found through the BRIN on committed_at.
_STRAGGLERS = """
DELETE FROM bemi.changes WHERE (commit_lsn, ordinal, committed_at) IN (
    SELECT commit_lsn, ordinal, committed_at FROM bemi.changes WHERE committed_at < %(before)s LIMIT %(size)s)
"""


def _delete_in_batches(
    conn: psycopg.Connection[Any], before: datetime, batch_size: int, progress: TextIO | None
) -> int:
    # Commit times grow with commit LSNs, so the walk in commit order meets the old changes first and stops at the
    # first batch that reaches the cutoff. A change committed before the cutoff but stored later in commit order (a
    # clock stepped back) is left to the last loop, which the BRIN leads to.
    total = 0
    lsn, ordinal, stream = -1, 0, 0
    while True:
        position = {"lsn": lsn, "ordinal": ordinal, "stream": stream}
        row = conn.execute(_BATCH, {**position, "size": batch_size, "before": before}).fetchone()
        if row is None:
            break
        deleted, reached_cutoff, lsn, ordinal, stream = row
        total += deleted
        if deleted:
            _say(progress, f"deleted {total:,} changes so far")
        if reached_cutoff:
            break
    while deleted := conn.execute(_STRAGGLERS, {"before": before, "size": batch_size}).rowcount:
        total += deleted
        _say(progress, f"deleted {total:,} changes so far")
    return total


def _say(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        print(f"bemi-asgi prune: {text}", file=progress, flush=True)
