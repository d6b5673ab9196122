"""`bemi.changes`: find and count stored changes by table, row, operation, context, row values and time.

Results come in commit order, `(commit_lsn, ordinal)` (then the stream, when several sources share a
destination), newest first unless `order="asc"`. Pages are keyset pages:
the cursor names the last change returned, so changes stored while a client pages through never cause duplicates or
skips (the worker stores commits in commit order, so new changes sort after every existing one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Unpack

from .._exceptions import QueryError
from .filters import ChangeFilter, Cursor, FilterArgs, decode_cursor, encode_cursor
from .models import Change
from .store import ChangeStore

__all__ = ["ChangePage", "ChangesAPI"]

MAX_LIMIT = 10_000


class ChangePage(list[Change]):
    """A page of changes (a list) and the cursor for the next page (None when this page is the last)."""

    next_cursor: str | None

    def __init__(self, changes: Sequence[Change], next_cursor: str | None) -> None:
        super().__init__(changes)
        self.next_cursor = next_cursor


class ChangesAPI:
    """Finding stored changes; reached as `bemi.changes`."""

    def __init__(self, store: ChangeStore) -> None:
        self._store = store

    async def find(
        self,
        *,
        limit: int = 100,
        order: Literal["asc", "desc"] = "desc",
        cursor: str | None = None,
        **filters: Unpack[FilterArgs],
    ) -> ChangePage:
        """Return one page of the changes matching every given filter.

        Filters: `table` is "name" or "schema.name" (schema `public` by default; `schema=` alone matches every
        table of a schema). `primary_key` is the row's key: an int or str, a tuple for a composite key.
        `operation` is one operation or several. `context`, `before` and `after` match by containment:
        `context={"user_id": 42}` finds changes whose context holds that pair. `since` is inclusive and `until`
        exclusive (aware datetimes). `transaction_id` is the source transaction's id. `trace_id` finds the changes
        written in one trace (the context key tracing adds): 32 hex digits or OpenTelemetry's int. `database` is the
        source database's name, `stream` one source stream's id (`Bemi.streams()`): default, every source. Pass the
        returned page's `next_cursor` as `cursor` with the same filters to get the next page.
        """
        if order not in ("asc", "desc"):
            raise QueryError(f"order must be 'asc' or 'desc', got {order!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise QueryError(f"limit must be an int from 1 to {MAX_LIMIT}, got {limit!r}")
        selection = ChangeFilter(filters, caller="find")
        # A context key with a B-tree of its own gives the matches in commit order, either way.
        context_index = await self._store.context_index(selection.indexable_context_key())
        where = await self._store.where(selection, context_index=context_index)
        position = None
        if cursor is not None:
            position = decode_cursor(cursor)
            if position.order != order:
                raise QueryError(f"this cursor pages in {position.order!r} order, but order={order!r} was given")
            comparison = ">" if order == "asc" else "<"
            where.add(
                f"(commit_lsn, ordinal, stream) {comparison} ({where.param(position.commit_lsn)}::bigint, "
                f"{where.param(position.ordinal)}::integer, {where.param(position.stream)}::integer)"
            )
        if order == "desc" and selection.unordered and context_index is None:
            below = None if position is None else position.commit_lsn
            found = await self._store.newest(where, limit=limit + 1, below=below, habit=selection.shape())
        else:
            found = await self._store.select(where, order=order, limit=limit + 1)
        changes = found[:limit]
        if not changes and selection.table is not None and cursor is None:
            await self._store.require_known_table(*selection.table)
        next_cursor = None
        if len(found) > limit:
            last = changes[-1]
            next_cursor = encode_cursor(Cursor(last.commit_lsn, last.ordinal, order, last.stream))
        return ChangePage(changes, next_cursor)

    async def count(self, **filters: Unpack[FilterArgs]) -> int:
        """Count the changes matching the filters (the same filters as `find`)."""
        selection = ChangeFilter(filters, caller="count")
        total = await self._store.count(await self._store.where(selection))
        if total == 0 and selection.table is not None:
            await self._store.require_known_table(*selection.table)
        return total
