"""The todo API on SQLAlchemy 2 async: ORM commits carry the request's context into the change history.

    DATABASE_URL=postgresql://... uvicorn examples.sqlalchemy_app:app

The recipe: SQLAlchemy's asyncpg dialect, with its connections made by `bemi_asgi.connect`, so every commit of a
session that wrote emits the Bemi context:

    engine = create_async_engine("postgresql+asyncpg://", async_creator=functools.partial(bemi_asgi.connect, dsn))

The URL names the dialect only (the DSN goes to `bemi_asgi.connect`; use a plain postgresql:// DSN there). Nothing
else changes: sessions, `session.commit()`, `engine.begin()` all work as usual. The history is read with `Bemi(dsn)`,
which opens its own small asyncpg pool.

The database needs the table tracked and the worker running, as for `examples/todo_app.py` (`create_schema` below
creates the table from the model; `bemi-asgi sql-migration` tracks it, before or after).
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import BigInteger, DateTime, Identity, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import bemi_asgi
from bemi_asgi import Bemi, BemiMiddleware, Change, get_bemi


class Base(DeclarativeBase):
    pass


class TodoRow(Base):
    __tablename__ = "todos"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    title: Mapped[str]
    done: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Todo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    done: bool
    updated_at: datetime


class TodoCreate(BaseModel):
    title: str = Field(min_length=1, max_length=200)


class TodoUpdate(BaseModel):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    done: bool | None = None


def create_engine(dsn: str) -> AsyncEngine:
    """An async engine whose connections carry the Bemi context (the recipe above)."""
    return create_async_engine("postgresql+asyncpg://", async_creator=functools.partial(bemi_asgi.connect, dsn))


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


def request_context(request: Request) -> dict[str, Any]:
    return {
        "user": request.headers.get("x-user"),
        "endpoint": f"{request.method} {request.url.path}",
        "request_id": request.headers.get("x-request-id") or uuid.uuid4().hex,
    }


def current_user(x_user: Annotated[str | None, Header()] = None) -> str:
    if not x_user:
        raise HTTPException(401, "say who you are: send the header X-User: <name>")
    return x_user


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


User = Annotated[str, Depends(current_user)]
Session = Annotated[AsyncSession, Depends(get_session)]
BemiDep = Annotated[Bemi, Depends(get_bemi)]


async def stored(bemi: Bemi) -> None:
    """Wait (briefly) until the worker stored what was just committed, so a history read right after includes it."""
    lsn = await bemi_asgi.current_lsn(await bemi.pool())
    with contextlib.suppress(TimeoutError):  # committed anyway; the history catches up when the worker does
        await bemi.wait_for(lsn, timeout=3)


def create_app(dsn: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(dsn)
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            async with Bemi(dsn) as bemi:
                app.state.bemi = bemi
                yield
        finally:
            await engine.dispose()

    app = FastAPI(title="Todos on SQLAlchemy, with history", lifespan=lifespan)
    app.add_middleware(BemiMiddleware, context=request_context)

    @app.post("/todos", status_code=201)
    async def create_todo(todo: TodoCreate, user: User, session: Session, bemi: BemiDep) -> Todo:
        row = TodoRow(title=todo.title)
        session.add(row)
        await session.commit()  # the commit emits the request's context
        await session.refresh(row)
        await stored(bemi)
        return Todo.model_validate(row)

    @app.get("/todos")
    async def list_todos(session: Session) -> list[Todo]:
        rows = await session.scalars(select(TodoRow).order_by(TodoRow.id))
        return [Todo.model_validate(row) for row in rows]

    @app.patch("/todos/{todo_id}")
    async def update_todo(todo_id: int, update: TodoUpdate, user: User, session: Session, bemi: BemiDep) -> Todo:
        row = await session.get(TodoRow, todo_id)
        if row is None:
            raise HTTPException(404, f"no todo {todo_id}")
        for name, value in update.model_dump(exclude_none=True).items():
            setattr(row, name, value)
        await session.commit()
        await session.refresh(row)
        await stored(bemi)
        return Todo.model_validate(row)

    @app.delete("/todos/{todo_id}", status_code=204)
    async def delete_todo(todo_id: int, user: User, session: Session, bemi: BemiDep) -> None:
        row = await session.get(TodoRow, todo_id)
        if row is None:
            raise HTTPException(404, f"no todo {todo_id}")
        await session.delete(row)
        await session.commit()
        await stored(bemi)

    @app.get("/todos/{todo_id}/history")
    async def todo_history(todo_id: int, bemi: BemiDep) -> list[Change]:
        changes = await bemi.history("todos", todo_id)
        if not changes:
            raise HTTPException(404, f"todo {todo_id} has no history")
        return changes

    return app


app = create_app(os.environ.get("DATABASE_URL", "postgresql://localhost/todos"))
