"""The capture worker end to end: changes made on a real PostgreSQL, stored by the worker running in-process."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import psycopg
import pytest
from psycopg import sql

from bemi_asgi import DestinationNotReadyError, SourceNotReadyError
from bemi_asgi._pgtext import parse_lsn
from bemi_asgi.worker.pipeline import Worker
from bemi_asgi.worker.stitching import INVALID_CONTEXT_KEY

from .conftest import PgServer, drop_database
from .worker_support import DESTINATION_SQL, changes, current_wal_lsn, drain, emit, prepare_source

ITEMS = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int)"


def run_sql(dsn: str, *statements: str, context: dict[str, Any] | str | None = None) -> None:
    """Run `statements` in one transaction, emitting `context` at the end like the pool does."""
    with psycopg.connect(dsn) as conn:
        for statement in statements:
            conn.execute(statement)
        if context is not None:
            emit(conn, context)


async def test_insert_update_delete_are_stored_with_rows_keys_and_context(database: str) -> None:
    """Each operation becomes one change with Bemi's columns: before/after rows, key, context, commit facts."""
    prepare_source(database, ITEMS, ["items"])
    run_sql(database, "INSERT INTO items VALUES (1, 'apple', 3)", context={"user_id": 7})
    run_sql(database, "UPDATE items SET qty = 4 WHERE id = 1", context={"user_id": 8})
    run_sql(database, "DELETE FROM items WHERE id = 1", context={"user_id": 9})
    with psycopg.connect(database) as conn:
        xids = [row[0] for row in conn.execute("SELECT current_database()").fetchall()]
    await drain(database)

    stored = changes(database)
    assert [c["operation"] for c in stored] == ["CREATE", "UPDATE", "DELETE"]
    create, update, delete = stored
    assert create["before"] == {}
    assert create["after"] == {"id": 1, "name": "apple", "qty": 3}
    assert update["before"] == {"id": 1, "name": "apple", "qty": 3}
    assert update["after"] == {"id": 1, "name": "apple", "qty": 4}
    assert delete["before"] == {"id": 1, "name": "apple", "qty": 4}
    assert delete["after"] == {}
    assert [c["context"] for c in stored] == [{"user_id": 7}, {"user_id": 8}, {"user_id": 9}]
    assert {c["primary_key"] for c in stored} == {"1"}
    assert {(c["database"], c["schema"], c["table"]) for c in stored} == {(xids[0], "public", "items")}
    assert len({c["transaction_id"] for c in stored}) == 3
    assert all(c["position"] < c["commit_lsn"] for c in stored)
    assert [c["commit_lsn"] for c in stored] == sorted({c["commit_lsn"] for c in stored})
    assert all(c["committed_at"] <= c["queued_at"] for c in stored)


async def test_composite_primary_key_is_a_json_array_in_key_order(database: str) -> None:
    """A composite key is stored as the JSON array of the key columns' texts in the key's order."""
    prepare_source(database, "CREATE TABLE stock (qty int, region text, sku int, PRIMARY KEY (sku, region))", ["stock"])
    run_sql(database, "INSERT INTO stock VALUES (5, 'EU', 42)", "UPDATE stock SET qty = 6")
    await drain(database)
    stored = changes(database)
    assert [c["primary_key"] for c in stored] == ['["42","EU"]', '["42","EU"]']
    assert json.loads(stored[0]["primary_key"]) == ["42", "EU"]


async def test_table_without_primary_key_has_null_key(database: str) -> None:
    """A table without a primary key still has its changes stored, with primary_key NULL."""
    prepare_source(database, "CREATE TABLE events (kind text, payload int)", ["events"])
    run_sql(database, "INSERT INTO events VALUES ('a', 1)", "UPDATE events SET payload = 2", "DELETE FROM events")
    await drain(database)
    stored = changes(database)
    assert [c["operation"] for c in stored] == ["CREATE", "UPDATE", "DELETE"]
    assert [c["primary_key"] for c in stored] == [None, None, None]
    assert stored[1]["before"] == {"kind": "a", "payload": 1}
    assert stored[1]["after"] == {"kind": "a", "payload": 2}


async def test_unchanged_toast_value_is_taken_from_the_old_row(database: str) -> None:
    """An update that leaves a large (TOASTed) column alone still stores that column's value in `after`."""
    prepare_source(database, "CREATE TABLE docs (id int PRIMARY KEY, body text, hits int)", ["docs"])
    with psycopg.connect(database) as conn:
        conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")  # no compression: surely TOASTed
        conn.commit()
    body = "lorem ipsum " * 2000
    run_sql(database, f"INSERT INTO docs VALUES (1, '{body}', 0)", "COMMIT", "UPDATE docs SET hits = 1")
    await drain(database)
    update = changes(database, "operation = 'UPDATE'")[0]
    assert update["after"] == {"id": 1, "body": body, "hits": 1}
    assert update["before"]["body"] == body


async def test_truncate_cascade_stores_one_change_per_table(database: str) -> None:
    """TRUNCATE ... CASCADE becomes one TRUNCATE change for each truncated table, with the context."""
    prepare_source(
        database,
        "CREATE TABLE parents (id int PRIMARY KEY);"
        "CREATE TABLE children (id int PRIMARY KEY, parent_id int REFERENCES parents)",
        ["parents", "children"],
    )
    run_sql(database, "INSERT INTO parents VALUES (1)", "INSERT INTO children VALUES (1, 1)")
    run_sql(database, "TRUNCATE parents CASCADE", context={"job": "cleanup"})
    await drain(database)
    truncates = changes(database, "operation = 'TRUNCATE'")
    assert sorted(c["table"] for c in truncates) == ["children", "parents"]
    assert all(c["context"] == {"job": "cleanup"} and c["primary_key"] is None for c in truncates)
    assert all(c["before"] == {} and c["after"] == {} for c in truncates)


async def test_foreign_key_cascade_changes_carry_the_transaction_context(database: str) -> None:
    """Rows deleted by ON DELETE CASCADE get the context of the request that deleted their parent."""
    prepare_source(
        database,
        "CREATE TABLE authors (id int PRIMARY KEY);"
        "CREATE TABLE books (id int PRIMARY KEY, author_id int REFERENCES authors ON DELETE CASCADE)",
        ["authors", "books"],
    )
    run_sql(database, "INSERT INTO authors VALUES (1)", "INSERT INTO books VALUES (1, 1), (2, 1)")
    run_sql(database, "DELETE FROM authors WHERE id = 1", context={"user_id": 3, "path": "/authors/1"})
    await drain(database)
    deletes = changes(database, "operation = 'DELETE'")
    assert sorted((c["table"], c["primary_key"]) for c in deletes) == [("authors", "1"), ("books", "1"), ("books", "2")]
    assert all(c["context"] == {"user_id": 3, "path": "/authors/1"} for c in deletes)


async def test_several_contexts_in_one_transaction_follow_the_stitching_rule(database: str) -> None:
    """A change takes the next `_bemi` message's context, or the last one when none follows."""
    prepare_source(database, ITEMS, ["items"])
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'a', 0)")
        emit(conn, {"step": 1})
        conn.execute("INSERT INTO items VALUES (2, 'b', 0)")
        conn.execute("INSERT INTO items VALUES (3, 'c', 0)")
        emit(conn, {"step": 2})
        conn.execute("INSERT INTO items VALUES (4, 'd', 0)")
    run_sql(database, "INSERT INTO items VALUES (5, 'e', 0)")  # no context at all
    await drain(database)
    stored = changes(database)
    assert [(c["primary_key"], c["context"]) for c in stored] == [
        ("1", {"step": 1}),
        ("2", {"step": 2}),
        ("3", {"step": 2}),
        ("4", {"step": 2}),
        ("5", {}),
    ]
    assert [c["ordinal"] for c in stored[:4]] == [1, 2, 3, 4]


async def test_invalid_context_is_kept_visibly_and_foreign_prefixes_are_ignored(database: str) -> None:
    """A `_bemi` payload that is not a JSON object is stored under `_bemi_invalid_context`; other prefixes are
    ignored."""
    prepare_source(database, ITEMS, ["items"])
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'a', 0)")
        emit(conn, "not json {")
        conn.commit()
        conn.execute("INSERT INTO items VALUES (2, 'b', 0)")
        emit(conn, "[1, 2]")
        conn.commit()
        conn.execute("INSERT INTO items VALUES (3, 'c', 0)")
        conn.execute("SELECT pg_logical_emit_message(true, 'other', '{\"user_id\": 1}')")
        conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '\\xff00'::bytea)")
        conn.commit()
    await drain(database)
    contexts = [c["context"] for c in changes(database)]
    assert contexts[0] == {INVALID_CONTEXT_KEY: "not json {"}
    assert contexts[1] == {INVALID_CONTEXT_KEY: "[1, 2]"}
    assert list(contexts[2]) == [INVALID_CONTEXT_KEY]  # the bytea payload, not the foreign-prefix one


async def test_rolled_back_transaction_leaves_nothing(database: str) -> None:
    """Changes of a rolled-back transaction (and of a rolled-back savepoint) are never stored."""
    prepare_source(database, ITEMS, ["items"])
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'gone', 0)")
        emit(conn, {"user_id": 1})
        conn.rollback()
        conn.execute("INSERT INTO items VALUES (2, 'kept', 0)")
        with conn.transaction():  # a savepoint released: its row stays
            conn.execute("INSERT INTO items VALUES (3, 'savepoint', 0)")
        conn.execute("SAVEPOINT s")
        conn.execute("INSERT INTO items VALUES (4, 'undone', 0)")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        emit(conn, {"user_id": 2})
        conn.commit()
    await drain(database)
    stored = changes(database)
    assert [c["primary_key"] for c in stored] == ["2", "3"]
    assert all(c["context"] == {"user_id": 2} for c in stored)


async def test_columns_added_and_dropped_mid_stream_are_followed(database: str) -> None:
    """After ALTER TABLE adds or drops a column, later changes show the table's new columns."""
    prepare_source(database, ITEMS, ["items"])
    run_sql(database, "INSERT INTO items VALUES (1, 'a', 0)")
    run_sql(database, "ALTER TABLE items ADD COLUMN color text DEFAULT 'red'", "INSERT INTO items VALUES (2, 'b', 0)")
    run_sql(database, "ALTER TABLE items DROP COLUMN qty", "UPDATE items SET color = 'blue' WHERE id = 1")
    await drain(database)
    stored = changes(database)
    assert stored[0]["after"] == {"id": 1, "name": "a", "qty": 0}
    assert stored[1]["after"] == {"id": 2, "name": "b", "qty": 0, "color": "red"}
    assert stored[2]["before"] == {"id": 1, "name": "a", "color": "red"}
    assert stored[2]["after"] == {"id": 1, "name": "a", "color": "blue"}


async def test_large_transaction_spills_and_keeps_every_context(database: str) -> None:
    """A transaction larger than the spill threshold is stored whole, each row with the context the rule gives."""
    prepare_source(database, ITEMS, ["items"])
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items SELECT g, 'first', 0 FROM generate_series(1, 700) g")
        emit(conn, {"part": 1})
        conn.execute("INSERT INTO items SELECT g, 'second', 0 FROM generate_series(701, 1500) g")
        emit(conn, {"part": 2})
        conn.execute("UPDATE items SET qty = 1 WHERE id <= 10")
    await drain(database, spill_threshold=64, batch_rows=100)
    stored = changes(database)
    assert len(stored) == 1510
    assert [c["ordinal"] for c in stored] == list(range(1, 1511))
    assert all(c["context"] == {"part": 1} for c in stored[:700])
    assert all(c["context"] == {"part": 2} for c in stored[700:])
    assert len({c["commit_lsn"] for c in stored}) == 1


async def test_running_again_stores_nothing_twice(database: str) -> None:
    """A second run resumes after the stored commit LSN: nothing is stored twice, new changes are stored once."""
    prepare_source(database, ITEMS, ["items"])
    run_sql(database, "INSERT INTO items VALUES (1, 'a', 0)")
    await drain(database)
    run_sql(database, "INSERT INTO items VALUES (2, 'b', 0)")
    await drain(database)
    await drain(database)
    assert [c["primary_key"] for c in changes(database)] == ["1", "2"]


async def test_run_until_a_position_stores_what_committed_before_it_and_returns(database: str) -> None:
    """`run(until_lsn=...)` returns once what committed before that position is stored, though more is coming."""
    prepare_source(database, ITEMS, ["items"])
    run_sql(database, "INSERT INTO items VALUES (1, 'a', 0)")
    position = current_wal_lsn(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE PROCEDURE keep_writing() LANGUAGE plpgsql AS $$ BEGIN"
            " FOR i IN 2 .. 200000 LOOP INSERT INTO items VALUES (i, 'x', 0); COMMIT; END LOOP; END $$"
        )
    writer = asyncio.create_task(asyncio.to_thread(run_sql, database, "CALL keep_writing()"))
    try:
        worker = Worker(database)
        await asyncio.wait_for(worker.run(until_lsn=position), timeout=60)
        assert worker.stats.flushed_lsn >= position
        assert "1" in [c["primary_key"] for c in changes(database)]
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = 'CALL keep_writing()'")
        await asyncio.gather(writer, return_exceptions=True)


async def test_transactions_already_stored_are_skipped_when_resent(database: str) -> None:
    """Transactions the slot sends again (its acknowledgement was lost) but the destination has are skipped."""
    prepare_source(database, ITEMS, ["items"])
    run_sql(database, "INSERT INTO items VALUES (1, 'a', 0)")
    run_sql(database, "INSERT INTO items VALUES (2, 'b', 0)")
    with psycopg.connect(database, autocommit=True) as conn:
        # A copy of the slot taken before anything is acknowledged: it will send both transactions again.
        conn.execute("SELECT pg_copy_logical_replication_slot('bemi', 'bemi_again')")
    await drain(database)
    with psycopg.connect(database, autocommit=True) as conn:
        # The copy is told it has stored what the original stored, as if it were the same stream resending.
        conn.execute(
            "WITH copied AS (INSERT INTO bemi.streams (system_identifier, database, slot_name)"
            " SELECT system_identifier, database, 'bemi_again' FROM bemi.streams WHERE slot_name = 'bemi' RETURNING id)"
            " INSERT INTO bemi.worker_state (stream, last_commit_lsn) SELECT copied.id, last_commit_lsn"
            " FROM copied, bemi.worker_state"
        )
    run_sql(database, "INSERT INTO items VALUES (3, 'c', 0)")
    await drain(database, slot="bemi_again")
    assert [c["primary_key"] for c in changes(database)] == ["1", "2", "3"]


async def test_separate_destination_database(database: str, pg_server: Any) -> None:
    """With a destination URL the changes go to that database's bemi.changes, named after the source."""
    prepare_source(database, ITEMS, ["items"])
    destination_name = database.rsplit("/", 1)[1] + "_dest"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{destination_name}"')
    destination = pg_server.dsn(destination_name)
    try:
        with psycopg.connect(destination, autocommit=True) as conn:
            conn.execute(DESTINATION_SQL)
        run_sql(database, "INSERT INTO items VALUES (1, 'a', 0)", context={"user_id": 1})
        await drain(database, destination=destination)
        stored = changes(destination)
        assert [(c["primary_key"], c["database"], c["context"]) for c in stored] == [
            ("1", database.rsplit("/", 1)[1], {"user_id": 1})
        ]
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT count(*) FROM bemi.changes").fetchone() == (0,)
    finally:
        from .conftest import drop_database

        drop_database(pg_server.admin_dsn, destination_name)


async def test_slot_is_created_when_missing(database: str) -> None:
    """Without a slot the worker creates one (and keeps it) instead of failing."""
    prepare_source(database, ITEMS, ["items"], slot="other")
    await drain(database, slot="fresh")
    with psycopg.connect(database) as conn:
        slots = conn.execute("SELECT slot_name, plugin FROM pg_replication_slots ORDER BY 1").fetchall()
    assert ("fresh", "pgoutput") in slots


async def test_missing_publication_is_a_clear_error(database: str) -> None:
    """A source without the publication raises SourceNotReadyError naming `bemi-asgi sql-migration`."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
    with pytest.raises(SourceNotReadyError, match="sql-migration"):
        await drain(database, publication="nope")


async def test_missing_destination_tables_are_a_clear_error(database: str) -> None:
    """A destination without bemi.changes raises DestinationNotReadyError naming the migration."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY); CREATE PUBLICATION bemi FOR TABLE items")
    with pytest.raises(DestinationNotReadyError, match="sql-migration"):
        await drain(database)


async def test_idle_slot_advances_past_untracked_traffic(database: str) -> None:
    """Transactions on untracked tables (or none at all) still move the slot's confirmed_flush_lsn forward."""
    prepare_source(database, ITEMS + "; CREATE TABLE untracked (id int)", ["items"])
    worker = Worker(database, status_interval=0.1)
    task = asyncio.create_task(worker.run())
    try:

        def write_untracked() -> int:
            with psycopg.connect(database, autocommit=True) as conn:
                for i in range(20):
                    with conn.transaction():
                        conn.execute("INSERT INTO untracked VALUES (%s)", [i])
                        emit(conn, {"i": i})
            return current_wal_lsn(database)

        written = await asyncio.to_thread(write_untracked)

        def confirmed() -> int:
            with psycopg.connect(database) as conn:
                row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots").fetchone()
                assert row is not None
                return parse_lsn(row[0])

        while (await asyncio.to_thread(confirmed)) < written:
            assert not task.done(), task
            await asyncio.sleep(0.1)
    finally:
        worker.stop()
        await task
    assert changes(database) == []


async def test_values_are_converted_to_json_by_type(database: str) -> None:
    """Column values reach `after` as JSON values of their type; timestamptz in UTC whatever the server's zone."""
    prepare_source(
        database,
        "CREATE TABLE typed (id bigint PRIMARY KEY, price numeric, ok bool, meta jsonb, at timestamptz,"
        " tags text[], raw bytea, ratio float8, nothing text)",
        ["typed"],
    )
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{database.rsplit('/', 1)[1]}\" SET timezone = 'Asia/Tokyo'")
    run_sql(
        database,
        "INSERT INTO typed VALUES (9007199254740993, 12.50, true, '{\"a\": [1, null]}',"
        " '2024-05-01 09:00:00+09', '{x,\"y z\"}', '\\x00ff', 0.5, NULL)",
    )
    await drain(database)
    (stored,) = changes(database)
    assert stored["primary_key"] == "9007199254740993"
    after = stored["after"]
    assert after["id"] == 9007199254740993
    assert after["price"] == "12.50"
    assert after["ok"] is True
    assert after["meta"] == {"a": [1, None]}
    assert after["at"] in ("2024-05-01T00:00:00+00:00", "2024-05-01T00:00:00Z")
    assert after["tags"] == ["x", "y z"]
    assert after["raw"] == "\\x00ff"
    assert after["ratio"] == 0.5
    assert after["nothing"] is None


async def test_worker_ignores_its_own_tables_under_a_for_all_tables_publication(database: str) -> None:
    """With FOR ALL TABLES (which includes bemi.changes) the worker stores app changes, never its own writes."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
        conn.execute(ITEMS)
        conn.execute("CREATE PUBLICATION bemi FOR ALL TABLES")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
    run_sql(database, "INSERT INTO items VALUES (1, 'a', 0)")
    await drain(database)
    run_sql(database, "INSERT INTO items VALUES (2, 'b', 0)")
    await drain(database)
    await drain(database)
    assert [(c["table"], c["primary_key"]) for c in changes(database)] == [("items", "1"), ("items", "2")]


async def test_json_values_jsonb_cannot_hold_are_stored_cleaned(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A `json` column holding \\u0000 or a lone surrogate (valid json, invalid jsonb) is stored with U+FFFD
    instead of stopping the worker, and the rest of the batch is stored as is."""
    prepare_source(database, "CREATE TABLE raw (id int PRIMARY KEY, doc json)", ["raw"])
    run_sql(
        database,
        """INSERT INTO raw VALUES (1, '{"a": "x\\u0000y"}'), (2, '["\\ud800"]'), (3, '{"ok": "é"}')""",
        context={"user_id": 1},
    )
    await drain(database)
    stored = changes(database)
    assert [c["after"]["doc"] for c in stored] == [{"a": "x\ufffdy"}, ["\ufffd"], {"ok": "é"}]
    assert "needs cleaning" not in caplog.text  # the json rule cleans them: no batch is refused and retried
    assert all(c["context"] == {"user_id": 1} for c in stored)


async def test_latin1_source_keeps_non_ascii_values_and_contexts(pg_server: PgServer) -> None:
    """On a LATIN1 database the worker reads values and names in UTF-8 (it asks for client_encoding UTF8) and
    decodes `_bemi` payloads in the server's encoding: accented values, an accented column name, a context with
    `\\u` escapes (as the pool sends) and one written with raw LATIN1 text all arrive intact, and the worker keeps
    going; a context character the (LATIN1) destination cannot hold is replaced rather than stopping it."""
    name = f"latin1_{os.getpid()}"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
                sql.Identifier(name)
            )
        )
    dsn = pg_server.dsn(name)
    try:
        prepare_source(dsn, 'CREATE TABLE café (id int PRIMARY KEY, "prénom" text, doc jsonb)', ["café"])
        run_sql(
            dsn,
            """INSERT INTO café VALUES (1, 'José Ñúñez ÿ', '{"ville": "Zürich", "n": 1.10}')""",
            context={"user": "Jérôme", "note": "\u00bfqu\u00e9?"},  # json.dumps: \\u escapes, as the pool sends
        )
        with psycopg.connect(dsn) as conn:
            conn.execute("""UPDATE café SET "prénom" = 'Zoë' WHERE id = 1""")
            conn.execute("""SELECT pg_logical_emit_message(true, '_bemi', '{"user": "Øyvind"}')""")
        # A context LATIN1 cannot hold (the pool's ASCII JSON can carry any character): stored with '?' for it.
        run_sql(dsn, "DELETE FROM café", context={"user": "Zoë 🙂"})
        await drain(dsn)
        await drain(dsn)  # a second run resumes: nothing stopped it
        stored = changes(f"{dsn}?client_encoding=UTF8")  # psycopg reads jsonb as UTF-8 whatever the encoding
        assert [(c["table"], c["operation"], c["after"], c["context"]) for c in stored] == [
            ("café", "CREATE", {"id": 1, "prénom": "José Ñúñez ÿ", "doc": {"ville": "Zürich", "n": 1.10}},
             {"user": "Jérôme", "note": "¿qué?"}),
            ("café", "UPDATE", {"id": 1, "prénom": "Zoë", "doc": {"ville": "Zürich", "n": 1.10}}, {"user": "Øyvind"}),
            ("café", "DELETE", {}, {"user": "Zoë ?"}),
        ]  # fmt: skip
    finally:
        drop_database(pg_server.admin_dsn, name)
