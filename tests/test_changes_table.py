"""The `bemi.changes` schema (`bemi_asgi._changes_table`): the migrated table, the worker's columns, the query
helpers' select list and the `Change` model all agree with its one definition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from bemi_asgi import Change
from bemi_asgi._changes_table import CHANGES, COLUMNS, SCHEMA, WRITTEN
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.worker.destination import BINARY_COLUMNS
from bemi_asgi.worker.destination import COLUMNS as WORKER_COLUMNS


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
def test_the_migrated_table_has_exactly_the_defined_columns(database: str, partitioned: bool) -> None:
    """Both destination migrations create bemi.changes with the defined columns, in order, with their types and
    nullability; the columns the worker leaves out have a default."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(migration_sql(parts=("destination",), partition_by_month=partitioned).encode())
        rows = conn.execute(
            """SELECT attname::text, format_type(atttypid, NULL), NOT attnotnull, atthasdef OR attidentity <> ''
                 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped
                ORDER BY attnum""",
            [f"{SCHEMA}.{CHANGES}"],
        ).fetchall()
    assert [row[:3] for row in rows] == [(column.name, column.type, column.nullable) for column in COLUMNS]
    defaulted = {row[0] for row in rows if row[3]}
    assert {column.name for column in COLUMNS if not column.written} <= defaulted


def test_the_worker_and_the_readers_derive_their_columns_from_it() -> None:
    """The worker writes every column but the defaulted ones (record and binary COPY alike); the readers read whole
    rows (as JSON), and Change has exactly one field per column."""
    assert WORKER_COLUMNS == WRITTEN
    assert sorted(name for name, _ in BINARY_COLUMNS) == sorted(WRITTEN)
    fields = [field.alias or name for name, field in Change.model_fields.items()]
    assert fields == [column.name for column in COLUMNS]


#: The destination SQL of bemi-asgi 0.1, whose primary key was the id.
RELEASE_0_1 = Path(__file__).parent / "data" / "destination_0_1"

#: Some stored changes (two transactions, a TRUNCATE and a baseline among them), in the current month so that the
#: partitioned layout has their partition.
SOME_CHANGES = """
INSERT INTO bemi.changes (primary_key, "before", "after", context, database, "schema", "table", operation,
                          committed_at, queued_at, transaction_id, position, commit_lsn, ordinal)
SELECT CASE WHEN g = 3 THEN NULL ELSE g::text END, '{}', jsonb_build_object('id', g),
       jsonb_build_object('user_id', g % 2),
       'app', 'public', 'items', (ARRAY['CREATE', 'UPDATE', 'DELETE', 'TRUNCATE', 'SNAPSHOT'])[g % 5 + 1],
       date_trunc('month', now()) + g * interval '1 second', now(), 700 + g / 3, 1000 + g, 5000 + g / 3 * 100, g % 3
  FROM generate_series(0, 11) AS g
"""


def _shape(conn: psycopg.Connection[Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """bemi.changes' indexes and constraints, as PostgreSQL prints their definitions."""
    indexes = conn.execute(
        "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index"
        " WHERE indrelid = 'bemi.changes'::regclass ORDER BY 1"
    ).fetchall()
    constraints = conn.execute(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'bemi.changes'::regclass ORDER BY 1"
    ).fetchall()
    return indexes, constraints


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
def test_a_destination_created_by_0_1_is_upgraded_in_place_keeping_every_row(database: str, partitioned: bool) -> None:
    """The current migration, run on a destination that 0.1's SQL created and filled, brings it to the shape a new
    destination gets (the exactly-once key as the primary key, no index on id, a BRIN on committed_at) with every
    stored row unchanged; running it again changes nothing, and the key still refuses a duplicate."""
    old = ["destination_up.sql", "destination_backfill_up.sql"]
    if partitioned:
        old.insert(0, "destination_partitioned_up.sql")
    with psycopg.connect(database, autocommit=True) as conn:
        for name in old:
            conn.execute((RELEASE_0_1 / name).read_text().encode())
        conn.execute(SOME_CHANGES)
        cursor = conn.execute("SELECT * FROM bemi.changes ORDER BY commit_lsn, ordinal")
        stored = cursor.fetchall()
        # 0.1's columns: the upgrade adds the stream (test_destination_upgrade checks which one).
        old_columns = ", ".join(f'"{column.name}"' for column in cursor.description or [])
        read_back = f"SELECT {old_columns} FROM bemi.changes ORDER BY commit_lsn, ordinal"
        current = migration_sql(parts=("destination",), partition_by_month=partitioned).encode()
        conn.execute(current)
        upgraded = _shape(conn)
        assert conn.execute(read_back).fetchall() == stored
        conn.execute(current)
        assert _shape(conn) == upgraded
        assert conn.execute(read_back).fetchall() == stored
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                'INSERT INTO bemi.changes (database, "schema", "table", operation, committed_at, queued_at,'
                " transaction_id, position, commit_lsn, ordinal, stream)"
                ' SELECT database, "schema", "table", operation, committed_at, queued_at, transaction_id,'
                " position, commit_lsn, ordinal, stream FROM bemi.changes LIMIT 1"
            )
        indexes, constraints = upgraded
        key = "(commit_lsn, ordinal, stream, committed_at)" if partitioned else "(commit_lsn, ordinal, stream)"
        assert ("changes_pkey", f"PRIMARY KEY {key}") in constraints
        assert not [name for name, definition in indexes if "(id" in definition]
        by_time = [definition for name, definition in indexes if name == "bemi.changes_committed_at_idx"]
        assert len(by_time) == 1
        assert "USING brin (committed_at)" in by_time[0]
        by_position = [definition for name, definition in indexes if name == "bemi.changes_commit_lsn_idx"]
        assert len(by_position) == 1
        assert "USING brin (commit_lsn)" in by_position[0]
        conn.execute("DROP SCHEMA bemi CASCADE")
        conn.execute(current)
        assert _shape(conn) == upgraded
