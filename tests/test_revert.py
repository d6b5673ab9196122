"""`bemi.revert`: undoing stored changes on real tables, with planning, conflicts and whole-request reverts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from bemi_asgi import QueryError, RevertConflictError

from ._change_writer import ChangesEnv as Env
from ._change_writer import Row, changes_env, row_image, tracked

ITEMS = '''
CREATE TABLE items (
    id integer PRIMARY KEY,
    name varchar(40) NOT NULL,
    price numeric(10, 2),
    tags text[],
    grid integer[][],
    meta jsonb,
    doc json,
    seen_at timestamptz,
    active boolean NOT NULL DEFAULT true,
    ratio double precision,
    "Odd ""Name""" text,
    upper_name text GENERATED ALWAYS AS (upper(name)) STORED
);
CREATE TABLE stock (region text, sku integer, qty integer NOT NULL, PRIMARY KEY (region, sku));
CREATE TABLE serials (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, label text);
'''


@pytest.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with changes_env(database, setup_sql=ITEMS) as env:
        yield env


INSERT_ITEM = '''INSERT INTO items (id, name, price, tags, grid, meta, doc, seen_at, ratio, "Odd ""Name""")
                 VALUES ($1, $2, 9.50, ARRAY['a', 'b "q"', NULL, 'c\\d'], '{{1,2},{3,NULL}}',
                         '{"k": [1, {"x": null}], "s": "it''s"}', '"just a string"',
                         '2025-01-02 03:04:05.123456+02', 0.1, 'odd; DROP TABLE items; --')'''


async def image(env: Env, key: int) -> dict[str, object] | None:
    return await row_image(env.conn, "items", {"id": key})


async def test_revert_one_update_restores_every_column_type(env: Env) -> None:
    """Reverting an UPDATE writes back the old values exactly, for arrays, JSON, numeric, time and odd names."""
    await tracked(env.conn, env.writer, "items", {"id": 1}, INSERT_ITEM, 1, "pen")
    original = await image(env, 1)
    await tracked(
        env.conn,
        env.writer,
        "items",
        {"id": 1},
        '''UPDATE items SET name = 'quill', price = NULL, tags = '{}', grid = NULL, meta = '[]', doc = '{"a":1}',
                  seen_at = now(), active = false, ratio = 2.5, "Odd ""Name""" = 'x' WHERE id = 1''',
    )
    assert await image(env, 1) != original
    update = (await env.bemi.history("items", 1))[-1]
    plan = await env.bemi.revert(env.conn, change=update)
    assert await image(env, 1) == original
    assert len(plan.statements) == 1
    assert plan.statements[0].sql.startswith('UPDATE "public"."items" SET')
    assert "upper_name" not in plan.statements[0].sql  # generated columns are never written
    assert await env.conn.fetchval("SELECT upper_name FROM items WHERE id = 1") == "PEN"


async def test_dry_run_shows_parameterised_statements_and_writes_nothing(env: Env) -> None:
    """A dry run returns statements with quoted identifiers, typed casts and values only as parameters."""
    await tracked(env.conn, env.writer, "items", {"id": 7}, INSERT_ITEM, 7, "it's; DROP")
    create = (await env.bemi.history("items", 7))[0]
    plan = await env.bemi.revert(change=create, dry_run=True)
    [statement] = plan.statements
    assert statement.sql == 'DELETE FROM "public"."items" WHERE "id" = $1::text::integer'
    assert statement.params == ("7",)
    assert await image(env, 7) is not None
    await tracked(env.conn, env.writer, "items", {"id": 7}, "DELETE FROM items WHERE id = 7")
    delete = (await env.bemi.history("items", 7))[-1]
    [insert] = (await env.bemi.revert(change=delete, dry_run=True)).statements
    assert insert.sql.startswith('INSERT INTO "public"."items" ("id", "name", "price", "tags", "grid", "meta"')
    assert '"Odd ""Name"""' in insert.sql
    assert "$2::text::character varying" in insert.sql
    assert "$4::text::text[]" in insert.sql
    assert "DROP" not in insert.sql
    assert "it's; DROP" in insert.params
    assert "odd; DROP TABLE items; --" in insert.params


async def test_revert_a_delete_and_a_create(env: Env) -> None:
    """Reverting a DELETE re-inserts the row as it was; reverting a CREATE deletes the row."""
    await tracked(env.conn, env.writer, "items", {"id": 1}, INSERT_ITEM, 1, "pen")
    original = await image(env, 1)
    await tracked(env.conn, env.writer, "items", {"id": 1}, "DELETE FROM items WHERE id = 1")
    delete = (await env.bemi.history("items", 1))[-1]
    await env.bemi.revert(env.conn, change=delete)
    assert await image(env, 1) == original
    await tracked(env.conn, env.writer, "items", {"id": 2}, INSERT_ITEM, 2, "cup")
    create = (await env.bemi.history("items", 2))[0]
    await env.bemi.revert(env.conn, change=create)
    assert await image(env, 2) is None


async def test_revert_refuses_when_a_row_changed_again_unless_forced(env: Env) -> None:
    """A row changed after the reverted change is a conflict: refused (nothing written) unless force=True."""
    await tracked(env.conn, env.writer, "items", {"id": 1}, INSERT_ITEM, 1, "pen")
    await tracked(env.conn, env.writer, "items", {"id": 1}, "UPDATE items SET name = 'quill' WHERE id = 1")
    await tracked(env.conn, env.writer, "items", {"id": 1}, "UPDATE items SET price = 1 WHERE id = 1")
    _, rename, reprice = await env.bemi.history("items", 1)
    with pytest.raises(RevertConflictError, match=rf"changed again after change {rename.id}.*UPDATE in change"):
        await env.bemi.revert(env.conn, change=rename)
    assert await env.conn.fetchval("SELECT name FROM items WHERE id = 1") == "quill"
    plan = await env.bemi.revert(env.conn, change=rename, force=True)
    assert plan.conflicts
    assert str(reprice.id) in plan.conflicts[0]
    # Forced: the row is back to its state before the reverted change, undoing the later one too.
    assert await env.conn.fetchrow("SELECT name, price FROM items WHERE id = 1") == ("pen", 9.5)


async def test_revert_rolls_back_when_the_table_differs_from_the_history(env: Env) -> None:
    """If a statement finds no row (a write the worker has not stored), the whole revert rolls back."""
    await tracked(env.conn, env.writer, "items", {"id": 1}, INSERT_ITEM, 1, "pen")
    await tracked(env.conn, env.writer, "items", {"id": 2}, INSERT_ITEM, 2, "cup")
    await env.writer.commit([])  # keeps LSNs increasing
    await tracked(
        env.conn, env.writer, "items", {"id": 1}, "UPDATE items SET name = 'a' WHERE id = 1", context={"r": 1}
    )
    await tracked(
        env.conn, env.writer, "items", {"id": 2}, "UPDATE items SET name = 'b' WHERE id = 2", context={"r": 1}
    )
    await env.conn.execute("DELETE FROM items WHERE id = 1")  # not in the stored history
    with pytest.raises(RevertConflictError, match="touched 0 rows"):
        await env.bemi.revert(env.conn, context={"r": 1})
    assert await env.conn.fetchval("SELECT name FROM items WHERE id = 2") == "b"


async def test_revert_a_whole_request_by_context(env: Env) -> None:
    """Every change of one request (context filter) is undone in one transaction, other requests untouched."""
    conn, w = env.conn, env.writer
    await tracked(conn, w, "items", {"id": 1}, INSERT_ITEM, 1, "pen", context={"request_id": "a"})
    await tracked(conn, w, "stock", {"region": "EU", "sku": 1}, "INSERT INTO stock VALUES ('EU', 1, 5)")
    before_request = (await image(env, 1), await row_image(conn, "stock", {"region": "EU", "sku": 1}))
    bad = {"request_id": "b", "user": 9}
    await tracked(conn, w, "items", {"id": 1}, "UPDATE items SET name = 'bad' WHERE id = 1", context=bad)
    await tracked(conn, w, "items", {"id": 2}, INSERT_ITEM, 2, "junk", context=bad)
    await tracked(conn, w, "stock", {"region": "EU", "sku": 1}, "UPDATE stock SET qty = 0", context=bad)
    await tracked(conn, w, "items", {"id": 1}, "UPDATE items SET price = 3 WHERE id = 1", context=bad)
    await tracked(conn, w, "items", {"id": 3}, INSERT_ITEM, 3, "keep", context={"request_id": "c"})
    plan = await env.bemi.revert(conn, context={"request_id": "b"})
    assert len(plan.changes) == 4
    assert plan.description["context"] == {"request_id": "b"}
    assert plan.description["changes"] == 4
    assert (await image(env, 1), await row_image(conn, "stock", {"region": "EU", "sku": 1})) == before_request
    assert await image(env, 2) is None
    assert await env.conn.fetchval("SELECT name FROM items WHERE id = 3") == "keep"


async def test_revert_a_transaction_and_identity_columns(env: Env) -> None:
    """transaction= undoes every change of that transaction; re-inserting an ALWAYS identity keeps its value."""
    conn = env.conn
    await conn.execute("INSERT INTO serials (label) VALUES ('one'), ('two')")
    rows = [await row_image(conn, "serials", {"id": i}) for i in (1, 2)]
    await env.writer.commit([Row("CREATE", "serials", i, after=row) for i, row in zip((1, 2), rows, strict=True)])
    await conn.execute("DELETE FROM serials")
    delete = await env.writer.commit(
        [Row("DELETE", "serials", i, before=row) for i, row in zip((1, 2), rows, strict=True)]
    )
    [change, *_] = await env.bemi.changes.find(table="serials", operation="DELETE")
    assert change.commit_lsn == delete
    plan = await env.bemi.revert(conn, transaction=change)
    assert [s.sql.split(" (")[0] for s in plan.statements] == ['INSERT INTO "public"."serials"'] * 2
    assert "OVERRIDING SYSTEM VALUE" in plan.statements[0].sql
    assert await conn.fetch("SELECT id, label FROM serials ORDER BY id") == [(1, "one"), (2, "two")]
    # By transaction id, the same plan (the revert itself is not in the stored history: no worker runs here).
    again = await env.bemi.revert(conn, transaction=change.transaction_id, dry_run=True)
    assert again.statements == plan.statements


async def test_revert_applies_under_a_context_describing_it(env: Env) -> None:
    """While applying, the Bemi context carries what is being reverted, merged over the caller's context."""
    from bemi_asgi import bemi_context, get_context

    await tracked(env.conn, env.writer, "items", {"id": 1}, INSERT_ITEM, 1, "pen")
    create = (await env.bemi.history("items", 1))[0]
    seen: list[dict[str, object]] = []

    def record(query: object) -> None:
        seen.append(json.loads(json.dumps(dict(get_context() or {}))))

    env.conn.add_query_logger(record)
    with bemi_context(user="admin"):
        await env.bemi.revert(env.conn, change=create)
    env.conn.remove_query_logger(record)
    assert seen
    assert seen[-1]["user"] == "admin"
    assert seen[-1]["bemi_revert"] == {"change_id": create.id, "change_ids": [create.id], "changes": 1}


async def test_revert_argument_errors(env: Env) -> None:
    """Revert refuses ambiguous selections, TRUNCATEs, missing connections and tables that do not exist."""
    with pytest.raises(QueryError, match="exactly one"):
        await env.bemi.revert(env.conn)
    await env.writer.commit([Row("TRUNCATE", "items")], context={"job": "wipe"})
    with pytest.raises(QueryError, match="TRUNCATE"):
        await env.bemi.revert(env.conn, context={"job": "wipe"})
    await env.writer.commit([Row("CREATE", "ghost", 1, after={"id": 1})], context={"job": "ghost"})
    with pytest.raises(QueryError, match=r"public\.ghost does not exist"):
        await env.bemi.revert(env.conn, context={"job": "ghost"})
    await tracked(env.conn, env.writer, "items", {"id": 1}, INSERT_ITEM, 1, "pen", context={"job": "x"})
    with pytest.raises(QueryError, match="needs conn"):
        await env.bemi.revert(context={"job": "x"})


async def test_revert_refuses_an_empty_context_and_rereads_a_given_change(env: Env) -> None:
    """`context={}` would select every stored change and undo all tracked writes: refused, nothing written. A
    Change passed as `change=` is planned from the row stored under its exactly-once key (commit LSN, ordinal),
    never from the object given: a forged Change (another table, other values, another id) undoes only what the
    stored change did, and one whose key is not stored is refused."""
    await tracked(env.conn, env.writer, "items", {"id": 1}, INSERT_ITEM, 1, "pen", context={"job": "x"})
    with pytest.raises(QueryError, match="empty"):
        await env.bemi.revert(env.conn, context={})
    assert await image(env, 1) is not None
    create = (await env.bemi.history("items", 1))[0]
    forged = create.model_copy(
        update={"id": create.id + 1000, "table": "stock", "primary_key": '["EU","1"]', "after": {"qty": 1}}
    )
    plan = await env.bemi.revert(change=forged, dry_run=True)
    assert plan.changes == (create,)
    assert [s.sql for s in plan.statements] == ['DELETE FROM "public"."items" WHERE "id" = $1::text::integer']
    ghost = create.model_copy(update={"ordinal": create.ordinal + 1000, "operation": "DELETE", "before": {"id": 5}})
    with pytest.raises(QueryError, match=rf"no stored change .*commit LSN {ghost.commit_lsn}, ordinal {ghost.ordinal}"):
        await env.bemi.revert(env.conn, change=ghost)
    assert await env.conn.fetchval("SELECT count(*) FROM items") == 1
