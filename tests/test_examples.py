"""The example apps (`examples/`), run as written against a real server with the worker running in the test."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from bemi_asgi import current_lsn
from bemi_asgi.ops.demo import load_example
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.worker.pipeline import Worker

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def prepare(dsn: str, schema_sql: str | None) -> None:
    """Create the example table (unless the app does), apply the migration and create the slot."""
    conn = await asyncpg.connect(dsn)
    try:
        if schema_sql:
            await conn.execute(schema_sql)
        await conn.execute(migration_sql())
        await conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
    finally:
        await conn.close()


@asynccontextmanager
async def running_app(app: FastAPI, dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    """Serve the app in-process (lifespan included) with the worker running beside it."""
    worker = Worker(dsn, status_interval=0.5)
    task = asyncio.create_task(worker.run())
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def todo_app() -> ModuleType:
    return load_example("todo_app.py")


@pytest.fixture
def todo_api(todo_app: ModuleType, database: str) -> FastAPI:
    app: FastAPI = todo_app.create_app(database)
    return app


@pytest.fixture
async def todos(database: str, todo_app: ModuleType, todo_api: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    await prepare(database, todo_app.SCHEMA_SQL)
    async with running_app(todo_api, database) as client:
        yield client


def by(user: str, request_id: str) -> dict[str, str]:
    return {"X-User": user, "X-Request-ID": request_id}


def contexts(history: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(change["operation"], change["context"]) for change in history]


async def test_todo_app_as_of_changes_and_revert(todos: httpx.AsyncClient) -> None:
    """The todo app answers as-of from the history, lists a user's changes, and reverts a change as the reverter."""
    created = await todos.post("/todos", json={"title": "Buy milk"}, headers=by("ann", "r1"))
    assert created.status_code == 201
    todo_id = created.json()["id"]
    moment = datetime.now(UTC)
    await asyncio.sleep(0.01)
    renamed = await todos.patch(f"/todos/{todo_id}", json={"title": "Buy oat milk"}, headers=by("ben", "r2"))
    assert renamed.json()["title"] == "Buy oat milk"

    then = await todos.get(f"/todos/{todo_id}/as-of", params={"at": moment.isoformat()})
    assert then.json()["title"] == "Buy milk"
    bens = (await todos.get("/changes", params={"user": "ben"})).json()
    assert [(change["operation"], change["after"]["title"]) for change in bens] == [("UPDATE", "Buy oat milk")]

    reverted = await todos.post(f"/todos/{todo_id}/revert", headers=by("ann", "r3"))
    assert reverted.status_code == 200
    assert reverted.json()["todo"]["title"] == "Buy milk"
    history = (await todos.get(f"/todos/{todo_id}/history")).json()
    assert [operation for operation, _ in contexts(history)] == ["CREATE", "UPDATE", "UPDATE"]
    last = history[-1]["context"]
    assert (last["user"], last["endpoint"], last["request_id"]) == ("ann", f"POST /todos/{todo_id}/revert", "r3")
    assert last["bemi_revert"]  # the revert says what it undid
    assert history[-1]["after"]["title"] == "Buy milk"


async def test_todo_app_refuses_anonymous_writes(todos: httpx.AsyncClient) -> None:
    """A write without X-User is refused with 401 and changes nothing."""
    response = await todos.post("/todos", json={"title": "Sneaky"})
    assert response.status_code == 401
    assert "X-User" in response.json()["detail"]
    assert (await todos.get("/todos")).json() == []


async def test_todo_app_change_browser_is_local_only(todos: httpx.AsyncClient, todo_api: FastAPI) -> None:
    """The change browser mounted at /bemi shows the history to a visitor on this machine and refuses others (403)."""
    await todos.post("/todos", json={"title": "Buy milk"}, headers=by("ann", "r1"))
    local = await todos.get("/bemi/")
    assert local.status_code == 200
    assert "Buy milk" in local.text
    transport = httpx.ASGITransport(app=todo_api, client=("203.0.113.5", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as remote:
        assert (await remote.get("/bemi/")).status_code == 403


async def test_todo_app_history_api_is_local_only_and_in_openapi(todos: httpx.AsyncClient, todo_api: FastAPI) -> None:
    """The history's JSON API under /api/history answers a visitor on this machine, refuses others with a JSON
    403, and shows in the app's OpenAPI schema next to the todo endpoints."""
    await todos.post("/todos", json={"title": "Buy milk"}, headers=by("ann", "r1"))
    found = await todos.get("/api/history/changes", params={"table": "todos"})
    assert found.status_code == 200
    [change] = found.json()["changes"]
    assert (change["operation"], change["context"]["user"], change["after"]["title"]) == ("CREATE", "ann", "Buy milk")
    schema = (await todos.get("/openapi.json")).json()
    assert {"/todos", "/api/history/changes", "/api/history/rows/blame"} <= set(schema["paths"])
    transport = httpx.ASGITransport(app=todo_api, client=("203.0.113.5", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as remote:
        refused = await remote.get("/api/history/changes")
    assert refused.status_code == 403
    assert refused.json() == {"detail": "You may not see the change history."}


async def test_todo_app_background_job_context(todos: httpx.AsyncClient, todo_api: FastAPI) -> None:
    """POST /jobs/purge-done deletes done todos after answering; the deletes carry the job and who started it."""
    todo_id = (await todos.post("/todos", json={"title": "Fix the bike"}, headers=by("ann", "r1"))).json()["id"]
    await todos.patch(f"/todos/{todo_id}", json={"done": True}, headers=by("ann", "r2"))
    traceparent = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
    started = await todos.post("/jobs/purge-done", headers={**by("cy", "r3"), **traceparent})
    assert started.status_code == 202  # ASGITransport returns after the background task ran
    assert (await todos.get(f"/todos/{todo_id}")).status_code == 404
    await todo_api.state.bemi.wait_for(await current_lsn(todo_api.state.pool))
    history = (await todos.get(f"/todos/{todo_id}/history")).json()
    operation, context = contexts(history)[-1]
    assert operation == "DELETE"
    assert context.pop("trace_id") == TRACE  # the caller's trace, continued by the request's span
    span_id = context.pop("span_id")  # the example's own span (OpenTelemetry is in the test extra), not the caller's
    assert re.fullmatch("[0-9a-f]{16}", span_id)
    assert span_id != "00f067aa0ba902b7"
    assert context == {"user": "cy", "endpoint": "POST /jobs/purge-done", "request_id": "r3", "job": "purge_done"}
    traced = (await todos.get(f"/traces/{TRACE}/changes")).json()
    assert [change["id"] for change in traced] == [history[-1]["id"]]
    assert (await todos.get("/traces/nonsense/changes")).status_code == 400


async def test_todo_app_job_as_a_script(database: str, todo_app: ModuleType) -> None:
    """`python examples/todo_app.py purge-done` deletes the done todos under the context {"job": "purge_done"}."""
    await prepare(database, todo_app.SCHEMA_SQL)
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("INSERT INTO todos (title, done) VALUES ('old', true), ('open', false)")
    finally:
        await conn.close()
    script = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(EXAMPLES / "todo_app.py"), "purge-done"],
        env={"DATABASE_URL": database, "PYTHONPATH": str(EXAMPLES.parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip() == "deleted 1 done todos"
    worker = Worker(database)
    await worker.run(until_caught_up=True)
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT operation, context::text FROM bemi.changes ORDER BY commit_lsn, ordinal")
    finally:
        await conn.close()
    assert [(row["operation"], row["context"]) for row in rows] == [
        ("CREATE", "{}"),
        ("CREATE", "{}"),
        ("DELETE", '{"job": "purge_done"}'),
    ]


async def test_sqlalchemy_app_history_carries_each_request_context(database: str) -> None:
    """The SQLAlchemy example's ORM commits (create, update, delete) are stored with each request's user."""
    example = load_example("sqlalchemy_app.py")
    await prepare(database, None)
    engine = example.create_engine(database)
    try:
        await example.create_schema(engine)  # after the migration: its event trigger tracks the new table
    finally:
        await engine.dispose()
    async with running_app(example.create_app(database), database) as client:
        created = await client.post("/todos", json={"title": "Buy milk"}, headers=by("ann", "r1"))
        assert created.status_code == 201
        todo_id = created.json()["id"]
        updated = await client.patch(f"/todos/{todo_id}", json={"done": True}, headers=by("ben", "r2"))
        assert updated.json()["done"] is True
        assert (await client.delete(f"/todos/{todo_id}", headers=by("cy", "r3"))).status_code == 204
        history = (await client.get(f"/todos/{todo_id}/history")).json()
    assert contexts(history) == [
        ("CREATE", {"user": "ann", "endpoint": "POST /todos", "request_id": "r1"}),
        ("UPDATE", {"user": "ben", "endpoint": f"PATCH /todos/{todo_id}", "request_id": "r2"}),
        ("DELETE", {"user": "cy", "endpoint": f"DELETE /todos/{todo_id}", "request_id": "r3"}),
    ]
    assert history[1]["diff"]["done"] == {"before": False, "after": True}


def test_examples_are_found_inside_an_installed_package(tmp_path: Path) -> None:
    """Installed from a wheel (examples under bemi_asgi/examples, no repository around), the demo finds its app."""
    shutil.copytree(EXAMPLES.parent / "bemi_asgi", tmp_path / "bemi_asgi", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(EXAMPLES, tmp_path / "bemi_asgi" / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from bemi_asgi.ops.demo import load_example; m = load_example(); print(m.__file__); print(m.create_app)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path, function = out.splitlines()
    assert path == str(tmp_path / "bemi_asgi" / "examples" / "todo_app.py")
    assert function.startswith("<function create_app")
