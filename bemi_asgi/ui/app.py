"""The change browser: a server-rendered ASGI app over the stored change history, which writes only reverts.

    from bemi_asgi.ui import bemi_ui

    app.mount("/bemi", bemi_ui(bemi, authorize=is_staff, scope=tenant_of))

Pages: the timeline (`/`, newest first, filters, keyset pages, live updates over server-sent events at `/stream`),
a row's history and its state at a chosen moment (`/row?schema=..&table=..&key=..&at=..`), and everything one
transaction (`/transaction/<id>`), one request (`/request?id=..`) or one trace (`/trace/<trace id>`, across
tables and databases) changed. `trace_url` links each traced change to the trace viewer.

Permissions, checked on every request before anything is read:
- `authorize(request)`, sync or async, is required. It returns True (allowed), False (403 Forbidden), None (401:
  not signed in), or a Starlette `Response` to send instead (e.g. a redirect to the login page). An exception it
  raises propagates. To let everyone in (local development), pass `authorize=allow_all` explicitly.
- `scope(request)`, optional, sync or async, returns a context filter, e.g. `{"tenant_id": 7}`, that narrows every
  query of that request: timeline, row pages, as-of states, transaction and request pages, the live stream. `{}`
  means everything; None is refused with 403 (a user without a scope sees nothing, rather than everything).
  A row page under a scope is built from the in-scope changes only: a change outside the scope never shows, not
  even as its effect on a row's state.

With a `scope`, pages and links show no global counter (change ids, transaction ids, the commit LSN and ordinal
in a cursor): links, anchors, cursors and stream event ids carry tokens sealed with `secret` instead
(`bemi_asgi.history.refs`), and one that does not read back answers like a reference to nothing in scope.

The overview (`/overview`) charts the changes of a period (`bemi_asgi.history.activity`, `.chart`). Reverts
(`/revert`, `bemi_asgi.ui.revert`) need `authorize_revert` (default: nobody) and are protected against
cross-site requests (`bemi_asgi.ui.csrf`).

GET and HEAD are served, and POST on `/revert`; any other method gets 405.
Jinja2 renders the templates shipped in `bemi_asgi/ui/templates/` with autoescaping on; stored values are shown as
JSON text. Responses carry a nonce-based Content-Security-Policy and `Cache-Control: no-store`.

Note: the timeline shows no total count (a count over millions of changes on every page view is not free), and
the row page shows a row's latest `HISTORY_LIMIT` changes.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from .._exceptions import QueryError, UnknownTableError
from ..history.access import Authorize, Denied, ScopeCallback, allow_all, merge_scope, read_access
from ..history.activity import Activity, activity, bucket_for
from ..history.changes import ChangePage
from ..history.client import Bemi
from ..history.filters import (
    TRACE_ID_KEY,
    At,
    ChangeFilter,
    Cursor,
    FilterArgs,
    decode_cursor,
    encode_cursor,
    read_trace_id,
)
from ..history.models import Change, Operation
from ..history.refs import Refs, refs_for
from ..history.replay import row_states
from ..history.store import CHANGES_SQL
from .chart import chart, table_rows
from .revert import AuthorizeRevert, RevertPages, RevertPool
from .rows import TimelineRows
from .sections import ChangeSections
from .view import (
    CONTEXT_PARAM_PREFIX,
    OPERATIONS,
    TimelineFilters,
    context_value_text,
    format_time,
    json_text,
    moment_input,
    moment_param,
    parse_context_value,
    parse_filters,
    parse_moment,
    query_string,
    schema_change_summary,
    shorten,
)

if TYPE_CHECKING:
    import jinja2

__all__ = ["Authorize", "BemiUI", "ScopeCallback", "allow_all", "bemi_ui"]

HISTORY_LIMIT = 500
#: Changes per page of a transaction or a request (each shows every field: pages of them stay bounded).
GROUP_LIMIT = 100
STREAM_BATCH = 100
#: The changes of one row in one transaction a value link looks through (a row changes a few times per transaction).
MAX_GROUP_SCAN = 1000
KEEPALIVE_SECONDS = 15.0
# Context keys and tables offered in the filter form come from this many latest (in-scope) changes: those of the
# unfiltered first page when it holds them all, otherwise read apart.
SUGGESTION_SAMPLE = 500
#: How long a scope's suggestions are reused: they are hints that a few seconds' new changes hardly move, and reading
#: them costs a timeline page as much as its changes. Kept for at most SUGGESTION_SCOPES scopes at once.
SUGGESTION_SECONDS = 10.0
SUGGESTION_SCOPES = 1000
SUGGESTED_KEYS = 6
_ACCESS = "bemi_asgi.ui.access"
# Input a query refuses: a malformed filter, a value PostgreSQL rejects (NUL, out of range), a time out of range.
_BAD_INPUT = (QueryError, asyncpg.DataError, OverflowError)
_METHODS = ("GET", "HEAD")
_LAST_MOMENT = datetime.max.replace(tzinfo=UTC)
#: The overview's period when the filters name none, and the periods it offers.
OVERVIEW_PERIOD = timedelta(days=1)
OVERVIEW_PERIODS = (
    ("last hour", timedelta(hours=1)),
    ("24 hours", OVERVIEW_PERIOD),
    ("7 days", timedelta(days=7)),
    ("30 days", timedelta(days=30)),
)


@dataclass(frozen=True)
class _Access:
    """What the current request may see: the scope's context filter ({} for everything)."""

    scope: Mapping[str, Any]


def _load_jinja() -> Any:
    try:
        import jinja2
    except ImportError:
        raise ImportError(
            "the change browser renders with Jinja2, which is not installed: pip install 'bemi-asgi[ui]'"
        ) from None
    return jinja2


class BemiUI:
    """The change browser as an ASGI app to mount, e.g. `app.mount("/bemi", bemi_ui(bemi, authorize=fn))`.

    `authorize` and `scope` are described in the module docstring. `page_size` changes per timeline page;
    `request_id_key` is the context key that holds a request's id (its values link to the request page).
    The live stream polls every `poll_interval` seconds and ends after `stream_seconds` (the browser then
    reconnects where it left off, and `authorize` runs again).

    `overview_keys` are the context keys whose top values the overview lists. `authorize_revert` and `revert_pool`
    are described in `bemi_asgi.ui.revert`.

    `secret` (with `scope` or `authorize_revert`, at least 16 bytes) seals the references in links (`refs`) and
    signs revert forms. Give every process
    that serves the browser the same one; without it each instance makes a random key, and its links then work
    only in that process, until it restarts.

    `trace_url` is the address of a trace in your trace viewer, with `{trace_id}` (and optionally `{span_id}`, the
    change's span) in it, e.g. `"http://jaeger:16686/trace/{trace_id}"`: each traced change, and each trace page,
    links there.
    """

    def __init__(
        self,
        bemi: Bemi,
        *,
        authorize: Authorize | None = None,
        scope: ScopeCallback | None = None,
        title: str = "Change history",
        page_size: int = 50,
        request_id_key: str = "request_id",
        poll_interval: float = 1.0,
        stream_seconds: float = 300.0,
        secret: str | bytes | None = None,
        trace_url: str | None = None,
        overview_keys: Sequence[str] = ("user", "endpoint"),
        authorize_revert: AuthorizeRevert | None = None,
        revert_pool: RevertPool | None = None,
    ) -> None:
        if authorize is None:
            raise TypeError(
                "bemi_ui() needs authorize=fn: fn(request) decides who may browse the change history (True "
                "allowed, False 403, None 401). To let everyone in, e.g. for local development, pass "
                "authorize=bemi_asgi.ui.allow_all explicitly."
            )
        if not callable(authorize):
            raise TypeError(f"bemi_ui(authorize=...) must be callable, got {type(authorize).__name__}")
        if scope is not None and not callable(scope):
            raise TypeError(f"bemi_ui(scope=...) must be callable or None, got {type(scope).__name__}")
        if not isinstance(bemi, Bemi):
            raise TypeError(f"bemi_ui() takes a bemi_asgi.Bemi, got {type(bemi).__name__}")
        if secret is not None and scope is None and authorize_revert is None:
            raise ValueError(
                "bemi_ui(secret=...) seals the ids in a scoped browser's links and signs the revert form; "
                "without scope= links carry the stored ids, and without authorize_revert= there is no form to sign"
            )
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be an int from 1 to 1000, got {page_size!r}")
        if poll_interval <= 0 or stream_seconds <= 0:
            raise ValueError("poll_interval and stream_seconds must be positive")
        if trace_url is not None:
            _check_trace_url(trace_url)
        jinja = _load_jinja()
        self.bemi = bemi
        self.authorize = authorize
        self.scope = scope
        self.title = title
        self.page_size = page_size
        self.request_id_key = request_id_key
        self.poll_interval = poll_interval
        self.stream_seconds = stream_seconds
        self.trace_url = trace_url
        self.overview_keys = tuple(overview_keys)
        self.refs: Refs = refs_for(scoped=scope is not None, secret=secret)
        key = secret.encode() if isinstance(secret, str) else secret
        self._revert = RevertPages(
            self, authorize_revert=authorize_revert, revert_pool=revert_pool, key=key or secrets.token_bytes(32)
        )
        self._rows = TimelineRows(self.refs, request_id_key, self._viewer_link)
        #: `_suggestions` by scope: when they were read, the tables, the context keys.
        self._suggested: dict[str, tuple[float, list[str], list[str]]] = {}
        self._env: jinja2.Environment = jinja.Environment(
            loader=jinja.PackageLoader("bemi_asgi.ui", "templates"),
            autoescape=True,
            undefined=jinja.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            # The templates ship with the package: no file to look at again on every page.
            auto_reload=False,
        )
        self._env.globals.update(
            schema_change_summary=schema_change_summary,
            when=format_time,
            json_text=json_text,
            value_text=context_value_text,
            shorten=shorten,
            operations=OPERATIONS,
            context_param_prefix=CONTEXT_PARAM_PREFIX,
            moment_input=moment_input,
            moment_param=moment_param,
            title=title,
            no_filters=TimelineFilters(),
            ref=self.refs,
            can_revert=False,
            timeline_rows=self._rows,
            change_sections=ChangeSections(self.refs, self._rows),
        )
        self._router = Router(
            routes=[
                Route("/", self._guard(self._timeline), methods=["GET"]),
                Route("/stream", self._guard(self._stream), methods=["GET"]),
                Route("/row", self._guard(self._row), methods=["GET"]),
                Route("/transaction/{ref}", self._guard(self._transaction), methods=["GET"]),
                Route("/value", self._guard(self._value), methods=["GET"]),
                Route("/request", self._guard(self._request), methods=["GET"]),
                Route("/trace/{trace_id}", self._guard(self._trace), methods=["GET"]),
                Route("/overview", self._guard(self._overview), methods=["GET"]),
                Route("/revert", self._guard(self._revert.plan_page), methods=["GET"]),
                Route("/revert", self._guard(self._revert.apply), methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":  # served on its own: nothing to start
                await self._router(scope, receive, send)
            return
        if scope["method"] not in _METHODS and not (scope["method"] == "POST" and _route_path(scope) == "/revert"):
            response: Response = Response(
                "The change browser reads: only GET is allowed (and POST on /revert).\n",
                status_code=405,
                headers={"Allow": ", ".join(_METHODS)},
                media_type="text/plain",
            )
            await response(scope, receive, send)
            return
        request = Request(scope, receive)
        denied = await self._check(request)
        if denied is not None:
            await denied(scope, receive, send)
            return
        try:
            await self._router(scope, receive, send)
        except ClientDisconnect:
            return  # the client left mid-response (a live stream, usually): no one to answer

    async def _check(self, request: Request) -> Response | None:
        """Run the permission callbacks; a response to send instead of the page, or None to go on."""
        access = await read_access(request, self.authorize, self.scope, caller="bemi_ui")
        if isinstance(access, Response):
            return access
        if isinstance(access, Denied):
            return self._error(request, access.status, access.message)
        request.scope[_ACCESS] = _Access(access)
        return None

    def _guard(self, page: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Answer 400 with the reason when the request's input is what the query refused."""

        async def endpoint(request: Request) -> Response:
            try:
                return await page(request)
            except _BAD_INPUT as exc:
                return self._error(request, 400, str(exc))

        return endpoint

    # Rendering.

    def _base(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def _render(self, request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        access: _Access | None = request.scope.get(_ACCESS)
        html = self._env.get_template(template).render(
            nonce=nonce, link=_linker(self._base(request)), scope=access.scope if access else {}, **values
        )
        return HTMLResponse(html, status_code=status_code, headers=_security_headers(nonce))

    def _error(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self._render(request, "error.html", status, status=status, message=message)

    def _access(self, request: Request) -> Mapping[str, Any]:
        access: _Access = request.scope[_ACCESS]
        return access.scope

    # Pages.

    async def _timeline(self, request: Request) -> Response:
        scope = self._access(request)
        error: str | None = None
        try:
            filters = parse_filters(request.query_params.multi_items())
        except QueryError as exc:
            filters, error = TimelineFilters(), str(exc)
        page = ChangePage([], None)
        if error is None:
            try:
                cursor = None if filters.cursor is None else self.refs.find_cursor(filters.cursor)
                page = await self._find(filters, scope, limit=self.page_size, cursor=cursor)
            except _BAD_INPUT as exc:
                error = str(exc)
        whole_sample = page.next_cursor is None or len(page) >= SUGGESTION_SAMPLE
        if error is None and not filters.active and filters.cursor is None and whole_sample:
            # The page is the newest in-scope changes, as many as the suggestions read or every one there is.
            tables, keys = self._suggest(scope, page[:SUGGESTION_SAMPLE])
        else:
            tables, keys = await self._suggestions(scope)
        keys = [key for key in keys if key not in scope]
        shown_keys = list(dict.fromkeys([*(k for k in filters.context if k not in scope), *keys[:SUGGESTED_KEYS]]))
        stream_after = None
        if page:
            stream_after = self.refs.cursor(
                encode_cursor(Cursor(page[0].commit_lsn, page[0].ordinal, "asc", page[0].stream))
            )
        return self._render(
            request,
            "timeline.html",
            400 if error else 200,
            filters=filters,
            page=page,
            error=error,
            tables=tables,
            context_keys=shown_keys,
            live=error is None and filters.cursor is None,
            stream_params=[*filters.params(cursor=None), *([("after", stream_after)] if stream_after else [])],
        )

    async def _stream(self, request: Request) -> Response:
        scope = self._access(request)
        try:
            filters = parse_filters(request.query_params.multi_items())
            start = request.headers.get("last-event-id") or request.query_params.get("after") or None
            if start is not None and decode_cursor(self.refs.find_cursor(start)).order != "asc":
                raise QueryError("the stream continues from an ascending cursor: pass the one the timeline gives")
        except QueryError as exc:
            # The reason repeats the input: never sniffed as HTML, never cached.
            return Response(
                f"{exc}\n",
                status_code=400,
                media_type="text/plain",
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
            )
        if request.method == "HEAD":  # the headers only: no stream to keep open
            return Response(media_type="text/event-stream", headers={"Cache-Control": "no-store"})

        async def poll(ref: str | None) -> tuple[str | None, str | None]:
            cursor = None if ref is None else self.refs.find_cursor(ref)
            page = await self._find(filters, scope, limit=STREAM_BATCH, cursor=cursor, order="asc")
            if not page:
                return None, ref
            last = page[-1]
            html = self._rows.rows(_linker(self._base(request)), reversed(page), filters, new=True)
            return html, self.refs.cursor(encode_cursor(Cursor(last.commit_lsn, last.ordinal, "asc", last.stream)))

        first = await poll(start)  # here, so that input the query refuses is a 400, not a broken stream
        return StreamingResponse(
            self._events(request, poll, first),
            media_type="text/event-stream",
            # Proxies must pass events through at once.
            headers={**_security_headers("-"), "X-Accel-Buffering": "no"},
        )

    async def _events(
        self,
        request: Request,
        poll: Callable[[str | None], Awaitable[tuple[str | None, str | None]]],
        first: tuple[str | None, str | None],
    ) -> AsyncIterator[bytes]:
        """Server-sent events: new changes as HTML rows, polled every `poll_interval` seconds, for at most
        `stream_seconds`. Each event's id is the cursor to continue from, which the browser sends back as
        Last-Event-ID when it reconnects.

        Starlette's StreamingResponse ends the stream when the client disconnects: under ASGI spec < 2.4 it listens
        for `http.disconnect` (so an idle stream stops too), under 2.4 a send fails. Each poll also asks
        `request.is_disconnected()`, so a 2.4 server that reports the disconnect stops an idle stream as well.
        """
        yield b"retry: 2000\n\n"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stream_seconds
        last_sent = loop.time()
        html, cursor = first
        while True:
            if html is not None:
                yield f"id: {cursor}\ndata: {json.dumps({'html': html})}\n\n".encode()
                last_sent = loop.time()
            elif loop.time() - last_sent >= KEEPALIVE_SECONDS:
                yield b": keepalive\n\n"
                last_sent = loop.time()
            await asyncio.sleep(self.poll_interval)
            if loop.time() >= deadline or await request.is_disconnected():
                return
            html, cursor = await poll(cursor)

    async def _row(self, request: Request) -> Response:
        scope = self._access(request)
        params = request.query_params
        schema, table, key = params.get("schema", "public"), params.get("table", ""), params.get("key", "")
        if not table or not key:
            return self._error(request, 400, "A row page needs table=... and key=... (and schema=..., default public).")
        at = parse_moment(params.get("at"), "at")
        if at is not None and at == _LAST_MOMENT:
            # The page's moment is inclusive: "committed before the next microsecond", and this one has none.
            raise QueryError(f"at={params['at']!r} is out of range: pick an earlier moment")
        history = await self._row_history(schema, table, key, scope)
        if not history:
            return self._error(request, 404, f"No changes of {schema}.{table} row {key} are visible to you.")
        steps = list(row_states(history))
        effective: Change | None
        state: dict[str, Any] | None
        if at is None:
            effective, state = steps[-1]
        else:
            as_of = state_at(history, at)
            if as_of is None:  # the history shown starts after `at`
                as_of = await self._row_as_of(schema, table, key, at, scope)
            effective, state = as_of
        steps.reverse()  # newest first, like the timeline
        return self._render(
            request,
            "row.html",
            can_revert=await self._revert.permitted(request) is not None,
            schema=schema,
            table=table,
            key=key,
            steps=steps,
            at=at,
            effective=effective,
            state=state,
            truncated=len(history) >= HISTORY_LIMIT,
        )

    async def _transaction(self, request: Request) -> Response:
        ref: str = request.path_params["ref"]
        xid = self.refs.transaction_id(ref)
        context = merge_scope({}, self._access(request))
        cursor = request.query_params.get("cursor") or None
        page = ChangePage([], None)
        if xid is not None:
            page = await self._group(transaction_id=xid, context=context, cursor=cursor)
        if not page:
            # The same answer whatever the reason: no such transaction, none in scope, a changed or foreign token.
            return self._error(request, 404, "No changes of this transaction are visible to you.")
        label = self.refs.label(ref)
        return await self._group_page(
            request, f"/transaction/{ref}", {}, f"Transaction {label}", page, cursor, {"transaction": ref}
        )

    async def _request(self, request: Request) -> Response:
        text = request.query_params.get("id", "")
        if not text:
            return self._error(request, 400, f"A request page needs id=... (the context's {self.request_id_key}).")
        context = merge_scope({self.request_id_key: parse_context_value(text)}, self._access(request))
        cursor = request.query_params.get("cursor") or None
        page = await self._group(context=context, cursor=cursor)
        if not page:
            return self._error(request, 404, f"No changes of request {text} are visible to you.")
        return await self._group_page(
            request, "/request", {"id": text}, f"Request {text}", page, cursor, {"request": text}
        )

    async def _trace(self, request: Request) -> Response:
        trace_id = read_trace_id(request.path_params["trace_id"])
        context = merge_scope({TRACE_ID_KEY: trace_id}, self._access(request))
        cursor = request.query_params.get("cursor") or None
        page = await self._group(context=context, cursor=cursor)
        if not page:
            return self._error(request, 404, f"No changes of trace {trace_id} are visible to you.")
        places = sorted({(change.database, change.schema_, change.table) for change in page})
        return await self._group_page(
            request,
            f"/trace/{trace_id}",
            {},
            f"Trace {trace_id}",
            page,
            cursor,
            None,
            places=places,
            viewer_href=self._viewer_link(trace_id, ""),
        )

    def _viewer_link(self, trace_id: str, span_id: Any) -> str | None:
        """The trace viewer's address of a trace (and span), or None without `trace_url`."""
        if self.trace_url is None:
            return None
        span = span_id if isinstance(span_id, str) and _SPAN_ID.fullmatch(span_id) else ""
        return self.trace_url.format(trace_id=trace_id, span_id=span)

    async def _overview(self, request: Request) -> Response:
        """Changes over time per table and operation, and the top `overview_keys` values, for the timeline's
        filters (the last OVERVIEW_PERIOD when they name no period)."""
        scope = self._access(request)
        filters = parse_filters(request.query_params.multi_items())
        now = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        until = filters.until or now
        since = filters.since or until - OVERVIEW_PERIOD
        if since >= until:
            raise QueryError("since= must be before until=")
        query = filters.query(scope)
        keys = [key for key in self.overview_keys if key not in scope]
        counts = Activity(since, until, bucket_for(since, until))
        if query is not None:
            counts = await activity(self.bemi.store, query, since=since, until=until, keys=keys)
        periods = [
            (
                label,
                _linker(self._base(request))("/overview", replace(filters, since=until - span, until=None).params()),
            )
            for label, span in OVERVIEW_PERIODS
        ]
        return self._render(
            request,
            "overview.html",
            filters=replace(filters, since=since, until=until),
            activity=counts,
            chart=chart(counts),
            bucket_label=_duration(counts.bucket),
            tables=table_rows(counts),
            top=counts.top or {key: [] for key in keys},
            periods=periods,
            from_json=json.loads,
            overview_of=lambda name: replace(filters, table=name).params(),
        )

    async def _group_page(
        self,
        request: Request,
        path: str,
        params: dict[str, str],
        heading: str,
        page: ChangePage,
        cursor: str | None,
        revert: dict[str, str] | None,
        **extra: Any,
    ) -> Response:
        next_href = None
        if page.next_cursor:
            next_href = _linker(self._base(request))(path, {**params, "cursor": self.refs.cursor(page.next_cursor)})
        return self._render(
            request,
            "group.html",
            can_revert=revert is not None and await self._revert.permitted(request) is not None,
            revert_href=None if revert is None else _linker(self._base(request))("/revert", revert),
            heading=heading,
            page=page,
            limit=GROUP_LIMIT,
            next_href=next_href,
            continued=cursor is not None,
            **extra,
        )

    async def _value(self, request: Request) -> Response:
        """One field's full stored value (JSON text), which pages cut: plain text, found only within the scope."""
        params = request.query_params
        change_id = self.refs.change_id(params.get("id", ""))
        xid = self.refs.transaction_id(params.get("transaction", ""))
        side, field_name = params.get("side", ""), params.get("field", "")
        if side not in ("before", "after"):
            return self._error(request, 400, "side= is before or after.")
        scope = self._access(request)
        context = merge_scope({}, scope)
        found: Change | None = None
        if context is not None and change_id is not None and xid is not None:
            page = await self._lookup(
                scope,
                table=params.get("table", ""),
                schema=params.get("schema", "public"),
                primary_key=params.get("key") or None,
                transaction_id=xid,
                context=context or None,
                limit=MAX_GROUP_SCAN,
            )
            found = next((change for change in page if change.id == change_id), None)
        image = None if found is None else (found.before if side == "before" else found.after)
        if image is None or field_name not in image:
            return self._error(request, 404, "No such value is visible to you.")
        return Response(
            json_text(image[field_name]),
            media_type="text/plain",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
        )

    # Queries: every one goes through the scope.

    async def _find(
        self,
        filters: TimelineFilters,
        scope: Mapping[str, Any],
        *,
        limit: int,
        cursor: str | None,
        order: Literal["asc", "desc"] = "desc",
    ) -> ChangePage:
        query = filters.query(scope)
        if query is None:
            return ChangePage([], None)
        return await self._lookup(scope, **query, limit=limit, cursor=cursor, order=order)

    async def _group(
        self, *, context: Mapping[str, Any] | None, transaction_id: int | None = None, cursor: str | None = None
    ) -> ChangePage:
        if context is None:
            return ChangePage([], None)
        return await self.bemi.changes.find(
            transaction_id=transaction_id,
            context=context or None,
            order="asc",
            limit=GROUP_LIMIT,
            cursor=None if cursor is None else self.refs.find_cursor(cursor),
        )

    async def _lookup(self, scope: Mapping[str, Any], **options: Any) -> ChangePage:
        """`find` for a visitor: under a scope, a table that is unknown (no stored changes, not in the database)
        reads as one with nothing in the scope, so a tenant learns nothing of other tenants' tables or the catalog
        from the difference."""
        try:
            return await self.bemi.changes.find(**options)
        except UnknownTableError:
            if scope:
                return ChangePage([], None)
            raise

    async def _row_history(self, schema: str, table: str, key: str, scope: Mapping[str, Any]) -> list[Change]:
        """The row's latest in-scope changes and the in-scope TRUNCATEs that ended it, in commit order."""
        store = self.bemi.store
        changes = await store.row_changes(schema, table, key, context=dict(scope) or None, limit=HISTORY_LIMIT)
        if not changes and not scope:  # under a scope, an unknown table reads as one with nothing in it
            await store.require_known_table(schema, table)
        return changes

    async def _row_as_of(
        self, schema: str, table: str, key: str, at: datetime, scope: Mapping[str, Any]
    ) -> tuple[Change | None, dict[str, Any] | None]:
        """The change in effect at `at` and the row's state then (None: it did not exist), as `Bemi.as_of`
        computes it, from in-scope changes only."""
        changes = await self.bemi.store.row_changes(
            schema, table, key, at=At("time", time=at), context=dict(scope) or None, limit=1
        )
        if not changes:
            return None, None
        return list(row_states(changes))[-1]

    async def _suggestions(self, scope: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """Tables and context keys seen in the latest in-scope changes, for the filter form's suggestions (read again
        after SUGGESTION_SECONDS)."""
        cached = self._suggested.get(json.dumps(scope, sort_keys=True))
        if cached is not None and asyncio.get_running_loop().time() - cached[0] < SUGGESTION_SECONDS:
            return cached[1], cached[2]
        where = ChangeFilter(FilterArgs(context=dict(scope) or None)).where()
        # The tables and the keys apart: a key set per change, taken apart in the select list, costs less than a
        # row per key joined to its change.
        async with self.bemi.store.reading() as conn:
            records = await conn.fetch(
                f"""WITH s AS MATERIALIZED (
                        SELECT "schema", "table", context FROM {CHANGES_SQL} WHERE {where.sql()}
                         ORDER BY commit_lsn DESC, ordinal DESC LIMIT {where.param(SUGGESTION_SAMPLE)})
                    SELECT "schema", "table", NULL AS key FROM s GROUP BY "schema", "table"
                    UNION ALL
                    SELECT NULL, NULL, key FROM (SELECT jsonb_object_keys(context) AS key FROM s) AS k GROUP BY key""",
                *where.params,
            )
        places = {(r["schema"], r["table"]) for r in records if r["table"]}
        return self._remember(scope, places, {r["key"] for r in records if r["key"] is not None})

    def _suggest(self, scope: Mapping[str, Any], sample: Sequence[Change]) -> tuple[list[str], list[str]]:
        """`_suggestions` read from `sample`, the newest in-scope changes already at hand."""
        places = {(change.schema_, change.table) for change in sample}
        return self._remember(scope, places, {key for change in sample for key in change.context})

    def _remember(
        self, scope: Mapping[str, Any], places: set[tuple[str, str]], keys: set[str]
    ) -> tuple[list[str], list[str]]:
        """The suggested tables (schema-qualified outside `public`) and context keys, kept for the scope."""
        tables = sorted(table if schema == "public" else f"{schema}.{table}" for schema, table in places)
        suggested = sorted(keys)
        if len(self._suggested) >= SUGGESTION_SCOPES:
            self._suggested.clear()
        self._suggested[json.dumps(scope, sort_keys=True)] = (asyncio.get_running_loop().time(), tables, suggested)
        return tables, suggested


#: The documented name: `bemi_ui(bemi, authorize=...)` creates the app.
bemi_ui = BemiUI


_SPAN_ID = re.compile(r"[0-9a-f]{16}")


def _check_trace_url(template: str) -> None:
    """Refuse a trace viewer template that names other fields or is not a web address (a `javascript:` link)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"bemi_ui(trace_url=...) is not a template: {exc}") from None
    if "trace_id" not in fields or not fields <= {"trace_id", "span_id"}:
        raise ValueError(
            f"bemi_ui(trace_url=...) names {sorted(fields)}: it takes {{trace_id}} and optionally {{span_id}}, e.g. "
            "'http://jaeger:16686/trace/{trace_id}'"
        )
    if not template.startswith(("http://", "https://", "/")):
        raise ValueError("bemi_ui(trace_url=...) must be an http(s) address or a path starting with /")


def _route_path(scope: Scope) -> str:
    """The request's path within the mounted browser."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


def _duration(span: timedelta) -> str:
    """A bucket width in words: "minute", "5 minutes", "hour", "day", "7 days"."""
    for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if span.total_seconds() % seconds == 0:
            count = int(span.total_seconds() // seconds)
            return unit if count == 1 else f"{count} {unit}s"
    return str(span)


def _linker(base: str) -> Callable[..., str]:
    def link(path: str, params: Sequence[tuple[str, str]] | Mapping[str, str] = ()) -> str:
        query = query_string(params.items() if isinstance(params, Mapping) else params)
        return f"{base}{path}" + (f"?{query}" if query else "")

    return link


def _security_headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; connect-src 'self'; "
            "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        ),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }


def state_at(history: Sequence[Change], at: datetime) -> tuple[Change | None, dict[str, Any] | None] | None:
    """What `_row_as_of` reads, taken from the row's history as the row page read it (its latest HISTORY_LIMIT
    changes, with the TRUNCATEs and schema changes after the oldest of them): the row's last change committed by
    `at` and the table events after it until then, replayed. None when that history starts after `at`."""
    if not any(change.committed_at <= at for change in history if change.operation not in _TABLE_EVENTS):
        whole = sum(change.operation not in _TABLE_EVENTS for change in history) < HISTORY_LIMIT
        return (None, None) if whole else None
    *_, last = row_states(change for change in history if change.committed_at <= at)
    return last


#: The changes of a row's history that are its table's: they do not start a state of their own.
_TABLE_EVENTS = frozenset({Operation.TRUNCATE, Operation.DDL})
