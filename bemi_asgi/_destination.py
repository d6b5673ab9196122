"""The destination side of the worker: `bemi.changes` and `bemi.worker_state`, written with asyncpg.

Each `write` is one destination transaction holding complete source transactions (rows by COPY) and the last
commit LSN they reach, so the stored progress and the stored rows can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from ._exceptions import DestinationNotReadyError

__all__ = ["COLUMNS", "ChangeRecord", "Destination"]

#: The `bemi.changes` columns the worker writes, in the order of the records it produces.
COLUMNS = (
    "primary_key",
    "before",
    "after",
    "context",
    "database",
    "schema",
    "table",
    "operation",
    "committed_at",
    "queued_at",
    "transaction_id",
    "position",
    "commit_lsn",
    "ordinal",
)

#: One row of `bemi.changes` in `COLUMNS` order (JSON columns as JSON text).
ChangeRecord = tuple[object, ...]


class Destination:
    """One asyncpg connection to the destination database."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, dsn: str) -> Destination:
        """Connect and check the destination tables exist (DestinationNotReadyError says how to create them)."""
        conn = await asyncpg.connect(dsn, server_settings={"application_name": "bemi-asgi worker"})
        try:
            missing = await conn.fetch(
                "SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL",
                ["bemi.changes", "bemi.worker_state"],
            )
        except BaseException:
            await conn.close()
            raise
        if missing:
            await conn.close()
            names = ", ".join(row["name"] for row in missing)
            raise DestinationNotReadyError(
                f"the destination database lacks {names}: create the tables with `bemi-asgi sql-migration` "
                "(migrations_sql/destination_up.sql) on the destination database"
            )
        return cls(conn)

    async def close(self) -> None:
        try:
            await self._conn.close(timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            self._conn.terminate()

    async def last_commit_lsn(self, slot: str) -> int:
        """The commit LSN of the last source transaction stored for `slot` (0 when nothing is)."""
        value = await self._conn.fetchval("SELECT last_commit_lsn FROM bemi.worker_state WHERE slot_name = $1", slot)
        return int(value) if value is not None else 0

    async def write(self, slot: str, records: Iterable[ChangeRecord], last_commit_lsn: int) -> None:
        """Store `records` and move the slot's progress to `last_commit_lsn`, atomically."""
        async with self._conn.transaction():
            await self._conn.copy_records_to_table("changes", schema_name="bemi", columns=COLUMNS, records=records)
            await self._conn.execute(
                "INSERT INTO bemi.worker_state (slot_name, last_commit_lsn) VALUES ($1, $2)"
                " ON CONFLICT (slot_name) DO UPDATE SET last_commit_lsn = excluded.last_commit_lsn,"
                " updated_at = now()",
                slot,
                last_commit_lsn,
            )
