"""`ChangeStore`: the stored history as every query helper reads it.

One object holds the pool (opened on first use when given a DSN) and runs the reads the helpers share: changes by
`ChangeFilter`, a row's changes (with the TRUNCATEs that ended it and the schema changes between them), and the
checks that turn a misspelt table or column into a QueryError. `Bemi`, `bemi.changes`, revert and the change
browser all take this store: none of them reaches into another.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import asyncpg

from .._changes_table import CHANGES, SCHEMA, STREAMS, WORKER_STATE
from .._exceptions import QueryError, UnknownTableError
from .._pgtext import quote_qualified
from .catalog import fetch_table_info
from .filters import At, ChangeFilter, FilterArgs, Where
from .models import Change, change_from_json
from .replay import without_idle_truncates

__all__ = ["CHANGES_SQL", "SELECT_CHANGE", "STREAMS_SQL", "WORKER_STATE_SQL", "ChangeStore", "history_grants"]

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

    async def pool(self) -> asyncpg.Pool:
        """The pool queries run on (opened on first use when the store was given a DSN)."""
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)
        return self._pool

    async def close(self) -> None:
        """Close the pool the store opened itself (a pool passed in is left to its owner)."""
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # Reading changes.

    async def where(self, selection: ChangeFilter) -> Where:
        """The filter's WHERE clause, once its `before`/`after` filters name real columns of its table."""
        where = selection.where()
        for table, names in selection.column_filters():
            await self.require_columns(*table, names)
        return where

    async def select(
        self,
        where: Where,
        *,
        order: Literal["asc", "desc"] = "asc",
        limit: int | None = None,
    ) -> list[Change]:
        """The changes matching `where` in commit order (`order`), at most `limit` of them."""
        direction = "ASC" if order == "asc" else "DESC"
        in_order = f"ORDER BY commit_lsn {direction}, ordinal {direction}, stream {direction}"
        # The JSON is written for the changes kept, after the LIMIT: in a flat query PostgreSQL would write it for
        # every matching change before sorting them.
        sql = (
            f"SELECT {SELECT_CHANGE} FROM (SELECT * FROM {CHANGES_SQL} WHERE {where.sql()} {in_order}"
            f"{'' if limit is None else f' LIMIT {where.param(limit)}'}) AS c {in_order}"
        )
        pool = await self.pool()
        with history_grants():
            records = await pool.fetch(sql, *where.params)
        return [change_from_json(record[0]) for record in records]

    async def count(self, where: Where) -> int:
        pool = await self.pool()
        with history_grants():
            total: int = await pool.fetchval(f"SELECT count(*) FROM {CHANGES_SQL} WHERE {where.sql()}", *where.params)
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
        pool = await self.pool()
        with history_grants():
            records = await pool.fetch(sql, *where.params)
        return without_idle_truncates(change_from_json(record[0]) for record in records)

    # Validation.

    async def require_known_table(self, schema: str, table: str) -> None:
        """Raise QueryError unless the table has stored changes or exists in this database."""
        pool = await self.pool()
        with history_grants():
            known = await pool.fetchval(
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
