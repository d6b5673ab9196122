"""What a connection sends when it goes back to its pool, and when it can send nothing.

asyncpg resets every connection it takes back: it rolls back an open transaction, then sends its reset query
(advisory locks released, `CLOSE ALL`, `UNLISTEN *`, `RESET ALL`), one round trip, so that the next user finds no
session state left behind. Plain reads outside a transaction leave none, and for a short read that round trip is
a large share of its time (0.2 ms of the 0.8 a row's history takes). A connection taken with `acquire_for_reads`
goes back without it when the reads succeeded; every other use of the same pool is reset as asyncpg would.

The bemi pool's connections (`BemiConnection.reset`) skip it so; a plain asyncpg pool does when it was created
with `reset=reset_unless_reads_only` (`Bemi(dsn)`'s own pool is).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["acquire_for_reads", "reset_query", "reset_unless_reads_only"]

#: True while a connection taken with `acquire_for_reads` goes back to its pool after its reads succeeded.
_READS_ONLY: ContextVar[bool] = ContextVar("bemi_reads_only", default=False)


@asynccontextmanager
async def acquire_for_reads(pool: asyncpg.Pool) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
    """A connection of `pool` for plain reads (SELECTs outside a transaction, no `SET`, cursor, `LISTEN` or
    advisory lock). When the block ends without an exception, a pool whose reset asks `reset_query` (a bemi pool,
    one made with `reset=reset_unless_reads_only`) takes it back without asyncpg's reset query; any other pool
    resets it as usual."""
    token = None
    try:
        async with pool.acquire() as conn:
            yield conn
            token = _READS_ONLY.set(True)  # read by the reset, which runs as the `async with` above ends
    finally:
        if token is not None:
            _READS_ONLY.reset(token)


def reset_query(conn: asyncpg.Connection) -> str:
    """The query that resets `conn`'s session state as it goes back to its pool: asyncpg's, or nothing after
    `acquire_for_reads`'s reads."""
    return "" if _READS_ONLY.get() else conn.get_reset_query()


async def reset_unless_reads_only(conn: asyncpg.Connection) -> None:
    """A plain asyncpg pool's `reset=`: asyncpg's reset query, skipped after `acquire_for_reads`'s reads (asyncpg
    has rolled back any open transaction before it calls this)."""
    query = reset_query(conn)
    if query:
        await conn.execute(query)
