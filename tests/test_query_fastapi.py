"""The FastAPI example (`examples/history_endpoint.py`): dependency helper and history endpoint, end to end."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bemi_asgi
from bemi_asgi import get_bemi
from bemi_asgi.worker.pipeline import Worker

from .worker_support import prepare_source

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "history_endpoint.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("history_endpoint", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_history_endpoint_shows_each_change_with_its_request_context(database: str) -> None:
    """PATCH through the bemi pool, then GET /items/{id}/history returns the changes as JSON with who and where."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY, name text)", ["items"])
    worker = Worker(database)
    task = asyncio.create_task(worker.run())
    app = load_example().create_app(database)
    try:
        async with app.router.lifespan_context(app):
            await app.state.pool.execute("INSERT INTO items VALUES (1, 'pen')")
            # Let the worker start up (slow on a busy machine) before the endpoint's own 5 s wait.
            await app.state.bemi.wait_for(await bemi_asgi.current_lsn(app.state.pool), timeout=60)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.patch("/items/1", json={"name": "quill"}, headers={"x-user": "ann"})
                assert response.status_code == 200
                history = (await client.get("/items/1/history")).json()
                missing = await client.get("/items/2/history")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert [change["operation"] for change in history] == ["CREATE", "UPDATE"]
    assert history[1]["context"] == {"user": "ann", "endpoint": "PATCH /items/1"}
    assert history[1]["diff"] == {"name": {"before": "pen", "after": "quill"}}
    assert history[1]["schema"] == "public"
    assert missing.status_code == 404


async def test_get_bemi_explains_a_missing_bemi() -> None:
    """get_bemi() fails with a message saying where to create the Bemi when app.state has none."""

    async def endpoint(request: Request) -> JSONResponse:
        get_bemi(request)
        return JSONResponse({})

    app = Starlette(routes=[Route("/", endpoint)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        with pytest.raises(RuntimeError, match="lifespan"):
            await client.get("/")
