"""The change browser's pure helpers: reading filters from query strings, writing them back into links, and
shaping changes for the templates (values as JSON text, per-field differences, UTC times).

No I/O here. Times in the UI are UTC, both shown and typed: a `datetime-local` input has no time zone, and a fixed,
labelled one is the only reading that means the same for every viewer.

Context values typed into a filter are read as JSON when they parse (`42` is the number 42, `true` the boolean,
`"42"` the text 42) and as text otherwise (`alice`). `context_value_text` is the inverse, so a link built from a
stored value always finds exactly that value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote_plus

from .._exceptions import QueryError
from .._jsontext import display_encoder
from ..history.access import merge_scope
from ..history.filters import FilterArgs, read_trace_id
from ..history.models import Change, Operation
from ..history.replay import column_changes

__all__ = [
    "CONTEXT_PARAM_PREFIX",
    "FieldRow",
    "TimelineFilters",
    "context_value_text",
    "field_rows",
    "format_time",
    "json_text",
    "moment_input",
    "parse_context_value",
    "parse_filters",
    "parse_moment",
    "query_string",
    "query_text",
    "shorten",
    "time_texts",
]

#: The query-string prefix of context filters: `c.<key>=<value>` narrows the timeline to that context pair
#: (`c.user=alice`).
CONTEXT_PARAM_PREFIX = "c."
OPERATIONS = tuple(op.value for op in Operation)


#: How deep a context filter value may nest: containment needs no more, and deeper JSON only costs (Python's
#: parser raises RecursionError near 1,000 levels, PostgreSQL's a stack depth error).
MAX_FILTER_DEPTH = 32


def parse_context_value(text: str) -> Any:
    """A context filter value as typed: JSON when it parses, otherwise the text itself. JSON nested deeper than
    MAX_FILTER_DEPTH is refused (QueryError)."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = _TOO_DEEP
    except ValueError:
        return text
    if value is _TOO_DEEP or _depth(value) > MAX_FILTER_DEPTH:
        raise QueryError(
            f"a context filter value nests deeper than {MAX_FILTER_DEPTH} levels: filter on a shallower value"
        )
    return value


_TOO_DEEP = object()


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (0 for a scalar), without recursion."""
    deepest = 0
    pending = [(value, 0)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            if level > MAX_FILTER_DEPTH:
                break
            pending.extend((child, level) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


#: The first characters (after JSON whitespace) of every text Python's JSON parser reads: a text starting otherwise
#: (`alice`, `req-5`) is bare without trying to parse it, which costs an exception per value.
_JSON_STARTS = frozenset('{["-0123456789tfnNI')
_JSON_SPACE = " \t\n\r"


def context_value_text(value: Any) -> str:
    """The text that `parse_context_value` reads back as `value` (text stays bare unless it would parse as JSON)."""
    if isinstance(value, str):
        if value.lstrip(_JSON_SPACE)[:1] not in _JSON_STARTS:
            return value
        try:
            json.loads(value)
        except (ValueError, RecursionError):
            return value
    return json_text(value)


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_display_chunks = display_encoder(_not_json)
_quoted: Callable[[str], str] = json.encoder.encode_basestring


def json_text(value: Any) -> str:
    """A stored JSON value as text for display (`"pen"`, `3`, `null`, `{"a": 1}`): `json.dumps(value,
    ensure_ascii=False)`."""
    if type(value) is str:  # the encoder's own shortcut for text, taken without building a list
        return _quoted(value)
    return "".join(_display_chunks(value, 0))


#: What `urllib.parse.quote_plus` leaves as it is.
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")


def query_text(text: str) -> str:
    """`text` quoted for a query string, as `urllib.parse.urlencode` quotes it (safe text skips its slow path)."""
    return text if _URL_SAFE.fullmatch(text) else quote_plus(text)


def query_string(params: Iterable[tuple[str, str]]) -> str:
    """`urllib.parse.urlencode(params)`, the same text, in a fraction of its time (pages write hundreds of links)."""
    return "&".join(f"{query_text(name)}={query_text(value)}" for name, value in params)


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_moment(text: str | None, name: str) -> datetime | None:
    """A time typed in the UI (ISO 8601, as a `datetime-local` input sends it): UTC unless it names its offset."""
    if text is None or not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QueryError(f"{name}={text!r} is not a time: use YYYY-MM-DDTHH:MM[:SS] (UTC)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def moment_input(moment: datetime | None) -> str:
    """The value for a `datetime-local` input (UTC, milliseconds), rounded up so the moment itself stays
    included: the input cannot hold microseconds, and rounding down would hide a change committed within it."""
    if moment is None:
        return ""
    moment = moment.astimezone(UTC)
    extra = moment.microsecond % 1000
    if extra and moment < datetime.max.replace(tzinfo=UTC) - timedelta(milliseconds=1):
        moment += timedelta(microseconds=1000 - extra)
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds")


def moment_param(moment: datetime) -> str:
    """A time for a link's query string: exact (microseconds), UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def format_time(moment: datetime) -> str:
    """A time as shown in tables: UTC to the millisecond."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "milliseconds")  # cut, not rounded


#: The length of a UTC time's `isoformat()` without a fraction of a second: "YYYY-MM-DDTHH:MM:SS+00:00".
_WHOLE_SECOND_ISO = 25


def time_texts(moment: datetime) -> tuple[str, str]:
    """`moment.isoformat()` (a time cell's title) and `format_time(moment)`; for a time in UTC, as stored changes'
    are, the second is cut from the first: an aware datetime's texts cost a microsecond or two each."""
    iso = moment.isoformat()
    if not iso.endswith("+00:00"):
        return iso, format_time(moment)
    if len(iso) == _WHOLE_SECOND_ISO:  # isoformat leaves out a zero fraction, format_time writes it
        return iso, f"{iso[:10]} {iso[11:19]}.000"
    return iso, f"{iso[:10]} {iso[11:23]}"


@dataclass(frozen=True)
class TimelineFilters:
    """What the timeline shows: every field narrows it; `cursor` is where the previous page ended."""

    table: str | None = None
    operations: tuple[str, ...] = ()
    #: The source database (when several feed the history); None: every source.
    database: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    context: Mapping[str, Any] = field(default_factory=dict)
    cursor: str | None = None

    def params(self, *, cursor: str | Literal[False] | None = False) -> list[tuple[str, str]]:
        """The query parameters that reproduce these filters (with another cursor when one is given)."""
        result: list[tuple[str, str]] = []
        if self.table:
            result.append(("table", self.table))
        result.extend(("op", op) for op in self.operations)
        if self.database:
            result.append(("database", self.database))
        if self.since is not None:
            result.append(("since", moment_param(self.since)))
        if self.until is not None:
            result.append(("until", moment_param(self.until)))
        result.extend((CONTEXT_PARAM_PREFIX + key, context_value_text(value)) for key, value in self.context.items())
        page = self.cursor if cursor is False else cursor
        if page:
            result.append(("cursor", page))
        return result

    def with_context(self, key: str, value: Any) -> TimelineFilters:
        """These filters (first page) also matching `key` = `value` in the context."""
        return replace(self, context={**self.context, key: value}, cursor=None)

    def without_context(self, key: str) -> TimelineFilters:
        return replace(self, context={k: v for k, v in self.context.items() if k != key}, cursor=None)

    @property
    def active(self) -> bool:
        return bool(self.table or self.operations or self.database or self.since or self.until or self.context)

    def query(self, scope: Mapping[str, Any]) -> FilterArgs | None:
        """The query helpers' filters for these filters within `scope`; None when the two contradict."""
        context = merge_scope(self.context, scope)
        if context is None:
            return None
        return FilterArgs(
            table=self.table,
            operation=list(self.operations) or None,
            database=self.database,
            context=context or None,
            since=self.since,
            until=self.until,
        )


def parse_filters(params: Sequence[tuple[str, str]]) -> TimelineFilters:
    """Read the timeline's filters from its query parameters (raises QueryError on a malformed one).

    Besides `c.<key>=<value>`, the form's free pair `ck=<key>&cv=<value>` adds one context filter.
    """
    single: dict[str, str] = {}
    operations: list[str] = []
    context: dict[str, Any] = {}
    for name, value in params:
        if name == "op":
            op = value.strip().upper()
            if op not in OPERATIONS:
                raise QueryError(f"op={value!r} is not one of {', '.join(OPERATIONS)}")
            if op not in operations:
                operations.append(op)
        elif name.startswith(CONTEXT_PARAM_PREFIX) and len(name) > len(CONTEXT_PARAM_PREFIX):
            if value != "":  # an empty form field means no filter
                key = name[len(CONTEXT_PARAM_PREFIX) :]
                context[key] = _lookup_value(key, parse_context_value(value))
        else:
            single.setdefault(name, value)
    extra_key = single.get("ck", "").strip()
    if extra_key and single.get("cv", "") != "":
        context[extra_key] = _lookup_value(extra_key, parse_context_value(single["cv"]))
    return TimelineFilters(
        table=single.get("table", "").strip() or None,
        operations=tuple(operations),
        database=single.get("database", "").strip() or None,
        since=parse_moment(single.get("since"), "since"),
        until=parse_moment(single.get("until"), "until"),
        context=context,
        cursor=single.get("cursor") or None,
    )


def _lookup_value(key: str, value: Any) -> Any:
    """Refuse a filter value without a single scalar (`{}`, `[]`, `{"a": []}`): the context index (jsonb_path_ops)
    holds scalars only, so such a filter scans the whole history, and the live stream would do so every second."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        else:
            return value
    raise QueryError(
        f"the filter {CONTEXT_PARAM_PREFIX}{key} names no value to look up (an empty object or array matches any), "
        "which would scan the whole history: filter on a value, e.g. c.user=alice"
    )


@dataclass(frozen=True)
class FieldRow:
    """One column of a change as the diff table shows it.

    `status`: "changed" (both sides, different), "added" (only after: CREATE, new column), "removed" (only
    before: DELETE, dropped column) or "same".
    """

    name: str
    before: str | None
    after: str | None
    status: Literal["changed", "added", "removed", "same"]
    #: Whether `before` / `after` were cut to MAX_VALUE_CHARS (the page links to the full value).
    before_cut: bool = False
    after_cut: bool = False


def _same(old: Any, new: Any) -> bool:
    if type(old) is not type(new):
        return False
    if isinstance(old, float) and math.isnan(old) and math.isnan(new):
        return True
    return bool(old == new)


#: Longer values are cut on pages (a page of large values would weigh megabytes); the full value is a link away.
MAX_VALUE_CHARS = 2000


def field_rows(change: Change) -> list[FieldRow]:
    """Every column of the change, in the row's column order, with its before/after JSON text (cut to
    MAX_VALUE_CHARS) and status; for a schema change, every column, index and constraint of the table."""
    before, after = change.before, change.after
    if change.operation is Operation.DDL:
        before, after = _definition_fields(before), _definition_fields(after)
    rows: list[FieldRow] = []
    for name in (*after, *(key for key in before if key not in after)):
        old = _cut(json_text(before[name])) if name in before else None
        new = _cut(json_text(after[name])) if name in after else None
        status: Literal["changed", "added", "removed", "same"]
        if name in before and name in after:
            status = "same" if _same(before[name], after[name]) else "changed"
        else:
            status = "added" if name in after else "removed"
        rows.append(
            FieldRow(
                name,
                old[0] if old else None,
                new[0] if new else None,
                status,
                before_cut=bool(old and old[1]),
                after_cut=bool(new and new[1]),
            )
        )
    return rows


def _definition_fields(definition: Mapping[str, Any]) -> dict[str, Any]:
    """A stored table definition as one field per column, index and constraint."""
    fields: dict[str, Any] = {}
    for kind, label in (("columns", "column"), ("indexes", "index"), ("constraints", "constraint")):
        part = definition.get(kind)
        if isinstance(part, Mapping):
            fields.update((f"{label} {name}", value) for name, value in part.items())
    return fields


def schema_change_summary(change: Change) -> str:
    """One line for a schema change: its command, what it names, and what it did to the columns."""
    after = change.after
    parts = [f"{after.get('command_tag', 'DDL')} {after.get('object_identity', '')}".strip()]
    found = column_changes(change)
    parts += [f"+{name}" for name in found.added]
    parts += [f"\u2212{name}" for name in found.dropped]
    parts += [f"{old} → {new}" for old, new in found.renamed]
    parts += [f"{name}: {old} → {new}" for name, old, new in found.retyped]
    return ", ".join(parts)


def _cut(text: str) -> tuple[str, bool]:
    if len(text) <= MAX_VALUE_CHARS:
        return text, False
    return text[:MAX_VALUE_CHARS] + "…", True


def trace_id_of(value: Any) -> str | None:
    """A context's trace id, when it is one that the trace page can open."""
    try:
        return value if isinstance(value, str) and read_trace_id(value) == value else None
    except QueryError:
        return None
