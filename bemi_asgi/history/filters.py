"""Turning query-helper arguments into SQL: table names, primary keys, times, LSNs, cursors, WHERE clauses.

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
from typing import Any, Literal

from .._exceptions import QueryError

__all__ = [
    "DEFAULT_SCHEMA",
    "At",
    "Cursor",
    "Where",
    "decode_cursor",
    "encode_cursor",
    "encode_primary_key",
    "lsn_to_str",
    "parse_at",
    "parse_lsn",
    "quote_ident",
    "quote_qualified",
    "require_aware",
    "split_table",
]

DEFAULT_SCHEMA = "public"

PrimaryKey = int | str | uuid.UUID | Sequence[int | str | uuid.UUID]


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's quote_ident does, always (safe for any name)."""
    if "\x00" in name:
        raise QueryError(f"identifier {name!r} contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(dotted: str) -> str:
    """Quote a `schema.name` (or bare `name`) table reference given in configuration."""
    return ".".join(quote_ident(part) for part in dotted.split(".", 1))


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


_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """'16/B374D848' (pg_lsn text) -> 0x16B374D848."""
    match = _LSN.match(text)
    if match is None:
        raise QueryError(f"{text!r} is not an LSN: expected the pg_lsn form 'X/XXXXXXXX' or an int")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def lsn_to_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


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
        return At("lsn", lsn=parse_lsn(at))
    raise QueryError(f"at must be a timezone-aware datetime or an LSN (int or 'X/XXXXXXXX'), got {type(at).__name__}")


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the last change's commit order key, and the order the pages go in."""

    commit_lsn: int
    ordinal: int
    order: Literal["asc", "desc"]


def encode_cursor(cursor: Cursor) -> str:
    raw = json.dumps([1, cursor.commit_lsn, cursor.ordinal, cursor.order], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        version, lsn, ordinal, order = json.loads(raw)
        if version != 1 or order not in ("asc", "desc") or type(lsn) is not int or type(ordinal) is not int:
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise QueryError(
            f"cursor {text[:40]!r} is not a cursor returned by find(): pass `page.next_cursor` unchanged"
        ) from None
    return Cursor(lsn, ordinal, order)


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
