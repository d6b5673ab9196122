"""SQLAlchemy 2 async on asyncpg, through `async_creator=bemi_asgi.connect`: its commits carry the context.

The dialect starts transactions with `connection.transaction(...).start()`, commits with `.commit()` (which sends
COMMIT through `Connection.execute`) and runs every statement through `connection.prepare()`: all three are the
bemi connection's, so a real slot sees one `_bemi` message per written transaction.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import Integer, String, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import bemi_asgi
from bemi_asgi import bemi_context
from tests.test_pool import CTX, prepare_source, read_slot, stitch


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String)


@pytest.fixture
async def reader(database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await prepare_source(database)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def engine(database: str, reader: asyncpg.Connection) -> AsyncIterator[AsyncEngine]:
    # The recipe: the URL names the dialect only; the connections come from bemi_asgi.connect.
    engine = create_async_engine("postgresql+asyncpg://", async_creator=functools.partial(bemi_asgi.connect, database))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def test_session_commit_carries_the_context(
    sessions: async_sessionmaker[AsyncSession], reader: asyncpg.Connection
) -> None:
    """An ORM session's commit sends one `_bemi` message with the context, in the written transaction."""
    with bemi_context(CTX):
        async with sessions() as session:
            session.add_all([Item(name="a"), Item(name="b")])
            await session.commit()
    assert await read_slot(reader) == [["I", "I", CTX]]


async def test_engine_begin_and_savepoint(engine: AsyncEngine, reader: asyncpg.Connection) -> None:
    """Core `engine.begin()` with a nested savepoint emits once, at the outer commit."""
    with bemi_context(CTX):
        async with engine.begin() as connection:
            await connection.execute(insert(Item).values(name="a"))
            async with connection.begin_nested():
                await connection.execute(insert(Item).values(name="b"))
    assert await read_slot(reader) == [["I", "I", CTX]]


async def test_rollback_and_reads_send_nothing(
    sessions: async_sessionmaker[AsyncSession], reader: asyncpg.Connection
) -> None:
    """A rolled-back session and a read-only one leave nothing in the WAL stream; no context, no message."""
    with bemi_context(CTX):
        async with sessions() as session:
            session.add(Item(name="a"))
            await session.flush()
            await session.rollback()
        async with sessions() as session:
            assert (await session.execute(select(Item))).scalars().all() == []
            await session.commit()
    async with sessions() as session:
        session.add(Item(name="b"))
        await session.commit()
    assert await read_slot(reader) == [["I"]]


async def test_autocommit_engine(engine: AsyncEngine, reader: asyncpg.Connection) -> None:
    """With isolation_level AUTOCOMMIT (no transaction at all), each written statement still carries the context."""
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with bemi_context(CTX):
        async with autocommit.connect() as connection:
            await connection.execute(insert(Item).values(name="a"))
            await connection.execute(text("UPDATE items SET name = :n"), {"n": "b"})
            assert (await connection.execute(select(Item.name))).scalar_one() == "b"
    assert await read_slot(reader) == [["I", CTX], ["U", CTX]]


async def test_context_changed_within_a_session(
    sessions: async_sessionmaker[AsyncSession], reader: asyncpg.Connection
) -> None:
    """A session that flushes under two contexts stitches each change to its own."""
    async with sessions() as session:
        with bemi_context(step=1):
            session.add(Item(name="a"))
            await session.flush()
        with bemi_context(step=2):
            session.add(Item(name="b"))
            await session.flush()
            await session.commit()
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {"step": 1}), ("I", {"step": 2})]


async def test_rolled_back_savepoint_under_another_context(
    sessions: async_sessionmaker[AsyncSession], reader: asyncpg.Connection
) -> None:
    """`begin_nested()` sends SAVEPOINT / ROLLBACK TO as prepared statements: a write under A, then a savepoint
    written under B and rolled back, then COMMIT: the outer write keeps A."""
    async with sessions() as session:
        with bemi_context(step="A"):
            session.add(Item(name="outer"))
            await session.flush()
        with bemi_context(step="B"):
            nested = await session.begin_nested()
            session.add(Item(name="inner"))
            await session.flush()
            await nested.rollback()
        with bemi_context(step="A"):
            await session.commit()
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {"step": "A"})]


async def test_core_and_orm_with_text_statements_and_switches(engine: AsyncEngine, reader: asyncpg.Connection) -> None:
    """Core text statements and ORM inserts in one transaction, under two contexts, each keep their own."""
    async with engine.begin() as connection:
        with bemi_context(step=1):
            await connection.execute(text("INSERT INTO items (name) VALUES ('a')"))
        with bemi_context(step=2):
            await connection.execute(insert(Item).values(name="b"))
            await connection.execute(text("UPDATE items SET name = 'c' WHERE name = 'a'"))
    (transaction,) = await read_slot(reader)
    assert stitch(transaction) == [("I", {"step": 1}), ("I", {"step": 2}), ("U", {"step": 2})]
