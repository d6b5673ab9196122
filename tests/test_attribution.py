"""Generated programs over every write path: each stored change carries exactly the context it was written under.

Each program is a random sequence of context switches, writes (every asyncpg path, many statement shapes), and
transaction control (raw BEGIN / COMMIT in all spellings, `conn.transaction()` nested, savepoints released or rolled
back, COMMIT AND CHAIN, PREPARE TRANSACTION, commits through the extended protocol). Every written row holds in
its `ctx` column the id of the context current when it was written. After the worker catches up, every stored
change's context must equal that context; `{}` is accepted only where the README's Limitations say a write lacks
its context (a write the text cannot show, run outside a transaction: attribute notation here). Never another one.

A bounded run is part of the suite; `BEMI_LONG_TESTS=1` runs many more programs and prints what it checked.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterator
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import String, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import bemi_asgi
from bemi_asgi import BemiConnection
from bemi_asgi.capture.context import ContextData, activate, deactivate

from .worker_support import changes, drain, prepare_source

LONG = os.environ.get("BEMI_LONG_TESTS", "") not in ("", "0")
EXAMPLES = int(os.environ.get("BEMI_ATTRIBUTION_EXAMPLES", 400 if LONG else 15))
SQLALCHEMY_EXAMPLES = 150 if LONG else 5

pytestmark = pytest.mark.timeout(3600 if LONG else 300)

CONTEXTS: dict[str, dict[str, Any] | None] = {
    "": None,
    "c1": {"id": "c1", "user_id": 1},
    "c2": {"id": "c2", "who": "Zoë 日本 \U0001f600", "quote": "'; COMMIT; --"},
    "c3": {"id": "c3", "tags": ["a", "b"], "n": 1.5, "nested": {"$bemi$": "*/"}},
}
IDS = list(CONTEXTS)

SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE written (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ctx text NOT NULL, note text NOT NULL);
CREATE TABLE src (c text PRIMARY KEY);
INSERT INTO src VALUES (''), ('c1'), ('c2'), ('c3');
CREATE FUNCTION write_row(c text) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO written (ctx, note) VALUES (c, 'function') RETURNING 1 $$;
CREATE FUNCTION app.count(c text) RETURNS bigint LANGUAGE sql
    AS $$ INSERT INTO written (ctx, note) VALUES (c, 'qualified') RETURNING 1::bigint $$;
CREATE FUNCTION op_write(c text, n text) RETURNS bool LANGUAGE sql
    AS $$ INSERT INTO written (ctx, note) VALUES (c, n) RETURNING true $$;
CREATE OPERATOR ===> (LEFTARG = text, RIGHTARG = text, FUNCTION = op_write);
CREATE TYPE tagged AS (c text);
CREATE FUNCTION make_tagged(c text) RETURNS tagged LANGUAGE sql
    AS $$ INSERT INTO written (ctx, note) VALUES (c, 'cast'); SELECT ROW(c)::tagged $$;
CREATE CAST (text AS tagged) WITH FUNCTION make_tagged(text);
CREATE FUNCTION touch(s src) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO written (ctx, note) VALUES (s.c, 'attribute') RETURNING 1 $$;
"""

# Statement shapes; {c} is the context id, as a literal or as $1.
SHAPES = {
    "insert": "INSERT INTO written (ctx, note) VALUES ({c}, 'insert')",
    "words": "INSERT INTO written (ctx, note) VALUES ({c}, 'COMMIT; ROLLBACK TO s; -- prepared concurrently')",
    "comment": "/* COMMIT */ INSERT INTO written (ctx, note) VALUES ({c}, $$comment; END;$$) -- BEGIN",
    "cte": "WITH w AS (INSERT INTO written (ctx, note) VALUES ({c}, 'cte') RETURNING id) SELECT count(*) FROM w",
    "update": "UPDATE written SET ctx = {c}, note = 'update' WHERE id = (SELECT max(id) FROM written)",
    "function": "SELECT write_row({c})",
    "split_call": "SELECT write_row/**/({c})",
    "qualified": "SELECT app.count({c})",
    "operator": "SELECT {c} ===> 'operator'",
    "cast": "SELECT ({c}::text)::tagged",
    "attribute": "SELECT s.touch FROM src s WHERE s.c = {c}",
}
# Writes the text cannot show: outside a transaction they lack their context (README, Limitations).
HIDDEN_OUTSIDE = {"attribute"}
METHODS = ["execute", "execute_args", "fetch", "fetchval", "fetchrow", "prepare", "cursor", "executemany", "copy"]
COMMITS = ["COMMIT", "END", "commit work", "END TRANSACTION", "/* c */ COMMIT;", "fetch", "prepared"]
BEGINS = ["BEGIN", "START TRANSACTION", "BEGIN ISOLATION LEVEL REPEATABLE READ"]


@dataclass
class Frame:
    kind: str  # "raw" / "tr" (the transaction), "sp_raw" / "sp_tr" (a savepoint)
    transaction: Any = None  # the asyncpg Transaction for "tr" / "sp_tr"
    name: str = ""


@dataclass
class Run:
    """What a program did, for the check."""

    hidden: set[tuple[str, str]] = field(default_factory=set)  # (note, ctx) written where the text hides it
    writes: int = 0


@dataclass
class Totals:
    programs: int = 0
    changes: int = 0
    empty_documented: int = 0


def literal(cid: str) -> str:
    return f"'{cid}'"


async def write(conn: BemiConnection, shape: str, method: str, cid: str, run: Run, stack: list[Frame]) -> None:
    outside = not stack
    run.writes += 1
    if outside and shape in HIDDEN_OUTSIDE and method not in ("executemany", "copy"):
        run.hidden.add(("attribute", cid))
    sql = SHAPES[shape]
    param = sql.format(c="$1::text")
    if method == "execute":
        await conn.execute(sql.format(c=literal(cid)))
    elif method == "execute_args":
        await conn.execute(param, cid)
    elif method == "fetch" or (method == "cursor" and outside):
        await conn.fetch(param, cid)
    elif method == "fetchval":
        await conn.fetchval(param, cid)
    elif method == "fetchrow":
        await conn.fetchrow(param, cid)
    elif method == "prepare":
        statement = await conn.prepare(param)
        await statement.fetch(cid)
    elif method == "cursor":
        async for _ in conn.cursor(param, cid):
            pass
    elif method == "executemany":
        await conn.executemany("INSERT INTO written (ctx, note) VALUES ($1, 'many')", [(cid,), (cid,)])
    else:
        await conn.copy_records_to_table("written", records=[(cid, "copy")], columns=["ctx", "note"])


async def commit(conn: BemiConnection, frame: Frame, spelling: str) -> None:
    if frame.kind == "tr":
        await frame.transaction.commit()
    elif spelling == "fetch":
        await conn.fetchval("COMMIT")
    elif spelling == "prepared":
        await (await conn.prepare("COMMIT")).fetch()
    else:
        await conn.execute(spelling)


async def run_program(conn: BemiConnection, reader: asyncpg.Connection, program: list[tuple[Any, ...]]) -> Run:
    run = Run()
    stack: list[Frame] = []
    cid = ""
    token: Token[ContextData | None] = activate(None)
    names = iter(range(1_000_000))
    try:
        for op in program:
            kind = op[0]
            if kind == "ctx":
                deactivate(token)
                cid = IDS[op[1]]
                token = activate(CONTEXTS[cid])
            elif kind == "write":
                await write(conn, op[1], op[2], cid, run, stack)
            elif kind == "begin" and not stack:
                if op[1] == "tr":
                    transaction = conn.transaction()
                    await transaction.start()
                    stack.append(Frame("tr", transaction))
                else:
                    await conn.execute(BEGINS[op[2] % len(BEGINS)])
                    stack.append(Frame("raw"))
            elif kind in ("begin", "savepoint") and stack:
                if op[1] == "tr" and all(f.kind in ("tr", "sp_tr") for f in stack):
                    transaction = conn.transaction()
                    await transaction.start()
                    stack.append(Frame("sp_tr", transaction))
                else:
                    name = f"sp{next(names)}"
                    await conn.execute(f"SAVEPOINT {name}")
                    stack.append(Frame("sp_raw", name=name))
            elif kind == "release" and len(stack) > 1:
                frame = stack.pop()
                if frame.kind == "sp_tr":
                    await frame.transaction.commit()
                else:
                    await conn.execute(f"RELEASE SAVEPOINT {frame.name}" if op[1] else f"release {frame.name}")
            elif kind == "rollback_to" and len(stack) > 1:
                frame = stack.pop()
                if frame.kind == "sp_tr":
                    await frame.transaction.rollback()
                else:
                    await conn.execute(f"ROLLBACK TO SAVEPOINT {frame.name}")
            elif kind == "commit" and len(stack) == 1:
                await commit(conn, stack.pop(), COMMITS[op[1]])
            elif kind == "rollback" and len(stack) == 1:
                frame = stack.pop()
                if frame.kind == "tr":
                    await frame.transaction.rollback()
                else:
                    await conn.execute("ABORT" if op[1] else "ROLLBACK")
            elif kind == "chain" and len(stack) == 1 and stack[0].kind == "raw":
                await conn.execute("COMMIT AND CHAIN")
            elif kind == "prepare" and len(stack) == 1 and stack[0].kind == "raw":
                stack.pop()
                await conn.execute("PREPARE TRANSACTION 'bemi-attribution'")
                await reader.execute("COMMIT PREPARED 'bemi-attribution'")
        while stack:  # close whatever the program left open
            frame = stack.pop()
            if frame.kind == "sp_tr":
                await frame.transaction.commit()
            elif frame.kind == "sp_raw":
                await conn.execute(f"RELEASE {frame.name}")
            else:
                await commit(conn, frame, "COMMIT")
    finally:
        deactivate(token)
    assert not conn.is_in_transaction()
    return run


def check(new: list[dict[str, Any]], run: Run, totals: Totals) -> None:
    """Check the changes a program stored."""
    for change in new:
        if change["table"] != "written":
            continue
        row = change["after"] if change["operation"] != "DELETE" else change["before"]
        expected = CONTEXTS[row["ctx"]] or {}
        totals.changes += 1
        if change["context"] == expected:
            continue
        assert change["context"] == {}, f"another context: {change}"
        assert (row["note"], row["ctx"]) in run.hidden, f"context missing outside the documented cases: {change}"
        totals.empty_documented += 1


_context_ids = st.integers(0, len(IDS) - 1)
_write = st.tuples(st.just("write"), st.sampled_from(list(SHAPES)), st.sampled_from(METHODS))
_ops = st.one_of(
    st.tuples(st.just("ctx"), _context_ids),
    _write,
    _write,
    _write,
    _write,
    st.tuples(st.just("begin"), st.sampled_from(["raw", "tr"]), st.integers(0, 2)),
    st.tuples(st.just("savepoint"), st.sampled_from(["raw", "tr"])),
    st.tuples(st.just("release"), st.integers(0, 1)),
    st.tuples(st.just("rollback_to")),
    st.tuples(st.just("commit"), st.integers(0, len(COMMITS) - 1)),
    st.tuples(st.just("rollback"), st.integers(0, 1)),
    st.tuples(st.just("chain")),
    st.tuples(st.just("prepare")),
)
_ends = st.one_of(
    st.tuples(st.just("commit"), st.integers(0, len(COMMITS) - 1)),
    st.tuples(st.just("commit"), st.integers(0, len(COMMITS) - 1)),
    st.tuples(st.just("rollback"), st.integers(0, 1)),
    st.tuples(st.just("chain")),
    st.tuples(st.just("prepare")),
)
_savepoint_ends = st.sampled_from([("release", 0), ("release", 1), ("rollback_to",)])


@st.composite
def _block(draw: st.DrawFn, depth: int) -> list[tuple[Any, ...]]:
    """Statements inside a transaction: context switches, writes, and savepoints holding blocks of their own."""
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 4))):
        choice = draw(st.integers(0, 3 if depth < 3 else 1))
        if choice == 0:
            ops.append(("ctx", draw(_context_ids)))
        elif choice == 1:
            ops.append(draw(_write))
        else:
            ops.append(("savepoint", draw(st.sampled_from(["raw", "tr"]))))
            ops += draw(_block(depth + 1))
            ops.append(draw(_savepoint_ends))
    return ops


@st.composite
def _structured(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Transactions (with nested savepoints) and autocommit writes, under switching contexts."""
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 5))):
        ops.append(("ctx", draw(_context_ids)))
        if draw(st.booleans()):
            ops.append(("begin", draw(st.sampled_from(["raw", "tr"])), draw(st.integers(0, 2))))
            ops += draw(_block(1))
            ops.append(draw(_ends))
        else:
            ops.append(draw(_write))
    return ops


# Structured programs reach deep savepoint patterns; flat random ones reach odd orders (control out of place).
programs = st.one_of(_structured(), st.lists(_ops, min_size=8, max_size=40))


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as run:
        yield run


def test_generated_programs_store_each_change_with_its_own_context(database: str, runner: asyncio.Runner) -> None:
    """Random programs over every asyncpg write path and statement shape: every stored change carries the context
    its row was written under, `{}` only in the documented case, never another context."""
    prepare_source(database, SCHEMA, ["written"])
    totals = Totals()
    seen = 0

    async def setup() -> tuple[BemiConnection, asyncpg.Connection]:
        return await bemi_asgi.connect(database), await asyncpg.connect(database)

    conn, reader = runner.run(setup())

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(programs)
    def program(ops: list[tuple[Any, ...]]) -> None:
        nonlocal seen
        if conn.is_in_transaction():  # a failed example may leave one open
            runner.run(conn.execute("ROLLBACK"))
        run = runner.run(run_program(conn, reader, ops))
        runner.run(drain(database))
        stored = changes(database)
        new, seen = stored[seen:], len(stored)  # a failing example must not fail the next ones (shrinking)
        check(new, run, totals)
        totals.programs += 1

    try:
        program()
    finally:
        runner.run(conn.close())
        runner.run(reader.close())
    print(f"\nattribution: {totals.programs} programs, {totals.changes} changes checked, "
          f"{totals.empty_documented} stored with {{}} in the documented case")  # fmt: skip
    assert totals.changes > 0


# --- SQLAlchemy ORM and Core sessions -------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Written(Base):
    __tablename__ = "written"
    id: Mapped[int] = mapped_column(primary_key=True)
    ctx: Mapped[str] = mapped_column(String)
    note: Mapped[str] = mapped_column(String)


_sa_ops = st.one_of(
    st.tuples(st.just("ctx"), _context_ids),
    st.tuples(st.just("orm")),
    st.tuples(st.just("orm")),
    st.tuples(st.just("core")),
    st.tuples(st.just("text"), st.sampled_from(["insert", "function", "operator", "update"])),
    st.tuples(st.just("flush")),
    st.tuples(st.just("nested"), st.booleans()),
    st.tuples(st.just("commit")),
    st.tuples(st.just("rollback")),
    st.tuples(st.just("autocommit")),
)


async def run_sqlalchemy(engine: AsyncEngine, program: list[tuple[Any, ...]]) -> None:
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    cid = ""
    token = activate(None)
    try:
        async with sessions() as session:
            nested: list[Any] = []
            for op in program:
                kind = op[0]
                if kind == "ctx":
                    await session.flush()  # pending ORM rows belong to the context they were added under
                    deactivate(token)
                    cid = IDS[op[1]]
                    token = activate(CONTEXTS[cid])
                elif kind == "orm":
                    session.add(Written(ctx=cid, note="orm"))
                elif kind == "core":
                    await session.execute(insert(Written).values(ctx=cid, note="core"))
                elif kind == "text":
                    await session.execute(text(SHAPES[op[1]].format(c=":c")), {"c": cid})
                elif kind == "flush":
                    await session.flush()
                elif kind == "nested":
                    if nested and not op[1]:
                        await nested.pop().rollback()
                    elif nested:
                        await nested.pop().commit()
                    else:
                        await session.flush()
                        nested.append(await session.begin_nested())
                elif kind == "commit":
                    nested.clear()
                    await session.commit()
                elif kind == "rollback":
                    nested.clear()
                    await session.rollback()
                else:
                    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
                    async with autocommit.connect() as connection:
                        await connection.execute(insert(Written).values(ctx=cid, note="autocommit"))
                        await connection.execute(text(SHAPES["function"].format(c=":c")), {"c": cid})
            await session.commit()
    finally:
        deactivate(token)


def test_generated_sqlalchemy_programs(database: str, runner: asyncio.Runner) -> None:
    """Random ORM / Core / text programs through SQLAlchemy's asyncpg dialect, with savepoints, rollbacks and
    AUTOCOMMIT connections: every stored change carries the context its row was written under."""
    prepare_source(database, SCHEMA, ["written"])
    totals = Totals()
    seen = 0
    engine = create_async_engine("postgresql+asyncpg://", async_creator=functools.partial(bemi_asgi.connect, database))

    @settings(max_examples=SQLALCHEMY_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(_sa_ops, min_size=6, max_size=25))
    def program(ops: list[tuple[Any, ...]]) -> None:
        nonlocal seen
        runner.run(run_sqlalchemy(engine, ops))
        runner.run(drain(database))
        stored = changes(database)
        new, seen = stored[seen:], len(stored)
        check(new, Run(), totals)
        totals.programs += 1

    try:
        program()
    finally:
        runner.run(engine.dispose())
    print(f"\nattribution (SQLAlchemy): {totals.programs} programs, {totals.changes} changes checked")
