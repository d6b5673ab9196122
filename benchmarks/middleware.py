"""Requests per second of a FastAPI hello endpoint with and without BemiMiddleware, in process.

    python -m benchmarks.middleware [--requests N] [--rounds R]

The app is driven directly through ASGI (no HTTP client, no sockets), so the figures are the app's and the
middleware's own cost. Time is the process's CPU time, not the wall clock: on a shared machine the wall clock also
counts the moments other processes ran, which fall on variants at random. Variants run in interleaved rounds and
each keeps its best round; the ratios against the bare app are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp, Message, Scope

from bemi_asgi import BemiMiddleware, get_context
from bemi_asgi.capture.context import activate, deactivate
from benchmarks._support import Result


def _hello_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


def _constant(request: Request) -> dict[str, Any]:
    return {"service": "shop"}


def _header_and_path(request: Request) -> dict[str, Any]:
    return {"user_id": request.headers.get("x-user-id"), "endpoint": request.url.path}


class _BaseHTTPEquivalent(BaseHTTPMiddleware):
    """The same job done the way Bemi's SQLAlchemy library does it, as the reference."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        token = activate(_header_and_path(request))
        try:
            return await call_next(request)
        finally:
            deactivate(token)


def _variants() -> dict[str, ASGIApp]:
    plain = _hello_app()
    constant = _hello_app()
    constant.add_middleware(BemiMiddleware, context=_constant)
    header = _hello_app()
    header.add_middleware(BemiMiddleware, context=_header_and_path)
    base = _hello_app()
    base.add_middleware(_BaseHTTPEquivalent)
    return {
        "no middleware": plain,
        "BemiMiddleware, constant callback": constant,
        "BemiMiddleware, header + path callback": header,
        "BaseHTTPMiddleware, header + path": base,
    }


_SCOPE: Scope = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/hello",
    "raw_path": b"/hello",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench"), (b"x-user-id", b"42")],
    "server": ("bench", 80),
    "client": ("127.0.0.1", 5000),
}


async def _run(app: ASGIApp, requests: int) -> float:
    """Serve `requests` requests one after another; return requests per second of CPU time."""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    call: Callable[[Scope, Any, Any], Awaitable[None]] = app
    start = time.process_time()
    for _ in range(requests):
        await call(dict(_SCOPE), receive, send)
    elapsed = time.process_time() - start
    assert statuses == [200] * requests
    assert get_context() is None
    return requests / elapsed


async def measure(requests: int, rounds: int) -> dict[str, float]:
    """Best requests/s of each variant over interleaved rounds; prints the table."""
    variants = _variants()
    for app in variants.values():  # warm up: build middleware stacks, fill caches
        await _run(app, 200)
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, app in variants.items():
            best[name] = max(best[name], await _run(app, requests))
    baseline = best["no middleware"]
    print(f"{'variant':42} {'req/s':>10} {'ratio':>7}")
    for name, rate in best.items():
        print(f"{name:42} {rate:10.0f} {rate / baseline:7.3f}x")
    return best


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks` (`quick`: fewer requests and rounds, the same ratios)."""
    best = asyncio.run(measure(1000 if quick else 5000, 3 if quick else 7))
    baseline = best["no middleware"]
    return [
        Result(
            "middleware",
            name,
            f"{rate:,.0f} req/s",
            None if name == "no middleware" else rate / baseline,
            "no middleware",
        )
        for name, rate in best.items()
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; each variant keeps its best")
    args = parser.parse_args()
    asyncio.run(measure(args.requests, args.rounds))
