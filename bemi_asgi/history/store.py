"""`ChangeStore`: the stored history as every query helper reads it.

One object holds the pool (opened on first use when given a DSN) and runs the reads the helpers share: changes by
`ChangeFilter`, a row's changes (with the TRUNCATEs that ended it and the schema changes between them), and the
checks that turn a misspelt table or column into a QueryError. `Bemi`, `bemi.changes`, revert and the change
browser all take this store: none of them reaches into another.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .._changes_table import CHANGES, SCHEMA, STREAMS, WORKER_STATE
from .._exceptions import QueryError, UnknownTableError
from .._pgtext import quote_ident, quote_literal, quote_qualified
from ..capture.session_reset import acquire_for_reads, reset_unless_reads_only
from .catalog import fetch_table_info
from .filters import At, ChangeFilter, FilterArgs, Where
from .models import Change, change_from_json
from .replay import without_idle_truncates

__all__ = [
    "CHANGES_SQL",
    "SELECT_CHANGE",
    "STREAMS_SQL",
    "WORKER_STATE_SQL",
    "ChangeStore",
    "context_index_sql",
    "history_grants",
]

CHANGES_SQL = quote_qualified(SCHEMA, CHANGES)
WORKER_STATE_SQL = quote_qualified(SCHEMA, WORKER_STATE)
STREAMS_SQL = quote_qualified(SCHEMA, STREAMS)

#: The select list of a change read from `bemi.changes AS c` (or a subquery of its rows): the whole row as one JSON
#: object (what `change_from_json` reads), and its commit order key for ORDER BY. PostgreSQL writes the JSON before
#: it sorts and limits, so queries with a LIMIT select it from a subquery of the rows kept.
SELECT_CHANGE = "row_to_json(c)::text AS change, c.commit_lsn, c.ordinal"


#: What a role needs to read the history (the README's `bemi_reader`; an app reading through its own pool gets them by
#: `GRANT bemi_reader TO app`).
READ_GRANTS = (
    f"GRANT USAGE ON SCHEMA {SCHEMA}; GRANT SELECT ON {CHANGES_SQL}, {WORKER_STATE_SQL}, {STREAMS_SQL}, "
    f"{SCHEMA}.tracking_rules"
)


@contextmanager
def history_grants() -> Iterator[None]:
    """Turn a read the server refuses into a QueryError naming the grants: the app's own role often lacks them."""
    try:
        yield
    except asyncpg.InsufficientPrivilegeError as exc:
        raise QueryError(
            f"{exc}: the role reading the history needs {READ_GRANTS} (or GRANT bemi_reader TO the role; see the "
            "README's Security section)"
        ) from None


#: `ChangeStore.newest`: how many times the room the last query of the same filters needed its first window takes,
#: and how many times farther a window reaches after one that held nothing.
WINDOW_MARGIN = 2
WINDOW_GROWTH = 16
#: A window is worth it when its reach is this many times less than every commit position stored: its pages are
#: read whole (the BRIN marks pages, not rows), so each costs about as much as this many matches read one by one.
WINDOW_PAGE_COST = 8
#: The filter shapes whose spacing `newest` remembers (forgotten all at once beyond that: they are only estimates).
MAX_HABITS = 1000


#: The newest first order `newest` sorts its matches in, with the commit LSN as an expression that no index
#: provides: PostgreSQL then intersects the context's GIN with the window's BRIN and sorts the few matches. Given
#: the primary key's order, it reads the primary key backwards and filters every change instead whenever its
#: statistics overrate the value (one that its sample of contexts holds): 20,000 changes read for a page of 20.
SORTED_NEWEST_FIRST = "ORDER BY commit_lsn + 0 DESC, ordinal DESC, stream DESC"


def _select_sql(where: Where, order: Literal["asc", "desc"], limit: int | None, *, sorted_order: str = "") -> str:
    """The query of the changes matching `where` in commit order (`order`), at most `limit` of them; the matches
    are taken in `sorted_order` when one is given (see SORTED_NEWEST_FIRST)."""
    direction = "ASC" if order == "asc" else "DESC"
    in_order = f"ORDER BY commit_lsn {direction}, ordinal {direction}, stream {direction}"
    # The JSON is written for the changes kept, after the LIMIT: in a flat query PostgreSQL would write it for every
    # matching change before sorting them.
    return (
        f"SELECT {SELECT_CHANGE} FROM (SELECT * FROM {CHANGES_SQL} WHERE {where.sql()} {sorted_order or in_order}"
        f"{'' if limit is None else f' LIMIT {where.param(limit)}'}) AS c {in_order}"
    )


def _lower_end(position: int) -> int | None:
    """A window's lowest commit LSN; None (no lower end) once it reaches below every LSN (none is negative)."""
    return position if position > 0 else None


#: How far below the newest commit position stored the oldest is; read again after SPAN_SECONDS by a query over
#: every match (a window reads it every time), so that a growing history turns to windows when they pay.
SPAN_SECONDS = 60.0
_SPAN = f"(SELECT max(commit_lsn) - min(commit_lsn) FROM {CHANGES_SQL}) AS span"


def newest_window_sql(where: Where, reach: int, limit: int) -> str:
    """The query of the newest commit LSN stored (`top`; None: no change at all), how far below it the oldest is
    (`span`), and the newest `limit` changes matching `where` at most `reach` below it (`change`), newest first."""
    return f"""SELECT w.top, w.top - w.bottom AS span, page.change
              FROM (SELECT max(commit_lsn) AS top, min(commit_lsn) AS bottom FROM {CHANGES_SQL}) AS w
              LEFT JOIN LATERAL (
                  SELECT {SELECT_CHANGE}, c.stream FROM (
                      SELECT * FROM {CHANGES_SQL} WHERE {where.sql()} AND commit_lsn >= w.top - {where.param(reach)}
                       {SORTED_NEWEST_FIRST} LIMIT {where.param(limit)}) AS c) AS page ON true
             ORDER BY page.commit_lsn DESC, page.ordinal DESC, page.stream DESC"""


async def _newest_window(
    conn: asyncpg.Connection | PoolConnectionProxy[asyncpg.Record], where: Where, reach: int, limit: int
) -> tuple[int | None, int, list[asyncpg.Record]]:
    """The newest commit LSN stored (None: no change at all), how far below it the oldest is, and the newest `limit`
    changes matching `where` at most `reach` below it, newest first, in one round trip."""
    records = await conn.fetch(newest_window_sql(where, reach, limit), *where.params)
    top: int | None = records[0]["top"]
    return top, records[0]["span"] or 0, [record for record in records if record["change"] is not None]


#: The opt-in B-trees on one context key's value in commit order (the README's "A context key's own index"): each
#: index of `bemi.changes` with its columns' definitions, valid and whole (no predicate), read from the catalog.
CONTEXT_INDEXES_SQL = f"""SELECT pg_get_indexdef(i.indexrelid, 1, true) AS key_column,
                                ARRAY[pg_get_indexdef(i.indexrelid, 2, true), pg_get_indexdef(i.indexrelid, 3, true),
                                      pg_get_indexdef(i.indexrelid, 4, true)] AS order_columns
                           FROM pg_index i
                          WHERE i.indrelid = '{CHANGES_SQL}'::regclass AND i.indisvalid AND i.indpred IS NULL
                            AND i.indnatts = 4"""
#: How PostgreSQL writes such an index's first column: `(context -> 'key'::text)`, quotes doubled. Keys with a `$`
#: or a backslash are left out: the query would quote them otherwise than the index's definition does.
_CONTEXT_KEY_COLUMN = re.compile(r"\(context -> '((?:[^'$\\]|'')*)'::text\)")
_COMMIT_ORDER_COLUMNS = ["commit_lsn", "ordinal", "stream"]


def context_index_sql(key: str, *, concurrently: bool = True) -> str:
    """The statement creating the B-tree that `find(context={key: value})` reads a context's changes from in commit
    order (found by `context_index_keys`). CONCURRENTLY keeps the worker writing while it is built; a partitioned
    `bemi.changes` takes the statement without it."""
    name = f"changes_context_{key}_idx"
    if "$" in key or "\\" in key or "\x00" in key or len(name.encode()) > 63:
        raise ValueError(
            f"context key {key!r} cannot have an index of its own: keys with '$', a backslash or NUL, or longer "
            "than 43 bytes, are read through the GIN index only"
        )
    return (
        f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS {quote_ident(name)} ON {CHANGES_SQL} "
        f"((context -> {quote_literal(key)}), commit_lsn, ordinal, stream)"
    )


def context_index_keys(records: Iterable[asyncpg.Record]) -> frozenset[str]:
    """The context keys that have a B-tree on `(context -> 'key', commit_lsn, ordinal, stream)`."""
    keys = set()
    for record in records:
        match = _CONTEXT_KEY_COLUMN.fullmatch(record["key_column"])
        if match is not None and record["order_columns"] == _COMMIT_ORDER_COLUMNS:
            keys.add(match[1].replace("''", "'"))
    return frozenset(keys)


def at_condition(at: At, where: Where) -> str:
    """`at` as a condition: committed at or before a time, or with a commit LSN at or below a position."""
    if at.kind == "time":
        return f"committed_at <= {where.param(at.time)}"
    return f"commit_lsn <= {where.param(at.lsn)}"


class ChangeStore:
    """The pool the history is read with, and the reads the query helpers share."""

    def __init__(self, pool_or_dsn: asyncpg.Pool | str) -> None:
        if isinstance(pool_or_dsn, str):
            self._dsn: str | None = pool_or_dsn
            self._pool: asyncpg.Pool | None = None
        elif isinstance(pool_or_dsn, asyncpg.Pool):
            self._dsn = None
            self._pool = pool_or_dsn
        else:
            raise TypeError(f"Bemi() takes an asyncpg pool or a DSN string, got {type(pool_or_dsn).__name__}")
        self._owns_pool = self._pool is None
        self._pool_lock = asyncio.Lock()
        self._columns: dict[tuple[str, str], frozenset[str]] = {}
        #: `newest`'s estimates: how far apart in commit LSN the matches of each filter shape were last time.
        self._spacings: dict[str, float] = {}
        #: How far apart the oldest and the newest commit positions stored were at the last window read, and when
        #: a query over every match reads it again.
        self._span: int | None = None
        self._span_due = 0.0
        #: The context keys with a B-tree of their own (`context_index`), and when to read them again.
        self._context_index_keys: frozenset[str] = frozenset()
        self._context_index_due = 0.0

    async def pool(self) -> asyncpg.Pool:
        """The pool queries run on (opened on first use when the store was given a DSN)."""
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=1, max_size=4, reset=reset_unless_reads_only
                    )
        return self._pool

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """A connection for the store's reads, which leave no session state: it goes back to the store's own pool
        or a bemi pool without asyncpg's reset query (`acquire_for_reads`), one round trip of the two a helper
        would cost. A read the server refuses for want of grants raises QueryError naming them."""
        async with acquire_for_reads(await self.pool()) as conn:
            with history_grants():
                yield conn

    async def close(self) -> None:
        """Close the pool the store opened itself (a pool passed in is left to its owner)."""
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # Reading changes.

    async def where(self, selection: ChangeFilter, *, context_index: str | None = None) -> Where:
        """The filter's WHERE clause (see `ChangeFilter.where`), once its `before`/`after` filters name real columns
        of its table."""
        where = selection.where(context_index=context_index)
        for table, names in selection.column_filters():
            await self.require_columns(*table, names)
        return where

    async def context_index(self, key: str | None) -> str | None:
        """`key` (a context key matched by equality, `ChangeFilter.indexable_context_key`) when it has a B-tree on
        its value in commit order: it finds a context's newest (or oldest) changes in order, where the GIN index
        finds every match in no order. Indexes are read from the catalog again after SPAN_SECONDS, so one created
        later is used then."""
        if key is None:
            return None
        if time.monotonic() >= self._context_index_due:
            async with self.reading() as conn:
                self._context_index_keys = context_index_keys(await conn.fetch(CONTEXT_INDEXES_SQL))
            self._context_index_due = time.monotonic() + SPAN_SECONDS
        return key if key in self._context_index_keys else None

    async def select(
        self,
        where: Where,
        *,
        order: Literal["asc", "desc"] = "asc",
        limit: int | None = None,
    ) -> list[Change]:
        """The changes matching `where` in commit order (`order`), at most `limit` of them."""
        sql = _select_sql(where, order, limit)
        async with self.reading() as conn:
            records = await conn.fetch(sql, *where.params)
        return [change_from_json(record[0]) for record in records]

    async def newest(self, where: Where, *, limit: int, below: int | None, habit: str) -> list[Change]:
        """The newest `limit` changes matching `where`, newest first, for filters whose index finds the changes in
        no order (the context's GIN index): rather than read and sort every match (a user's thousands of changes
        for a page of 20), read windows of commit positions, newest first, until `limit` are found. The BRIN on
        `commit_lsn` narrows each window to its pages, which PostgreSQL intersects with the GIN's matches.

        `below` is the commit LSN a page starts at (its cursor's, which `where` holds), None for the newest. The
        windows partition the commit positions, so the result is exactly the one query's; their sizes only decide
        the cost. The first reaches as far as the last query of the same `habit` (the filters' shape, such as
        "a user's changes") needed for as many changes, with a margin; each next one as far as the matches found
        so far suggest; the last one has no lower end. A window reaching over much of the history is not worth
        its pages (see WINDOW_PAGE_COST): then one query reads every match.
        """
        spacing = self._spacings.get(habit)
        found: list[Change] = []
        top = below  # where the windows start: the cursor's position, or the newest stored (read with the first)
        high: int | None = None  # the last window's lowest commit LSN: the next window ends below it
        async with self.reading() as conn:
            while True:
                need = limit - len(found)
                window = Where(list(where.conditions), list(where.params))
                if high is not None:
                    window.add(f"commit_lsn < {window.param(high)}::bigint")
                reach = None if spacing is None else int(spacing * need * WINDOW_MARGIN) + 1
                if reach is not None and self._span is not None and reach * WINDOW_PAGE_COST >= self._span:
                    reach = None  # so near to the whole history that every match one by one costs less
                low: int | None = None
                if reach is not None and top is None:  # the first window, under the newest commit stored
                    top, self._span, records = await _newest_window(conn, window, reach, need)
                    low = None if top is None else _lower_end(top - reach)
                else:  # a window under `top` or `high`; or, without an estimate, every match
                    if reach is not None and top is not None:
                        low = _lower_end((top if high is None else high) - reach)
                    if low is not None:
                        window.add(f"commit_lsn >= {window.param(low)}::bigint")
                    sql = _select_sql(window, "desc", need, sorted_order=SORTED_NEWEST_FIRST)
                    read_span = reach is None and top is None and time.monotonic() >= self._span_due
                    if read_span:  # every match, and how far the positions reach now (it costs a little)
                        sql = f"SELECT page.*, {_SPAN} FROM ({sql}) AS page"
                    records = await conn.fetch(sql, *window.params)
                    if read_span and records:
                        self._span, self._span_due = records[0]["span"], time.monotonic() + SPAN_SECONDS
                changes = [change_from_json(record["change"]) for record in records]
                found += changes
                if len(found) >= limit or low is None or top is None:
                    break
                # Every match between `low` and the window's upper end is in `changes`: as many more farther down
                # need about as much room each (much more room, when this window held none).
                span = (top if high is None else high) - low
                spacing = span / len(changes) if changes else span / need * WINDOW_GROWTH
                high = low
        if len(found) < limit:
            # Every match there is (a request's few changes): one query over them all is the cheapest next time,
            # as a window reaching over the whole history would mark every page of it first.
            self._spacings.pop(habit, None)
        else:
            reached = (found[0].commit_lsn if top is None else top) - found[-1].commit_lsn
            self._learn(habit, max(reached, 1) / len(found))
        return found

    def _learn(self, habit: str, spacing: float) -> None:
        """Remember how far apart a habit's matches are: between the last estimate and this one (a geometric mean,
        so that one unusual user moves it halfway)."""
        if len(self._spacings) >= MAX_HABITS and habit not in self._spacings:
            self._spacings.clear()
        known = self._spacings.get(habit)
        self._spacings[habit] = spacing if known is None else (known * spacing) ** 0.5

    async def count(self, where: Where) -> int:
        async with self.reading() as conn:
            total: int = await conn.fetchval(f"SELECT count(*) FROM {CHANGES_SQL} WHERE {where.sql()}", *where.params)
        return total

    async def row_changes(
        self,
        schema: str,
        table: str,
        key: str,
        *,
        at: At | None = None,
        context: Mapping[str, Any] | None = None,
        database: str | None = None,
        limit: int | None = None,
    ) -> list[Change]:
        """The row's changes, the TRUNCATEs that ended it and the schema changes that changed its columns, in commit
        order.

        `at` keeps what was committed by then, `context` what matches that context filter (the TRUNCATEs and schema
        changes too), and `limit` the row's latest changes, with the TRUNCATEs and schema changes after the oldest
        of them.
        """
        where = ChangeFilter(FilterArgs(table=table, schema=schema, context=context, database=database)).where()
        if at is not None:
            where.add(at_condition(at, where))
        scope = where.sql()
        sql = f"""
            WITH row_changes AS (
                SELECT * FROM {CHANGES_SQL} WHERE {scope} AND primary_key = {where.param(key)}
                 ORDER BY commit_lsn DESC, ordinal DESC LIMIT {where.param(limit)})
            SELECT {SELECT_CHANGE} FROM (
                SELECT * FROM row_changes
                UNION ALL
                SELECT * FROM {CHANGES_SQL} WHERE {scope}
                   AND operation IN ('TRUNCATE', 'DDL')  -- the table events' partial index
                   AND (operation = 'TRUNCATE' OR "before" -> 'columns' IS DISTINCT FROM "after" -> 'columns')
                   AND (commit_lsn, ordinal) > (SELECT commit_lsn, ordinal FROM row_changes
                                                 ORDER BY commit_lsn, ordinal LIMIT 1)
            ) AS c
            ORDER BY commit_lsn, ordinal
        """
        async with self.reading() as conn:
            records = await conn.fetch(sql, *where.params)
        return without_idle_truncates(change_from_json(record[0]) for record in records)

    # Validation.

    async def require_known_table(self, schema: str, table: str) -> None:
        """Raise QueryError unless the table has stored changes or exists in this database."""
        async with self.reading() as conn:
            known = await conn.fetchval(
                f"""SELECT EXISTS (SELECT 1 FROM {CHANGES_SQL} WHERE "schema" = $1 AND "table" = $2)
                        OR EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                    WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))""",
                schema,
                table,
            )
        if not known:
            raise UnknownTableError(
                f"unknown table {schema}.{table}: it has no stored changes and does not exist in this database; "
                "check the name and schema (tables are 'name' in schema public, or 'schema.name')"
            )

    async def require_columns(self, schema: str, table: str, names: Iterable[str]) -> None:
        """Raise QueryError naming any of `names` that is not a column of the table."""
        wanted = set(names)
        columns = self._columns.get((schema, table))
        if columns is None or not wanted <= columns:
            columns = await self._load_columns(schema, table)
            self._columns[(schema, table)] = columns
        missing = sorted(wanted - columns)
        if missing:
            raise QueryError(
                f"{schema}.{table} has no column {', '.join(missing)}: its columns are {', '.join(sorted(columns))}"
            )

    async def _load_columns(self, schema: str, table: str) -> frozenset[str]:
        pool = await self.pool()
        info = await fetch_table_info(pool, schema, table)
        if info is not None:
            return frozenset(column.name for column in info.columns)
        # Not in this database (the history may be stored elsewhere): the columns the latest change shows.
        with history_grants():
            record = await pool.fetchrow(
                f"""SELECT "before"::text AS "before", "after"::text AS "after" FROM {CHANGES_SQL}
                 WHERE "schema" = $1 AND "table" = $2 AND operation NOT IN ('TRUNCATE', 'DDL')
                 ORDER BY commit_lsn DESC, ordinal DESC LIMIT 1""",
                schema,
                table,
            )
        if record is None:
            await self.require_known_table(schema, table)
            return frozenset()
        return frozenset(json.loads(record["before"])) | frozenset(json.loads(record["after"]))
