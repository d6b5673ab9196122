"""The `bemi.changes` schema (`bemi_asgi._changes_table`): the migrated table, the worker's columns, the query
helpers' select list and the `Change` model all agree with its one definition."""

from __future__ import annotations

import psycopg
import pytest

from bemi_asgi import Change
from bemi_asgi._changes_table import CHANGES, COLUMNS, SCHEMA, WRITTEN
from bemi_asgi.history.store import SELECT_COLUMNS
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
    """The worker writes every column but the defaulted ones (record and binary COPY alike); the readers select
    every column, and Change has exactly one field per column."""
    assert WORKER_COLUMNS == WRITTEN
    assert sorted(name for name, _ in BINARY_COLUMNS) == sorted(WRITTEN)
    assert SELECT_COLUMNS.count(",") == len(COLUMNS) - 1
    fields = [field.alias or name for name, field in Change.model_fields.items()]
    assert fields == [column.name for column in COLUMNS]
