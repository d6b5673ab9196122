"""Trace capture: OpenTelemetry spans and W3C traceparent headers in the stored context, and find(trace_id=...)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import bemi_asgi
from bemi_asgi import Bemi, BemiMiddleware, QueryError, bemi_context, configure_tracing, get_context
from bemi_asgi.capture.context import current
from bemi_asgi.capture.tracing import TraceIds, active_trace, parse_traceparent
from bemi_asgi.ui import allow_all, bemi_ui
from bemi_asgi.worker.pipeline import Worker

from ._change_writer import ChangesEnv as Env
from ._change_writer import Row, changes_env
from .worker_support import prepare_source

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture(autouse=True)
def tracing_restored() -> Iterator[None]:
    yield
    configure_tracing()


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    """An SDK tracer provider of the test's own, exporting to memory. Never the global one: FastAPI's own telemetry
    turns on for every later app once a global provider is set."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _request_context(request: Request) -> dict[str, Any]:
    return {"endpoint": f"{request.method} {request.scope['path']}"}


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _server_span(exporter: InMemorySpanExporter, trace_id: str) -> ReadableSpan:
    found = [
        span
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.SERVER and f"{span.context.trace_id:032x}" == trace_id
    ]
    assert len(found) == 1, found
    return found[0]


def _ids(span: ReadableSpan) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


# --- traceparent -----------------------------------------------------------------------------------------------------


def test_traceparent_gives_the_trace_and_the_callers_span() -> None:
    """A valid header gives its trace id and parent span id; a later version may append fields."""
    assert parse_traceparent(TRACEPARENT) == TraceIds(TRACE, PARENT)
    assert parse_traceparent(f" {TRACEPARENT}\t".encode()) == TraceIds(TRACE, PARENT)
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-00-what-comes-next") == TraceIds(TRACE, PARENT)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero ids are invalid
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{PARENT}-01",  # lowercase hex only
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-1",
        f"01-{TRACE}-{PARENT}-01x",
        f"00-{TRACE}-{PARENT}-01\u2028",  # not even Latin-1
    ],
)
def test_an_invalid_traceparent_is_ignored(header: str) -> None:
    """Anything W3C Trace Context calls invalid gives no trace."""
    assert parse_traceparent(header) is None


# --- spans and the context ------------------------------------------------------------------------------------------


def test_a_job_inside_a_span_carries_its_ids(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """bemi_context inside a span, or a span inside bemi_context: writes carry the span where they run, and the
    ids go away with the span."""
    tracer = spans[0].get_tracer("test")
    with tracer.start_as_current_span("import") as outer:
        with bemi_context(job="import"):
            trace_id, span_id = f"{outer.get_span_context().trace_id:032x}", f"{outer.get_span_context().span_id:016x}"
            assert get_context() == {"job": "import", "trace_id": trace_id, "span_id": span_id}
            with tracer.start_as_current_span("batch") as inner:
                inner_id = f"{inner.get_span_context().span_id:016x}"
                assert get_context() == {"job": "import", "trace_id": trace_id, "span_id": inner_id}
        assert get_context() == {"trace_id": trace_id, "span_id": span_id}  # no context but the trace
    assert get_context() is None
    with bemi_context(job="import"):
        assert get_context() == {"job": "import"}


def test_the_contexts_json_is_what_get_context_shows(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """The JSON the pool emits holds exactly the context get_context() shows, for an empty context too."""
    import json

    tracer = spans[0].get_tracer("test")
    with tracer.start_as_current_span("s"):
        for values in ({}, {"user": "ann", "n": [1, {"x": None}]}):
            with bemi_context(values):
                data = current()
                assert data is not None
                assert json.loads(data.json) == get_context() == {**values, **_trace_of_current()}
                assert current() is data  # each statement of the span meets the same object: no new JSON


def _trace_of_current() -> dict[str, str]:
    trace = active_trace()
    assert trace is not None
    return {"trace_id": trace.trace_id, "span_id": trace.span_id}


def test_the_applications_own_trace_keys_win(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """A context that sets trace_id (say, from a queue message) keeps it inside a span."""
    with spans[0].get_tracer("test").start_as_current_span("s"), bemi_context(trace_id="from-the-message"):
        assert get_context() == {"trace_id": "from-the-message"}


def test_tracing_can_be_turned_off(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """configure_tracing(enabled=False) adds nothing, and the same context object reaches the pool."""
    configure_tracing(enabled=False)
    with spans[0].get_tracer("test").start_as_current_span("s"), bemi_context(job="x"):
        assert get_context() == {"job": "x"}
    with spans[0].get_tracer("test").start_as_current_span("s"):
        assert current() is None


# --- middleware order ------------------------------------------------------------------------------------------------


def _traced_app(order: str, provider: TracerProvider) -> Any:
    """An app whose endpoint answers with the context a write would carry; the OpenTelemetry ASGI middleware (or
    FastAPI's own telemetry) outside or inside BemiMiddleware."""
    native = order == "fastapi-native"
    app = FastAPI(telemetry={"tracer_provider": provider} if native else {"tracing": False})

    @app.get("/write")
    async def write() -> Any:
        return get_context()

    if order == "otel-inside":
        app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
    app.add_middleware(BemiMiddleware, context=_request_context)
    if order == "otel-outside":
        app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
    return app


@pytest.mark.parametrize("order", ["otel-outside", "otel-inside", "fastapi-native"])
async def test_the_request_span_is_found_whatever_the_middleware_order(
    order: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """The endpoint's writes carry the request's trace, continuing the caller's traceparent, and the span they run
    in: the server span, or with FastAPI's own telemetry the endpoint's span inside it."""
    provider, exporter = spans
    async with _client(_traced_app(order, provider)) as client:
        seen = (await client.get("/write", headers={"traceparent": TRACEPARENT})).json()
        fresh = (await client.get("/write")).json()
    server = _server_span(exporter, TRACE)
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == PARENT
    assert seen["endpoint"] == "GET /write"
    assert seen["trace_id"] == TRACE
    exported = {_ids(span)[1]: span for span in exporter.get_finished_spans()}
    span = exported[seen["span_id"]]
    if order == "fastapi-native":
        assert span.kind is SpanKind.INTERNAL
        assert span.parent is not None
        assert span.parent.span_id == server.context.span_id
    else:
        assert span is server
    # Without a traceparent, a new trace: the one the server span started.
    assert _ids(_server_span(exporter, fresh["trace_id"]))[0] == fresh["trace_id"] != TRACE


async def test_traceparent_is_read_when_no_span_is_active() -> None:
    """No tracer anywhere: the request's traceparent gives the trace and the caller's span; it is reset after
    the request, and ignored when turned off."""
    app = _traced_app("none", TracerProvider())
    async with _client(app) as client:
        seen = (await client.get("/write", headers={"traceparent": TRACEPARENT})).json()
        doubled = (await client.get("/write", headers=[("traceparent", TRACEPARENT)] * 2)).json()
        configure_tracing(traceparent=False)
        ignored = (await client.get("/write", headers={"traceparent": TRACEPARENT})).json()
    assert seen == {"endpoint": "GET /write", "trace_id": TRACE, "span_id": PARENT}
    assert doubled == ignored == {"endpoint": "GET /write"}
    assert get_context() is None


def test_without_opentelemetry_installed_the_header_is_still_read() -> None:
    """With `opentelemetry` not importable, bemi_asgi imports, and a traceparent request is traced."""
    script = f"""
import sys
sys.modules["opentelemetry"] = None  # as if not installed: every import of it fails
import asyncio, httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
import bemi_asgi
from bemi_asgi.capture import tracing
assert tracing._current_otel_context is None

async def endpoint(request):
    return JSONResponse(bemi_asgi.get_context())

app = bemi_asgi.BemiMiddleware(Starlette(routes=[Route("/", endpoint)]), context=lambda request: {{"a": 1}})

async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        print((await client.get("/", headers={{"traceparent": "{TRACEPARENT}"}})).text)

asyncio.run(main())
"""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f'{{"a":1,"trace_id":"{TRACE}","span_id":"{PARENT}"}}'


# --- stored and found ------------------------------------------------------------------------------------------------


@pytest.fixture
async def pipeline(database: str) -> AsyncIterator[tuple[asyncpg.Pool, Bemi]]:
    prepare_source(
        database,
        "CREATE TABLE items (id int PRIMARY KEY, name text); CREATE TABLE audit (n int)",
        [
            "items",
            "audit",
        ],
    )
    worker = Worker(database, status_interval=1.0)
    task = asyncio.create_task(worker.run())
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=2)
    try:
        yield pool, Bemi(pool)
    finally:
        await pool.close()
        worker.stop()
        await asyncio.wait_for(task, 30)


def _writing_app(pool: asyncpg.Pool, provider: TracerProvider | None) -> Any:
    app = FastAPI(telemetry={"tracing": False})

    @app.post("/items/{item_id}")
    async def create(item_id: int) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO items VALUES ($1, 'new')", item_id)
            await conn.execute("INSERT INTO audit VALUES ($1)", item_id)

    # OpenTelemetry's middleware inside ours: its span starts after BemiMiddleware set the context.
    if provider is not None:
        app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
    app.add_middleware(BemiMiddleware, context=_request_context)
    return app


async def test_stored_changes_carry_their_trace_and_find_follows_it(
    pipeline: tuple[asyncpg.Pool, Bemi], spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Two requests in two traces, a job in a span of its own, and a traceparent-only request to an app without
    a tracer: each stored change carries its trace and span, and find(trace_id=...) returns exactly its trace's."""
    pool, bemi = pipeline
    provider, exporter = spans
    async with _client(_writing_app(pool, provider)) as client:
        assert (await client.post("/items/1")).status_code == 200
        assert (await client.post("/items/2")).status_code == 200
    async with _client(_writing_app(pool, None)) as client:
        assert (await client.post("/items/3", headers={"traceparent": TRACEPARENT})).status_code == 200
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("nightly") as job_span, bemi_context(job="nightly"):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE items SET name = 'old' WHERE id < 3")
    async with pool.acquire() as conn, conn.transaction():  # one transaction, its parts in two traces
        with tracer.start_as_current_span("part one") as part_one:
            await conn.execute("INSERT INTO audit VALUES (10)")
        with tracer.start_as_current_span("part two") as part_two:
            await conn.execute("INSERT INTO audit VALUES (11)")
    await bemi.wait_for(await bemi_asgi.current_lsn(pool), timeout=60)

    first, second = sorted(
        (span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER),
        key=lambda span: span.start_time or 0,
    )
    job = f"{job_span.get_span_context().trace_id:032x}", f"{job_span.get_span_context().span_id:016x}"
    parts = [
        (f"{s.trace_id:032x}", f"{s.span_id:016x}") for s in (part_one.get_span_context(), part_two.get_span_context())
    ]
    assert len({_ids(first)[0], _ids(second)[0], TRACE, job[0], parts[0][0], parts[1][0]}) == 6
    expected = {
        parts[0]: [("audit", None)],
        parts[1]: [("audit", None)],
        _ids(first): [("items", "1"), ("audit", None)],
        _ids(second): [("items", "2"), ("audit", None)],
        (TRACE, PARENT): [("items", "3"), ("audit", None)],
        job: [("items", "1"), ("items", "2")],
    }
    for (trace_id, span_id), changes in expected.items():
        found = await bemi.changes.find(trace_id=trace_id, order="asc")
        assert [(change.table, change.primary_key) for change in found] == changes
        assert {change.context["span_id"] for change in found} == {span_id}
        assert [change.id for change in await bemi.changes.find(trace_id=int(trace_id, 16), order="asc")] == [
            change.id for change in found
        ]
    assert (await bemi.changes.find(trace_id=_ids(first)[0]))[0].context == {
        "endpoint": "POST /items/1",
        "trace_id": _ids(first)[0],
        "span_id": _ids(first)[1],
    }
    assert await bemi.changes.count(trace_id=TRACE, table="items") == 1
    assert await bemi.changes.count(trace_id="f" * 32) == 0


@pytest.mark.parametrize("bad", ["xyz", "0" * 32, "a" * 31, 0, -1, 1 << 128, True, 1.5])
async def test_find_refuses_what_is_not_a_trace_id(database: str, bad: Any) -> None:
    """A trace_id that is not 32 hex digits or a positive 128-bit int is a QueryError, before any query."""
    bemi = Bemi(database)
    try:
        with pytest.raises(QueryError, match="not a trace id"):
            await bemi.changes.find(trace_id=bad)
    finally:
        await bemi.close()


# --- the change browser ----------------------------------------------------------------------------------------------

OTHER = "0af7651916cd43dd8448eb211c80319c"
VIEWER = "http://jaeger.test/trace/{trace_id}?uiFind={span_id}"


@pytest.fixture
async def traced(database: str) -> AsyncIterator[Env]:
    """Two services' changes in one trace (the second service's database renamed), and another trace."""
    async with changes_env(database) as env:
        w = env.writer
        await w.commit(
            [Row("CREATE", "orders", 1, after={"id": 1}), Row("CREATE", "items", 7, after={"id": 7})],
            context={"tenant_id": 1, "trace_id": TRACE, "span_id": PARENT},
        )
        await w.commit([Row("CREATE", "orders", 2, after={"id": 2})], context={"tenant_id": 1, "trace_id": OTHER})
        billing = await w.commit(
            [Row("CREATE", "invoices", 9, after={"id": 9}, schema="billing")],
            context={"tenant_id": 2, "trace_id": TRACE, "span_id": "b7ad6b7169203331"},
        )
        await w.conn.execute("UPDATE bemi.changes SET database = 'billing' WHERE commit_lsn = $1", billing)
        yield env


def _sections(page: str) -> list[int]:
    return [int(found) for found in re.findall(r'<section class="step[^"]*" id="c([^"]+)"', page)]


async def test_the_trace_page_lists_its_changes_across_tables_and_databases(traced: Env) -> None:
    """/trace/<id> shows every change of the trace in commit order, where each lives, and the viewer link."""
    ui = bemi_ui(traced.bemi, authorize=allow_all, trace_url=VIEWER)
    async with _client(ui) as client:
        page = await client.get(f"/trace/{TRACE}")
        upper = await client.get(f"/trace/{TRACE.upper()}")
        unknown = await client.get(f"/trace/{'e' * 32}")
        malformed = await client.get("/trace/not-a-trace")
    assert page.status_code == upper.status_code == 200
    assert _sections(page.text) == _sections(upper.text) == await _change_ids(traced, trace_id=TRACE)
    assert len(_sections(page.text)) == 3
    db = await traced.conn.fetchval("SELECT current_database()")
    assert (
        f"<code>billing · billing.invoices</code>, <code>{db} · items</code>, <code>{db} · orders</code>" in page.text
    )
    assert f'href="http://jaeger.test/trace/{TRACE}?uiFind="' in page.text  # the page's own link names no span
    assert f'href="http://jaeger.test/trace/{TRACE}?uiFind={PARENT}"' in page.text  # a change's link names its span
    assert (unknown.status_code, malformed.status_code) == (404, 400)
    assert "not a trace id" in malformed.text


async def test_trace_ids_link_to_the_trace_page_within_the_scope(traced: Env) -> None:
    """On the timeline a trace id links to its trace page; under a scope that page holds only in-scope changes,
    and no viewer link is shown without trace_url."""

    async def tenant(request: Request) -> dict[str, Any]:
        return {"tenant_id": int(request.headers["x-tenant"])}

    ui = bemi_ui(traced.bemi, authorize=allow_all, scope=tenant)
    async with _client(ui) as client:
        timeline = await client.get("/", headers={"x-tenant": "1"})
        page = await client.get(f"/trace/{TRACE}", headers={"x-tenant": "2"})
        other = await client.get(f"/trace/{OTHER}", headers={"x-tenant": "2"})
    assert f'href="/trace/{TRACE}"' in timeline.text
    assert f'href="/trace/{OTHER}"' in timeline.text
    assert "trace viewer" not in timeline.text + page.text
    assert page.status_code == 200
    assert "billing.invoices" in page.text
    assert "orders" not in page.text
    assert other.status_code == 404


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("javascript:alert('{trace_id}')", "http"),
        ("http://jaeger/trace/{trace_id}/{user}", "takes {trace_id}"),
        ("http://jaeger/trace/{trace_id.__class__}", "takes {trace_id}"),
        ("http://jaeger/search", "takes {trace_id}"),
        ("http://jaeger/trace/{trace_id", "not a template"),
    ],
)
def test_a_trace_url_that_is_not_a_viewer_address_is_refused(template: str, reason: str) -> None:
    """trace_url must be a web address with {trace_id} and at most {span_id} in it."""
    with pytest.raises(ValueError, match=re.escape(reason)):
        bemi_ui(Bemi("postgresql://unused"), authorize=allow_all, trace_url=template)


async def _change_ids(env: Env, **filters: Any) -> list[int]:
    return [change.id for change in await env.bemi.changes.find(order="asc", **filters)]
