"""Read-your-writes: wait until the worker has stored a write.

The rule. The worker stores source transactions in commit order and records, in the same destination transaction,
the commit LSN of the last one stored (`bemi.worker_state.last_commit_lsn`). So once that value is at or past a
position P, every transaction that committed before P is stored, with all its changes.

The position. After a write's COMMIT, `current_lsn(conn)` on the same connection reads
`pg_current_wal_insert_lsn()`: a position past the write's commit record. Waiting for the worker to reach it is
therefore correct: it never returns before the write is stored.

The catch, and what `wait_for` does about it. The stored value is the start of the last stored commit record, so if
nothing commits after the write, the worker stops just below that position and a plain wait would last forever. When
the worker has not reached the position after `nudge_after` seconds, `wait_for` commits one transaction that only
carries a transactional logical message (prefix `bemi_asgi.wait`, which the worker ignores as context) through its
own pool: when that pool is on the tracked source database, the worker receives that commit, stores its progress
past the position, and the wait ends. This costs one small commit, and only for a wait that would otherwise stall.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

__all__ = ["NUDGE_PREFIX", "current_lsn", "wait_for_lsn"]

NUDGE_PREFIX = "bemi_asgi.wait"


async def current_lsn(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The WAL insert position as an int; read after a write's COMMIT, it is past the write's commit record.

    Use it on the connection that wrote, after the transaction committed (not inside it).
    """
    lsn: int = await conn.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
    return int(lsn)


async def wait_for_lsn(
    pool: asyncpg.Pool,
    state_table_sql: str,
    lsn: int,
    *,
    timeout: float,  # noqa: ASYNC109 (the deadline also decides when to nudge)
    slot_name: str | None,
    nudge_after: float | None,
) -> int:
    """Poll the worker's progress until it reaches `lsn`; return the progress reached (TimeoutError otherwise)."""
    if slot_name is None:
        sql = f"SELECT max(last_commit_lsn) FROM {state_table_sql}"
        args: tuple[str, ...] = ()
    else:
        sql = f"SELECT last_commit_lsn FROM {state_table_sql} WHERE slot_name = $1"
        args = (slot_name,)
    start = time.monotonic()
    deadline = start + timeout
    delay = 0.002
    nudged = False
    while True:
        reached = await pool.fetchval(sql, *args)
        if reached is not None and reached >= lsn:
            return int(reached)
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(
                f"the worker has not stored position {lsn} within {timeout} s (it is at {reached}): is "
                "`bemi-asgi worker` running and reading this database? Raise timeout= for a slow worker"
            )
        if not nudged and nudge_after is not None and now - start >= nudge_after:
            nudged = True
            await pool.execute(f"SELECT pg_logical_emit_message(true, '{NUDGE_PREFIX}', '')")
        await asyncio.sleep(min(delay, max(deadline - now, 0.0)))
        delay = min(delay * 2, 0.05)
