"""Hostile and odd input through the whole pipeline (bemi pool or raw SQL -> WAL -> worker -> bemi.changes):
fuzzed contexts, foreign and malformed logical messages, huge rows, quoted and unicode identifiers in several
schemas, the widest table PostgreSQL allows, and one transaction touching thousands of tables.

The rule each test checks: a change is stored exactly, or refused before it is committed; never stored wrong, and
the worker never stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import os
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

import bemi_asgi
from bemi_asgi import BemiContextError, bemi_context
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.worker.stitching import INVALID_CONTEXT_KEY

from .worker_support import DESTINATION_SQL, changes, drain, prepare_source

LONG = os.environ.get("BEMI_LONG_TESTS", "") not in ("", "0")

pytestmark = pytest.mark.timeout(600 if LONG else 180)


def exact(text: str) -> Any:
    """JSON text read with every number as a Decimal, so 1e308 and 100...0 compare equal, as jsonb sees them."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def stored_contexts(dsn: str) -> dict[int, Any]:
    """Each stored change's context (read exactly), by the row's primary key."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT primary_key, context::text FROM bemi.changes").fetchall()
    return {int(key): exact(text) for key, text in rows}


# -- fuzzed contexts ---------------------------------------------------------------------------------------------

# Strings that have broken SQL quoting or JSON escaping somewhere, mixed into every generated text.
NASTY = ["$bemi$", "$$", "$bemi", "*/", "/*", "'", "''", "\\", '"', "\x00", "\ud800", "\n", "\u2028", "é", "🦄", "--"]
texts = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=8),  # surrogates and controls too
    st.lists(st.sampled_from(NASTY), max_size=4).map("".join),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.floats(), texts)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(texts, inner, max_size=4),
        st.sets(st.integers(), max_size=2),  # not JSON: refused
    ),
    max_leaves=12,
)
contexts = st.one_of(
    st.dictionaries(texts, json_like, max_size=5),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),  # non-string keys: refused
    st.builds(lambda n: {"big": "x" * n}, st.integers(min_value=8000, max_value=9000)),  # around the size limit
)


def test_fuzzed_contexts_are_stored_exactly_or_refused_before_commit(database: str) -> None:
    """Every generated context written through the bemi pool is either stored on its row exactly as given (as
    JSON), or refused with BemiContextError before anything is committed."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY, how text)", ["items"])
    expected: dict[int, Any] = {}  # id -> the context as JSON, or None when refused
    numbers = itertools.count()
    with asyncio.Runner() as runner:

        async def open_pool() -> asyncpg.Pool:
            return await bemi_asgi.create_pool(database, min_size=1, max_size=1)

        pool = runner.run(open_pool())

        async def insert(i: int, how: str) -> None:
            if how == "transaction":
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("INSERT INTO items VALUES ($1, $2)", i, how)
            elif how == "autocommit":
                await pool.execute("INSERT INTO items VALUES ($1, $2)", i, how)
            else:
                await pool.execute(f"INSERT INTO items VALUES ({i}, 'simple')")

        @settings(
            max_examples=1000 if LONG else 150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(context=contexts, how=st.sampled_from(["transaction", "autocommit", "simple"]))
        def write(context: dict[Any, Any], how: str) -> None:
            i = next(numbers)
            try:
                with bemi_context(context):
                    # A Runner runs tasks in its own context unless given one: give it this thread's.
                    runner.run(insert(i, how), context=contextvars.copy_context())
            except BemiContextError:
                expected[i] = None
                return
            expected[i] = exact(json.dumps(context, ensure_ascii=False))

        try:
            write()
        finally:
            runner.run(pool.close())
    refused = {i for i, context in expected.items() if context is None}
    assert 0 < len(refused) < len(expected)  # the strategies produce both kinds
    asyncio.run(drain(database))
    stored = stored_contexts(database)
    assert stored == {i: context for i, context in expected.items() if context is not None}
    with psycopg.connect(database) as conn:
        rows = {i for (i,) in conn.execute("SELECT id FROM items")}
    assert rows == set(stored)  # refused contexts never reached a commit


# -- foreign and malformed logical messages ---------------------------------------------------------------------

HUGE_CONTEXT = json.dumps({"user_id": 7, "payload": "é" * 3_000_000})  # 6 MB: far over the pool's limit
# (description, messages emitted after the row's insert as (transactional, prefix, payload), stored context)
MESSAGES: list[tuple[str, list[tuple[bool, str, str | bytes]], Any]] = [
    ("foreign prefix", [(True, "audit", '{"user_id": 1}')], {}),
    ("prefix look-alikes", [(True, "_bemi_v2", '{"a": 1}'), (True, "_BEMI", '{"a": 1}'), (True, "", "{}")], {}),
    ("invalid JSON", [(True, "_bemi", '{"user_id": ')], {INVALID_CONTEXT_KEY: '{"user_id": '}),
    ("a JSON array", [(True, "_bemi", "[1, 2]")], {INVALID_CONTEXT_KEY: "[1, 2]"}),
    ("a JSON string", [(True, "_bemi", '"admin"')], {INVALID_CONTEXT_KEY: '"admin"'}),
    ("JSON null", [(True, "_bemi", "null")], {INVALID_CONTEXT_KEY: "null"}),
    ("empty payload", [(True, "_bemi", "")], {INVALID_CONTEXT_KEY: ""}),
    ("NaN", [(True, "_bemi", '{"a": NaN}')], {INVALID_CONTEXT_KEY: '{"a": NaN}'}),
    ("escaped NUL", [(True, "_bemi", '{"a": "\\u0000"}')], {INVALID_CONTEXT_KEY: '{"a": "\\u0000"}'}),
    ("lone surrogate", [(True, "_bemi", '{"a": "\\ud800"}')], {INVALID_CONTEXT_KEY: '{"a": "\\ud800"}'}),
    ("not UTF-8", [(True, "_bemi", b'{"a": "\xff\xfe"}')], {INVALID_CONTEXT_KEY: '{"a": "\ufffd\ufffd"}'}),
    ("NUL byte", [(True, "_bemi", b'{"a": 1}\x00')], {INVALID_CONTEXT_KEY: '{"a": 1}\ufffd'}),
    ("nested 100,000 deep", [(True, "_bemi", "[" * 100_000)], {INVALID_CONTEXT_KEY: "[" * 100_000}),
    ("duplicate keys", [(True, "_bemi", '{"a": 1, "a": 2}')], {"a": 2}),
    ("huge", [(True, "_bemi", HUGE_CONTEXT)], json.loads(HUGE_CONTEXT)),
    ("non-transactional", [(False, "_bemi", '{"user_id": 2}')], {}),
    ("non-transactional then transactional", [(False, "_bemi", '{"a": 1}'), (True, "_bemi", '{"a": 2}')], {"a": 2}),
    ("foreign, then valid", [(True, "audit", '{"a": 1}'), (True, "_bemi", '{"a": 3}')], {"a": 3}),
]


def test_foreign_and_malformed_messages_never_stop_the_worker(database: str) -> None:
    """Logical messages emitted by hand (foreign prefixes, invalid or non-object JSON, bytes that are not UTF-8,
    a 6 MB payload, non-transactional `_bemi` messages, even outside any transaction) are ignored or kept as
    `_bemi_invalid_context`; the worker stores every change with the context the stitching rule gives it."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    with psycopg.connect(database, autocommit=True) as conn:
        # Messages outside any transaction: a non-transactional one is decoded on its own, between transactions.
        conn.execute("SELECT pg_logical_emit_message(false, '_bemi', '{\"stray\": true}')")
        conn.execute("SELECT pg_logical_emit_message(false, '_bemi', 'not json')")
        for i, (_, messages, _) in enumerate(MESSAGES):
            with conn.transaction():
                conn.execute("INSERT INTO items VALUES (%s)", [i])
                for transactional, prefix, payload in messages:
                    kind = "bytea" if isinstance(payload, bytes) else "text"
                    conn.execute(
                        sql.SQL("SELECT pg_logical_emit_message(%s, %s, %s::{})").format(sql.SQL(kind)),
                        [transactional, prefix, payload],
                    )
    asyncio.run(drain(database))
    stored = {int(c["primary_key"]): c["context"] for c in changes(database)}
    for i, (description, _, context) in enumerate(MESSAGES):
        assert stored[i] == context, description
    assert len(stored) == len(MESSAGES)


# -- huge rows --------------------------------------------------------------------------------------------------


def test_huge_rows_are_stored_whole(database: str) -> None:
    """Rows of several MB (text, bytea, jsonb), updated without touching them (unchanged TOAST values) and
    deleted, are stored byte for byte."""
    prepare_source(
        database, "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, blob bytea, doc jsonb)", ["docs"]
    )
    body = "".join(chr(0x20 + i % 0x2000) for i in range(4_000_000))  # 4M characters, mostly multi-byte
    blob = os.urandom(3_000_000)
    doc = {"items": [{"n": i, "s": "x" * 100} for i in range(20_000)]}
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO docs VALUES (1, 'a', %s, %s, %s)", [body, blob, json.dumps(doc)])
        conn.execute("UPDATE docs SET title = 'b' WHERE id = 1")  # body, blob and doc stay in TOAST, unsent
        conn.execute("DELETE FROM docs WHERE id = 1")
    asyncio.run(drain(database))
    create, update, delete = changes(database)
    row = {"id": 1, "title": "a", "body": body, "blob": "\\x" + blob.hex(), "doc": doc}
    assert create["after"] == row
    assert update["before"] == row
    assert update["after"] == {**row, "title": "b"}
    assert delete["before"] == {**row, "title": "b"}


# -- names ------------------------------------------------------------------------------------------------------

ODD = '"ünï ""cödé"""'  # the schema ünï "cödé", quoted
NAMES_SQL = f"""
CREATE SCHEMA "Sales Data";
CREATE SCHEMA {ODD};
CREATE TABLE "Sales Data"."Order Lines" (
    "Order Id" int, "Line" text, "Unit Price" numeric, "ÉTAT" text, "a""b" int, "select" text, "🦄" text,
    PRIMARY KEY ("Order Id", "Line"));
CREATE TABLE {ODD}."Tab.le" (id int PRIMARY KEY, "x y" text);
CREATE TABLE public.items (id int PRIMARY KEY, name text);
CREATE TABLE "Sales Data".items (id int PRIMARY KEY, name text);
CREATE TABLE {ODD}.items (id int PRIMARY KEY, name text);
"""


async def test_quoted_and_unicode_names_in_several_schemas(database: str) -> None:
    """Schemas, tables and columns with spaces, capitals, quotes, dots, reserved words and emoji, and one table
    name in three schemas, tracked by the migration: each change is stored under its exact names with its
    context, and the query helpers find it."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(NAMES_SQL)
        conn.execute(migration_sql(schemas=['public, "Sales Data"', ODD]))
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=1)
    try:
        with bemi_context(user_id="ü'\"$$"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    """INSERT INTO "Sales Data"."Order Lines" VALUES (1, 'L"1', 9.5, 'neu', 2, 'x', '🦄')"""
                )
                await conn.execute("""UPDATE "Sales Data"."Order Lines" SET "ÉTAT" = 'alt' WHERE "Order Id" = 1""")
                await conn.execute(f"""INSERT INTO {ODD}."Tab.le" VALUES (1, 'z')""")
                for schema in ("public", '"Sales Data"', ODD):
                    await conn.execute(f"INSERT INTO {schema}.items VALUES (1, 'n')")
        await drain(database)
        stored = changes(database)
        assert [(c["schema"], c["table"], c["operation"], c["primary_key"]) for c in stored] == [
            ("Sales Data", "Order Lines", "CREATE", '["1","L\\"1"]'),
            ("Sales Data", "Order Lines", "UPDATE", '["1","L\\"1"]'),
            ('ünï "cödé"', "Tab.le", "CREATE", "1"),
            ("public", "items", "CREATE", "1"),
            ("Sales Data", "items", "CREATE", "1"),
            ('ünï "cödé"', "items", "CREATE", "1"),
        ]
        assert stored[1]["after"] == {
            "Order Id": 1, "Line": 'L"1', "Unit Price": "9.5", "ÉTAT": "alt", 'a"b': 2, "select": "x", "🦄": "🦄"
        }  # fmt: skip
        assert all(c["context"] == {"user_id": "ü'\"$$"} for c in stored)
        bemi = bemi_asgi.Bemi(pool)
        history = await bemi.history("Order Lines", (1, 'L"1'), schema="Sales Data")
        assert [c.operation for c in history] == ["CREATE", "UPDATE"]
        found = await bemi.changes.find(schema='ünï "cödé"', table="Tab.le")
        assert [c.after for c in found] == [{"id": 1, "x y": "z"}]
    finally:
        await pool.close()


# -- shapes -----------------------------------------------------------------------------------------------------


def test_widest_table_postgresql_allows(database: str) -> None:
    """A table with 1,600 columns (PostgreSQL's maximum) is stored with every column, through insert, update of
    one column, and delete."""
    columns = ", ".join(f"c{i} int" for i in range(1, 1600))
    prepare_source(database, f"CREATE TABLE wide (id int PRIMARY KEY, {columns})", ["wide"])
    values = ", ".join(str(i * 7) for i in range(1, 1600))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"INSERT INTO wide VALUES (1, {values})")
        conn.execute("UPDATE wide SET c1500 = -1 WHERE id = 1")
        conn.execute("DELETE FROM wide")
    asyncio.run(drain(database))
    create, update, delete = changes(database)
    row = {"id": 1, **{f"c{i}": i * 7 for i in range(1, 1600)}}
    assert len(create["after"]) == 1600
    assert create["after"] == row
    assert update["after"] == {**row, "c1500": -1}
    assert delete["before"] == {**row, "c1500": -1}


def test_one_transaction_touching_thousands_of_tables(database: str) -> None:
    """One transaction inserting a row into each of 2,000 tracked tables is stored as 2,000 changes of one
    transaction, each under its own table, all with the transaction's context."""
    count = 2000
    names = [f"t{i:04}" for i in range(count)]
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
        for start in range(0, count, 500):  # chunks keep the lock table small
            conn.execute(
                "".join(
                    f"CREATE TABLE {name} (id int PRIMARY KEY, v text); ALTER TABLE {name} REPLICA IDENTITY FULL;"
                    for name in names[start : start + 500]
                )
            )
        conn.execute(f"CREATE PUBLICATION bemi FOR TABLE {', '.join(names)}")
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
        with conn.transaction():
            conn.execute("".join(f"INSERT INTO {name} VALUES ({i}, 'v');" for i, name in enumerate(names)))
            conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"job\": \"fan-out\"}')")
    asyncio.run(drain(database))
    stored = changes(database)
    assert sorted(c["table"] for c in stored) == [f"t{i:04}" for i in range(count)]
    assert all(c["after"] == {"id": int(c["table"][1:]), "v": "v"} for c in stored)
    assert len({c["transaction_id"] for c in stored}) == 1
    assert all(c["context"] == {"job": "fan-out"} for c in stored)
