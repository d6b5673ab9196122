"""Undoing changes from the change browser: `GET /revert` shows the plan (the statements, and the rows that changed
again since), `POST /revert` applies it. The plan and the writes are `bemi_asgi.history.revert`'s.

What can be reverted: one change (from a row page), one transaction or one request (from their pages), each within
the visitor's scope: under a scope only the transaction's or request's in-scope changes are undone.

Who may: `authorize_revert(request)`, sync or async, on top of `authorize` and `scope` (reading). It returns True,
or a mapping that says who is reverting (added to the revert's context, e.g. `{"user": "ann"}`), to allow; False or
None to refuse. Without it nobody may, and no page shows a revert button.

The writes run on `revert_pool` (default: the Bemi's own pool), which must be a `bemi_asgi.create_pool` pool so
that the revert is captured like any change: its context holds the scope's keys (so it shows on the tenant's
timeline), the mapping `authorize_revert` returned, and `bemi_revert` saying what was reverted from where. The
POST is protected against cross-site requests (`bemi_asgi.ui.csrf`).

Outcomes, each a page of its own: the plan (200), refused (403: not permitted, or a cross-site or forged POST; 400:
what the history cannot undo), conflicting (409: rows changed again since, shown with the choice to undo those
too), applied (200).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeAlias, cast
from urllib.parse import parse_qsl

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from .._exceptions import QueryError, RevertConflictError
from ..capture.context import bemi_context
from ..capture.pool import BemiConnection
from ..history.access import merge_scope
from ..history.changes import ChangePage
from ..history.client import Bemi
from ..history.filters import FilterArgs
from ..history.models import Change
from ..history.refs import Refs
from ..history.revert import RevertPlan, RevertSelection, apply_plan, plan_revert, revert_selection
from ..history.wait import current_lsn
from .csrf import CsrfGuard
from .view import parse_context_value

__all__ = ["AuthorizeRevert", "RevertPages", "RevertPool"]

AuthorizeRevert = Callable[[Request], "bool | Mapping[str, Any] | Awaitable[bool | Mapping[str, Any] | None] | None"]
RevertPool: TypeAlias = "asyncpg.Pool | Callable[[], asyncpg.Pool | Awaitable[asyncpg.Pool]]"
#: The changes of one row in one transaction a change reference is looked up among.
MAX_GROUP_SCAN = 1000
#: How long the applied page waits for the worker to store the revert, so the timeline shows it at once.
STORED_WAIT_SECONDS = 2.0
MAX_FORM_BYTES = 16_384
_FIELDS = ("change", "transaction", "schema", "table", "key", "request")


class Host(Protocol):
    """What the revert pages use of the change browser."""

    bemi: Bemi
    refs: Refs
    request_id_key: str

    def _access(self, request: Request) -> Mapping[str, Any]: ...
    def _base(self, request: Request) -> str: ...
    def _render(self, request: Request, template: str, status_code: int = 200, **values: Any) -> Response: ...
    async def _lookup(self, scope: Mapping[str, Any], **options: Any) -> ChangePage: ...


@dataclass(frozen=True)
class Target:
    """What a revert form names: one change (with its transaction, table and key), a transaction, or a request."""

    kind: Literal["change", "transaction", "request"]
    fields: tuple[tuple[str, str], ...]

    @property
    def action(self) -> str:
        """The text a form token is bound to."""
        return "&".join(f"{name}={value}" for name, value in self.fields)

    def get(self, name: str) -> str:
        return dict(self.fields).get(name, "")


def read_target(params: Mapping[str, str]) -> Target:
    """The revert's target from the query string or the form (QueryError when it names none)."""
    fields = tuple((name, params[name]) for name in _FIELDS if params.get(name))
    names = {name for name, _ in fields}
    if names == {"request"}:
        return Target("request", fields)
    if names == {"transaction"}:
        return Target("transaction", fields)
    if {"change", "transaction", "table", "key"} <= names and "request" not in names:
        return Target("change", fields)
    raise QueryError("a revert names change= (with transaction=, table= and key=), transaction= or request=")


class RevertPages:
    """The `/revert` pages of one change browser (see the module docstring)."""

    def __init__(self, host: Host, *, authorize_revert: AuthorizeRevert | None, revert_pool: Any, key: bytes) -> None:
        if authorize_revert is not None and not callable(authorize_revert):
            raise TypeError(f"authorize_revert must be callable or None, got {type(authorize_revert).__name__}")
        self.host = host
        self.authorize_revert = authorize_revert
        self.revert_pool = revert_pool
        self.csrf = CsrfGuard(key)

    async def permitted(self, request: Request) -> Mapping[str, Any] | None:
        """Who is reverting (the mapping for the revert's context, {} for plain True); None: not permitted."""
        if self.authorize_revert is None:
            return None
        verdict = self.authorize_revert(request)
        verdict = await verdict if inspect.isawaitable(verdict) else verdict
        if verdict is None or verdict is False:
            return None
        if verdict is True:
            return {}
        if isinstance(verdict, Mapping):
            return dict(verdict)
        raise TypeError(
            f"bemi_ui authorize_revert callback returned {verdict!r}: return True or a mapping saying who reverts "
            "(allowed), False or None (refused)"
        )

    async def plan_page(self, request: Request) -> Response:
        """GET /revert: the dry-run plan and the form that applies it."""
        who = await self.permitted(request)
        if who is None:
            return self._refused(request, 403, "You may not revert changes.")
        target = read_target(request.query_params)
        return await self._outcome(request, target, apply=False, force=False)

    async def apply(self, request: Request) -> Response:
        """POST /revert: check who and where from, plan again (a row may have changed since) and apply."""
        who = await self.permitted(request)
        if who is None:
            return self._refused(request, 403, "You may not revert changes.")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return self._refused(request, 400, "The form is too large.")
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        target = read_target(form)
        reason = self.csrf.refusal(request, form, target.action)
        if reason is not None:
            return self._refused(request, 403, f"Revert refused: {reason}. Nothing was changed.")
        return await self._outcome(request, target, apply=True, force=form.get("force") == "yes", who=who)

    async def _outcome(
        self, request: Request, target: Target, *, apply: bool, force: bool, who: Mapping[str, Any] | None = None
    ) -> Response:
        scope = self.host._access(request)
        selection = await self._select(target, scope)
        if selection is None:
            return self._refused(request, 404, "No such changes are visible to you.")
        try:
            plan = await plan_revert(self.host.bemi.store, None, selection, force=force or not apply)
        except RevertConflictError as exc:
            return self._page(request, target, "conflict", None, 409, message=self._reason(exc, scope))
        except QueryError as exc:
            return self._refused(request, 400, f"This cannot be reverted: {self._reason(exc, scope)}")
        if not apply:
            return self._page(request, target, "plan", plan, 200)
        plan = replace(plan, description=self._description(target, plan, scope))
        pool = await self._pool()
        async with pool.acquire() as proxy:
            conn = cast(asyncpg.Connection, proxy)
            if not isinstance(getattr(proxy, "_con", proxy), BemiConnection):  # unwrap the pool's proxy
                raise TypeError(
                    "bemi_ui(revert_pool=...) must be a bemi_asgi.create_pool pool, so that reverts are captured "
                    "with their context like any change"
                )
            with bemi_context({**scope, **(who or {})}):
                try:
                    await apply_plan(conn, plan)
                except RevertConflictError as exc:
                    return self._page(request, target, "conflict", None, 409, message=self._reason(exc, scope))
            lsn = await current_lsn(conn)
        if plan.statements:
            with contextlib.suppress(TimeoutError):  # the worker is behind: the revert shows once it is stored
                await self.host.bemi.wait_for(lsn, timeout=STORED_WAIT_SECONDS)
        return self._page(request, target, "applied", plan, 200)

    async def _select(self, target: Target, scope: Mapping[str, Any]) -> RevertSelection | None:
        """The target's changes within the scope, as `revert_selection` selects them; None when none is visible."""
        host = self.host
        context = merge_scope({}, scope)
        if target.kind == "request":
            wanted = merge_scope({host.request_id_key: parse_context_value(target.get("request"))}, scope)
            if wanted is None or not await host._lookup(scope, context=wanted, limit=1):
                return None
            return revert_selection(None, None, wanted, FilterArgs())
        xid = host.refs.transaction_id(target.get("transaction"))
        if xid is None or context is None:
            return None
        if target.kind == "transaction":
            if not await host._lookup(scope, transaction_id=xid, context=context or None, limit=1):
                return None
            return revert_selection(None, xid, None, FilterArgs(context=context or None))
        page = await host._lookup(
            scope,
            table=target.get("table"),
            schema=target.get("schema") or "public",
            primary_key=target.get("key"),
            transaction_id=xid,
            context=context or None,
            limit=MAX_GROUP_SCAN,
        )
        found: Change | None = next((c for c in page if host.refs.change(c) == target.get("change")), None)
        return None if found is None else revert_selection(found, None, None, FilterArgs())

    def _description(self, target: Target, plan: RevertPlan, scope: Mapping[str, Any]) -> dict[str, Any]:
        """The revert's `bemi_revert` context: the plan's own description, or under a scope (where the stored
        numbers would tell a tenant of others' writes) the references the visitor used."""
        if not scope:
            return {**plan.description, "via": "change browser"}
        return {"via": "change browser", **dict(target.fields), "changes": len(plan.changes)}

    @staticmethod
    def _reason(exc: QueryError, scope: Mapping[str, Any]) -> str:
        """The planner's reason, or under a scope one without the stored ids it names."""
        if not scope:
            return str(exc)
        if isinstance(exc, RevertConflictError):
            return "rows changed again after the changes to revert."
        return (
            "the selection holds a change the history cannot undo (a TRUNCATE, a table without a primary key, "
            "or values the worker did not store)."
        )

    async def _pool(self) -> asyncpg.Pool:
        chosen = self.revert_pool
        if chosen is None:
            return await self.host.bemi.pool()
        if isinstance(chosen, asyncpg.Pool):
            return chosen
        made = chosen()
        pool: asyncpg.Pool = await made if inspect.isawaitable(made) else made
        return pool

    def _page(
        self,
        request: Request,
        target: Target,
        outcome: str,
        plan: RevertPlan | None,
        status: int,
        message: str = "",
    ) -> Response:
        session, new = self.csrf.session(request)
        response = self.host._render(
            request,
            "revert.html",
            status,
            outcome=outcome,
            plan=plan,
            message=message,
            target=target,
            token=self.csrf.token(session, target.action),
            scoped=bool(self.host._access(request)),
        )
        if new:
            response.headers.append("Set-Cookie", self.csrf.cookie(request, session, self.host._base(request) + "/"))
        return response

    def _refused(self, request: Request, status: int, message: str) -> Response:
        return self.host._render(request, "revert.html", status, outcome="refused", message=message, plan=None)
