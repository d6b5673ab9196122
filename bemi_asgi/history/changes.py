"""`bemi.changes`: find and count stored changes by table, row, operation, context, row values and time.

Results come in commit order, `(commit_lsn, ordinal)`, newest first unless `order="asc"`. Pages are keyset pages:
the cursor names the last change returned, so changes stored while a client pages through never cause duplicates or
skips (the worker stores commits in commit order, so new changes sort after every existing one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from .._changes_table import COLUMNS
from .._exceptions import QueryError
from .._pgtext import quote_ident
from .filters import (
    Cursor,
    PrimaryKey,
    Where,
    decode_cursor,
    encode_cursor,
    encode_primary_key,
    json_param,
    require_aware,
    split_table,
)
from .models import Change, Operation, change_from_record

if TYPE_CHECKING:
    from .client import Bemi

__all__ = ["SELECT_COLUMNS", "ChangePage", "ChangesAPI"]

#: Every column of `bemi.changes`, jsonb as text (asyncpg would decode it twice otherwise): what `change_from_record`
#: reads.
SELECT_COLUMNS = ", ".join(
    f"{name}::text AS {name}" if column.is_json else name for column in COLUMNS for name in [quote_ident(column.name)]
)

MAX_LIMIT = 10_000


class ChangePage(list[Change]):
    """A page of changes (a list) and the cursor for the next page (None when this page is the last)."""

    next_cursor: str | None

    def __init__(self, changes: Sequence[Change], next_cursor: str | None) -> None:
        super().__init__(changes)
        self.next_cursor = next_cursor


def _operations(operation: Operation | str | Sequence[Operation | str]) -> list[str]:
    items = [operation] if isinstance(operation, Operation | str) else list(operation)
    result = []
    for item in items:
        try:
            result.append(Operation(item.upper() if isinstance(item, str) else item).value)
        except ValueError:
            raise QueryError(f"operation {item!r} is not one of {', '.join(op.value for op in Operation)}") from None
    return result


class ChangesAPI:
    """Finding stored changes; reached as `bemi.changes`."""

    def __init__(self, bemi: Bemi) -> None:
        self._bemi = bemi

    async def find(
        self,
        *,
        table: str | None = None,
        schema: str | None = None,
        primary_key: PrimaryKey | None = None,
        operation: Operation | str | Sequence[Operation | str] | None = None,
        context: Mapping[str, Any] | None = None,
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        transaction_id: int | None = None,
        limit: int = 100,
        order: Literal["asc", "desc"] = "desc",
        cursor: str | None = None,
    ) -> ChangePage:
        """Return one page of the changes matching every given filter.

        `table` is "name" or "schema.name" (schema `public` by default; `schema=` alone matches every table of a
        schema). `primary_key` is the row's key: an int or str, a tuple for a composite key. `context`, `before`
        and `after` match by containment: `context={"user_id": 42}` finds changes whose context holds that pair.
        `since` is inclusive and `until` exclusive (aware datetimes). Pass the returned page's `next_cursor` as
        `cursor` with the same filters to get the next page.
        """
        if order not in ("asc", "desc"):
            raise QueryError(f"order must be 'asc' or 'desc', got {order!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise QueryError(f"limit must be an int from 1 to {MAX_LIMIT}, got {limit!r}")
        where, table_ref = await self._where(
            table, schema, primary_key, operation, context, before, after, since, until, transaction_id
        )
        if cursor is not None:
            position = decode_cursor(cursor)
            if position.order != order:
                raise QueryError(f"this cursor pages in {position.order!r} order, but order={order!r} was given")
            comparison = ">" if order == "asc" else "<"
            where.add(
                f"(commit_lsn, ordinal) {comparison} ({where.param(position.commit_lsn)}::bigint, "
                f"{where.param(position.ordinal)}::integer)"
            )
        direction = "ASC" if order == "asc" else "DESC"
        sql = (
            f"SELECT {SELECT_COLUMNS} FROM {self._bemi.changes_table_sql} WHERE {where.sql()} "
            f"ORDER BY commit_lsn {direction}, ordinal {direction} LIMIT {where.param(limit + 1)}"
        )
        pool = await self._bemi.pool()
        records = await pool.fetch(sql, *where.params)
        changes = [change_from_record(record) for record in records[:limit]]
        if not changes and table_ref is not None and cursor is None:
            await self._bemi.require_known_table(*table_ref)
        next_cursor = None
        if len(records) > limit:
            last = changes[-1]
            next_cursor = encode_cursor(Cursor(last.commit_lsn, last.ordinal, order))
        return ChangePage(changes, next_cursor)

    async def count(
        self,
        *,
        table: str | None = None,
        schema: str | None = None,
        primary_key: PrimaryKey | None = None,
        operation: Operation | str | Sequence[Operation | str] | None = None,
        context: Mapping[str, Any] | None = None,
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        transaction_id: int | None = None,
    ) -> int:
        """Count the changes matching the filters (the same filters as `find`)."""
        where, table_ref = await self._where(
            table, schema, primary_key, operation, context, before, after, since, until, transaction_id
        )
        pool = await self._bemi.pool()
        total: int = await pool.fetchval(
            f"SELECT count(*) FROM {self._bemi.changes_table_sql} WHERE {where.sql()}", *where.params
        )
        if total == 0 and table_ref is not None:
            await self._bemi.require_known_table(*table_ref)
        return total

    async def _where(
        self,
        table: str | None,
        schema: str | None,
        primary_key: PrimaryKey | None,
        operation: Operation | str | Sequence[Operation | str] | None,
        context: Mapping[str, Any] | None,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        since: datetime | None,
        until: datetime | None,
        transaction_id: int | None,
    ) -> tuple[Where, tuple[str, str] | None]:
        where = Where()
        table_ref: tuple[str, str] | None = None
        if table is not None:
            table_ref = split_table(table, schema)
            where.add(f'"schema" = {where.param(table_ref[0])} AND "table" = {where.param(table_ref[1])}')
        elif schema is not None:
            where.add(f'"schema" = {where.param(schema)}')
        if primary_key is not None:
            if table_ref is None:
                raise QueryError("primary_key needs table=...: a key only identifies a row within one table")
            where.add(f"primary_key = {where.param(encode_primary_key(primary_key))}")
        if operation is not None:
            where.add(f"operation = ANY({where.param(_operations(operation))}::text[])")
        if context is not None:
            where.add(f"context @> {where.param(json_param(context, 'context'))}::jsonb")
        for name, values in (("before", before), ("after", after)):
            if values is None:
                continue
            if table_ref is None:
                raise QueryError(f"{name}= filters on a table's columns: pass table=... too")
            text = json_param(values, name)
            await self._bemi.require_columns(table_ref[0], table_ref[1], values.keys())
            where.add(f'"{name}" @> {where.param(text)}::jsonb')
        if since is not None:
            where.add(f"committed_at >= {where.param(require_aware(since, 'since'))}")
        if until is not None:
            where.add(f"committed_at < {where.param(require_aware(until, 'until'))}")
        if transaction_id is not None:
            if isinstance(transaction_id, bool) or not isinstance(transaction_id, int):
                raise QueryError(f"transaction_id must be an int, got {transaction_id!r}")
            where.add(f"transaction_id = {where.param(transaction_id)}::bigint")
        return where, table_ref
