"""The query helpers (`Bemi`: find, count, history, as_of, table_as_of, blame, wait_for) against real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

import bemi_asgi
from bemi_asgi import Bemi, Change, Operation, QueryError
from bemi_asgi._pgtext import format_lsn
from bemi_asgi.history.filters import ChangeFilter
from bemi_asgi.history.store import context_index_sql, newest_window_sql

from ._change_writer import ChangesEnv as Env
from ._change_writer import Row, changes_env

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with changes_env(database) as env:
        yield env


async def write_item_story(env: Env) -> None:
    """items row 1: created by alice, renamed by bob, price changed by alice; row 2 created and deleted by bob."""
    w = env.writer
    await w.commit(
        [Row("CREATE", "items", 1, after={"id": 1, "name": "pen", "price": 3})],
        context={"user": "alice", "endpoint": "POST /items"},
        committed_at=T0,
    )
    await w.commit(
        [Row("CREATE", "items", 2, after={"id": 2, "name": "cup", "price": 5})],
        context={"user": "bob", "request_id": "r2"},
        committed_at=T0 + timedelta(minutes=1),
    )
    await w.commit(
        [
            Row(
                "UPDATE",
                "items",
                1,
                before={"id": 1, "name": "pen", "price": 3},
                after={"id": 1, "name": "ink pen", "price": 3},
            ),
            Row("DELETE", "items", 2, before={"id": 2, "name": "cup", "price": 5}),
        ],
        context={"user": "bob", "request_id": "r3"},
        committed_at=T0 + timedelta(minutes=2),
    )
    await w.commit(
        [
            Row(
                "UPDATE",
                "items",
                1,
                before={"id": 1, "name": "ink pen", "price": 3},
                after={"id": 1, "name": "ink pen", "price": 4},
            )
        ],
        context={"user": "alice", "endpoint": "PATCH /items/1"},
        committed_at=T0 + timedelta(minutes=3),
    )


async def test_find_returns_immutable_change_models_newest_first(env: Env) -> None:
    """find() returns frozen Change models in newest-first commit order with parsed JSON and a computed diff."""
    await write_item_story(env)
    page = await env.bemi.changes.find(table="items")
    assert [(c.operation, c.primary_key) for c in page] == [
        (Operation.UPDATE, "1"),
        (Operation.DELETE, "2"),
        (Operation.UPDATE, "1"),
        (Operation.CREATE, "2"),
        (Operation.CREATE, "1"),
    ]
    latest = page[0]
    assert isinstance(latest, Change)
    assert latest.context == {"user": "alice", "endpoint": "PATCH /items/1"}
    assert latest.changed_fields == ["price"]
    assert latest.diff["price"].before == 3
    assert latest.diff["price"].after == 4
    assert latest.committed_at == T0 + timedelta(minutes=3)
    assert latest.schema_ == "public"
    assert latest.model_dump(by_alias=True)["schema"] == "public"
    with pytest.raises(ValueError, match="frozen"):
        latest.operation = Operation.DELETE  # type: ignore[misc]
    assert page.next_cursor is None


async def test_times_come_back_in_utc_whatever_the_session_time_zone(env: Env, database: str) -> None:
    """Read through a pool whose sessions use another time zone, a change's times are the same instants, aware and
    in UTC."""
    await write_item_story(env)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1, server_settings={"TimeZone": "Asia/Kathmandu"})
    try:
        assert await pool.fetchval("SHOW TimeZone") == "Asia/Kathmandu"
        for change in [*await Bemi(pool).changes.find(table="items"), *await Bemi(pool).history("items", 1)]:
            for moment in (change.committed_at, change.queued_at, change.created_at):
                assert moment.tzinfo is UTC
        first = (await Bemi(pool).history("items", 1))[0]
        assert first.committed_at == T0
        assert first.committed_at.isoformat() == T0.isoformat()
    finally:
        await pool.close()


async def test_find_filters_combine(env: Env) -> None:
    """Each find() filter narrows the result: key, operation, context, before/after containment, time, xid."""
    await write_item_story(env)
    find = env.bemi.changes.find
    assert [c.operation for c in await find(table="items", primary_key=1, order="asc")] == [
        Operation.CREATE,
        Operation.UPDATE,
        Operation.UPDATE,
    ]
    assert [c.primary_key for c in await find(table="items", primary_key="2", operation="delete")] == ["2"]
    bob = await find(context={"user": "bob"}, order="asc")
    assert [(c.operation.value, c.primary_key) for c in bob] == [("CREATE", "2"), ("UPDATE", "1"), ("DELETE", "2")]
    assert [c.primary_key for c in await find(context={"request_id": "r3"}, operation=["DELETE"])] == ["2"]
    assert [c.after["price"] for c in await find(table="items", after={"name": "ink pen"})] == [4, 3]
    assert [c.id for c in await find(table="items", before={"price": 5})] == [bob[2].id]
    window = await find(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3), order="asc")
    assert [c.committed_at for c in window] == [T0 + timedelta(minutes=1)] + [T0 + timedelta(minutes=2)] * 2
    assert {c.primary_key for c in await find(transaction_id=bob[1].transaction_id)} == {"1", "2"}
    assert await find(table="items", context={"user": "carol"}) == []


async def test_context_pages_read_in_windows_are_those_of_one_query_over_every_match(env: Env) -> None:
    """find(context=...) newest first reads windows of commit positions, sized from the last query of the same
    filters; whatever their sizes, its pages hold exactly the changes, in the order, of one query over every match:
    for a value frequent among the newest changes, a rare one, one seen only long ago and one never seen, one after
    the other, page by page."""
    for n in range(300):
        users = ["dense"] if n % 2 else []
        users += ["rare"] if n % 37 == 0 else []
        users += ["old"] if n < 8 else []
        await env.writer.commit(
            [Row("UPDATE", "items", n % 11, before={"n": n - 1}, after={"n": n}) for _ in range(1 + n % 3)],
            context={"user": users[0] if users else "other", **{f"is_{user}": True for user in users}},
        )
    for key in ["is_dense", "is_rare", "is_dense", "is_old", "is_dense", "is_none", "is_dense", "is_rare"]:
        expected = [
            record["id"]
            for record in await env.conn.fetch(
                "SELECT id FROM bemi.changes WHERE context @> $1::jsonb ORDER BY commit_lsn DESC, ordinal DESC",
                f'{{"{key}": true}}',
            )
        ]
        for limit in (1, 7, 40):
            found, cursor = [], None
            while True:
                page = await env.bemi.changes.find(context={key: True}, limit=limit, cursor=cursor)
                found += [change.id for change in page]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert found == expected, (key, limit)


async def test_a_context_window_reads_its_commit_positions_even_for_a_value_the_statistics_overrate(env: Env) -> None:
    """The first window of find(context=...) reads the changes of its commit positions (the BRIN on `commit_lsn`)
    and sorts its matches, also for a value the planner's statistics hold to be frequent (user 1 made 30% of the old
    changes and none of the newest): given the primary key's order, PostgreSQL reads the primary key backwards
    instead, filtering every change until it meets enough of that user's, here the whole newest half of the
    history rather than the window's tenth of it."""
    await env.conn.execute(
        """INSERT INTO bemi.changes (primary_key, context, database, "schema", "table", operation, committed_at,
                                     queued_at, transaction_id, position, commit_lsn, ordinal, stream)
           SELECT g::text,
                  jsonb_build_object('user_id', CASE WHEN g < 10000 AND g % 10 < 3 THEN 1 ELSE 2 + g % 500 END),
                  'app', 'public', 'items', 'CREATE', $1::timestamptz, $1::timestamptz, 1000 + g, g * 64, g * 64, 0, 1
             FROM generate_series(0, 19999) AS g""",
        T0,
    )
    await env.conn.execute("ANALYZE bemi.changes")
    where = ChangeFilter({"context": {"user_id": 1}}).where()
    sql = newest_window_sql(where, 64 * 2000, 21)
    plan = "\n".join(record[0] for record in await env.conn.fetch(f"EXPLAIN {sql}", *where.params))
    assert "changes_commit_lsn_idx" in plan, plan
    assert "Index Scan Backward using changes_pkey" not in plan, plan


async def test_a_context_key_with_an_index_of_its_own_gives_the_pages_of_one_query_over_every_match(env: Env) -> None:
    """With the opt-in B-tree on one context key (`context_index_sql`), find(context=...) on that key alone reads
    the key's matches in commit order through it, in both orders and page by page, and returns exactly the changes
    of one containment query over every match: numbers equal as JSON (7 and 7.0) match, a string "7" does not, a
    JSON null is a value like any other; with another context key too (read through the GIN index), the same."""
    values: list[object] = [7, 7.0, "7", 8, None, {"id": 7}, [7]]
    for n in range(120):
        context = {"user_id": values[n % len(values)], "tag": "a" if n % 3 else "b"}
        if n % 11 == 0:
            context = {"tag": "a"}  # no user at all
        await env.writer.commit([Row("UPDATE", "items", n % 5, before={"n": n - 1}, after={"n": n})], context=context)
    await env.conn.execute(context_index_sql("user_id"))
    await env.conn.execute("ANALYZE bemi.changes")
    assert await env.bemi.store.context_index("user_id") == "user_id"
    where = ChangeFilter({"context": {"user_id": 7}}).where(context_index="user_id")
    async with env.conn.transaction():  # a table this small is read whole otherwise
        await env.conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            record[0]
            for record in await env.conn.fetch(
                f"EXPLAIN SELECT * FROM bemi.changes WHERE {where.sql()} ORDER BY commit_lsn DESC, ordinal DESC, "
                "stream DESC LIMIT 5",
                *where.params,
            )
        )
    assert "changes_context_user_id_idx" in plan, plan
    assert "changes_context_idx" not in plan, plan
    for context in ({"user_id": 7}, {"user_id": "7"}, {"user_id": 7, "tag": "b"}, {"user_id": None}, {"user_id": 9}):
        for order in ("desc", "asc"):
            direction = order.upper()
            expected = [
                record["id"]
                for record in await env.conn.fetch(
                    f"SELECT id FROM bemi.changes WHERE context @> $1::jsonb "
                    f"ORDER BY commit_lsn {direction}, ordinal {direction}, stream {direction}",
                    json.dumps(context),
                )
            ]
            for limit in (1, 6, 100):
                found, cursor = [], None
                while True:
                    page = await env.bemi.changes.find(context=context, limit=limit, order=order, cursor=cursor)
                    found += [change.id for change in page]
                    if page.next_cursor is None:
                        break
                    cursor = page.next_cursor
                assert found == expected, (context, order, limit)


async def test_only_a_context_key_index_in_commit_order_counts_as_one(env: Env) -> None:
    """An index on a context key without the commit order after it, or with a predicate, is not one `find` can
    read a context's changes from in order: such keys are found through the GIN index as before."""
    await env.conn.execute("CREATE INDEX ON bemi.changes ((context -> 'tenant'))")
    await env.conn.execute(
        "CREATE INDEX ON bemi.changes ((context -> 'team'), commit_lsn, ordinal, stream) WHERE operation = 'UPDATE'"
    )
    await env.conn.execute(context_index_sql("user_id", concurrently=False))
    assert await env.bemi.store.context_index("tenant") is None
    assert await env.bemi.store.context_index("team") is None
    assert await env.bemi.store.context_index("user_id") == "user_id"


def test_only_a_lone_scalar_context_filter_is_read_through_its_key_index() -> None:
    """A context filter's key is read through its own index when it is the filter's only context key, its value a
    JSON scalar, and no row, transaction or trace narrows the changes more (their indexes find few changes)."""
    for value in ("alice", 7, 7.5, True, None):
        assert ChangeFilter({"context": {"user_id": value}, "table": "items"}).indexable_context_key() == "user_id"
    for args in (
        {"context": {"user_id": 7, "tenant": 3}},
        {"context": {"user_id": {"id": 7}}},
        {"context": {"user_id": [7]}},
        {"context": {}},
        {"context": {"user_id": 7}, "table": "items", "primary_key": 1},
        {"context": {"user_id": 7}, "transaction_id": 5},
        {"context": {"user_id": 7}, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"},
        {"table": "items"},
    ):
        assert ChangeFilter(args).indexable_context_key() is None, args  # type: ignore[arg-type]


def test_a_context_key_that_the_catalog_would_spell_otherwise_gets_no_index() -> None:
    """Keys whose quoting in the index's definition differs from the query's (a `$`, a backslash) or that make
    too long an index name are refused with the reason, rather than given an index `find` would never read."""
    for key in ("a$b", "a\\b", "k" * 44):
        with pytest.raises(ValueError, match="GIN index only"):
            context_index_sql(key)
    assert "'o''brien'" in context_index_sql("o'brien")


async def test_count_uses_the_same_filters(env: Env) -> None:
    """count() counts what find() would return for the same filters."""
    await write_item_story(env)
    assert await env.bemi.changes.count() == 5
    assert await env.bemi.changes.count(table="items", context={"user": "alice"}) == 2
    assert await env.bemi.changes.count(table="items", primary_key=2, operation=["CREATE", "DELETE"]) == 2


async def test_pagination_is_stable_while_changes_arrive(env: Env) -> None:
    """Keyset pages never repeat or skip a change even when new changes are stored between pages, in both orders."""
    for i in range(25):
        await env.writer.commit([Row("CREATE", "logs", i, after={"id": i})], committed_at=T0)
    for order in ("desc", "asc"):
        seen: list[int] = []
        cursor = None
        pages = 0
        while True:
            page = await env.bemi.changes.find(table="logs", limit=10, order=order, cursor=cursor)
            seen += [c.after["id"] for c in page]
            pages += 1
            # New changes arrive between pages: they sort after everything stored so far.
            await env.writer.commit([Row("CREATE", "other", pages, after={"id": pages})])
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == list(range(25))
        assert len(seen) == len(set(seen))
        assert seen == (sorted(seen, reverse=True) if order == "desc" else sorted(seen))
    fresh = await env.bemi.changes.find(table="logs", order="asc", limit=1)
    with pytest.raises(QueryError, match="order"):
        await env.bemi.changes.find(table="logs", order="desc", cursor=fresh.next_cursor)
    with pytest.raises(QueryError, match="not a cursor"):
        await env.bemi.changes.find(table="logs", cursor="garbage!")


async def test_pagination_across_new_rows_of_the_same_table(env: Env) -> None:
    """In ascending order, changes of the paged table stored after the first page appear on a later page, once."""
    for i in range(5):
        await env.writer.commit([Row("CREATE", "logs", i, after={"id": i})])
    page = await env.bemi.changes.find(table="logs", limit=3, order="asc")
    await env.writer.commit([Row("CREATE", "logs", 99, after={"id": 99})])
    rest = await env.bemi.changes.find(table="logs", limit=10, order="asc", cursor=page.next_cursor)
    assert [c.after["id"] for c in [*page, *rest]] == [0, 1, 2, 3, 4, 99]


async def test_composite_primary_keys(env: Env) -> None:
    """A tuple key is matched against the stored JSON-array form in find, history, as_of and blame."""
    key = ("EU", 42)
    await env.writer.commit([Row("CREATE", "stock", key, after={"region": "EU", "sku": 42, "qty": 1})], committed_at=T0)
    await env.writer.commit(
        [Row("CREATE", "stock", ("US", 42), after={"region": "US", "sku": 42, "qty": 9})], committed_at=T0
    )
    await env.writer.commit(
        [
            Row(
                "UPDATE",
                "stock",
                key,
                before={"region": "EU", "sku": 42, "qty": 1},
                after={"region": "EU", "sku": 42, "qty": 2},
            )
        ],
        context={"user": "ops"},
        committed_at=T0 + timedelta(hours=1),
    )
    history = await env.bemi.history("stock", key)
    assert [c.primary_key for c in history] == ['["EU","42"]'] * 2
    assert [c.after["qty"] for c in await env.bemi.changes.find(table="stock", primary_key=["US", 42])] == [9]
    assert await env.bemi.as_of("stock", key, at=T0 + timedelta(minutes=30)) == {"region": "EU", "sku": 42, "qty": 1}
    assert (await env.bemi.blame("stock", key))["qty"].context == {"user": "ops"}


async def test_history_lists_a_rows_changes_in_commit_order(env: Env) -> None:
    """history() returns only that row's changes, oldest first."""
    await write_item_story(env)
    history = await env.bemi.history("items", 1)
    assert [(c.operation.value, c.after.get("name"), c.after.get("price")) for c in history] == [
        ("CREATE", "pen", 3),
        ("UPDATE", "ink pen", 3),
        ("UPDATE", "ink pen", 4),
    ]
    assert [c.operation for c in await env.bemi.history("public.items", "2")] == [Operation.CREATE, Operation.DELETE]


async def test_as_of_walks_back_in_time_and_respects_deletes(env: Env) -> None:
    """as_of() gives the row as it was at a time or LSN: None before creation and after deletion."""
    await write_item_story(env)
    as_of = env.bemi.as_of
    assert await as_of("items", 1, at=T0 - timedelta(seconds=1)) is None
    assert await as_of("items", 1, at=T0) == {"id": 1, "name": "pen", "price": 3}
    assert await as_of("items", 1, at=T0 + timedelta(minutes=2, seconds=30)) == {"id": 1, "name": "ink pen", "price": 3}
    assert await as_of("items", 1, at=datetime.now(UTC)) == {"id": 1, "name": "ink pen", "price": 4}
    assert await as_of("items", 2, at=T0 + timedelta(minutes=1)) == {"id": 2, "name": "cup", "price": 5}
    assert await as_of("items", 2, at=T0 + timedelta(minutes=2)) is None
    history = await env.bemi.history("items", 1)
    assert await as_of("items", 1, at=history[1].commit_lsn) == history[1].after
    lsn_text = format_lsn(history[1].commit_lsn - 1)
    assert await as_of("items", 1, at=lsn_text) == history[0].after


async def test_history_and_as_of_take_a_context_scope(env: Env) -> None:
    """With context=, history() and as_of() see only the matching changes, TRUNCATEs included: the row as those
    changes alone made it."""
    await write_item_story(env)
    await env.writer.commit([Row("TRUNCATE", "items")], context={"user": "bob"}, committed_at=T0 + timedelta(minutes=4))
    alice = {"user": "alice"}
    assert [c.operation.value for c in await env.bemi.history("items", 1, context=alice)] == ["CREATE", "UPDATE"]
    assert [c.operation.value for c in await env.bemi.history("items", 1, context={"user": "bob"})] == [
        "UPDATE",
        "TRUNCATE",
    ]
    assert await env.bemi.history("items", 1, context={"user": "carol"}) == []
    now = datetime.now(UTC)
    assert await env.bemi.as_of("items", 1, at=now, context=alice) == {"id": 1, "name": "ink pen", "price": 4}
    assert await env.bemi.as_of("items", 1, at=T0 + timedelta(minutes=2), context=alice) == {
        "id": 1,
        "name": "pen",
        "price": 3,
    }
    assert await env.bemi.as_of("items", 1, at=now) is None  # truncated, for everyone
    with pytest.raises(QueryError, match="context must be a mapping"):
        await env.bemi.history("items", 1, context=["user"])  # type: ignore[arg-type]


async def test_filters_are_keyword_arguments_checked_by_name(env: Env) -> None:
    """find() and count() refuse a filter they do not know, as a function refuses an unknown keyword."""
    with pytest.raises(TypeError, match="find\\(\\) got an unexpected keyword argument 'tabel'"):
        await env.bemi.changes.find(tabel="items")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="count\\(\\) got an unexpected keyword argument 'user'"):
        await env.bemi.changes.count(user="bob")  # type: ignore[call-arg]


async def test_truncate_ends_a_rows_existence(env: Env) -> None:
    """A TRUNCATE in the middle of a row's history ends the row until it is created again."""
    w = env.writer
    await w.commit([Row("CREATE", "items", 1, after={"id": 1, "name": "a"})], committed_at=T0)
    await w.commit([Row("CREATE", "items", 2, after={"id": 2, "name": "b"})], committed_at=T0)
    await w.commit([Row("TRUNCATE", "items")], context={"job": "reset"}, committed_at=T0 + timedelta(minutes=1))
    await w.commit([Row("TRUNCATE", "items")], committed_at=T0 + timedelta(minutes=2))
    await w.commit([Row("CREATE", "items", 1, after={"id": 1, "name": "a2"})], committed_at=T0 + timedelta(minutes=3))
    assert await env.bemi.as_of("items", 1, at=T0 + timedelta(seconds=30)) == {"id": 1, "name": "a"}
    assert await env.bemi.as_of("items", 1, at=T0 + timedelta(minutes=1)) is None
    assert await env.bemi.as_of("items", 2, at=T0 + timedelta(minutes=5)) is None
    assert await env.bemi.as_of("items", 1, at=T0 + timedelta(minutes=5)) == {"id": 1, "name": "a2"}
    history = await env.bemi.history("items", 1)
    # The second TRUNCATE happened while the row did not exist: it is not part of the row's history.
    assert [c.operation.value for c in history] == ["CREATE", "TRUNCATE", "CREATE"]
    assert history[1].context == {"job": "reset"}
    assert await env.bemi.blame("items", 2) == {}
    rows = [row async for row in env.bemi.table_as_of("items", at=T0 + timedelta(seconds=30))]
    assert rows == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert [row async for row in env.bemi.table_as_of("items", at=T0 + timedelta(minutes=2))] == []
    assert [row async for row in env.bemi.table_as_of("items", at=datetime.now(UTC))] == [{"id": 1, "name": "a2"}]


async def test_table_as_of_yields_each_live_row_once(env: Env) -> None:
    """table_as_of() streams every row that existed at the time, in its latest state then, skipping deleted rows."""
    await write_item_story(env)
    at = T0 + timedelta(minutes=1)
    assert [row async for row in env.bemi.table_as_of("items", at=at)] == [
        {"id": 1, "name": "pen", "price": 3},
        {"id": 2, "name": "cup", "price": 5},
    ]
    now_rows = [row async for row in env.bemi.table_as_of("items", at=datetime.now(UTC), batch_size=1)]
    assert now_rows == [{"id": 1, "name": "ink pen", "price": 4}]


async def test_blame_names_the_change_that_last_set_each_column(env: Env) -> None:
    """blame() maps each column to the change (and so the context) that last set its value."""
    await write_item_story(env)
    blame = await env.bemi.blame("items", 1)
    assert {name: change.context.get("user") for name, change in blame.items()} == {
        "id": "alice",
        "name": "bob",
        "price": "alice",
    }
    assert blame["price"].context["endpoint"] == "PATCH /items/1"
    assert blame["id"].operation is Operation.CREATE
    earlier = await env.bemi.blame("items", 1, at=T0 + timedelta(minutes=2))
    assert earlier["price"].operation is Operation.CREATE
    assert await env.bemi.blame("items", 2) == {}


async def test_time_zones(env: Env) -> None:
    """Aware datetimes in any zone mean the same instant; naive datetimes are refused with a QueryError."""
    await write_item_story(env)
    tokyo = timezone(timedelta(hours=9))
    at_tokyo = (T0 + timedelta(minutes=2, seconds=30)).astimezone(tokyo)
    assert await env.bemi.as_of("items", 1, at=at_tokyo) == {"id": 1, "name": "ink pen", "price": 3}
    since = (T0 + timedelta(minutes=3)).astimezone(timezone(timedelta(hours=-5)))
    assert [c.after["price"] for c in await env.bemi.changes.find(table="items", since=since)] == [4]
    page = await env.bemi.changes.find(table="items", limit=1)
    assert page[0].committed_at.utcoffset() == timedelta(0)
    naive = datetime(2025, 3, 1, 12, 0)
    with pytest.raises(QueryError, match="naive"):
        await env.bemi.as_of("items", 1, at=naive)
    with pytest.raises(QueryError, match="naive"):
        await env.bemi.changes.find(since=naive)
    with pytest.raises(QueryError, match="naive"):
        await env.bemi.changes.count(until=naive)


async def test_errors_are_clear(env: Env) -> None:
    """Unknown tables, unknown columns, future times and malformed arguments raise QueryError saying what is wrong."""
    await write_item_story(env)
    with pytest.raises(QueryError, match=r"unknown table public\.itemz"):
        await env.bemi.history("itemz", 1)
    with pytest.raises(QueryError, match="unknown table"):
        await env.bemi.as_of("nope.items", 1, at=datetime.now(UTC))
    with pytest.raises(QueryError, match="unknown table"):
        await env.bemi.changes.find(table="itemz")
    with pytest.raises(QueryError, match="unknown table"):
        [row async for row in env.bemi.table_as_of("itemz", at=datetime.now(UTC))]
    with pytest.raises(QueryError, match=r"has no column colour.*columns are id, name, price"):
        await env.bemi.changes.find(table="items", after={"colour": "red"})
    with pytest.raises(QueryError, match="in the future"):
        await env.bemi.as_of("items", 1, at=datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(QueryError, match="operation"):
        await env.bemi.changes.find(operation="MERGE")
    with pytest.raises(QueryError, match="primary key value"):
        await env.bemi.history("items", 1.5)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="limit"):
        await env.bemi.changes.find(limit=0)
    with pytest.raises(QueryError, match="needs table"):
        await env.bemi.changes.find(primary_key=1)
    # A table known only from the catalog (no changes yet) is not an error: it just has no history.
    await env.conn.execute("CREATE TABLE fresh (id int PRIMARY KEY, label text)")
    assert await env.bemi.history("fresh", 1) == []
    assert await env.bemi.changes.find(table="fresh", after={"label": "x"}) == []
    with pytest.raises(QueryError, match="has no column nope"):
        await env.bemi.changes.find(table="fresh", before={"nope": 1})


async def test_bemi_from_a_dsn(env: Env, database: str) -> None:
    """Bemi(dsn) opens and closes its own pool."""
    await write_item_story(env)
    async with Bemi(database) as bemi:
        assert await bemi.changes.count() == 5
        assert len(await bemi.history("items", 1)) == 3


RESET_QUERY = "RESET ALL"


@pytest.mark.parametrize("pool_kind", ["own", "bemi", "asyncpg"])
async def test_reads_go_back_to_the_pool_without_the_reset_query(env: Env, database: str, pool_kind: str) -> None:
    """After the helpers' reads, a connection goes back to Bemi(dsn)'s own pool or a bemi pool without asyncpg's
    reset query; any other use of the same pool, and a read that failed, still resets the session. A plain asyncpg
    pool passed in is reset after every use, as its owner made it."""
    await write_item_story(env)
    passed_in = {"bemi": bemi_asgi.create_pool, "asyncpg": asyncpg.create_pool}.get(pool_kind)
    bemi = Bemi(database if passed_in is None else await passed_in(database, min_size=1, max_size=1))
    sent: list[str] = []
    try:
        pool = await bemi.pool()
        async with pool.acquire() as conn:  # the one connection in use: a pool hands out its live ones, last first
            pid = conn.get_server_pid()
            conn.add_query_logger(lambda logged: sent.append(logged.query))

        async def the_connection() -> None:
            async with pool.acquire() as conn:
                assert conn.get_server_pid() == pid

        await the_connection()
        sent.clear()
        assert len(await bemi.changes.find(table="items", limit=2)) == 2
        assert len(await bemi.history("items", 1)) == 3
        assert await bemi.changes.count(context={"user": "bob"}) == 3
        assert any("bemi" in query for query in sent)
        assert any(RESET_QUERY in query for query in sent) == (pool_kind == "asyncpg")

        sent.clear()
        async with pool.acquire() as conn:  # anyone's use of the pool: `bemi.pool()` hands it out
            await conn.execute("SET work_mem = '1234kB'")
        assert any(RESET_QUERY in query for query in sent)
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid
            assert await conn.fetchval("SHOW work_mem") != "1234kB"

        async def a_read_that_fails_after_a_set() -> None:
            async with bemi.store.reading() as conn:
                await conn.execute("SET work_mem = '1234kB'")
                await conn.fetch("SELECT nope FROM bemi.changes")

        sent.clear()
        with pytest.raises(asyncpg.UndefinedColumnError):
            await a_read_that_fails_after_a_set()
        assert any(RESET_QUERY in query for query in sent)
        await the_connection()
    finally:
        await bemi.close()
        if passed_in is not None:
            await pool.close()


async def test_wait_for_returns_once_the_worker_has_stored_the_position(env: Env) -> None:
    """wait_for() blocks until worker_state reaches the position, and times out with a clear error otherwise."""
    first = await env.writer.commit([Row("CREATE", "items", 1, after={"id": 1})])
    assert await env.bemi.wait_for(first, timeout=1) == first
    target = first + 0x1000
    waiter = asyncio.create_task(env.bemi.wait_for(target, timeout=10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    stored = await env.writer.commit([Row("CREATE", "items", 2, after={"id": 2})])
    assert stored == target
    assert await waiter == target
    with pytest.raises(TimeoutError, match="worker"):
        await env.bemi.wait_for(target + 1, timeout=0.1)
    assert await env.bemi.wait_for(format_lsn(target), timeout=1) == target


async def test_current_lsn_is_past_the_last_commit(env: Env) -> None:
    """current_lsn() read after a COMMIT is past that transaction's commit record (the WAL position grows)."""
    before = await bemi_asgi.current_lsn(env.conn)
    await env.conn.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    after = await bemi_asgi.current_lsn(env.conn)
    assert after > before
    assert after == await env.conn.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
