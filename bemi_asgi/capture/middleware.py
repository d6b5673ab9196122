"""`BemiMiddleware`: sets the Bemi context for each HTTP request and websocket session.

A pure ASGI middleware, on purpose: Starlette's `dispatch`-style base middleware runs the endpoint in another task,
so a context variable set there is not what the endpoint sees (and it serves about 5x fewer requests per second:
`python -m benchmarks.middleware`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from . import tracing
from .context import _current, validate
from .request import CallbackRequest

__all__ = ["BemiMiddleware", "ContextCallback"]

ContextCallback = Callable[[Request], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None]


class BemiMiddleware:
    """Call `context(request)` for every HTTP request and websocket session and make its result the Bemi context.

        app.add_middleware(BemiMiddleware, context=lambda request: {"user_id": request.headers.get("x-user-id")})

    `context` may be sync or async and returns a mapping of JSON values, or None for no context. It receives a
    Starlette `Request` built on the connection scope (headers, path, query, client, `scope["state"]`; for a
    websocket session, its handshake GET): it must not read the body, which belongs to the endpoint. A sync
    callback runs in the event loop, so keep it cheap.

    The context is set before the app runs and reset after it finishes, so nothing leaks into the next request.
    Writes also carry the trace they run in (`trace_id`, `span_id`: see `bemi_asgi.capture.tracing`), taken from
    the active OpenTelemetry span, or else from the request's W3C `traceparent` header.
    Other scope types (`lifespan`) pass through untouched.

    `request.url.path` is read from the scope, without building the full URL (`bemi_asgi.capture.request`).

    Note: the callback runs before routing, so `request.path_params` and the matched route are not known yet;
    use `request.url.path` or `request.scope["path"]`.
    """

    def __init__(self, app: ASGIApp, *, context: ContextCallback) -> None:
        if not callable(context):
            raise TypeError(f"BemiMiddleware(context=...) must be callable, got {type(context).__name__}")
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        # A websocket session is described by its handshake, an HTTP GET: callbacks get the same Request type.
        request = CallbackRequest(scope if kind == "http" else {**scope, "type": "http", "method": "GET"})
        try:
            values = self.context(request)
            if values is not None and type(values) is not dict and inspect.isawaitable(values):
                values = await values
            data = None if values is None else validate(values)
        except Exception as exc:
            exc.add_note(f"(raised by the Bemi context callback {_name(self.context)} for {scope.get('path', '')!r})")
            raise
        token = _current.set(data)
        traced = tracing.enter_request(scope)  # the request's traceparent, for writes made in no span
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
            if traced is not None:
                tracing.leave_request(traced)


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__
