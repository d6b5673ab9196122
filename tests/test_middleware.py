"""BemiMiddleware: raw ASGI behaviour, and FastAPI through httpx's in-process transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, WebSocket
from starlette.types import Message, Receive, Scope, Send

from bemi_asgi import BemiContextError, BemiMiddleware, bemi_context, get_context


def _user_context(request: Request) -> dict[str, Any]:
    return {"user_id": request.headers.get("x-user-id"), "endpoint": f"{request.method} {request.url.path}"}


def _app(context: Any = _user_context) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BemiMiddleware, context=context)

    @app.get("/whoami")
    async def whoami() -> Any:
        await asyncio.sleep(0)
        return get_context()

    @app.get("/sync")
    def sync_endpoint() -> Any:  # FastAPI runs it in a worker thread: the context must follow
        return get_context()

    @app.get("/job")
    async def job() -> Any:
        with bemi_context(job="resize"):
            return get_context()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(get_context())
        await websocket.close()

    return app


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_fastapi_endpoint_sees_the_callback_context() -> None:
    """An async endpoint sees what the callback built from the request's headers and path."""
    async with _client(_app()) as client:
        response = await client.get("/whoami", headers={"x-user-id": "42"})
    assert response.json() == {"user_id": "42", "endpoint": "GET /whoami"}
    assert get_context() is None


async def test_sync_endpoint_in_threadpool_sees_the_context() -> None:
    """A sync endpoint, run by FastAPI in a thread, still sees the request's context."""
    async with _client(_app()) as client:
        response = await client.get("/sync", headers={"x-user-id": "7"})
    assert response.json() == {"user_id": "7", "endpoint": "GET /sync"}


async def test_job_scope_inside_a_request_merges() -> None:
    """bemi_context inside an endpoint adds to the request context."""
    async with _client(_app()) as client:
        response = await client.get("/job", headers={"x-user-id": "1"})
    assert response.json() == {"user_id": "1", "endpoint": "GET /job", "job": "resize"}


async def test_async_callback() -> None:
    """An async callback is awaited and its result becomes the context."""

    async def context(request: Request) -> Mapping[str, Any]:
        await asyncio.sleep(0)
        return {"tenant": request.query_params["tenant"]}

    async with _client(_app(context)) as client:
        response = await client.get("/whoami?tenant=acme")
    assert response.json() == {"tenant": "acme"}


async def test_callback_returning_none_means_no_context() -> None:
    """A callback returning None leaves the endpoint without context."""
    async with _client(_app(lambda request: None)) as client:
        response = await client.get("/whoami")
    assert response.json() is None


async def test_thousand_concurrent_requests_each_see_only_their_own_user() -> None:
    """1000 concurrent requests with distinct users each see their own context, and none is left afterwards."""
    async with _client(_app()) as client:
        responses = await asyncio.gather(*(client.get("/whoami", headers={"x-user-id": str(i)}) for i in range(1000)))
    assert [r.json()["user_id"] for r in responses] == [str(i) for i in range(1000)]
    assert get_context() is None


async def test_websocket_sees_the_context() -> None:
    """A websocket session gets the context its handshake produced, and it is reset when the session ends."""
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {**_http_scope("/ws", [(b"x-user-id", b"9")]), "type": "websocket", "scheme": "ws", "subprotocols": []}
    del scope["method"]
    await _app()(scope, receive, send)
    texts = [json.loads(m["text"]) for m in sent if m["type"] == "websocket.send"]
    assert texts == [{"user_id": "9", "endpoint": "GET /ws"}]
    assert get_context() is None


async def test_callback_error_propagates_with_a_note() -> None:
    """An exception in the callback reaches the caller unchanged in type, noting it came from the Bemi callback."""

    def broken(request: Request) -> Mapping[str, Any]:
        raise LookupError("no session")

    async with _client(_app(broken)) as client:
        with pytest.raises(LookupError, match="no session") as info:
            await client.get("/whoami")
    assert any("Bemi context callback" in note and "broken" in note for note in info.value.__notes__)


async def test_callback_returning_bad_values_is_a_context_error() -> None:
    """A callback returning a non-JSON value fails the request with BemiContextError naming the key."""
    async with _client(_app(lambda request: {"user": object()})) as client:
        with pytest.raises(BemiContextError, match="at 'user'"):
            await client.get("/whoami")


async def test_a_callback_mutating_the_dict_it_returns_is_validated_each_time() -> None:
    """A callback may return one dict object that it changes per request: each request carries that request's
    values, and a change to a value JSON cannot hold is refused, even after the same object was accepted before."""
    shared: dict[str, Any] = {"service": "shop"}

    def mutating(request: Request) -> dict[str, Any]:
        shared["user_id"] = request.headers.get("x-user-id")
        return shared

    async with _client(_app(mutating)) as client:
        first = await client.get("/whoami", headers={"x-user-id": "1"})
        second = await client.get("/whoami", headers={"x-user-id": "2"})
        shared["tags"] = {1, 2}
        with pytest.raises(BemiContextError, match="at 'tags'"):
            await client.get("/whoami", headers={"x-user-id": "3"})
    assert first.json() == {"service": "shop", "user_id": "1"}
    assert second.json() == {"service": "shop", "user_id": "2"}


def test_non_callable_context_is_refused() -> None:
    """Passing something that is not callable fails at construction, not on the first request."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("not reached")

    with pytest.raises(TypeError, match="must be callable"):
        BemiMiddleware(app, context={"user": 1})  # type: ignore[arg-type]


# Raw ASGI: no framework between the test and the middleware.


async def _call(middleware: BemiMiddleware, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return sent


def _http_scope(path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
    }


async def test_raw_http_context_set_during_app_and_reset_after() -> None:
    """The inner app sees the context while it runs; after the call the var is empty again."""
    seen: list[Any] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = BemiMiddleware(inner, context=lambda request: {"path": request.url.path})
    sent = await _call(middleware, _http_scope("/orders/1"))
    assert seen == [{"path": "/orders/1"}]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert get_context() is None


async def test_raw_context_reset_when_the_app_raises() -> None:
    """An exception from the inner app propagates and the context is still reset."""

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("handler failed")

    middleware = BemiMiddleware(inner, context=lambda request: {"user": 1})
    with pytest.raises(RuntimeError, match="handler failed"):
        await _call(middleware, _http_scope())
    assert get_context() is None


async def test_lifespan_passes_through_without_calling_the_callback() -> None:
    """A lifespan scope reaches the app untouched and the callback is never called."""
    calls: list[Any] = []
    scopes: list[Scope] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        assert get_context() is None

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    await _call(BemiMiddleware(inner, context=calls.append), scope)
    assert scopes == [scope]
    assert scopes[0] is scope
    assert calls == []


async def test_context_does_not_outlive_the_request_when_stored_on_scope_state() -> None:
    """Two sequential requests through one middleware never see each other's context."""
    seen: list[Any] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context())

    headers_for = {b"1": [(b"x-user-id", b"1")], b"2": []}
    middleware = BemiMiddleware(
        inner, context=lambda request: {"u": request.headers["x-user-id"]} if "x-user-id" in request.headers else None
    )
    await _call(middleware, _http_scope(headers=headers_for[b"1"]))
    await _call(middleware, _http_scope(headers=headers_for[b"2"]))
    assert seen == [{"u": "1"}, None]
