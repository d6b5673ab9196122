"""The application context that travels with every write: who, where, why.

The current context lives in one `ContextVar`, so each request, task and thread sees its own. Every way of setting
it (the middleware, `bemi_context`) validates the mapping once, where it is set, and keeps its compact JSON beside
it: the pool then emits that text at each COMMIT without serializing again, and a bad value fails in the code that
produced it rather than at commit time, far away.

A context must be a mapping with string keys whose values are JSON: str, int, float (finite), bool, None, lists
(or tuples) and mappings of those. Strings may not contain NUL: PostgreSQL's jsonb cannot store U+0000, so such a
context could never be stored exactly, and it is refused up front instead. The default size limit is 8 KiB of
UTF-8 JSON (`configure_context(max_bytes=...)` changes it): a context is written to the WAL once per written
transaction and stored beside every change, so it should describe the request, not carry its payload.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast, overload

from .._exceptions import BemiContextError
from .._jsontext import compact_encoder

__all__ = ["SKIP_KEY", "ContextData", "bemi_context", "configure_context", "current", "get_context", "skip_tracking"]

DEFAULT_MAX_CONTEXT_BYTES = 8192

_max_bytes = DEFAULT_MAX_CONTEXT_BYTES


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_chunks = compact_encoder(allow_nan=False, default=_not_json)


def _encode(value: object) -> str:
    return "".join(_chunks(value, 0))


class ContextData(NamedTuple):
    """A validated context: the mapping (a private copy, never handed out) and its compact JSON text."""

    values: Mapping[str, Any]
    json: str


_current: ContextVar[ContextData | None] = ContextVar("bemi_context", default=None)


def configure_context(*, max_bytes: int) -> None:
    """Set the largest context accepted, in bytes of UTF-8 JSON (default 8192)."""
    global _max_bytes
    if max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2 (the size of '{{}}'), got {max_bytes}")
    _max_bytes = max_bytes
    _validated.clear()  # validated under the previous limit


def get_context() -> dict[str, Any] | None:
    """Return a copy of the current context, as a write here would carry it (with the active trace), or None.

    A copy, so that changing it cannot make the context differ from the JSON the pool emits.
    """
    data = current()
    return None if data is None else dict(data.values)


#: What a write gains from where it runs, added when the pool takes the context (the active trace, installed by
#: `tracing.configure_tracing`), or None. Read at each statement: a span may start after the context was set.
_extension: Callable[[ContextData | None], ContextData | None] | None = None


def extend_context(extension: Callable[[ContextData | None], ContextData | None] | None) -> None:
    global _extension
    _extension = extension


def current() -> ContextData | None:
    """Return the context a write here carries, validated, with its JSON text (for the pool and the tests)."""
    data = _current.get()
    return data if _extension is None else _extension(data)


#: Flat contexts validated before, by their items in order, with their values' types: what a request's callback
#: returns is mostly an equal dict each time, and taking the earlier `ContextData` skips the JSON encoding (the
#: C encoder is most of the cost of a validation) and gives the pool and tracing the same object again. Only str
#: keys and str, int, bool or None values, only small texts, and at most `_VALIDATED_MAX` entries (the values may
#: come from request headers). Equal items give the same JSON when the values are str or None; 1, 1.0 and True are
#: equal with different JSON, so an entry holding another type is taken only when the types match too.
_validated: dict[tuple[tuple[str, Any], ...], tuple[ContextData, tuple[type, ...] | None]] = {}
_VALIDATED_MAX = 256
_VALIDATED_MAX_TEXT = 1024
_STR = frozenset({str})
_TEXT_VALUES = frozenset({str, type(None)})
_FLAT_VALUES = frozenset({str, int, bool, type(None)})


def validate(values: Mapping[str, Any]) -> ContextData:
    """Check that `values` can be stored exactly and return it with its JSON text.

    Raises BemiContextError naming the offending key otherwise.
    """
    if type(values) is not dict:
        return _validate(values)
    key = tuple(values.items())
    try:
        entry = _validated.get(key)
    except Exception:  # an unhashable value (a list, a mapping): not a flat context
        return _validate(values)
    if entry is not None:
        data, types = entry
        if types is None or types == tuple(map(type, values.values())):
            return data
        return _validate(values)
    data = _validate(values)
    types = tuple(map(type, values.values()))
    if len(data.json) <= _VALIDATED_MAX_TEXT and _FLAT_VALUES.issuperset(types) and _STR.issuperset(map(type, values)):
        if len(_validated) >= _VALIDATED_MAX:
            _validated.clear()
        _validated[key] = (data, None if _TEXT_VALUES.issuperset(types) else types)
    return data


def _validate(values: Mapping[str, Any]) -> ContextData:
    if type(values) is not dict and not isinstance(values, Mapping):
        raise BemiContextError(
            f"a Bemi context must be a mapping of str keys to JSON values, got {type(values).__name__}"
        )
    # Fast path: the C encoder catches most bad values, and the walk below names the key when it fails. The walk
    # also runs when the text hints at what the encoder lets through but jsonb or a round trip would not keep:
    # non-str keys (silently turned into strings) and NUL characters.
    try:
        text = _encode(values)
        # ASCII text (the usual case) is its own UTF-8 and cannot hold a lone surrogate: skip the encoding.
        size = len(text) if text.isascii() else len(text.encode())
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise BemiContextError(_find_problem(values, "") or f"the Bemi context is not JSON: {exc}") from None
    if "\\u0000" in text or not _keys_are_str(values):
        problem = _find_problem(values, "")
        if problem is not None:
            raise BemiContextError(problem)
    if size > _max_bytes:
        raise BemiContextError(
            f"the Bemi context is {size} bytes of JSON, over the limit of {_max_bytes}: keep identifiers "
            "(user id, endpoint, request id) in it, not payloads, or raise the limit with "
            "bemi_asgi.configure_context(max_bytes=...)"
        )
    # A private copy: the caller may go on changing its dict; nobody else gets a reference to this one.
    return ContextData(dict(values), text)


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _keys_are_str(value: Mapping[Any, Any]) -> bool:
    """True when every mapping key, at any depth, is a str (json.dumps would silently stringify the others)."""
    for key, item in value.items():
        if type(key) is not str:
            return False
        if type(item) not in _SCALARS and not _nested_keys_are_str(item):
            return False
    return True


def _nested_keys_are_str(value: object) -> bool:
    if isinstance(value, Mapping):
        return _keys_are_str(value)
    if isinstance(value, list | tuple):
        return all(_nested_keys_are_str(item) for item in value)
    return True


def _find_problem(value: object, path: str, depth: int = 0) -> str | None:
    """Describe the first part of `value` that cannot be stored exactly, or return None when all is well."""
    where = f"at {path!r}" if path else "at the top level"
    if depth > 100:
        return f"the Bemi context is nested more than 100 levels deep {where}"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if type(key) is not str:
                return (
                    f"the Bemi context has a {type(key).__name__} key {key!r} {where}: JSON object keys must be "
                    "strings, convert it with str()"
                )
            if "\x00" in key:
                return f"the Bemi context has a key {key!r} {where} with a NUL character, which jsonb cannot store"
            problem = _find_problem(item, f"{path}.{key}" if path else key, depth + 1)
            if problem is not None:
                return problem
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _find_problem(item, f"{path}[{index}]", depth + 1)
            if problem is not None:
                return problem
    elif isinstance(value, str):
        if "\x00" in value:
            return (
                f"the Bemi context value {where} contains a NUL character (U+0000), which PostgreSQL's jsonb "
                "cannot store: remove it or encode the value"
            )
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"the Bemi context value {where} is not valid Unicode (it has a lone surrogate)"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return f"the Bemi context value {where} is {value}, which JSON cannot represent"
    elif value is not None and not isinstance(value, int | bool):
        return (
            f"the Bemi context value {where} is a {type(value).__name__}, which is not JSON: convert it to a str, "
            "number, bool, None, list or mapping first"
        )
    return None


def activate(values: Mapping[str, Any] | None) -> Token[ContextData | None]:
    """Validate and set the context for the current task; reset it with `deactivate(token)`."""
    return _current.set(None if values is None else validate(values))


def deactivate(token: Token[ContextData | None]) -> None:
    _current.reset(token)


class _Scope(NamedTuple):
    """An entered `bemi_context`: the token that restores the context before it, and the scope around it."""

    token: Token[ContextData | None]
    outer: _Scope | None


_scopes: ContextVar[_Scope | None] = ContextVar("bemi_context_scopes", default=None)

P = ParamSpec("P")
R = TypeVar("R")


class bemi_context:  # lower case: used like a function, `with bemi_context(...)` and `@bemi_context(...)`
    """Add keys to the Bemi context for a block, a function or a coroutine function.

        with bemi_context(job="nightly-import", user_id=42):
            await pool.execute("UPDATE ...")

        @bemi_context(job="send-invoices")
        async def send_invoices() -> None: ...

    Nested scopes merge, inner keys winning; the previous context comes back on exit, exceptions included. Tasks
    created inside inherit the context (asyncio copies context variables when it creates a task). A bad value
    raises BemiContextError at entry.
    """

    __slots__ = ("_values",)

    def __init__(self, mapping: Mapping[str, Any] | None = None, /, **values: Any) -> None:
        merged: dict[str, Any] = {}
        if mapping is not None:
            if not isinstance(mapping, Mapping):
                raise BemiContextError(f"bemi_context() takes a mapping, got {type(mapping).__name__}")
            merged.update(mapping)
        merged.update(values)
        self._values = merged

    def __enter__(self) -> dict[str, Any]:
        outer = _current.get()
        values = self._values if outer is None else {**outer.values, **self._values}
        data = validate(values)
        # The token goes on a stack held by the task's own context, never on `self`: one instance may be entered
        # by several tasks at once (a module-level `job = bemi_context(...)` used as `with job:` in each).
        _scopes.set(_Scope(_current.set(data), _scopes.get()))
        return dict(data.values)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope = _scopes.get()
        if scope is None:
            raise RuntimeError("bemi_context exited without being entered in this task")
        _scopes.set(scope.outer)
        _current.reset(scope.token)

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        values = self._values
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with bemi_context(values):
                    return await fn(*args, **kwargs)

            return run_async

        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(
                "bemi_context cannot decorate a generator: its body runs outside the call; "
                "use `with bemi_context(...)` inside it"
            )

        @functools.wraps(fn)
        def run_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            with bemi_context(values):
                return fn(*args, **kwargs)

        return cast(Callable[P, Any], run_sync)


#: The prefix of the logical messages that carry a context into the WAL; the worker ignores every other prefix.
MESSAGE_PREFIX = "_bemi"
#: The context key asking the worker to store nothing of a transaction (see `skip_tracking`).
SKIP_KEY = "_bemi_skip"


def skip_tracking() -> bemi_context:
    """Store no change of the transactions written inside: for backfills, data migrations, bulk fixes.

        with bemi_asgi.skip_tracking():
            await pool.execute("UPDATE orders SET total_cents = total * 100")

    A `bemi_context` adding the reserved key `"_bemi_skip": true` (a `with` block or a decorator). The pool emits
    it like any context and the worker drops every transaction carrying it, whole, even the part written before
    the block was entered. Note: a deliberate hole in the audit trail: such changes leave no trace at all.
    """
    return bemi_context({SKIP_KEY: True})
