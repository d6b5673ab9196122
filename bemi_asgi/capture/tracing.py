"""The trace behind a write: `trace_id` and `span_id` added to the context every change is stored with.

Where a write runs, its context gains the ids of, in this order:

1. the active OpenTelemetry span, when `opentelemetry-api` is installed (`pip install 'bemi-asgi[otel]'`) and a
   span is current: a request's server span, whichever ASGI middleware (OpenTelemetry's, FastAPI's own telemetry,
   `BemiMiddleware`) runs first, or a job's span around a `bemi_context` block;
2. the W3C `traceparent` header of the request `BemiMiddleware` handles, when no span is current (no tracer
   configured, or no OpenTelemetry at all): the caller's trace and span.

The span is read when the pool takes the context for a statement, not when the context is set: a span started
after the middleware ran (by a middleware inside it, or in the endpoint) is the one a write runs in. Two parts of
one transaction written in different spans keep their own span ids (the pool's attribution rule). A context that
sets `trace_id` or `span_id` itself keeps its own values. Ids are lowercase hex, 32 and 16 digits, as W3C Trace
Context and trace viewers (Jaeger, Tempo) write them; they come on top of the context size limit.

`configure_tracing(enabled=False)` turns it all off; `configure_tracing(traceparent=False)` ignores the header.

Note: a `traceparent` header is whatever the client sent. At a service that untrusted clients call directly, it
links their writes to a trace id of their choosing (as it parents OpenTelemetry's own spans): turn the header off
there if that matters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Final, NamedTuple

from starlette.types import Scope

from . import context

__all__ = ["SPAN_ID_KEY", "TRACE_ID_KEY", "TraceIds", "active_trace", "configure_tracing", "parse_traceparent"]

#: The context keys a traced write gains.
TRACE_ID_KEY: Final = "trace_id"
SPAN_ID_KEY: Final = "span_id"

_current_otel_context: Callable[[], object] | None
try:
    from opentelemetry.context import get_current as _current_otel_context
    from opentelemetry.trace import get_current_span as _span_in
except ImportError:  # the [otel] extra is optional: without it, only the traceparent header is read
    _current_otel_context = None


class TraceIds(NamedTuple):
    """A trace id (32 lowercase hex digits) and a span id (16) of that trace."""

    trace_id: str
    span_id: str


# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex; later versions may append "-" fields.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?", re.DOTALL)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse_traceparent(value: bytes | str) -> TraceIds | None:
    """The trace and parent span of a W3C `traceparent` header value, or None when it is not a valid one
    (version ff, an all-zero id, upper-case hex, or version 00 with extra fields)."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    found = _TRACEPARENT.fullmatch(raw.strip(b" \t"))
    if found is None:
        return None
    version, trace_id, span_id, rest = found.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    ids = TraceIds(trace_id.decode(), span_id.decode())
    return None if ids.trace_id == _ZERO_TRACE or ids.span_id == _ZERO_SPAN else ids


#: The `traceparent` of the request being handled (set by BemiMiddleware), when it sent a valid one.
_request_trace: ContextVar[TraceIds | None] = ContextVar("bemi_request_trace", default=None)
_read_traceparent = True


#: The OpenTelemetry context looked at last and the valid SpanContext of its span, or None. Contexts are immutable
#: and a request's statements run in the same one (outside any span, the same empty one for ever), so the span's
#: look-up, about 3,900 instructions, runs once per context instead of at every statement. One tuple, replaced whole.
_last_span: tuple[object, object | None] = (object(), None)


def _source() -> object | None:
    """What the active trace comes from: the current span's (valid) SpanContext, the request's TraceIds, or None.
    Both are one object for the span's or the request's whole life, which is what `_with_trace` caches by."""
    global _last_span
    if _current_otel_context is not None:
        otel_context = _current_otel_context()
        seen, span_context = _last_span
        if seen is not otel_context:
            span_context = _span_in(otel_context).get_span_context()  # type: ignore[arg-type]
            if not span_context.is_valid:
                span_context = None
            _last_span = (otel_context, span_context)
        if span_context is not None:
            return span_context
    return _request_trace.get()


def _ids(source: object) -> TraceIds:
    if isinstance(source, TraceIds):
        return source
    return TraceIds(f"{source.trace_id:032x}", f"{source.span_id:016x}")  # type: ignore[attr-defined]


def active_trace() -> TraceIds | None:
    """The trace a write made here belongs to: the current OpenTelemetry span's, else the request's
    `traceparent`, else None."""
    source = _source()
    return None if source is None else _ids(source)


#: Contexts with a trace's keys added, by (id of the context, id of the trace's source). Each entry keeps both
#: objects, so neither id can be reused while it is here; the pool then meets the same object at every statement
#: of a request (no new JSON, and its message SQL cached by that text).
_traced: dict[tuple[int, int], tuple[context.ContextData | None, object, context.ContextData | None]] = {}
_TRACED_MAX = 512


def _with_trace(data: context.ContextData | None) -> context.ContextData | None:
    """`data` with the active trace's keys added (the JSON spliced, since the ids are plain hex)."""
    source = _source()
    if source is None:
        return data
    key = (id(data), id(source))
    entry = _traced.get(key)
    if entry is not None and entry[0] is data and entry[1] is source:
        return entry[2]
    traced = _add_trace(data, _ids(source))
    if len(_traced) >= _TRACED_MAX:
        _traced.clear()
    _traced[key] = (data, source, traced)
    return traced


def _add_trace(data: context.ContextData | None, trace: TraceIds) -> context.ContextData | None:
    pair = f'"{TRACE_ID_KEY}":"{trace.trace_id}","{SPAN_ID_KEY}":"{trace.span_id}"'
    if data is None:
        return context.ContextData({TRACE_ID_KEY: trace.trace_id, SPAN_ID_KEY: trace.span_id}, "{" + pair + "}")
    values = data.values
    if TRACE_ID_KEY in values or SPAN_ID_KEY in values:  # the application's own ids win
        return data
    text = data.json
    return context.ContextData(
        {**values, TRACE_ID_KEY: trace.trace_id, SPAN_ID_KEY: trace.span_id},
        ("{" if text == "{}" else text[:-1] + ",") + pair + "}",
    )


def enter_request(scope: Scope) -> Token[TraceIds | None] | None:
    """Make the request's `traceparent` the fallback trace (BemiMiddleware); None when there is nothing to reset:
    tracing or the header is off, or the request sent no valid header (two headers count as none, as W3C says)."""
    if not _read_traceparent:
        return None
    found = None
    for name, value in scope["headers"]:
        if name == b"traceparent":
            if found is not None:
                return None
            found = value
    ids = None if found is None else parse_traceparent(found)
    return None if ids is None else _request_trace.set(ids)


def leave_request(token: Token[TraceIds | None]) -> None:
    _request_trace.reset(token)


def configure_tracing(*, enabled: bool = True, traceparent: bool = True) -> None:
    """Turn trace capture on or off (it is on by default), and reading the `traceparent` header with it."""
    global _read_traceparent
    _read_traceparent = enabled and traceparent
    context.extend_context(_with_trace if enabled else None)


configure_tracing()
