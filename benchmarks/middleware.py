"""Requests per second of a FastAPI hello endpoint with and without BemiMiddleware, in process.

    python -m benchmarks.middleware [--requests N] [--rounds R]

The app is driven directly through ASGI (no HTTP client, no sockets), so the figures are the app's and the
middleware's own cost. Time is the process's CPU time, not the wall clock: on a shared machine the wall clock also
counts the moments other processes ran, which fall on variants at random. Variants run in many short interleaved
rounds; a variant's ratio is the median over the rounds of its rate against the bare app's in the same round (the
machine's load drifts less within a round than across them), printed with the lowest and highest round.

Trace capture (on by default) is measured on and off: reading a `traceparent` header the request sends, and
adding the active OpenTelemetry span's ids where the endpoint takes the context, as the pool does for each write
statement (the span is opened once around the whole run, so OpenTelemetry's own cost is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fastapi import FastAPI, Request, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp, Message, Scope

from bemi_asgi import BemiMiddleware, configure_tracing, get_context
from bemi_asgi.capture.context import activate, current, deactivate
from benchmarks._support import Result, in_turn, round_ratios


def _hello_app(takes_context: bool = False) -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        if takes_context:
            current()  # what the pool does for a write statement
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


@dataclass(frozen=True)
class _Variant:
    app: ASGIApp
    tracing: bool = True
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    in_span: bool = False


def _bemi_app(context: Callable[[Request], dict[str, Any]], takes_context: bool = False) -> FastAPI:
    app = _hello_app(takes_context)
    app.add_middleware(BemiMiddleware, context=context)
    return app


def _variants() -> dict[str, _Variant]:
    base = _hello_app()
    base.add_middleware(_BaseHTTPEquivalent)
    header = _bemi_app(_header_and_path)
    traceparent = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    variants = {
        "no middleware": _Variant(_hello_app()),
        "BemiMiddleware, constant callback": _Variant(_bemi_app(_constant)),
        "BemiMiddleware, header + path callback": _Variant(header),
        "BaseHTTPMiddleware, header + path": _Variant(base),
        "header + path, tracing off": _Variant(header, tracing=False),
        "header + path, traceparent sent": _Variant(header, headers=traceparent),
    }
    if _tracer() is not None:  # the OpenTelemetry SDK is installed (the test extra)
        takes = _bemi_app(_header_and_path, takes_context=True)
        variants["header + path, context taken in a span"] = _Variant(takes, in_span=True)
        variants["header + path, context taken in a span, tracing off"] = _Variant(takes, tracing=False, in_span=True)
    return variants


def _tracer() -> Any:
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    return TracerProvider().get_tracer("benchmarks.middleware")


@contextlib.contextmanager
def _conditions(variant: _Variant) -> Iterator[None]:
    configure_tracing(enabled=variant.tracing)
    try:
        if variant.in_span:
            with _tracer().start_as_current_span("bench"):
                yield
        else:
            yield
    finally:
        configure_tracing()


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


async def _run(variant: _Variant, requests: int) -> float:
    """Serve `requests` requests one after another; return requests per second of CPU time."""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    call: Callable[[Scope, Any, Any], Awaitable[None]] = variant.app
    scope = {**_SCOPE, "headers": [*_SCOPE["headers"], *variant.headers]}
    with _conditions(variant):
        start = time.process_time()
        for _ in range(requests):
            await call(dict(scope), receive, send)
        elapsed = time.process_time() - start
    assert statuses == [200] * requests
    assert get_context() is None
    return requests / elapsed


class Measured(NamedTuple):
    """A variant's best requests/s over the rounds, and its ratio to the bare app: the median of the ratios of
    the same round, with the lowest and highest of them."""

    rate: float
    ratio: float
    low: float
    high: float


async def measure(requests: int, rounds: int) -> dict[str, Measured]:
    """Each variant measured over interleaved rounds; prints the table."""
    variants = _variants()
    for variant in variants.values():  # warm up: build middleware stacks, fill caches
        await _run(variant, 200)
    # What is alive now (the modules, the apps) lives for the whole run: moved out of the collector's sight, as a
    # server that preloads its app would, so that a full collection's cost falls on no variant by chance.
    gc.collect()
    gc.freeze()
    names = list(variants)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in in_turn(names, r):
            rates[name].append(await _run(variants[name], requests))
    bare = rates["no middleware"]
    measured = {}
    for name in names:
        ratios = round_ratios(rates[name], bare)
        measured[name] = Measured(max(rates[name]), statistics.median(ratios), ratios[0], ratios[-1])
    print(f"{'variant':52} {'req/s':>10} {'ratio':>7}  {'rounds from':>11}")
    for name, m in measured.items():
        print(f"{name:52} {m.rate:10.0f} {m.ratio:7.3f}x  {m.low:.3f}-{m.high:.3f}")
    return measured


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks` (`quick`: fewer rounds, the same ratios)."""
    measured = asyncio.run(measure(300, 30 if quick else 100))
    return [
        Result(
            "middleware",
            name,
            f"{m.rate:,.0f} req/s",
            None if name == "no middleware" else m.ratio,
            "no middleware",
        )
        for name, m in measured.items()
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds")
    args = parser.parse_args()
    asyncio.run(measure(args.requests, args.rounds))
