"""A FastAPI app whose items carry their change history: `GET /items/{item_id}/history`.

    DATABASE_URL=postgresql://... uvicorn examples.history_endpoint:app

The database needs the `items` table tracked (publication, REPLICA IDENTITY FULL, see `bemi-asgi sql-migration`)
and `bemi-asgi worker` running. Writes go through the bemi pool, so each change is stored with the request's
context (the `x-user` header and the endpoint); `PATCH` waits until the worker stored its write, so a history read
right after it includes it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from starlette.requests import Request

import bemi_asgi
from bemi_asgi import Bemi, BemiMiddleware, Change, get_bemi

BemiDep = Annotated[Bemi, Depends(get_bemi)]


class ItemUpdate(BaseModel):
    name: str


def request_context(request: Request) -> dict[str, Any]:
    return {"user": request.headers.get("x-user"), "endpoint": f"{request.method} {request.url.path}"}


def create_app(dsn: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await bemi_asgi.create_pool(dsn)
        app.state.pool = pool
        app.state.bemi = Bemi(pool)  # reads through the same pool: reads carry no tracking cost
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(BemiMiddleware, context=request_context)

    @app.patch("/items/{item_id}")
    async def update_item(item_id: int, update: ItemUpdate, request: Request, bemi: BemiDep) -> dict[str, Any]:
        async with request.app.state.pool.acquire() as conn:
            status = await conn.execute("UPDATE items SET name = $1 WHERE id = $2", update.name, item_id)
            lsn = await bemi_asgi.current_lsn(conn)
        if status == "UPDATE 0":
            raise HTTPException(404, f"no item {item_id}")
        await bemi.wait_for(lsn, timeout=5)  # read-your-writes for the client's next request
        return {"id": item_id, "name": update.name}

    @app.get("/items/{item_id}/history")
    async def item_history(item_id: int, bemi: BemiDep) -> list[Change]:
        changes = await bemi.history("items", item_id)
        if not changes:
            raise HTTPException(404, f"item {item_id} has no history")
        return changes

    return app


app = create_app(os.environ.get("DATABASE_URL", "postgresql://localhost/app"))
