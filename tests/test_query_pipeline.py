"""The query helpers on changes stored by the real pipeline: Bemi pool -> WAL -> worker -> bemi.changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

import bemi_asgi
from bemi_asgi import Bemi, Operation, RevertConflictError, bemi_context
from bemi_asgi.worker.pipeline import Worker

from .worker_support import prepare_source

SCHEMA = """
CREATE TABLE items (
    id integer PRIMARY KEY,
    name text NOT NULL,
    price numeric(10, 2),
    tags text[],
    meta jsonb,
    seen_at timestamptz,
    ratio real
);
CREATE TABLE stock (region text, sku integer, qty integer NOT NULL, PRIMARY KEY (region, sku));
"""


@dataclass
class Pipeline:
    pool: asyncpg.Pool
    bemi: Bemi

    async def write(self, *statements: str, **context: Any) -> int:
        """Run statements in one transaction through the bemi pool under `context`; wait until stored."""
        with bemi_context(context):
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    for statement in statements:
                        await conn.execute(statement)
                lsn = await bemi_asgi.current_lsn(conn)
        return await self.bemi.wait_for(lsn, timeout=30)

    async def row(self, sql: str) -> tuple[Any, ...] | None:
        record = await self.pool.fetchrow(sql)
        return None if record is None else tuple(record)


@pytest.fixture
async def pipeline(database: str) -> AsyncIterator[Pipeline]:
    prepare_source(database, SCHEMA, ["items", "stock"])
    worker = Worker(database, status_interval=1.0)
    task = asyncio.create_task(worker.run())
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=2)
    try:
        yield Pipeline(pool, Bemi(pool))
    finally:
        await pool.close()
        worker.stop()
        await asyncio.wait_for(task, 30)


ITEM_1 = """INSERT INTO items VALUES (1, 'pen', 9.50, ARRAY['a', 'b "q"', NULL], '{"k": [1, {"x": null}]}',
                                      '2025-01-02 03:04:05.123456+02', 0.25)"""


async def test_read_your_writes_history_as_of_and_blame(pipeline: Pipeline) -> None:
    """After wait_for(current_lsn), each write is in the history with its context; as_of and blame follow it."""
    p, bemi = pipeline, pipeline.bemi
    await p.write(ITEM_1, "INSERT INTO stock VALUES ('EU', 7, 3)", user="alice", request_id="r1")
    assert [c.operation for c in await bemi.history("items", 1)] == [Operation.CREATE]
    middle = datetime.now(UTC)
    await p.write("UPDATE items SET name = 'quill' WHERE id = 1", user="bob", request_id="r2")
    history = await bemi.history("items", 1)
    assert [(c.operation, c.context["user"]) for c in history] == [
        (Operation.CREATE, "alice"),
        (Operation.UPDATE, "bob"),
    ]
    assert history[1].changed_fields == ["name"]
    assert (await bemi.as_of("items", 1, at=middle))["name"] == "pen"  # type: ignore[index]
    assert (await bemi.as_of("items", 1, at=history[1].commit_lsn))["name"] == "quill"  # type: ignore[index]
    blame = await bemi.blame("items", 1)
    assert blame["name"].context["user"] == "bob"
    assert blame["price"].context["user"] == "alice"
    [stock] = await bemi.changes.find(table="stock", primary_key=("EU", 7))
    assert stock.after == {"region": "EU", "sku": 7, "qty": 3}
    assert await bemi.changes.count(context={"request_id": "r1"}) == 2
    await p.write("TRUNCATE items", job="reset")
    assert await bemi.as_of("items", 1, at=datetime.now(UTC)) is None
    assert [c.operation for c in await bemi.history("items", 1)][-1] is Operation.TRUNCATE
    assert [row["name"] async for row in bemi.table_as_of("items", at=middle)] == ["pen"]


async def test_revert_a_request_through_the_bemi_pool_is_itself_tracked(pipeline: Pipeline) -> None:
    """Reverting one request's changes restores the rows exactly, and the revert is stored with its own context."""
    p, bemi = pipeline, pipeline.bemi
    await p.write(ITEM_1, "INSERT INTO stock VALUES ('EU', 7, 3)", request_id="r1")
    original = await p.row("SELECT * FROM items WHERE id = 1")
    await p.write(
        "UPDATE items SET name = 'bad', price = NULL, tags = '{}', meta = '[]', seen_at = now(), ratio = 2",
        "INSERT INTO items (id, name) VALUES (2, 'junk')",
        "DELETE FROM stock",
        request_id="r2",
        user="mallory",
    )
    await p.write("INSERT INTO items (id, name) VALUES (3, 'keep')", request_id="r3")
    with bemi_context(user="admin"):
        async with p.pool.acquire() as conn:
            plan = await bemi.revert(conn, context={"request_id": "r2"})
            lsn = await bemi_asgi.current_lsn(conn)
    assert len(plan.changes) == 3
    assert await p.row("SELECT * FROM items WHERE id = 1") == original
    assert await p.row("SELECT * FROM items WHERE id = 2") is None
    assert await p.row("SELECT * FROM stock") == ("EU", 7, 3)
    assert await p.row("SELECT name FROM items WHERE id = 3") == ("keep",)
    await bemi.wait_for(lsn, timeout=30)
    reverts = await bemi.changes.find(context={"user": "admin"}, order="asc")
    assert len(reverts) == 3
    assert {c.context["bemi_revert"]["context"]["request_id"] for c in reverts} == {"r2"}
    assert (await bemi.history("items", 1))[-1].after == (await bemi.history("items", 1))[0].after
    # Reverting r2 again now conflicts: its rows changed afterwards (by the revert itself).
    with pytest.raises(RevertConflictError):
        await bemi.revert(context={"request_id": "r2"}, dry_run=True)
