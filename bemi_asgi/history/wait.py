"""Read-your-writes: wait until the worker has stored a write.

The position. After a write's COMMIT, `current_lsn(conn)` on the same connection reads
`pg_current_wal_insert_lsn()`: the WAL position right after the write's commit record (or later, if other sessions
wrote WAL meanwhile). Every transaction that committed before it, the write included, has its commit record below it.

The rule: the write is stored once the worker has stored every transaction that committed below that position.
`wait_for` knows this from either of two facts, whichever comes first:

1. `bemi.worker_state.last_commit_lsn >= position`, for a stream of this database (`bemi.streams`; every stream
   when the history is stored on another server, where none is). The worker stores transactions in commit order
   and records the commit LSN of the last one it stored in the same destination transaction, so a stored commit
   at or past the position means every earlier commit is stored too.
2. The worker's replication slot has `confirmed_flush_lsn >= position`. The worker confirms a position to the
   source only once everything below it is stored (or was read and had nothing to store). Right after storing a
   transaction it confirms that transaction's end, which is exactly the position `current_lsn` returned when no
   other WAL was written in between: this is what makes the wait end promptly when nothing else commits after the
   write (fact 1 alone would wait for a later commit, since the last commit LSN is the start of the commit record,
   below the position). When other sessions did write WAL in between, the confirmed position catches up with the
   next stored commit or with the walsender's next keepalive, which the worker answers at once when it has
   nothing pending.

Fact 2 needs the slot to be visible from the pool Bemi reads with: the destination on the same PostgreSQL server
as the source (the usual setup; `pg_replication_slots` is readable by every role).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from .store import history_grants

__all__ = ["current_lsn", "wait_for_lsn"]


async def current_lsn(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The WAL insert position as an int; read after a write's COMMIT, it is past the write's commit record.

    Use it on the connection that wrote, after the transaction committed (not inside it).
    """
    lsn = await conn.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
    return int(lsn)


def _progress_sql(state_table_sql: str, streams_table_sql: str) -> str:
    # The streams of this cluster and database (a carried-over stream without identity counts as one), or every
    # stream when none is (the history is stored on another server): a commit LSN of another source says nothing
    # about this one's.
    return f"""
        WITH candidates AS (
            SELECT id, slot_name,
                   coalesce(system_identifier = (SELECT system_identifier FROM pg_control_system()), true)
                   AND coalesce(database = current_database(), true) AS here
              FROM {streams_table_sql} WHERE $1::text IS NULL OR slot_name = $1
        ), state AS (
            SELECT c.slot_name, c.here, w.last_commit_lsn
              FROM candidates c JOIN {state_table_sql} w ON w.stream = c.id
             WHERE c.here OR NOT EXISTS (SELECT FROM candidates WHERE here)
        )
        SELECT (SELECT max(last_commit_lsn) FROM state) AS stored,
               (SELECT max(confirmed_flush_lsn - '0/0'::pg_lsn) FROM pg_replication_slots
                 WHERE database = current_database() AND slot_name IN (SELECT slot_name FROM state WHERE here))
                   AS confirmed
    """


async def wait_for_lsn(
    pool: asyncpg.Pool,
    state_table_sql: str,
    streams_table_sql: str,
    lsn: int,
    *,
    timeout: float,  # noqa: ASYNC109 (the error message reports it)
    slot_name: str | None,
) -> int:
    """Poll the worker's progress until it covers `lsn` (see the module docstring); return the position reached."""
    sql = _progress_sql(state_table_sql, streams_table_sql)
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        with history_grants():
            record = await pool.fetchrow(sql, slot_name)
        assert record is not None  # an aggregate query always returns one row
        stored, confirmed = record["stored"], record["confirmed"]
        reached = max(int(stored or 0), int(confirmed or 0))
        if reached >= lsn:
            return reached
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(
                f"the worker has not stored position {lsn} within {timeout} s (last stored commit {stored}, "
                f"confirmed {confirmed}): is `bemi-asgi worker` running on this database? Raise timeout= for a "
                "slow worker"
            )
        await asyncio.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.05)
