"""Schema changes in the history: the migration's event triggers record DDL on tracked tables as changes with
operation DDL, stored by the worker in order with the row changes, with their context; the query helpers and the
change browser replay them."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

import bemi_asgi
from bemi_asgi import Bemi, Operation
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.ops.verify import verify

from .worker_support import changes, drain, emit


def migrate(dsn: str) -> None:
    """The tracked table, then the migration (source and destination), then the worker's slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric)")
        conn.execute(migration_sql())
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")


def ddl_changes(dsn: str) -> list[dict[str, Any]]:
    return changes(dsn, "operation = 'DDL'")


async def test_add_rename_and_drop_column_are_stored_in_order_with_the_row_changes(database: str) -> None:
    """ADD COLUMN, RENAME COLUMN and DROP COLUMN between row changes are stored as DDL changes in commit order,
    each with the table's definition before and after, its command tag and object identity, and its context."""
    migrate(database)
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'pen', 2.5)")
        emit(conn, {"user": "alice"})
        conn.commit()
        conn.execute("ALTER TABLE items ADD COLUMN stock int")
        conn.execute("UPDATE items SET stock = 3 WHERE id = 1")
        emit(conn, {"migration": "0002_stock"})
        conn.commit()
        conn.execute("ALTER TABLE items RENAME COLUMN name TO title")
        conn.commit()
        conn.execute("UPDATE items SET title = 'quill' WHERE id = 1")
        conn.commit()
        conn.execute("ALTER TABLE items DROP COLUMN price")
        emit(conn, {"migration": "0003_drop_price"})
        conn.commit()
        conn.execute("UPDATE items SET stock = 4 WHERE id = 1")
        conn.commit()
    await drain(database)

    stored = changes(database)
    assert [(row["operation"], row["table"]) for row in stored] == [
        ("CREATE", "items"),
        ("DDL", "items"),
        ("UPDATE", "items"),
        ("DDL", "items"),
        ("UPDATE", "items"),
        ("DDL", "items"),
        ("UPDATE", "items"),
    ]
    add, rename, drop = (row for row in stored if row["operation"] == "DDL")
    assert add["context"] == {"migration": "0002_stock"}  # the message after it in its transaction
    assert rename["context"] == {}  # no context: as from psql
    assert drop["context"] == {"migration": "0003_drop_price"}
    assert add["transaction_id"] == stored[2]["transaction_id"]
    assert add["ordinal"] < stored[2]["ordinal"]
    for change in (add, rename, drop):
        assert change["primary_key"] is None
        assert change["after"]["command_tag"] == "ALTER TABLE"
        assert (change["schema"], change["table"]) == ("public", "items")
    assert add["after"]["object_identity"] == "public.items"
    assert (rename["after"]["object_type"], rename["after"]["object_identity"]) == (
        "table column",
        "public.items.title",
    )
    assert sorted(add["before"]["columns"]) == ["id", "name", "price"]
    assert sorted(add["after"]["columns"]) == ["id", "name", "price", "stock"]
    assert add["after"]["columns"]["stock"] == {"type": "integer", "not_null": False, "number": 4}
    assert add["after"]["columns"]["name"] == {"type": "text", "not_null": True, "number": 2}
    assert rename["before"]["columns"]["name"]["number"] == rename["after"]["columns"]["title"]["number"]
    assert sorted(drop["after"]["columns"]) == ["id", "stock", "title"]
    # Each change's before is the table as the previous one left it.
    assert drop["before"]["columns"] == rename["after"]["columns"]
    assert rename["before"]["columns"] == add["after"]["columns"]


async def test_create_index_constraint_and_drop_table_are_recorded(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CREATE TABLE in a tracked schema, CREATE INDEX, ADD CONSTRAINT, DROP INDEX and DROP TABLE are recorded
    with their command tags; an index or constraint shows in the table's definition. They are chained like any
    change: the digests the worker computes are the destination's, and the chain verifies."""
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
        conn.execute("CREATE INDEX orders_total_idx ON orders (total)")
        conn.execute("ALTER TABLE orders ADD CONSTRAINT orders_total_positive CHECK (total > 0)")
        conn.execute("DROP INDEX orders_total_idx")
        conn.execute("DROP TABLE orders")
        conn.execute("CREATE TEMP TABLE scratch (x int)")  # not tracked
    with caplog.at_level(logging.WARNING, logger="bemi_asgi.worker"):
        await drain(database)
    assert [r.message for r in caplog.records if "digest" in r.message] == []
    assert verify(database, key=None)[0].intact

    stored = ddl_changes(database)
    assert [(row["table"], row["after"]["command_tag"]) for row in stored] == [
        ("orders", "CREATE TABLE"),
        ("orders", "CREATE INDEX"),
        ("orders", "ALTER TABLE"),
        ("orders", "DROP INDEX"),
        ("orders", "DROP TABLE"),
    ]
    create, index, constraint, drop_index, drop = stored
    assert create["before"] == {}
    assert sorted(create["after"]["columns"]) == ["id", "total"]
    assert sorted(create["after"]["indexes"]) == ["orders_pkey"]
    assert index["after"]["object_identity"] == "public.orders_total_idx"
    assert "orders_total_idx" in index["after"]["indexes"]
    assert constraint["after"]["constraints"]["orders_total_positive"] == "CHECK ((total > 0))"
    assert "orders_total_idx" not in drop_index["after"]["indexes"]
    assert drop["after"] == {"command_tag": "DROP TABLE", "object_type": "table", "object_identity": "public.orders"}
    assert sorted(drop["before"]["columns"]) == ["id", "total"]


async def test_rolled_back_ddl_leaves_no_trace(database: str) -> None:
    """A DDL rolled back (a whole transaction, or a savepoint) stores nothing and leaves the remembered definition
    as it was, so the next schema change's `before` is the table as it really was."""
    migrate(database)
    with psycopg.connect(database) as conn:
        conn.execute("ALTER TABLE items ADD COLUMN ghost int")
        conn.rollback()
        conn.execute("SAVEPOINT s")
        conn.execute("ALTER TABLE items ADD COLUMN phantom int")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("ALTER TABLE items ADD COLUMN real_one int")
        conn.commit()
    await drain(database)

    (stored,) = ddl_changes(database)
    assert sorted(stored["before"]["columns"]) == ["id", "name", "price"]
    assert sorted(stored["after"]["columns"]) == ["id", "name", "price", "real_one"]


async def test_migration_through_the_bemi_pool_carries_its_context(database: str) -> None:
    """A migration run inside a transaction of the bemi pool stores its DDL with the migration's context."""
    migrate(database)
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=1)
    try:
        with bemi_asgi.bemi_context(migration="0004_sku"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("ALTER TABLE items ADD COLUMN sku text")
    finally:
        await pool.close()
    await drain(database)

    (stored,) = ddl_changes(database)
    assert stored["context"] == {"migration": "0004_sku"}


async def test_untracked_and_excluded_tables_record_nothing(database: str) -> None:
    """DDL on a table outside the tracked schemas, or excluded from tracking, is not recorded; neither is the
    migration's own REPLICA IDENTITY FULL on a new table (its definition does not change)."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA other; CREATE TABLE other.t (id int PRIMARY KEY); CREATE TABLE skip (id int)")
        conn.execute(migration_sql(exclude_tables=["public.skip"]))
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
        conn.execute("ALTER TABLE other.t ADD COLUMN x int")
        conn.execute("ALTER TABLE skip ADD COLUMN x int")
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    await drain(database)

    stored = ddl_changes(database)
    assert [(row["table"], row["after"]["command_tag"]) for row in stored] == [("kept", "CREATE TABLE")]


async def test_history_and_as_of_replay_schema_changes(database: str) -> None:
    """`history` shows the schema changes that changed the row's columns between its versions; `as_of` and
    `table_as_of` give the row under the columns of that moment (renamed, dropped); `columns_as_of` the table's
    columns then, before and after each migration."""
    migrate(database)
    moments: list[datetime] = []

    def mark(conn: psycopg.Connection[Any]) -> None:
        conn.commit()
        moments.append(conn.execute("SELECT clock_timestamp()").fetchone()[0])  # type: ignore[index]
        conn.commit()

    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'pen', 2.5)")
        mark(conn)  # 0: created
        conn.execute("CREATE INDEX items_name_idx ON items (name)")  # no column changes: not in the row history
        conn.execute("ALTER TABLE items RENAME COLUMN name TO title")
        mark(conn)  # 1: renamed
        conn.execute("ALTER TABLE items DROP COLUMN price")
        mark(conn)  # 2: dropped
        conn.execute("ALTER TABLE items ADD COLUMN stock int")
        mark(conn)  # 3: added, the row not changed since
        conn.execute("UPDATE items SET stock = 7")
        mark(conn)  # 4
    await drain(database)

    async with Bemi(database) as bemi:
        history = await bemi.history("items", 1)
        assert [(change.operation, change.after.get("command_tag")) for change in history] == [
            (Operation.CREATE, None),
            (Operation.DDL, "ALTER TABLE"),
            (Operation.DDL, "ALTER TABLE"),
            (Operation.DDL, "ALTER TABLE"),
            (Operation.UPDATE, None),
        ]
        expected = [
            {"id": 1, "name": "pen", "price": "2.5"},
            {"id": 1, "title": "pen", "price": "2.5"},
            {"id": 1, "title": "pen"},
            {"id": 1, "title": "pen", "stock": None},
            {"id": 1, "title": "pen", "stock": 7},
        ]
        for moment, row in zip(moments, expected, strict=True):
            assert await bemi.as_of("items", 1, at=moment) == row
            assert [item async for item in bemi.table_as_of("items", at=moment)] == [row]
            columns = await bemi.columns_as_of("items", at=moment)
            assert sorted(columns or {}) == sorted(row)
        assert (await bemi.columns_as_of("items", at=moments[0]))["price"]["type"] == "numeric"  # type: ignore[index]
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("DROP TABLE items")
        await drain(database)
        assert await bemi.columns_as_of("items", at=datetime.now(UTC)) is None
        assert [item async for item in bemi.table_as_of("items", at=datetime.now(UTC))] == []
        assert await bemi.as_of("items", 1, at=datetime.now(UTC)) is None
        assert sorted(await bemi.columns_as_of("items", at=moments[4]) or {}) == ["id", "stock", "title"]


@pytest.mark.parametrize("tag", ["ALTER TABLE"])
def test_schema_change_payload_of_another_shape_is_ignored(tag: str) -> None:
    """A message with the schema change prefix that is not one (written by hand) is ignored, never fatal."""
    from bemi_asgi.worker.schema_changes import schema_change

    assert schema_change(b"not json", "utf-8", 1, 1) is None
    assert schema_change(b'{"schema": 1, "table": "t", "before": {}, "after": {}}', "utf-8", 1, 1) is None
    found = schema_change(b'{"schema": "s", "table": "t", "before": {}, "after": {"command_tag": "%s"}}'
                          .replace(b"%s", tag.encode()), "utf-8", 5, 2)  # fmt: skip
    assert found is not None
    assert found[3:] == ("s", "t", "DDL", 5, 2)


async def test_change_browser_shows_schema_changes_on_the_row_and_timeline(database: str) -> None:
    """The row page lists the schema change between two versions of the row with what it did to the columns, and
    the timeline summarises it; the row's state is shown under the renamed column."""
    from bemi_asgi.ui import allow_all, bemi_ui

    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'pen', 2.5)")
        conn.execute("ALTER TABLE items RENAME COLUMN name TO title")
        conn.execute("ALTER TABLE items ADD COLUMN stock int")
        conn.execute("UPDATE items SET stock = 1")
    await drain(database)

    async with Bemi(database) as bemi:
        app = bemi_ui(bemi, authorize=allow_all)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            row = await client.get("/row", params={"schema": "public", "table": "items", "key": "1"})
            timeline = await client.get("/")
    assert row.status_code == timeline.status_code == 200
    assert "ALTER TABLE public.items.title, name → title" in row.text
    assert "ALTER TABLE public.items, +stock" in row.text
    assert 'id="state"' in row.text
    assert '<td class="field">title</td>' in row.text
    assert "key=None" not in row.text  # "state after this" of a schema change links to the row's own page
    assert "ALTER TABLE public.items, +stock" in timeline.text


async def test_create_index_concurrently_is_recorded_and_never_fails(database: str) -> None:
    """CREATE INDEX CONCURRENTLY (run outside a transaction block) succeeds with the event triggers in place and
    its index is in the table's recorded definition."""
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE INDEX CONCURRENTLY items_price_idx ON items (price)")
        conn.execute("DROP INDEX CONCURRENTLY items_price_idx")
    await drain(database)

    stored = ddl_changes(database)
    assert [row["after"]["command_tag"] for row in stored] == ["CREATE INDEX", "DROP INDEX"]
    assert "items_price_idx" in stored[0]["after"]["indexes"]
    assert "items_price_idx" not in stored[1]["after"]["indexes"]
