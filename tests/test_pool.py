"""The bemi pool: every way asyncpg writes carries the context as one `_bemi` message, read back from a real slot."""

from __future__ import annotations

import asyncio
import io
import json
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bemi_asgi
from bemi_asgi import BemiConnection, BemiContextError, bemi_context
from bemi_asgi.capture.pool import OTHER, READ, WRITE, classify, control, emit_sql, quote_literal

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
    """A multi-statement script with BEGIN/COMMIT inside carries the context in its transaction."""
    with bemi_context(CTX):
        await conn.execute(f"BEGIN; {INSERT}; {INSERT}; COMMIT;")
    assert await read_slot(reader) == [[CTX, "I", "I"]]


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
def test_quote_literal_picks_a_tag_absent_from_the_text(text: str) -> None:
    """The dollar-quote tag never occurs in the quoted text, so the text cannot end the literal early."""
    literal = quote_literal(text)
    tag = literal[: literal.index("$", 1) + 1]
    assert literal == tag + text + tag
    assert tag not in text


@pytest.mark.parametrize("text", ["x$bemi", "$bemi", "x$bemi$bemi", "$bemi1$", "$", "$$", "'\\"])
async def test_quote_literal_round_trips_through_the_server(conn: BemiConnection, text: str) -> None:
    """The server reads back exactly the quoted text, including text ending where the closing tag begins."""
    assert await conn.fetchval(f"SELECT {quote_literal(text)}") == text


def test_emit_sql_is_cached_and_calls_the_three_argument_function() -> None:
    """The emitted SQL calls pg_logical_emit_message with 3 arguments and is built once per context text."""
    with bemi_context(CTX):
        data = bemi_asgi.capture.context.current()
    assert data is not None
    sql = emit_sql(data)
    assert sql is emit_sql(data)
    assert "pg_logical_emit_message(true, '_bemi', $bemi$" in sql
    assert sql.endswith(" END;")
    assert "pg_current_xact_id_if_assigned() IS NOT NULL" in sql
    assert "pg_current_xact_id_if_assigned" not in emit_sql(data, conditional=False)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT * FROM items WHERE id = $1", READ),
        ("select last_update, deleted_at, count(*) from t group by 1, 2", READ),
        ("/* api */ WITH x AS (SELECT 1) SELECT coalesce(max(a), 0) FROM x WHERE b IN (1, 2)", READ),
        ("SHOW search_path", READ),
        ("SELECT create_order($1)", WRITE),
        ('SELECT "Create"($1)', WRITE),
        ("SELECT * FROM t FOR UPDATE", WRITE),
        ("INSERT INTO t VALUES ($1)", WRITE),
        ("with x as (delete from t returning *) select * from x", WRITE),
        ("CALL do_things()", WRITE),
        ("INSERT INTO t (database) VALUES (1)", WRITE),
        ("CREATE INDEX CONCURRENTLY i ON t (x) WHERE y = 'update'", OTHER),
        ("VACUUM t", OTHER),
        ("SET search_path = app", OTHER),
        ("CREATE TABLE t (id int)", OTHER),
    ],
)
def test_classify(query: str, expected: int) -> None:
    """Reads are recognized only when certain; data-modifying statements and unknown function calls are writes."""
    assert classify(query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("COMMIT;", ("commit", "")),
        ("end work", ("commit", "")),
        ("commit and chain", ("commit", "")),
        ("ROLLBACK;", ("rollback", "")),
        ("ROLLBACK TO __asyncpg_savepoint_1__;", ("rollback_to", "__asyncpg_savepoint_1__")),
        ('rollback to savepoint "My SP"', ("rollback_to", "My SP")),
        ("RELEASE SAVEPOINT Sa_1;", ("release", "sa_1")),
        ("SAVEPOINT x;", ("savepoint", "x")),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE;", ("begin", "")),
        ("COMMIT PREPARED 'x'", None),
        ("INSERT INTO t VALUES (1); COMMIT", None),
        ("SELECT 1", None),
    ],
)
def test_control(query: str, expected: tuple[str, str] | None) -> None:
    """Transaction-control statements are recognized, with their savepoint names; anything else is not."""
    assert control(query) == expected


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
    """For any JSON context, the message read back from the slot is exactly the context's JSON text."""

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
        assert raw[end + 5 :].decode() == data.json
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
