"""Upgrading a destination made before source streams (`ops/sql/destination_upgrade_1_streams.sql`): every stored
row is kept, the tables end up as a new migration makes them, and the worker resumes where it stopped.

`tests/data/destination_0_1/` holds that version's destination SQL, as it shipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from bemi_asgi._changes_table import COLUMNS
from bemi_asgi.history.store import CONTEXT_INDEXES_SQL, context_index_keys, context_index_sql
from bemi_asgi.ops.migration import migration_sql

from .worker_support import drain

OLD = Path(__file__).parent / "data" / "destination_0_1"

OLD_ROWS = """
INSERT INTO bemi.changes (primary_key, "after", context, database, "schema", "table", operation, committed_at,
                          queued_at, transaction_id, position, commit_lsn, ordinal)
VALUES ('1', '{"id": 1}', '{"user": "a"}', 'app', 'public', 'items', 'CREATE', now(), now(), 700, 10, 100, 1),
       ('2', '{"id": 2}', '{"user": "a"}', 'app', 'public', 'items', 'CREATE', now(), now(), 700, 11, 100, 2),
       ('1', '{"id": 1}', '{"bemi_backfill": {}}', 'app', 'public', 'items', 'SNAPSHOT', now(), now(), 0, 50, 50,
        -2147483648);
INSERT INTO bemi.worker_state (slot_name, last_commit_lsn) VALUES ('bemi', 100);
INSERT INTO bemi.backfill_state ("schema", "table", snapshot_lsn, rows_stored, done)
VALUES ('public', 'items', 50, 1, true);
"""


def old_destination(partitioned: bool) -> str:
    names = ["destination_partitioned_up.sql"] if partitioned else []
    names += ["destination_up.sql", "destination_backfill_up.sql"]
    return "\n".join((OLD / name).read_text() for name in names)


def fetch(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


def shape(dsn: str) -> dict[str, Any]:
    """The destination's columns (name, type, nullability) and constraints, table by table."""
    found: dict[str, Any] = {}
    for table in ("bemi.changes", "bemi.worker_state", "bemi.backfill_state", "bemi.streams"):
        found[table] = (
            sorted(
                fetch(
                    dsn,
                    "SELECT attname::text, format_type(atttypid, NULL), attnotnull FROM pg_attribute"
                    f" WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped",
                )
            ),
            sorted(
                fetch(
                    dsn,
                    "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint"
                    f" WHERE conrelid = '{table}'::regclass",
                )
            ),
        )
    return found


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
def test_an_upgraded_destination_keeps_every_row_and_matches_a_new_one(database: str, partitioned: bool) -> None:
    """The migration run on a destination of the earlier version keeps every change, the progress and the
    backfill's progress, each in one stream carried over (the slot's, no system identifier yet); a second run
    changes nothing; the tables then have exactly the columns and constraints a new destination has."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(old_destination(partitioned).encode())
        conn.execute(OLD_ROWS)
    before = fetch(database, "SELECT to_jsonb(c) - 'stream' FROM bemi.changes c ORDER BY id")
    migration = migration_sql(parts=("destination",), partition_by_month=partitioned)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(migration.encode())
        conn.execute(migration.encode())
    assert fetch(database, "SELECT id, system_identifier, database, slot_name FROM bemi.streams") == [
        (1, None, "app", "bemi")
    ]
    assert fetch(database, "SELECT to_jsonb(c) - 'stream' FROM bemi.changes c ORDER BY id") == before
    assert fetch(database, "SELECT DISTINCT stream FROM bemi.changes") == [(1,)]
    assert fetch(database, "SELECT stream, last_commit_lsn FROM bemi.worker_state") == [(1, 100)]
    assert fetch(database, 'SELECT stream, "table", rows_stored FROM bemi.backfill_state') == [(1, "items", 1)]
    columns = fetch(
        database,
        "SELECT attname::text, format_type(atttypid, NULL), NOT attnotnull FROM pg_attribute"
        " WHERE attrelid = 'bemi.changes'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    assert columns == [(column.name, column.type, column.nullable) for column in COLUMNS]
    upgraded = shape(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(migration_sql(parts=("destination",), down=True).encode())
        conn.execute(migration.encode())
    assert upgraded == shape(database)


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
def test_a_context_key_index_is_added_to_an_upgraded_destination_and_kept_by_later_migrations(
    database: str, partitioned: bool
) -> None:
    """The opt-in index on a context key is added to a destination of the earlier version, once upgraded, over its
    stored changes (CONCURRENTLY on a plain table, which keeps the worker writing), a later run of the migration
    keeps it, and the query helpers find it there."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(old_destination(partitioned).encode())
        conn.execute(OLD_ROWS)
        migration = migration_sql(parts=("destination",), partition_by_month=partitioned)
        conn.execute(migration.encode())
        conn.execute(context_index_sql("user", concurrently=not partitioned).encode())
        conn.execute(migration.encode())
    with psycopg.connect(database, row_factory=dict_row) as conn:
        assert context_index_keys(conn.execute(CONTEXT_INDEXES_SQL).fetchall()) == {"user"}
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row["QUERY PLAN"]
            for row in conn.execute("""EXPLAIN SELECT * FROM bemi.changes WHERE context -> 'user' = '"a"'""")
        )
    assert "Index Cond: ((context -> 'user'::text)" in plan, plan  # each partition's copy of the index, if any


async def test_the_worker_resumes_an_upgraded_destination_where_it_stopped(database: str) -> None:
    """After the upgrade the worker claims the carried-over stream (filling in the source's system identifier),
    skips what the earlier version stored and stores the rest under that stream."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(old_destination(False).encode())
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute("CREATE PUBLICATION bemi FOR TABLE items")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
        conn.execute("INSERT INTO items VALUES (1, 'stored by the earlier version')")
        stored = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert stored is not None
        conn.execute("INSERT INTO bemi.worker_state (slot_name, last_commit_lsn) VALUES ('bemi', %s)", [stored[0]])
        conn.execute("INSERT INTO items VALUES (2, 'not stored yet')")
        conn.execute(migration_sql(parts=("destination",)).encode())
    await drain(database)
    assert fetch(database, "SELECT primary_key, stream FROM bemi.changes") == [("2", 1)]
    assert fetch(
        database,
        "SELECT s.id, s.database = current_database(), s.system_identifier = c.system_identifier"
        " FROM bemi.streams s, pg_control_system() c",
    ) == [(1, True, True)]


def test_an_alembic_upgrade_revision_keeps_every_row(database: str, tmp_path: Path) -> None:
    """`sql-migration --alembic DIR --upgrade` writes a revision whose upgrade brings the earlier version's tables
    up to date through SQLAlchemy, keeping every row, and whose downgrade changes nothing."""
    import sqlalchemy
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from typer.testing import CliRunner

    from bemi_asgi.cli import app

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(old_destination(False).encode())
        conn.execute(OLD_ROWS)
    arguments = ["sql-migration", "--alembic", str(tmp_path), "--upgrade", "--only", "destination"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*_bemi_asgi_upgrade.py")
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert namespace["DOWNGRADE"] == []
    engine = sqlalchemy.create_engine(database.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection, Operations.context(MigrationContext.configure(connection)):
        namespace["upgrade"]()
        namespace["downgrade"]()
    engine.dispose()
    assert fetch(database, "SELECT count(*), min(stream), max(stream) FROM bemi.changes") == [(3, 1, 1)]
    assert fetch(database, "SELECT stream, last_commit_lsn FROM bemi.worker_state") == [(1, 100)]
