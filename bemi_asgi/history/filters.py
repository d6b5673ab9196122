"""Turning query-helper arguments into SQL: table names, primary keys, times, LSNs, cursors, WHERE clauses.

`ChangeFilter` is the one reading of the filters `find`, `count`, `revert` and the change browser take: it checks
them and writes their WHERE clause.

Pure functions, no I/O. Every value reaches PostgreSQL as a query parameter; identifiers are quoted.

Times: `since`, `until` and `at` must be timezone-aware datetimes. A naive datetime raises QueryError instead of
being read as UTC or as local time: both guesses are wrong for someone, and a silently shifted audit query is worse
than an error. Results carry aware UTC datetimes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypedDict

from .._exceptions import QueryError
from .._pgtext import parse_lsn, quote_literal
from ..capture.tracing import TRACE_ID_KEY
from .models import Operation

__all__ = [
    "DEFAULT_SCHEMA",
    "TRACE_ID_KEY",
    "At",
    "ChangeFilter",
    "Cursor",
    "FilterArgs",
    "Where",
    "decode_cursor",
    "encode_cursor",
    "encode_primary_key",
    "parse_at",
    "read_lsn",
    "read_trace_id",
    "require_aware",
    "split_table",
]

DEFAULT_SCHEMA = "public"

PrimaryKey = int | str | uuid.UUID | Sequence[int | str | uuid.UUID]


def split_table(table: str, schema: str | None) -> tuple[str, str]:
    """Resolve `table` ("name" or "schema.name") and an explicit `schema` to (schema, name); default public."""
    if not isinstance(table, str) or not table:
        raise QueryError(f"table must be a non-empty table name, got {table!r}")
    if schema is not None:
        return schema, table
    if "." in table:
        head, tail = table.split(".", 1)
        return head, tail
    return DEFAULT_SCHEMA, table


def _key_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str | uuid.UUID):
        raise QueryError(
            f"a primary key value must be an int, str or UUID, got {type(value).__name__} {value!r}: pass the "
            "value's PostgreSQL text form as a str"
        )
    return str(value)


def encode_primary_key(value: PrimaryKey) -> str:
    """The stored form of a primary key: the text of a single-column key; for a composite key (tuple or list,
    in key column order) a compact JSON array of the columns' texts, e.g. `["42","EU"]`."""
    if isinstance(value, list | tuple):
        if not value:
            raise QueryError("a composite primary key needs at least one value")
        if len(value) == 1:
            return _key_text(value[0])
        return json.dumps([_key_text(item) for item in value], ensure_ascii=False, separators=(",", ":"))
    return _key_text(value)


def require_aware(value: datetime, name: str) -> datetime:
    """Refuse naive datetimes (see the module docstring)."""
    if not isinstance(value, datetime):
        raise QueryError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise QueryError(
            f"{name}={value!r} is a naive datetime: pass a timezone-aware one, e.g. datetime.now(UTC) or "
            "value.replace(tzinfo=UTC) if it is in UTC"
        )
    return value


def read_lsn(text: str) -> int:
    """An LSN argument given as text ('16/B374D848'), refused with QueryError when it is not one."""
    try:
        return parse_lsn(text)
    except ValueError:
        raise QueryError(f"{text!r} is not an LSN: expected the pg_lsn form 'X/XXXXXXXX' or an int") from None


_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def read_trace_id(value: str | int) -> str:
    """A trace id as stored in the context (32 lowercase hex digits), from its hex text or OpenTelemetry's int."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 128:
        return f"{value:032x}"
    if isinstance(value, str) and _TRACE_ID.fullmatch(value.lower()) and value.strip("0"):
        return value.lower()
    raise QueryError(
        f"trace_id={value!r} is not a trace id: pass its 32 hex digits (as in a traceparent header) or "
        "OpenTelemetry's int (span.get_span_context().trace_id)"
    )


@dataclass(frozen=True, slots=True)
class At:
    """A point in the history: a commit time, or a WAL position (every commit at or below it)."""

    kind: Literal["time", "lsn"]
    time: datetime | None = None
    lsn: int | None = None


def parse_at(at: datetime | int | str, now: datetime) -> At:
    """Validate an `at=` argument: an aware datetime not after `now`, an LSN int or an LSN string."""
    if isinstance(at, datetime):
        require_aware(at, "at")
        if at > now:
            raise QueryError(
                f"at={at.isoformat()} is in the future (now is {now.isoformat()}): the history cannot say how a "
                "row will be; pass a time up to now"
            )
        return At("time", time=at)
    if isinstance(at, bool):
        raise QueryError("at must be a datetime or an LSN, got a bool")
    if isinstance(at, int):
        if at < 0:
            raise QueryError(f"at={at} is not an LSN: LSNs are non-negative")
        return At("lsn", lsn=at)
    if isinstance(at, str):
        return At("lsn", lsn=read_lsn(at))
    raise QueryError(f"at must be a timezone-aware datetime or an LSN (int or 'X/XXXXXXXX'), got {type(at).__name__}")


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the last change's order key `(commit_lsn, ordinal, stream)`, and the order the pages go
    in. The stream breaks ties between streams (two shards of one database store the same commit LSN and
    ordinals); a cursor written before streams existed reads as stream 0, before every stream."""

    commit_lsn: int
    ordinal: int
    order: Literal["asc", "desc"]
    stream: int = 0


def encode_cursor(cursor: Cursor) -> str:
    raw = json.dumps([2, cursor.commit_lsn, cursor.ordinal, cursor.order, cursor.stream], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        version, lsn, ordinal, order, *rest = json.loads(raw)
        stream = rest[0] if version == 2 and len(rest) == 1 else 0 if version == 1 and not rest else None
        if order not in ("asc", "desc") or type(lsn) is not int or type(ordinal) is not int or type(stream) is not int:
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise QueryError(
            f"cursor {text[:40]!r} is not a cursor returned by find(): pass `page.next_cursor` unchanged"
        ) from None
    return Cursor(lsn, ordinal, order, stream)


def json_param(value: Mapping[str, Any], name: str) -> str:
    """A containment filter's JSON text, refusing what jsonb containment cannot mean."""
    if not isinstance(value, Mapping):
        raise QueryError(f"{name} must be a mapping (matched by jsonb containment), got {type(value).__name__}")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise QueryError(f"{name} is not JSON: {exc}") from None


@dataclass
class Where:
    """A growing list of SQL conditions with their positional parameters."""

    conditions: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def param(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def add(self, condition: str) -> None:
        self.conditions.append(condition)

    def sql(self) -> str:
        return " AND ".join(self.conditions) if self.conditions else "true"


class FilterArgs(TypedDict, total=False):
    """The filters of `bemi.changes.find` and `count`, each narrowing the result (see `find`'s docstring)."""

    table: str | None
    schema: str | None
    primary_key: PrimaryKey | None
    operation: Operation | str | Sequence[Operation | str] | None
    context: Mapping[str, Any] | None
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    since: datetime | None
    until: datetime | None
    transaction_id: int | None
    trace_id: str | int | None
    database: str | None
    stream: int | None


def _operations(operation: Operation | str | Sequence[Operation | str]) -> list[str]:
    items = [operation] if isinstance(operation, Operation | str) else list(operation)
    result = []
    for item in items:
        try:
            result.append(Operation(item.upper() if isinstance(item, str) else item).value)
        except ValueError:
            raise QueryError(f"operation {item!r} is not one of {', '.join(op.value for op in Operation)}") from None
    return result


class ChangeFilter:
    """Which stored changes a query means: `FilterArgs` (and, for revert, one transaction's commit LSN), checked
    and written as a WHERE clause. Every filter given must match; none given matches every change."""

    def __init__(self, args: FilterArgs, *, commit_lsn: int | None = None, caller: str = "find") -> None:
        unknown = sorted(set(args) - set(FilterArgs.__annotations__))
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        self.args = args
        self.commit_lsn = commit_lsn

    @property
    def table(self) -> tuple[str, str] | None:
        """The (schema, name) of the one table filtered on, if any."""
        table = self.args.get("table")
        return None if table is None else split_table(table, self.args.get("schema"))

    @property
    def unordered(self) -> bool:
        """Whether the context's GIN index, which finds changes in no order, is what narrows these filters: a context
        or trace filter, without a row or a transaction (whose own indexes find few changes)."""
        args = self.args
        by_context = args.get("context") is not None or args.get("trace_id") is not None
        return by_context and args.get("primary_key") is None and args.get("transaction_id") is None

    def shape(self) -> str:
        """Which filters are given and the context keys they match, not their values: "a user's changes" for every
        user."""
        given = sorted(name for name, value in self.args.items() if value is not None)
        return json.dumps([given, sorted(self.args.get("context") or {})])

    def indexable_context_key(self) -> str | None:
        """The context filter's one key, when it is the only context filter and its value a JSON scalar: then
        containment is equality of the key's value (`context -> 'key' = value`), which a B-tree on that key finds in
        commit order. With more keys, one of the others may be far rarer, which only the GIN index knows."""
        context = self.args.get("context") or {}
        if len(context) != 1 or self.args.get("trace_id") is not None or not self.unordered:
            return None
        ((key, value),) = context.items()
        return key if value is None or isinstance(value, str | int | float) else None

    def column_filters(self) -> list[tuple[tuple[str, str], list[str]]]:
        """The table and column names the `before`/`after` filters rely on (checked against the table by I/O)."""
        table = self.table
        names = [name for side in (self.args.get("before"), self.args.get("after")) for name in (side or {})]
        return [(table, names)] if table is not None and names else []

    def where(self, *, context_index: str | None = None) -> Where:
        """The WHERE clause (raises QueryError for a filter that cannot mean anything). `context_index` is
        `indexable_context_key()` when it has a B-tree on its value and commit order (see `ChangeStore.context_index`):
        the context filter is then that key's equality, which the B-tree finds, and the containment, written so
        that the GIN index cannot serve it (PostgreSQL would intersect both and sort every match)."""
        args = self.args
        where = Where()
        table = self.table
        schema = args.get("schema")
        if table is not None:
            where.add(f'"schema" = {where.param(table[0])} AND "table" = {where.param(table[1])}')
        elif schema is not None:
            where.add(f'"schema" = {where.param(schema)}')
        primary_key = args.get("primary_key")
        if primary_key is not None:
            if table is None:
                raise QueryError("primary_key needs table=...: a key only identifies a row within one table")
            where.add(f"primary_key = {where.param(encode_primary_key(primary_key))}")
        operation = args.get("operation")
        if operation is not None:
            where.add(f"operation = ANY({where.param(_operations(operation))}::text[])")
        context = args.get("context")
        if context is not None:
            contained = where.param(json_param(context, "context"))
            if context_index is None:
                where.add(f"context @> {contained}::jsonb")
            else:
                equal = where.param(json.dumps(context[context_index], ensure_ascii=False))
                where.add(
                    f"context -> {quote_literal(context_index)} = {equal}::jsonb"
                    f" AND (context || '{{}}'::jsonb) @> {contained}::jsonb"
                )
        for name, values in (("before", args.get("before")), ("after", args.get("after"))):
            if values is None:
                continue
            if table is None:
                raise QueryError(f"{name}= filters on a table's columns: pass table=... too")
            where.add(f'"{name}" @> {where.param(json_param(values, name))}::jsonb')
        since, until = args.get("since"), args.get("until")
        if since is not None:
            where.add(f"committed_at >= {where.param(require_aware(since, 'since'))}")
        if until is not None:
            where.add(f"committed_at < {where.param(require_aware(until, 'until'))}")
        for name, kind, what in (
            ("transaction_id", "bigint", "an int"),
            ("database", "text", "a database name (str)"),
            ("stream", "integer", "a stream id (int, see bemi.streams())"),
        ):
            value = args.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, str if kind == "text" else int):
                raise QueryError(f"{name} must be {what}, got {value!r}")
            where.add(f"{name} = {where.param(value)}::{kind}")
        trace_id = args.get("trace_id")
        if trace_id is not None:  # the context key tracing writes, found through the context's GIN index
            where.add(f"context @> {where.param(json.dumps({TRACE_ID_KEY: read_trace_id(trace_id)}))}::jsonb")
        if self.commit_lsn is not None:
            where.add(f"commit_lsn = {where.param(self.commit_lsn)}::bigint")
        return where
