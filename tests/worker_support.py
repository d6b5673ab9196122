"""Shared setup for the worker tests: a prepared source database, running the worker, reading what it stored."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bemi_asgi._pgtext import parse_lsn
from bemi_asgi.ops.migration import load_sql
from bemi_asgi.worker.pipeline import Worker

DESTINATION_SQL = load_sql("destination_up.sql")


def current_wal_lsn(dsn: str) -> int:
    """The server's WAL position now."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(row[0])


def prepare_source(dsn: str, schema_sql: str, tables: list[str], *, slot: str = "bemi") -> None:
    """Create the tables, a `bemi` publication for them with REPLICA IDENTITY FULL, the destination tables, and
    the slot (so every later change is captured)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
        if schema_sql:
            conn.execute(schema_sql)
        names = sql.SQL(", ").join(sql.Identifier(*name.split(".")) for name in tables)
        conn.execute(sql.SQL("CREATE PUBLICATION bemi FOR TABLE {}").format(names))
        for name in tables:
            conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.Identifier(*name.split("."))))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])


def emit(conn: psycopg.Connection[Any], context: dict[str, Any] | str) -> None:
    """Emit a `_bemi` context message in the current transaction, as the pool does at COMMIT."""
    payload = context if isinstance(context, str) else json.dumps(context)
    conn.execute("SELECT pg_logical_emit_message(true, '_bemi', %s::text)", [payload])


async def drain(dsn: str, **options: Any) -> Worker:
    """Run the worker in-process until everything committed so far is stored."""
    worker = Worker(dsn, **options)
    await worker.run(until_caught_up=True)
    return worker


def changes(dsn: str, where: str = "true") -> list[dict[str, Any]]:
    """The stored changes in commit and ordinal order."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(f"SELECT * FROM bemi.changes WHERE {where} ORDER BY commit_lsn, ordinal").fetchall()
