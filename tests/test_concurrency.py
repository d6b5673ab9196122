"""Many concurrent requests from distinct users through a real server: a FastAPI app with BemiMiddleware and the
bemi pool, served by uvicorn on the loopback interface, hit over real sockets while the worker captures.

The check: every stored change carries its own request's context (the user and request id in the row, written by
the endpoint from the request's headers, equal the ones in the context the middleware took from the same headers).
A context leaking between requests, tasks or pooled connections would show as a mismatch.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

import bemi_asgi
from bemi_asgi import BemiMiddleware
from bemi_asgi.ops.postgres import free_port
from bemi_asgi.worker.pipeline import Worker

from .worker_support import changes, drain, prepare_source

ROOT = Path(__file__).parent.parent
LONG = os.environ.get("BEMI_LONG_TESTS", "") not in ("", "0")
REQUESTS = 20_000 if LONG else 1500
CONCURRENCY = 100
USERS = 500
KINDS = ("transaction", "autocommit", "task", "nested")
SERVER_KEEP_ALIVE = 20  # seconds uvicorn keeps an idle connection open

pytestmark = pytest.mark.timeout(900 if LONG else 180)

SCHEMA = """
CREATE TABLE items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id text NOT NULL,
    request_id text NOT NULL,
    kind text NOT NULL,
    touched int NOT NULL DEFAULT 0
)
"""


def make_app(dsn: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await bemi_asgi.create_pool(dsn, min_size=4, max_size=20)
        yield
        await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    def context(request: Request) -> dict[str, str]:
        return {"user_id": request.headers["x-user"], "request_id": request.headers["x-request-id"]}

    app.add_middleware(BemiMiddleware, context=context)
    insert = "INSERT INTO items (user_id, request_id, kind) VALUES ($1, $2, $3)"

    @app.post("/items/{kind}")
    async def write(kind: str, request: Request) -> dict[str, bool]:
        user, request_id = request.headers["x-user"], request.headers["x-request-id"]
        pool = request.app.state.pool
        if kind == "transaction":
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(insert, user, request_id, kind)
                await asyncio.sleep(random.random() / 100)  # other requests run while this one holds its transaction
                await conn.execute("UPDATE items SET touched = touched + 1 WHERE request_id = $1", request_id)
        elif kind == "autocommit":
            await pool.execute(insert, user, request_id, kind)
        elif kind == "task":
            # A task created by the endpoint inherits the request's context.
            await asyncio.create_task(pool.execute(insert, user, request_id, kind))
        else:
            # A nested scope adds keys; the request's keys stay.
            with bemi_asgi.bemi_context(step="nested"):
                await pool.execute(insert, user, request_id, kind)
        return {"ok": True}

    return app


def app_from_environment() -> FastAPI:
    """The app for `uvicorn --factory`, on the database named by BEMI_TEST_APP_DSN."""
    return make_app(os.environ["BEMI_TEST_APP_DSN"])


@pytest.fixture
def server(database: str) -> Iterator[str]:
    """uvicorn serving the app on 127.0.0.1 (never another interface) in its own process, so that server and
    client each have a core; the base URL."""
    prepare_source(database, SCHEMA, ["items"])
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"{__name__}:app_from_environment", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--backlog", str(CONCURRENCY * 2),
         "--timeout-keep-alive", str(SERVER_KEEP_ALIVE)],
        cwd=ROOT,
        env={**os.environ, "BEMI_TEST_APP_DSN": database},
    )  # fmt: skip
    try:
        while True:
            assert process.poll() is None, "uvicorn did not start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_concurrent_requests_each_store_their_own_context(server: str, database: str) -> None:
    """Thousands of requests from distinct users, 100 at a time over real sockets, writing through the bemi pool
    in transactions, autocommit statements, child tasks and nested scopes: every stored change carries the user
    and request id of the request that made it, and every write is stored exactly once."""
    worker = Worker(database)
    capture = asyncio.create_task(worker.run())
    limit = asyncio.Semaphore(CONCURRENCY)
    rng = random.Random(7)
    plan = [(f"user-{rng.randrange(USERS)}", f"req-{i}", rng.choice(KINDS)) for i in range(REQUESTS)]
    # The client drops an idle connection well before the server would: otherwise, on a loaded machine, uvicorn
    # closes one that sat idle past its keep-alive timeout just as the client sends the next request on it, and
    # that request fails with "Server disconnected without sending a response".
    limits = httpx.Limits(
        max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=SERVER_KEEP_ALIVE / 4
    )
    try:
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=60) as client:

            async def request(user: str, request_id: str, kind: str) -> int:
                async with limit:
                    response = await client.post(f"/items/{kind}", headers={"x-user": user, "x-request-id": request_id})
                    return response.status_code

            statuses = await asyncio.gather(*(request(*item) for item in plan))
        assert Counter(statuses) == {200: REQUESTS}
    finally:
        worker.stop()
        await capture
    await drain(database)
    stored = changes(database)
    kinds = {request_id: kind for _, request_id, kind in plan}
    expected_count = sum(2 if kind == "transaction" else 1 for kind in kinds.values())
    assert len(stored) == expected_count
    for change in stored:
        row = change["after"]
        context = {"user_id": row["user_id"], "request_id": row["request_id"]}
        if row["kind"] == "nested":
            context["step"] = "nested"
        assert change["context"] == context, change
    creates = Counter(c["after"]["request_id"] for c in stored if c["operation"] == "CREATE")
    assert creates == dict.fromkeys(kinds, 1)
    users = {user for user, _, _ in plan}
    assert {c["context"]["user_id"] for c in stored} == users
