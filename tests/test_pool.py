"""The bemi pool: every way asyncpg writes carries the context as one `_bemi` message, read back from a real slot."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql as psql

import bemi_asgi
from bemi_asgi import BemiConnection, BemiContextError, bemi_context
from bemi_asgi.capture.context import ContextData, validate
from bemi_asgi.capture.pool import Transaction, TransactionState, ascii_json, dollar_quote, emit_sql
from bemi_asgi.capture.statements import Step
from tests.conftest import PgServer, drop_database

# --- reading the slot -----------------------------------------------------------------------------------------------

SLOT = "bemi_test"
PUBLICATION = "bemi_test_pub"


def parse_transactions(payloads: list[bytes]) -> list[list[Any]]:
    """Group pgoutput (v1) payloads into transactions: a list per transaction of change letters and `_bemi` contexts.

    Just enough of the protocol for these tests: Begin 'B' and Commit 'C' delimit, 'I'/'U'/'D'/'T' are changes,
    'M' is a message (flags, LSN, prefix, length, content); relation and type messages are skipped.
    """
    transactions: list[list[Any]] = []
    current: list[Any] | None = None
    for data in payloads:
        kind = chr(data[0])
        if kind == "B":
            current = []
        elif kind == "C":
            assert current is not None
            transactions.append(current)
            current = None
        elif kind in "IUDT":
            assert current is not None
            current.append(kind)
        elif kind == "M":
            transactional = data[1] == 1
            end = data.index(b"\x00", 10)
            prefix = data[10:end].decode()
            (length,) = struct.unpack_from(">i", data, end + 1)
            content = data[end + 5 : end + 5 + length]
            assert transactional, "the pool only sends transactional messages"
            assert current is not None
            if prefix == "_bemi":
                current.append(json.loads(content.decode()))
    return transactions


def stitch(transaction: list[Any]) -> list[tuple[str, Any]]:
    """The stitching rule: a change takes the first message after it, or else the last one before it."""
    result = []
    for index, item in enumerate(transaction):
        if isinstance(item, str):
            after = [m for m in transaction[index + 1 :] if isinstance(m, dict)]
            before = [m for m in transaction[:index] if isinstance(m, dict)]
            result.append((item, after[0] if after else before[-1] if before else None))
    return result


async def read_slot(conn: asyncpg.Connection) -> list[list[Any]]:
    rows = await conn.fetch(
        "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, 'proto_version', '1', "
        "'publication_names', $2, 'messages', 'true')",
        SLOT,
        PUBLICATION,
    )
    return parse_transactions([bytes(row["data"]) for row in rows])


async def prepare_source(dsn: str) -> asyncpg.Connection:
    """Create a tracked table `items`, a publication and a pgoutput slot; return a plain asyncpg reader."""
    reader = await asyncpg.connect(dsn)
    await reader.execute(
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);"
        f"CREATE PUBLICATION {PUBLICATION} FOR TABLE items;"
    )
    await reader.execute(f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    return reader


@pytest.fixture
async def source(database: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    reader = await prepare_source(database)
    try:
        yield database, reader
    finally:
        await reader.close()


@pytest.fixture
async def conn(source: tuple[str, asyncpg.Connection]) -> AsyncIterator[BemiConnection]:
    connection = await bemi_asgi.connect(source[0])
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def reader(source: tuple[str, asyncpg.Connection]) -> asyncpg.Connection:
    return source[1]


CTX = {"user_id": 7, "endpoint": "POST /items"}
INSERT = "INSERT INTO items (name) VALUES ('a')"


async def insert_then_fail(conn: BemiConnection) -> None:
    async with conn.transaction():
        await conn.execute(INSERT)
        raise ZeroDivisionError


async def insert_null_under_step_2(conn: BemiConnection) -> None:
    async with conn.transaction():
        with bemi_context(step=2):
            await conn.execute("INSERT INTO items (name) VALUES ($1)", None)


# --- explicit transactions ------------------------------------------------------------------------------------------


async def test_transaction_block_emits_one_message_with_commit(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """A written `async with conn.transaction()` block carries exactly one `_bemi` message with the context."""
    with bemi_context(CTX):
        async with conn.transaction():
            await conn.execute(INSERT)
            await conn.execute("INSERT INTO items (name) VALUES ($1)", "b")
    assert await read_slot(reader) == [["I", "I", CTX]]


async def test_nested_savepoints_emit_only_at_the_outermost_commit(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """Savepoints (committed or rolled back) emit nothing: the outer COMMIT sends the single message."""
    with bemi_context(CTX):
        async with conn.transaction():
            await conn.execute(INSERT)
            async with conn.transaction():
                await conn.execute(INSERT)
            with pytest.raises(ZeroDivisionError):
                await insert_then_fail(conn)
    assert await read_slot(reader) == [["I", "I", CTX]]


async def test_manual_start_and_commit(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """`tr.start()` / `tr.commit()` carries the context like the context manager does."""
    with bemi_context(CTX):
        tr = conn.transaction()
        await tr.start()
        await conn.execute(INSERT)
        await tr.commit()
    assert await read_slot(reader) == [["I", CTX]]


async def test_isolation_and_readonly_options(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A serializable write transaction emits; a READ ONLY one sends nothing."""
    with bemi_context(CTX):
        async with conn.transaction(isolation="serializable", deferrable=False):
            await conn.execute(INSERT)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            assert await conn.fetchval("SELECT count(*) FROM items") == 1
    assert await read_slot(reader) == [["I", CTX]]


async def test_raw_begin_and_commit_statements(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A transaction driven by `execute('BEGIN')` ... `execute('END')` carries the context too."""
    with bemi_context(CTX):
        await conn.execute("BEGIN")
        await conn.execute(INSERT)
        await conn.execute("end;")
    assert await read_slot(reader) == [["I", CTX]]


async def test_commit_of_a_failed_transaction_still_rolls_back_quietly(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """COMMIT after an error in the transaction behaves as in asyncpg: no exception, rolled back, nothing sent."""
    with bemi_context(CTX):
        await conn.execute("BEGIN")
        await conn.execute(INSERT)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1/0")
        assert await conn.execute("COMMIT") == "ROLLBACK"
    assert not conn.is_in_transaction()
    assert await read_slot(reader) == []


async def test_rollback_sends_nothing(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A rolled-back transaction leaves nothing in the WAL stream."""
    with bemi_context(CTX):
        with pytest.raises(ZeroDivisionError):
            await insert_then_fail(conn)
        tr = conn.transaction()
        await tr.start()
        await conn.execute(INSERT)
        await tr.rollback()
    assert await read_slot(reader) == []


# --- autocommit writes ----------------------------------------------------------------------------------------------


async def test_autocommit_execute_without_arguments(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A bare `execute` write is one transaction with one message, and returns the statement's own status."""
    with bemi_context(CTX):
        assert await conn.execute(INSERT) == "INSERT 0 1"
        assert await conn.execute("UPDATE items SET name = 'z'") == "UPDATE 1"
    assert await read_slot(reader) == [[CTX, "I"], [CTX, "U"]]


async def test_autocommit_script_with_its_own_transaction(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A multi-statement script with BEGIN/COMMIT inside carries the context: the message goes in before its COMMIT."""
    with bemi_context(CTX):
        await conn.execute(f"BEGIN; {INSERT}; {INSERT}; COMMIT;")
    assert await read_slot(reader) == [["I", "I", CTX]]


async def test_autocommit_execute_with_arguments(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """`execute` with arguments is wrapped into one transaction with the message, and returns its status."""
    with bemi_context(CTX):
        assert await conn.execute("INSERT INTO items (name) VALUES ($1)", "x") == "INSERT 0 1"
        assert await conn.execute("DELETE FROM items WHERE name = $1", "x") == "DELETE 1"
    assert await read_slot(reader) == [["I", CTX], ["D", CTX]]
    assert not conn.is_in_transaction()


async def test_autocommit_executemany(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """`executemany` writes all its rows in one transaction with one message."""
    with bemi_context(CTX):
        await conn.executemany("INSERT INTO items (name) VALUES ($1)", [("a",), ("b",), ("c",)])
    assert await read_slot(reader) == [["I", "I", "I", CTX]]


async def test_autocommit_fetch_methods_of_insert_returning(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """`fetch`, `fetchrow`, `fetchval` and `fetchmany` of INSERT ... RETURNING each carry the context."""
    returning = "INSERT INTO items (name) VALUES ($1) RETURNING id"
    with bemi_context(CTX):
        assert [r["id"] for r in await conn.fetch(returning, "a")] == [1]
        row = await conn.fetchrow(returning, "b")
        assert row is not None
        assert row["id"] == 2
        assert await conn.fetchval(returning, "c") == 3
        assert [r["id"] for r in await conn.fetchmany(returning, [("d",), ("e",)])] == [4, 5]
    assert await read_slot(reader) == [["I", CTX], ["I", CTX], ["I", CTX], ["I", "I", CTX]]


async def test_autocommit_copy(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """`copy_records_to_table` and `copy_to_table` each write one transaction with the message."""
    with bemi_context(CTX):
        assert await conn.copy_records_to_table("items", records=[("a",), ("b",)], columns=["name"]) == "COPY 2"
        assert await conn.copy_to_table("items", source=io.BytesIO(b"c\nd\n"), columns=["name"]) == "COPY 2"
    assert await read_slot(reader) == [["I", "I", CTX], ["I", "I", CTX]]


async def test_autocommit_prepared_statement(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Executions of a `prepare()`d write statement carry the context (SQLAlchemy runs everything this way)."""
    statement = await conn.prepare("INSERT INTO items (name) VALUES ($1) RETURNING id")
    with bemi_context(CTX):
        assert await statement.fetchval("a") == 1
        await statement.executemany([("b",), ("c",)])
    assert await read_slot(reader) == [["I", CTX], ["I", "I", CTX]]


async def test_pool_shortcuts(source: tuple[str, asyncpg.Connection]) -> None:
    """`pool.execute`, `pool.fetch` and a transaction on an acquired connection all carry the context."""
    dsn, reader = source
    async with bemi_asgi.create_pool(dsn, min_size=1, max_size=2) as pool:
        with bemi_context(CTX):
            await pool.execute("INSERT INTO items (name) VALUES ($1)", "a")
            await pool.fetch("INSERT INTO items (name) VALUES ($1) RETURNING id", "b")
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute(INSERT)
        with bemi_context(user_id=8):
            await pool.execute(INSERT)
    assert await read_slot(reader) == [["I", CTX], ["I", CTX], ["I", CTX], [{"user_id": 8}, "I"]]


async def test_failed_autocommit_write_leaves_no_transaction_open(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """A wrapped statement that fails is rolled back: the error surfaces and the connection is idle again."""
    with bemi_context(CTX):
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute("INSERT INTO items (name) VALUES ($1)", None)
        assert not conn.is_in_transaction()
        await conn.execute("INSERT INTO items (name) VALUES ($1)", "ok")
    assert await read_slot(reader) == [["I", CTX]]


async def test_writes_inside_functions(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A SELECT calling a function that writes carries the context, inside a transaction or not."""
    await conn.execute(
        "CREATE FUNCTION add_item(n text) RETURNS int LANGUAGE sql AS "
        "$$ INSERT INTO items (name) VALUES (n) RETURNING id $$"
    )
    with bemi_context(CTX):
        assert await conn.fetchval("SELECT add_item($1)", "a") == 1
        async with conn.transaction():
            assert await conn.fetchval("SELECT add_item($1)", "b") == 2
        assert await conn.execute("SELECT add_item('c')") == "SELECT 1"
    assert await read_slot(reader) == [["I", CTX], ["I", CTX], ["I", CTX]]


# --- what sends nothing ---------------------------------------------------------------------------------------------


async def test_reads_send_nothing(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Reads, in a transaction or not, leave nothing in the WAL stream even with a context set."""
    await conn.execute(INSERT)
    assert len(await read_slot(reader)) == 1
    with bemi_context(CTX):
        assert await conn.fetchval("SELECT count(*) FROM items") == 1
        assert await conn.execute("SELECT 1") == "SELECT 1"
        async with conn.transaction():
            await conn.fetch("SELECT * FROM items WHERE id = $1", 1)
        statement = await conn.prepare("SELECT name FROM items")
        assert await statement.fetchval() == "a"
        assert await conn.fetchval("SHOW server_version") is not None
    assert await read_slot(reader) == []


async def test_no_context_sends_nothing(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Without a context, writes reach the WAL without any `_bemi` message."""
    await conn.execute(INSERT)
    await conn.execute("INSERT INTO items (name) VALUES ($1)", "b")
    async with conn.transaction():
        await conn.execute(INSERT)
    assert await read_slot(reader) == [["I"], ["I"], ["I"]]


async def test_commands_that_refuse_transactions_still_run(conn: BemiConnection) -> None:
    """Maintenance commands that cannot run in a transaction block are not wrapped, even with a context set."""
    with bemi_context(CTX):
        await conn.execute("CREATE INDEX CONCURRENTLY items_name ON items (name) WHERE name <> 'delete'")
        await conn.execute("VACUUM items")
    assert await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = 'items_name'") == 1


# --- context changes inside a transaction ---------------------------------------------------------------------------


async def test_context_changed_mid_transaction(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Each part of a transaction keeps the context it ran under, by the stitching rule."""
    with bemi_context(step=1):
        async with conn.transaction():
            await conn.execute(INSERT)
            with bemi_context(step=2):
                await conn.execute("INSERT INTO items (name) VALUES ($1)", "b")  # extended protocol
                await conn.execute(INSERT)
            await conn.execute(INSERT)  # simple protocol, back to step 1
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {"step": 1}), ("I", {"step": 2}), ("I", {"step": 2}), ("I", {"step": 1})]
    assert transaction.count({"step": 1}) == 2
    assert transaction.count({"step": 2}) == 1


async def test_part_without_context_gets_an_empty_one(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Statements run with no context inside a transaction that also ran under one are stitched to `{}`."""
    async with conn.transaction():
        await conn.execute(INSERT)
        with bemi_context(CTX):
            await conn.execute(INSERT)
        await conn.execute(INSERT)
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {}), ("I", CTX), ("I", {})]


async def test_context_changed_inside_a_rolled_back_savepoint(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A message sent inside a savepoint that rolls back is undone with it, and the commit sends the owed one."""
    with bemi_context(step=1):
        async with conn.transaction():
            await conn.execute(INSERT)
            with pytest.raises(asyncpg.NotNullViolationError):
                await insert_null_under_step_2(conn)
            await conn.fetchval("SELECT 1")
    assert await read_slot(reader) == [["I", {"step": 1}]]


async def test_statements_the_connection_does_not_see_take_the_context_at_commit(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """A transaction written only through a cursor (not seen statement by statement) carries the context at COMMIT."""
    with bemi_context(CTX):
        async with conn.transaction():
            async for row in conn.cursor("INSERT INTO items (name) VALUES ('a') RETURNING id"):
                assert row["id"] == 1
    assert await read_slot(reader) == [["I", CTX]]


# --- safety ---------------------------------------------------------------------------------------------------------


def test_nul_is_refused_where_the_context_is_set() -> None:
    """A NUL character never reaches the pool: the context refuses it at entry with BemiContextError."""
    with pytest.raises(BemiContextError, match="NUL"), bemi_context(note="a\x00b"):
        pass


async def test_nul_context_write_through_the_pool_fails_before_sql(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """A write attempted with a NUL context raises BemiContextError and nothing is written."""
    with pytest.raises(BemiContextError), bemi_context(note="\x00"):
        await conn.execute(INSERT)
    assert await conn.fetchval("SELECT count(*) FROM items") == 0
    assert await read_slot(reader) == []


@pytest.mark.parametrize(
    "text", ["", "$bemi$", "$bemi$$bemi1$", "a$", "'; DROP TABLE items; --", "\\'", "*/", "$$", "\U0001f600"]
)
def test_dollar_quote_picks_a_tag_absent_from_the_text(text: str) -> None:
    """The dollar-quote tag never occurs in the quoted text, so the text cannot end the literal early."""
    literal = dollar_quote(text)
    tag = literal[: literal.index("$", 1) + 1]
    assert literal == tag + text + tag
    assert tag not in text


@pytest.mark.parametrize("text", ["x$bemi", "$bemi", "x$bemi$bemi", "$bemi1$", "$", "$$", "'\\"])
async def test_dollar_quote_round_trips_through_the_server(conn: BemiConnection, text: str) -> None:
    """The server reads back exactly the quoted text, including text ending where the closing tag begins."""
    assert await conn.fetchval(f"SELECT {dollar_quote(text)}") == text


def test_emit_sql_is_cached_and_calls_the_three_argument_function() -> None:
    """The emitted SQL calls pg_logical_emit_message with 3 arguments and is built once per context text."""
    with bemi_context(CTX):
        data = bemi_asgi.capture.context.current()
    assert data is not None
    sql = emit_sql(data)
    assert sql is emit_sql(data)
    assert "pg_logical_emit_message(true, '_bemi', $bemi$" in sql
    assert sql.endswith("$bemi$) WHERE pg_current_xact_id_if_assigned() IS NOT NULL;")
    assert "pg_current_xact_id_if_assigned" not in emit_sql(data, conditional=False)


# Any JSON value, weighted towards the characters that break naive quoting.
_tricky = st.sampled_from(["'", '"', "\\", "$$", "$bemi$", "*/", "/*", ";", "--", "\n", "\x01", "\x7f", "\U0001f600"])
_text = st.lists(
    st.one_of(_tricky, st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8)),
    max_size=6,
).map("".join)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as run:
        yield run


def test_any_json_round_trips_through_the_wal(database: str, runner: asyncio.Runner) -> None:
    """For any JSON context, the message read back from the slot is the context's JSON text, `\\u`-escaped to ASCII."""

    async def setup() -> tuple[BemiConnection, asyncpg.Connection]:
        return await bemi_asgi.connect(database), await prepare_source(database)

    conn, reader = runner.run(setup())

    async def check(values: dict[str, Any]) -> None:
        with bemi_context(values):
            data = bemi_asgi.capture.context.current()
            assert data is not None
            async with conn.transaction():
                await conn.execute("INSERT INTO items (name) VALUES ($1)", "x")
        rows = await reader.fetch(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, 'proto_version', '1', "
            "'publication_names', $2, 'messages', 'true')",
            SLOT,
            PUBLICATION,
        )
        messages = [bytes(r["data"]) for r in rows if bytes(r["data"])[:1] == b"M"]
        assert len(messages) == 1
        raw = messages[0]
        end = raw.index(b"\x00", 10)
        content = raw[end + 5 :]
        assert content.isascii()  # any server encoding accepts it
        assert json.loads(content) == json.loads(data.json)
        assert content.decode() == ascii_json(data.json)
        assert json.loads(raw[end + 5 :]) == json.loads(json.dumps(values))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(_text, _json, max_size=5))
    def run(values: dict[str, Any]) -> None:
        runner.run(check(values))

    try:
        run()
    finally:
        runner.run(conn.close())
        runner.run(reader.close())


def test_connection_class_must_derive_from_bemi_connection() -> None:
    """A plain asyncpg connection class is refused: its writes would silently lose the context."""
    with pytest.raises(TypeError, match="BemiConnection"):
        bemi_asgi.create_pool("postgresql://unused", connection_class=asyncpg.Connection)


# --- the server judges inside transactions: every spelling, every path ----------------------------------------------


@pytest.mark.parametrize("spelling", ["COMMIT WORK", "END TRANSACTION", "commit;", "/* done */ COMMIT AND NO CHAIN"])
async def test_every_commit_spelling_carries_the_message(
    conn: BemiConnection, reader: asyncpg.Connection, spelling: str
) -> None:
    """COMMIT in any spelling PostgreSQL accepts carries the message."""
    with bemi_context(CTX):
        await conn.execute("BEGIN")
        await conn.execute(INSERT)
        await conn.execute(spelling)
    assert not conn.is_in_transaction()
    assert await read_slot(reader) == [["I", CTX]]


async def test_commit_and_chain_starts_a_fresh_transaction(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """COMMIT AND CHAIN carries the first transaction's context; the chained one carries its own."""
    with bemi_context(step=1):
        await conn.execute("START TRANSACTION")
        await conn.execute(INSERT)
        await conn.execute("COMMIT AND CHAIN")
    assert conn.is_in_transaction()
    with bemi_context(step=2):
        await conn.execute(INSERT)
    await conn.execute("END")
    assert await read_slot(reader) == [["I", {"step": 1}], ["I", {"step": 2}]]


async def test_prepare_transaction_carries_the_message(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Two-phase commit: PREPARE TRANSACTION carries the message, decoded when COMMIT PREPARED runs."""
    with bemi_context(CTX):
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO items (name) VALUES ($1)", "2pc")
        await conn.execute("PREPARE TRANSACTION 'bemi-2pc'")
        assert not conn.is_in_transaction()
    await reader.execute("COMMIT PREPARED 'bemi-2pc'")
    assert await read_slot(reader) == [["I", CTX]]


async def test_abort_sends_nothing_and_rollback_to_keeps_the_outer_part(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """ABORT ends the transaction with nothing sent; ROLLBACK TO SAVEPOINT undoes only the savepoint's part (and any
    message sent inside it), so the outer part keeps its own context."""
    with bemi_context(step=1):
        await conn.execute("BEGIN")
        await conn.execute(INSERT)
        await conn.execute("ABORT")
        await conn.execute("BEGIN")
        await conn.execute(INSERT)
        await conn.execute('SAVEPOINT "Inner"')
        with bemi_context(step=2):
            await conn.execute(INSERT)
            await conn.execute('ROLLBACK TO SAVEPOINT "Inner"')
            await conn.execute("SELECT 1")
        await conn.execute("COMMIT")
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {"step": 1})]


async def test_transaction_control_through_prepared_statements(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """SAVEPOINT, ROLLBACK TO and COMMIT sent through the extended protocol (as SQLAlchemy does) are tracked."""
    with bemi_context(step=1):
        await (await conn.prepare("BEGIN")).fetch()
        await conn.execute("INSERT INTO items (name) VALUES ($1)", "outer")
        await (await conn.prepare("SAVEPOINT sa_savepoint_1")).fetch()
        with bemi_context(step=2):
            await conn.execute("INSERT INTO items (name) VALUES ($1)", "inner")
            await (await conn.prepare("ROLLBACK TO SAVEPOINT sa_savepoint_1")).fetch()
        await conn.fetch("INSERT INTO items (name) VALUES ($1)", "after")
        with bemi_context(step=3):
            await conn.fetchval("COMMIT")
    assert not conn.is_in_transaction()
    assert await read_slot(reader) == [["I", "I", {"step": 1}]]


async def test_cursor_statements_take_their_own_context(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """A cursor's statements run under the context current when it binds, like any other statement."""
    async with conn.transaction():
        with bemi_context(step=1):
            await conn.execute(INSERT)
        with bemi_context(step=2):
            rows = [row async for row in conn.cursor("INSERT INTO items (name) VALUES ('c') RETURNING id")]
            assert len(rows) == 1
            statement = await conn.prepare("INSERT INTO items (name) VALUES ($1) RETURNING id")
            cursor = await statement.cursor("d")
            assert await cursor.fetchrow() is not None
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {"step": 1}), ("I", {"step": 2}), ("I", {"step": 2})]


async def test_a_write_the_text_hides_keeps_its_own_context(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Inside a transaction nothing is judged from the text: a write through a comment-split call, a view or
    attribute notation is stitched to the context it ran under, never to the one after it."""
    await conn.execute(
        "CREATE FUNCTION bump(n int) RETURNS int LANGUAGE sql AS "
        "$$ INSERT INTO items (name) VALUES ('b') RETURNING n $$;"
        "CREATE FUNCTION touch(i items) RETURNS int LANGUAGE sql AS "
        "$$ INSERT INTO items (name) VALUES ('t') RETURNING 1 $$;"
        "CREATE VIEW bumped AS SELECT bump(1) AS n"
    )
    await conn.execute(INSERT)
    assert len(await read_slot(reader)) == 1
    async with conn.transaction():
        with bemi_context(step=1):
            await conn.execute("SELECT bump/**/(1)")
        with bemi_context(step=2):
            await conn.fetchval("SELECT n FROM bumped")
        with bemi_context(step=3):
            await conn.fetch("SELECT i.touch FROM items i WHERE i.id = $1", 1)
        with bemi_context(step=4):
            await conn.fetchval("SELECT 1")
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {"step": 1}), ("I", {"step": 2}), ("I", {"step": 3})]


# --- the pool never changes what a statement does -------------------------------------------------------------------


async def test_procedures_and_do_blocks_that_commit_behave_as_without_the_pool(
    conn: BemiConnection, reader: asyncpg.Connection
) -> None:
    """CALL of a procedure that COMMITs and a DO block with COMMIT work with a context set; their own commits
    carry no context (documented)."""
    await conn.execute(
        "CREATE PROCEDURE two_commits() LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO items (name) VALUES ('p1'); COMMIT; INSERT INTO items (name) VALUES ('p2'); END $$"
    )
    with bemi_context(CTX):
        assert await conn.execute("CALL two_commits()") == "CALL"
        await conn.execute("DO $$ BEGIN INSERT INTO items (name) VALUES ('d1'); COMMIT; END $$")
    assert await conn.fetchval("SELECT count(*) FROM items") == 3
    assert await read_slot(reader) == [["I"], ["I"], ["I"]]


async def test_set_transaction_first_still_works(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """SET TRANSACTION as the first statement works with a context set, even after a context change; a message is
    never sent in front of a SET."""
    with bemi_context(step=1):
        await conn.execute("BEGIN")
        await conn.execute("SET LOCAL application_name = 'x'")
    with bemi_context(step=2):
        await conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
        await conn.execute(INSERT)
        await conn.execute("COMMIT")
        status = await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; " + INSERT)
        assert status == "INSERT 0 1"
    assert await read_slot(reader) == [["I", {"step": 2}], [{"step": 2}, "I"]]


async def test_multi_statement_strings(conn: BemiConnection, reader: asyncpg.Connection) -> None:
    """Multi-statement strings keep their status and their transactions; each transaction gets its message."""
    with bemi_context(CTX):
        assert await conn.execute(f"{INSERT}; {INSERT}; SELECT 1") == "SELECT 1"
        assert await conn.execute(f"BEGIN; {INSERT}; COMMIT; {INSERT}") == "INSERT 0 1"
        assert await conn.execute(f"BEGIN; {INSERT}") == "INSERT 0 1"
    assert conn.is_in_transaction()
    with bemi_context(user_id=8):
        await conn.execute(f"{INSERT}; COMMIT")
    assert await read_slot(reader) == [
        [CTX, "I", "I"],
        ["I", CTX],
        [CTX, "I"],
        ["I", CTX, "I", {"user_id": 8}],
    ]


async def test_failed_emission_leaves_no_aborted_transaction(
    source: tuple[str, asyncpg.Connection], reader: asyncpg.Connection
) -> None:
    """When the message cannot be written (EXECUTE revoked here), the transaction is rolled back, the connection is
    idle and usable, and the error says what to fix."""
    dsn, _ = source
    # Every overload: PostgreSQL 17 replaced the 3-argument function with one taking an optional 4th.
    await reader.execute(
        "DO $$ DECLARE f regprocedure; BEGIN"
        " FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname = 'pg_logical_emit_message' LOOP"
        " EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f); END LOOP; END $$;"
        "CREATE ROLE bemi_app_no_emit LOGIN; GRANT ALL ON items, items_id_seq TO bemi_app_no_emit"
    )
    try:
        conn = await bemi_asgi.connect(dsn, user="bemi_app_no_emit")
        try:
            with bemi_context(CTX):
                tr = conn.transaction()
                await tr.start()
                await conn.execute(INSERT)
                with pytest.raises(bemi_asgi.SourceNotReadyError, match="pg_logical_emit_message"):
                    await tr.commit()
                assert not conn.is_in_transaction()
                with pytest.raises(bemi_asgi.SourceNotReadyError, match="rolled back"):
                    await conn.execute("INSERT INTO items (name) VALUES ($1)", "x")
                assert not conn.is_in_transaction()
            await conn.execute(INSERT)  # without a context nothing is emitted: it works
            assert await conn.fetchval("SELECT count(*) FROM items") == 1
        finally:
            await conn.close()
    finally:
        await reader.execute("DROP OWNED BY bemi_app_no_emit; DROP ROLE bemi_app_no_emit")


async def test_latin1_database_accepts_any_context(pg_server: PgServer) -> None:
    """On a LATIN1 database a context with characters LATIN1 lacks is written as ASCII JSON and reads back equal."""
    name = f"latin1_{os.getpid()}"

    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
        admin.execute(
            psql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
                psql.Identifier(name)
            )
        )
    try:
        dsn = pg_server.dsn(name)
        latin1_reader = await prepare_source(dsn)
        conn = await bemi_asgi.connect(dsn)
        context = {"who": "Zoë 日本 \U0001f600", "note": "é\\\"'"}
        try:
            with bemi_context(context):
                async with conn.transaction():
                    await conn.execute("INSERT INTO items (name) VALUES ($1)", "é")
                await conn.execute("INSERT INTO items (name) VALUES ('ü')")
            assert await read_slot(latin1_reader) == [["I", context], [context, "I"]]
        finally:
            await conn.close()
            await latin1_reader.close()
    finally:
        drop_database(pg_server.admin_dsn, name)


# --- the tracked transaction, on its own ----------------------------------------------------------------------------


def _data(**values: Any) -> ContextData:
    return validate(values)


def test_transaction_state_machine_owes_the_previous_context_on_a_switch() -> None:
    """A switch owes the previous context's conditional message; COMMIT owes the last one; savepoints restore."""
    a, b = _data(step="a"), _data(step="b")
    tx = Transaction()
    assert tx.advance(Step.STATEMENT, a) is None  # outside a transaction nothing is owed here
    assert tx.advance(Step.BEGIN, a) is None
    assert tx.state is TransactionState.STARTED
    assert tx.advance(Step.STATEMENT, a) is None
    assert tx.advance(Step.SAVEPOINT, b, "s") is None
    assert tx.advance(Step.STATEMENT, b) == emit_sql(a)
    assert tx.advance(Step.ROLLBACK_TO, b, "s") is None
    assert (tx.state, tx.under) == (TransactionState.RUNNING, a)
    assert tx.advance(Step.NEUTRAL, b) is None
    assert tx.advance(Step.COMMIT, b) == emit_sql(a)
    assert tx.state is TransactionState.IDLE


def test_a_part_without_context_is_owed_an_empty_message_once_a_context_ran() -> None:
    """After a part under a context, a part under none needs `{}`, or it would take a later message's context."""
    a = _data(step="a")
    tx = Transaction(TransactionState.STARTED)
    assert tx.advance(Step.STATEMENT, None) is None
    assert tx.advance(Step.STATEMENT, a) == emit_sql(None)
    assert tx.advance(Step.STATEMENT, None) == emit_sql(a)
    assert tx.advance(Step.COMMIT, None) == emit_sql(None)
    tx = Transaction(TransactionState.STARTED)
    assert tx.advance(Step.STATEMENT, None) is None
    assert tx.advance(Step.COMMIT, a) is None  # nothing ran under a context: no message at all


def test_read_only_transactions_owe_nothing_until_a_set() -> None:
    """BEGIN ... READ ONLY (the server refuses every write) owes no message, AND CHAIN included; a SET before the
    first query may make it READ WRITE, so from then on the usual rule applies."""
    a, b = _data(step="a"), _data(step="b")
    tx = Transaction()
    tx.advance(Step.BEGIN_READ_ONLY, a)
    assert tx.state is TransactionState.READ_ONLY
    assert tx.advance(Step.STATEMENT, a) is None
    assert tx.advance(Step.STATEMENT, b) is None
    assert tx.advance(Step.COMMIT_AND_CHAIN, b) is None
    assert tx.state is TransactionState.READ_ONLY
    tx.advance(Step.NEUTRAL, b)
    tx.advance(Step.STATEMENT, b)
    assert tx.advance(Step.COMMIT, b) == emit_sql(b)


async def test_releasing_a_connection_inside_a_span_writes_nothing(
    source: tuple[str, asyncpg.Connection], reader: asyncpg.Connection
) -> None:
    """The reset the pool runs when a connection goes back is asyncpg's own, not a write of the application's: no
    message even when a span (whose ids every write's context gains) is active."""
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    async with bemi_asgi.create_pool(source[0], min_size=1, max_size=1) as pool:
        with tracer.start_as_current_span("request"), bemi_context(CTX):
            async with pool.acquire() as connection:
                await connection.fetchval("SELECT 1")
            await pool.execute(INSERT)
    (transaction,) = await read_slot(reader)  # the INSERT's, and no message-only transaction of the releases
    ((change, context),) = stitch(transaction)
    assert change == "I"
    assert context.keys() == CTX.keys() | {"trace_id", "span_id"}
