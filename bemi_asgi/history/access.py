"""Who may read which part of the history over HTTP: the `authorize` and `scope` callbacks that the change browser
(`bemi_asgi.ui`) and the JSON API (`bemi_asgi.api`) both take, read the same way by both.

- `authorize(request)`, sync or async: True (allowed), False (forbidden), None (not signed in), or a Starlette
  `Response` to send instead (e.g. a redirect to the login page). An exception it raises propagates.
- `scope(request)`, optional, sync or async: a context filter such as `{"tenant_id": 7}` that narrows every query
  of the request (`{}`: everything; None: nothing, refused as forbidden).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["Authorize", "Denied", "ScopeCallback", "allow_all", "merge_scope", "read_access"]

Authorize = Callable[[Request], "bool | Response | Awaitable[bool | Response | None] | None"]
ScopeCallback = Callable[[Request], "Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None"]


def allow_all(request: Request) -> bool:
    """An `authorize` that lets every visitor read the whole change history: for local development only."""
    return True


@dataclass(frozen=True)
class Denied:
    """A refused request: 401 (not signed in) or 403 (forbidden), and what to tell the visitor."""

    status: int
    message: str


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def read_access(
    request: Request, authorize: Authorize, scope: ScopeCallback | None, *, caller: str
) -> Mapping[str, Any] | Response | Denied:
    """Run the callbacks: the request's scope ({} for everything), the callback's own Response, or a denial.
    `caller` names the callbacks' owner in the TypeError a wrong return value raises."""
    verdict = await maybe_await(authorize(request))
    if isinstance(verdict, Response):
        return verdict
    if verdict is None:
        return Denied(401, "Sign in to see the change history.")
    if verdict is False:
        return Denied(403, "You may not see the change history.")
    if verdict is not True:
        raise TypeError(
            f"{caller} authorize callback returned {verdict!r}: return True (allowed), False (403), None (401) "
            "or a Response"
        )
    if scope is None:
        return {}
    answer = await maybe_await(scope(request))
    if answer is None:
        return Denied(403, "You may not see any part of the change history.")
    if not isinstance(answer, Mapping):
        raise TypeError(
            f"{caller} scope callback returned {type(answer).__name__}: return a mapping such as "
            '{"tenant_id": 7} ({} for everything) or None (no access)'
        )
    try:
        json.dumps(dict(answer), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{caller} scope callback returned a mapping that is not JSON: {exc}") from None
    return dict(answer)


def merge_scope(context: Mapping[str, Any], scope: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The context filter a query runs with: the user's filter and the scope together; None when they contradict
    (the user filtered on a scoped key with another value), which must match nothing rather than widen the scope."""
    merged = dict(context)
    for key, value in (scope or {}).items():
        if key in merged and (merged[key] != value or type(merged[key]) is not type(value)):
            return None
        merged[key] = value
    return merged
