"""The stored history as a JSON API: a FastAPI router to mount in the app.

    from bemi_asgi.api import history_router

    app.include_router(history_router(bemi, authorize=is_staff, scope=tenant_of), prefix="/api/history")

Endpoints (all GET, JSON, in the app's OpenAPI schema with their response models):
- `/changes`: find changes by table, schema, key, operation, context (a JSON object, matched by containment),
  since/until; newest first unless `order=asc`, `limit` per page, keyset pages through `cursor`.
- `/changes/count`: how many changes the same filters match.
- `/rows/history`, `/rows/as-of`, `/rows/blame` (`table=...&key=...`): a row's changes, its state at a moment,
  and which change last set each column.
- `/transactions/{ref}` and `/requests/{request_id}`: everything one transaction, or one request (the context key
  `request_id_key`), changed, in commit order, in pages.

`authorize` and `scope` are the change browser's (`bemi_asgi.history.access`), checked before anything is read:
every query runs within the scope, and under a scope changes, transactions and cursors are named by tokens sealed
with `secret` (`bemi_asgi.history.refs`), never by the stored numbers. A refused request, input a query refuses
and a page with nothing visible are JSON errors: `{"detail": "..."}` with 401, 403, 400 or 404.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, some of them local names.
import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Query
from starlette.requests import Request
from starlette.responses import Response

from .._exceptions import QueryError, UnknownTableError
from ..history.access import Authorize, Denied, ScopeCallback, merge_scope, read_access
from ..history.changes import ChangePage
from ..history.client import Bemi
from ..history.filters import FilterArgs, parse_at, split_table
from ..history.models import Change, Operation
from ..history.refs import refs_for
from ..history.replay import blame_columns, row_states
from .models import BlameView, ChangePageView, ChangeView, CountView, ErrorView, RowStateView

__all__ = ["history_router"]

#: Changes a row's history answers with (its latest), as the change browser's row page.
HISTORY_LIMIT = 500
MAX_PAGE = 1000
# Input a query refuses: a malformed filter, a value PostgreSQL rejects (NUL, out of range), a time out of range.
_BAD_INPUT = (QueryError, asyncpg.DataError, OverflowError)
# Headers of an `authorize` Response worth passing on (a redirect's target, a challenge), not its body's.
_PASSED_HEADERS = ("location", "www-authenticate", "retry-after")
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorView} for status in (400, 401, 403, 404)}

Table = Annotated[str, Query(description='"name" (schema public) or "schema.name"')]
Key = Annotated[str, Query(description="The row's primary key text (a JSON array of texts for a composite key)")]


def history_router(
    bemi: Bemi,
    *,
    authorize: Authorize | None = None,
    scope: ScopeCallback | None = None,
    secret: str | bytes | None = None,
    request_id_key: str = "request_id",
) -> APIRouter:
    """The JSON API over `bemi`'s history, as a router for `app.include_router(...)` (see the module docstring).

    `authorize` is required (`bemi_asgi.history.access.allow_all` lets everyone in); `secret` (with `scope` only,
    at least 16 bytes, the same in every process) seals the references; without it each process makes a random
    key, and its references work only in that process.
    """
    if authorize is None or not callable(authorize):
        raise TypeError(
            "history_router() needs authorize=fn: fn(request) decides who may read the change history (True "
            "allowed, False 403, None 401). To let everyone in, e.g. for local development, pass "
            "authorize=bemi_asgi.api.allow_all explicitly."
        )
    if scope is not None and not callable(scope):
        raise TypeError(f"history_router(scope=...) must be callable or None, got {type(scope).__name__}")
    if not isinstance(bemi, Bemi):
        raise TypeError(f"history_router() takes a bemi_asgi.Bemi, got {type(bemi).__name__}")
    if secret is not None and scope is None:
        raise ValueError("history_router(secret=...) seals references under a scope: pass scope= too")
    refs = refs_for(scoped=scope is not None, secret=secret)
    checked_authorize = authorize

    async def access(request: Request) -> Mapping[str, Any]:
        verdict = await read_access(request, checked_authorize, scope, caller="history_router")
        if isinstance(verdict, Response):
            passed = {name: value for name, value in verdict.headers.items() if name in _PASSED_HEADERS}
            raise HTTPException(verdict.status_code, "Refused by authorize.", headers=passed)
        if isinstance(verdict, Denied):
            raise HTTPException(verdict.status, verdict.message)
        return verdict

    Scope = Annotated[Mapping[str, Any], Depends(access)]
    router = APIRouter(tags=["change history"], responses=_ERRORS)

    def page_view(page: ChangePage) -> ChangePageView:
        next_cursor = None if page.next_cursor is None else refs.cursor(page.next_cursor)
        return ChangePageView(changes=[ChangeView.of(c, refs) for c in page], next_cursor=next_cursor)

    async def find(scope: Mapping[str, Any], **options: Any) -> ChangePage:
        """`find` within the scope; under a scope an unknown table reads as one with nothing in it (as in the
        change browser), so a tenant learns nothing of the catalog."""
        context = merge_scope(options.pop("context", None) or {}, scope)
        if context is None:
            return ChangePage([], None)
        try:
            return await bemi.changes.find(context=context or None, **options)
        except UnknownTableError:
            if scope:
                return ChangePage([], None)
            raise

    async def row_changes(
        scope: Mapping[str, Any], table: str, key: str, *, at: datetime | None = None, limit: int | None = None
    ) -> list[Change]:
        schema_name, table_name = split_table(table, None)
        point = None if at is None else parse_at(at, datetime.now(UTC))
        changes = await bemi.store.row_changes(
            schema_name, table_name, key, at=point, context=dict(scope) or None, limit=limit
        )
        if not changes and not scope:
            await bemi.store.require_known_table(schema_name, table_name)
        return changes

    @router.get("/changes", response_model=ChangePageView, summary="Find changes")
    @_json_errors
    async def find_changes(
        scope: Scope,
        filters: Filters,
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        cursor: Annotated[str | None, Query(description="The previous page's next_cursor")] = None,
    ) -> ChangePageView:
        position = None if cursor is None else refs.find_cursor(cursor)
        return page_view(await find(scope, **filters, order=order, limit=limit, cursor=position))

    @router.get("/changes/count", response_model=CountView, summary="Count changes")
    @_json_errors
    async def count_changes(scope: Scope, filters: Filters) -> CountView:
        merged = merge_scope(filters.get("context") or {}, scope)
        if merged is None:
            return CountView(count=0)
        narrowed = FilterArgs(**filters)
        narrowed["context"] = merged or None
        try:
            return CountView(count=await bemi.changes.count(**narrowed))
        except UnknownTableError:
            if scope:
                return CountView(count=0)
            raise

    @router.get("/rows/history", response_model=list[ChangeView], summary="A row's history")
    @_json_errors
    async def row_history(scope: Scope, table: Table, key: Key) -> list[ChangeView]:
        changes = await row_changes(scope, table, key, limit=HISTORY_LIMIT)
        if not changes:
            raise HTTPException(404, f"No changes of {table} row {key} are visible to you.")
        return [ChangeView.of(change, refs) for change in changes]

    @router.get("/rows/as-of", response_model=RowStateView, summary="A row as it was at a moment")
    @_json_errors
    async def row_as_of(
        scope: Scope, table: Table, key: Key, at: Annotated[datetime, Query(description="With a time zone")]
    ) -> RowStateView:
        changes = await row_changes(scope, table, key, at=at, limit=1)
        if not changes:
            return RowStateView(state=None, change=None)
        change, state = list(row_states(changes))[-1]
        return RowStateView(state=state, change=ChangeView.of(change, refs))

    @router.get("/rows/blame", response_model=BlameView, summary="Which change set each column of a row")
    @_json_errors
    async def row_blame(
        scope: Scope,
        table: Table,
        key: Key,
        at: Annotated[datetime | None, Query(description="With a time zone (default: now)")] = None,
    ) -> BlameView:
        setters = blame_columns(await row_changes(scope, table, key, at=at))
        return BlameView(columns={name: ChangeView.of(change, refs) for name, change in setters.items()})

    @router.get("/transactions/{ref}", response_model=ChangePageView, summary="A transaction's changes")
    @_json_errors
    async def transaction_changes(
        scope: Scope,
        ref: str,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: str | None = None,
    ) -> ChangePageView:
        xid = refs.transaction_id(ref)
        page = ChangePage([], None)
        if xid is not None:
            position = None if cursor is None else refs.find_cursor(cursor)
            page = await find(scope, transaction_id=xid, order="asc", limit=limit, cursor=position)
        if not page:
            # The same answer whatever the reason: no such transaction, none in scope, a changed or foreign token.
            raise HTTPException(404, "No changes of this transaction are visible to you.")
        return page_view(page)

    @router.get("/requests/{request_id}", response_model=ChangePageView, summary="A request's changes")
    @_json_errors
    async def request_changes(
        scope: Scope,
        request_id: str,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: str | None = None,
    ) -> ChangePageView:
        position = None if cursor is None else refs.find_cursor(cursor)
        page = await find(scope, context={request_id_key: request_id}, order="asc", limit=limit, cursor=position)
        if not page:
            raise HTTPException(404, f"No changes of request {request_id} are visible to you.")
        return page_view(page)

    return router


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _json_errors(endpoint: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Answer 400 with the reason when the request's input is what the query refused."""

    @functools.wraps(endpoint)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await endpoint(*args, **kwargs)
        except _BAD_INPUT as exc:
            raise HTTPException(400, str(exc)) from None

    return guarded


def change_filters(
    table: Annotated[str | None, Query(description='"name" or "schema.name"')] = None,
    schema: Annotated[str | None, Query(description="Every table of this schema")] = None,
    key: Annotated[str | None, Query(description="The row's primary key text (needs table)")] = None,
    operation: Annotated[list[Operation] | None, Query()] = None,
    context: Annotated[str | None, Query(description='A JSON object matched by containment: {"user": "ann"}')] = None,
    since: Annotated[datetime | None, Query(description="Committed at or after (with a time zone)")] = None,
    until: Annotated[datetime | None, Query(description="Committed before (with a time zone)")] = None,
) -> FilterArgs:
    """The query helpers' filters from the query parameters (400 for a context that is no JSON object)."""
    filters = FilterArgs(
        table=table, schema=schema, primary_key=key, operation=operation or None, since=since, until=until
    )
    if context is not None:
        try:
            parsed = json.loads(context)
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            raise HTTPException(400, 'context= is a JSON object matched by containment, e.g. {"user": "ann"}')
        filters["context"] = parsed
    return filters


Filters = Annotated[FilterArgs, Depends(change_filters)]
