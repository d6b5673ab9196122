"""Stand-in for the worker's output in query tests: rows written to `bemi.changes` exactly as the worker stores them.

One `ChangeWriter.commit(...)` is one source transaction: its changes share a commit LSN (increasing from call to
call) and take ordinals 0, 1, ... in order; `primary_key` is the key's text, or a compact JSON array of the key
columns' texts for a composite key; `before`/`after` are row images as JSON values (`{}` for the missing side).
`row_image` reads a real row in the worker's JSON form (ints, bools, floats and JSON as such, numeric as int when
integral, arrays as lists, everything else as its text), so tests can record real writes on real tables.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bemi_asgi import Bemi
from bemi_asgi._pgtext import quote_ident
from bemi_asgi.ops.migration import load_sql
from bemi_asgi.worker.destination import SourceStream, stream_id

MIGRATION = load_sql("destination_up.sql")


async def migrate(conn: asyncpg.Connection) -> None:
    await conn.execute(MIGRATION)


@dataclass(frozen=True)
class Row:
    """One row change of a transaction."""

    operation: str
    table: str
    primary_key: Any = None  # an int/str, a tuple for a composite key, None for TRUNCATE
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    schema: str = "public"


def key_text(key: Any) -> str | None:
    if key is None:
        return None
    if isinstance(key, tuple):
        return json.dumps([str(part) for part in key], separators=(",", ":"))
    return str(key)


class ChangeWriter:
    """Writes transactions of changes into bemi.changes and advances bemi.worker_state like the worker."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        *,
        slot: str = "bemi",
        start_lsn: int = 0x1_0000_0000,
        database: str | None = None,
    ) -> None:
        self.conn = conn
        self.slot = slot
        #: The source database the changes are stored as coming from (default: the one written to).
        self.database = database
        self._lsns = itertools.count(start_lsn, 0x1000)
        self._xids = itertools.count(1000)

    async def commit(
        self,
        rows: list[Row],
        *,
        context: dict[str, Any] | None = None,
        committed_at: datetime | None = None,
        transaction_id: int | None = None,
    ) -> int:
        """Store one source transaction's changes and the worker's progress; return its commit LSN."""
        commit_lsn = next(self._lsns)
        xid = next(self._xids) if transaction_id is None else transaction_id
        when = committed_at or datetime.now(UTC)
        database = self.database or await self.conn.fetchval("SELECT current_database()")
        stream = await stream_id(self.conn, SourceStream(0, database, self.slot))
        records = [
            (
                key_text(row.primary_key),
                json.dumps(row.before),
                json.dumps(row.after),
                json.dumps(context or {}),
                database,
                row.schema,
                row.table,
                row.operation,
                when,
                datetime.now(UTC),
                xid,
                commit_lsn - 0x800 + ordinal * 0x40,
                commit_lsn,
                ordinal,
                stream,
            )
            for ordinal, row in enumerate(rows)
        ]
        async with self.conn.transaction():
            await self.conn.executemany(
                """INSERT INTO bemi.changes (primary_key, "before", "after", context, database, "schema", "table",
                       operation, committed_at, queued_at, transaction_id, position, commit_lsn, ordinal, stream)
                   VALUES ($1, $2::jsonb, $3::jsonb, $4::jsonb, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)""",
                records,
            )
            await self.conn.execute(
                """INSERT INTO bemi.worker_state (stream, last_commit_lsn) VALUES ($1, $2)
                   ON CONFLICT (stream) DO UPDATE SET last_commit_lsn = excluded.last_commit_lsn""",
                stream,
                commit_lsn,
            )
        return commit_lsn


_INTS = {20, 21, 23, 26}


_FLOATS = {700, 701}


async def row_image(conn: asyncpg.Connection, table: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The row of `table` whose columns equal `key`, in the worker's JSON form; None when there is none."""
    columns = await conn.fetch(
        """SELECT a.attname, a.atttypid::int AS oid, t.typcategory FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
            WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
        table,
    )
    selects = ", ".join(
        f"to_jsonb({quote_ident(c['attname'])})::text"
        if c["typcategory"] == "A"
        else f"{quote_ident(c['attname'])}::text"
        for c in columns
    )
    condition = " AND ".join(f"{quote_ident(name)}::text = ${i}" for i, name in enumerate(key, 1))
    record = await conn.fetchrow(
        f"SELECT {selects} FROM {table} WHERE {condition}", *(str(value) for value in key.values())
    )
    if record is None:
        return None
    image: dict[str, Any] = {}
    for column, text in zip(columns, record, strict=True):
        oid = column["oid"]
        if text is None:
            value: Any = None
        elif column["typcategory"] == "A" or oid in (114, 3802):
            value = json.loads(text)
        elif oid in _INTS:
            value = int(text)
        elif oid in _FLOATS:
            value = float(text)
        elif oid == 16:
            value = text == "true"
        elif oid == 1700 and "." not in text:
            value = int(text)
        else:
            value = text
        image[column["attname"]] = value
    return image


async def tracked(
    conn: asyncpg.Connection,
    writer: ChangeWriter,
    table: str,
    key: dict[str, Any],
    sql: str,
    *args: Any,
    context: dict[str, Any] | None = None,
) -> int:
    """Run one write of one row of a real table and store its change as the worker would; return the commit LSN."""
    before = await row_image(conn, table, key)
    await conn.execute(sql, *args)
    after = await row_image(conn, table, key)
    operation = "CREATE" if before is None else "DELETE" if after is None else "UPDATE"
    stored_key = tuple(key.values()) if len(key) > 1 else next(iter(key.values()))
    return await writer.commit([Row(operation, table, stored_key, before or {}, after or {})], context=context)


@dataclass
class ChangesEnv:
    """A migrated database: a connection writing changes as the worker would, and a Bemi reading them."""

    conn: asyncpg.Connection
    writer: ChangeWriter
    bemi: Bemi


@asynccontextmanager
async def changes_env(database: str, *, setup_sql: str = "", pool_size: int = 2) -> AsyncIterator[ChangesEnv]:
    """Migrate `database`, run `setup_sql` (the tables a test reverts, say), and hand out a `ChangesEnv`."""
    conn = await asyncpg.connect(database)
    try:
        await migrate(conn)
        if setup_sql:
            await conn.execute(setup_sql)
        pool = await asyncpg.create_pool(database, min_size=1, max_size=pool_size)
        try:
            yield ChangesEnv(conn, ChangeWriter(conn), Bemi(pool))
        finally:
            await pool.close()
    finally:
        await conn.close()
