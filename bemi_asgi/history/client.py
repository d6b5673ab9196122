"""`Bemi`: the entry point for reading the stored change history.

    bemi = bemi_asgi.Bemi(pool_or_dsn)
    page = await bemi.changes.find(table="items", context={"user_id": 42})
    rows = await bemi.history("items", 7)
    row = await bemi.as_of("items", 7, at=datetime(2025, 1, 1, tzinfo=UTC))

Row helpers take `table` as "name" or "schema.name" (schema `public` by default, or `schema=`), and the row's
primary key: an int or str for a single-column key, a tuple in key column order for a composite one. When several
source databases feed one history and two of them have a table of that name, give `database=` too: a row is named
by its database, table and key.

Note: only rows with stored changes are known. A row that has not changed since tracking began has no history, so
`as_of` returns None for it and `table_as_of` does not yield it. A primary-key UPDATE is stored under the new key.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import asyncpg

from .._exceptions import QueryError
from .catalog import fetch_table_info
from .changes import ChangesAPI
from .filters import ChangeFilter, FilterArgs, PrimaryKey, encode_primary_key, parse_at, read_lsn, split_table
from .models import Change, Stream, change_from_json
from .replay import apply_schema_change, blame_columns, row_states, table_columns
from .revert import RevertPlan, apply_plan, plan_revert, revert_selection
from .store import CHANGES_SQL, SELECT_CHANGE, STREAMS_SQL, WORKER_STATE_SQL, ChangeStore, at_condition
from .wait import wait_for_lsn

__all__ = ["Bemi"]


class Bemi:
    """Read the change history stored by the worker.

    `pool_or_dsn` is any asyncpg pool (the pool from `bemi_asgi.create_pool` works, and costs nothing for reads)
    or a DSN, for which Bemi opens its own small pool on first use (close it with `await bemi.close()` or
    `async with Bemi(dsn) as bemi`). It reads `bemi.changes` and `bemi.worker_state`, the tables the worker writes.

    Row helpers take `context=`, a context filter like `find`'s: the row's history made of the matching changes
    only (the change browser's tenant scope uses it).
    """

    def __init__(self, pool_or_dsn: asyncpg.Pool | str) -> None:
        #: The reads every helper shares (`bemi.changes`, revert and the change browser use it too).
        self.store = ChangeStore(pool_or_dsn)
        self.changes = ChangesAPI(self.store)

    async def pool(self) -> asyncpg.Pool:
        """The pool queries run on (opened on first use when Bemi was given a DSN)."""
        return await self.store.pool()

    async def close(self) -> None:
        """Close the pool Bemi opened itself (a pool passed in is left to its owner)."""
        await self.store.close()

    async def __aenter__(self) -> Bemi:
        await self.pool()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def streams(self) -> list[Stream]:
        """The source streams the history holds changes of (`Change.stream` names one), in the order they were first
        seen: with several sources or shards, pass `stream=` or `database=` to `find` and the row helpers."""
        async with self.store.reading() as conn:
            records = await conn.fetch(
                f"SELECT id, system_identifier, database, slot_name FROM {STREAMS_SQL} ORDER BY id"
            )
        return [Stream.model_validate(dict(record)) for record in records]

    # Row history and time travel.

    async def history(
        self,
        table: str,
        primary_key: PrimaryKey,
        *,
        schema: str | None = None,
        context: Mapping[str, Any] | None = None,
        database: str | None = None,
    ) -> list[Change]:
        """The row's changes in commit order, with the TRUNCATEs that ended its existence and the schema changes
        (operation DDL) that changed its columns while it existed (those matching `context`, when given).
        `database` names the source database, when several hold a table of that name."""
        schema_name, table_name = split_table(table, schema)
        changes = await self.store.row_changes(
            schema_name, table_name, encode_primary_key(primary_key), context=context, database=database
        )
        if not changes:
            await self.store.require_known_table(schema_name, table_name)
        return changes

    async def as_of(
        self,
        table: str,
        primary_key: PrimaryKey,
        at: datetime | int | str,
        *,
        schema: str | None = None,
        context: Mapping[str, Any] | None = None,
        database: str | None = None,
    ) -> dict[str, Any] | None:
        """The row as it was at `at`: an aware datetime (changes committed at or before it) or an LSN (changes
        whose commit LSN is at or below it). None when the row did not exist then: not yet created, deleted, or
        removed by a TRUNCATE of its table. With `context`, as the changes matching it alone make it."""
        schema_name, table_name = split_table(table, schema)
        point = parse_at(at, datetime.now(UTC))
        key = encode_primary_key(primary_key)
        changes = await self.store.row_changes(
            schema_name, table_name, key, at=point, context=context, database=database, limit=1
        )
        if not changes:
            await self.store.require_known_table(schema_name, table_name)
            return None
        _, state = list(row_states(changes))[-1]
        return state

    async def table_as_of(
        self,
        table: str,
        at: datetime | int | str,
        *,
        schema: str | None = None,
        batch_size: int = 1000,
        database: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield every row of the table as it was at `at` (see `as_of`), in primary key text order, under the
        table's columns of that moment (`columns_as_of`): the schema changes after a row's last change rename and
        drop its columns, and add those added without a default as None.

        Streams through a server-side cursor, so tables larger than memory are fine.
        """
        schema_name, table_name = split_table(table, schema)
        point = parse_at(at, datetime.now(UTC))
        await self.store.require_known_table(schema_name, table_name)
        where = ChangeFilter(FilterArgs(table=table_name, schema=schema_name, database=database)).where()
        where.add(at_condition(point, where))
        pool = await self.pool()
        async with pool.acquire() as conn:
            # Rows end at the last TRUNCATE or DROP TABLE; the schema changes since then apply to the rows before.
            end = await conn.fetchrow(
                f"""SELECT commit_lsn, ordinal FROM {CHANGES_SQL} WHERE {where.sql()}
                     AND operation IN ('TRUNCATE', 'DDL') AND (operation = 'TRUNCATE' OR NOT "after" ? 'columns')
                     ORDER BY commit_lsn DESC, ordinal DESC LIMIT 1""",
                *where.params,
            )
            after_lsn, after_ordinal = (end["commit_lsn"], end["ordinal"]) if end else (-1, -1)
            after = f"({where.param(after_lsn)}::bigint, {where.param(after_ordinal)}::integer)"
            schema_changes = [
                change_from_json(record["change"])
                for record in await conn.fetch(
                    f"""SELECT {SELECT_CHANGE} FROM {CHANGES_SQL} AS c WHERE {where.sql()}
                         AND operation IN ('TRUNCATE', 'DDL') AND operation = 'DDL'
                         AND "before" -> 'columns' IS DISTINCT FROM "after" -> 'columns'
                         AND (commit_lsn, ordinal) > {after} ORDER BY commit_lsn, ordinal""",
                    *where.params,
                )
            ]
            sql = f"""
                SELECT "after", commit_lsn, ordinal FROM (
                    SELECT DISTINCT ON (primary_key) primary_key, operation, "after"::text AS "after",
                           commit_lsn, ordinal
                      FROM {CHANGES_SQL}
                     WHERE {where.sql()} AND primary_key IS NOT NULL AND operation <> 'DDL'
                       AND (commit_lsn, ordinal) > {after}
                     ORDER BY primary_key, commit_lsn DESC, ordinal DESC
                ) AS last
                WHERE operation <> 'DELETE'
                ORDER BY primary_key
            """
            async with conn.transaction(readonly=True):
                cursor = conn.cursor(sql, *where.params, prefetch=batch_size)
                async for record in cursor:
                    row: dict[str, Any] | None = json.loads(record["after"])
                    position = (record["commit_lsn"], record["ordinal"])
                    for change in schema_changes:
                        if row is not None and (change.commit_lsn, change.ordinal) > position:
                            row = apply_schema_change(row, change)
                    if row is not None:
                        yield row

    async def columns_as_of(
        self, table: str, at: datetime | int | str, *, schema: str | None = None
    ) -> dict[str, Any] | None:
        """The table's columns at `at` (see `as_of`), as the stored schema changes describe them: `{name: {"type",
        "not_null", "number", "default"}}`. None when the table did not exist then (created later, or dropped).

        Read from the last schema change at or before `at`, else the first one after it (its `before`), else the
        table as it is now in this database: with no schema change stored, its columns have not changed since
        schema changes are recorded.
        """
        schema_name, table_name = split_table(table, schema)
        point = parse_at(at, datetime.now(UTC))
        await self.store.require_known_table(schema_name, table_name)
        where = ChangeFilter(FilterArgs(table=table_name, schema=schema_name, operation="DDL")).where()
        moment = at_condition(point, where)
        events = "operation IN ('TRUNCATE', 'DDL')"
        side = await (await self.pool()).fetchval(
            # The literal IN lets the planner use the table events' partial index (a parameter would not).
            f"""(SELECT "after"::text FROM {CHANGES_SQL} WHERE {where.sql()} AND {events} AND {moment}
                  ORDER BY commit_lsn DESC, ordinal DESC LIMIT 1)
                UNION ALL
                (SELECT "before"::text FROM {CHANGES_SQL} WHERE {where.sql()} AND {events} AND NOT ({moment})
                  ORDER BY commit_lsn, ordinal LIMIT 1)
                LIMIT 1""",
            *where.params,
        )
        if side is not None:
            return table_columns(json.loads(side))
        info = await fetch_table_info(await self.pool(), schema_name, table_name)
        if info is None:
            return None
        return {column.name: {"type": column.type_sql} for column in info.columns}

    async def blame(
        self,
        table: str,
        primary_key: PrimaryKey,
        *,
        schema: str | None = None,
        at: datetime | int | str | None = None,
        database: str | None = None,
    ) -> dict[str, Change]:
        """For each column of the row (now, or at `at`), the change that last set its value: its context says
        who and where. {} when the row does not exist (then or now)."""
        schema_name, table_name = split_table(table, schema)
        point = None if at is None else parse_at(at, datetime.now(UTC))
        key = encode_primary_key(primary_key)
        changes = await self.store.row_changes(schema_name, table_name, key, at=point, database=database)
        if not changes:
            await self.store.require_known_table(schema_name, table_name)
        return blame_columns(changes)

    # Reverting.

    async def revert(
        self,
        conn: asyncpg.Connection | None = None,
        *,
        change: Change | None = None,
        transaction: Change | int | None = None,
        context: Mapping[str, Any] | None = None,
        table: str | None = None,
        schema: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        dry_run: bool = False,
        force: bool = False,
    ) -> RevertPlan:
        """Undo one change, one transaction, or every change matching a context filter; return the plan.

        Exactly one of `change`, `transaction` (a Change of it, or its transaction id) and `context` selects what
        to undo; `table`, `schema`, `since`, `until` narrow a context selection. The plan restores each affected
        row to its state before the first selected change. If a row changed again afterwards (by a change not
        selected), the plan is refused with RevertConflictError unless `force=True`, which restores it anyway.

        With `dry_run=True` nothing is written: the plan's `statements` show the exact SQL and parameters. Otherwise
        the statements run in one transaction on `conn` (a connection to the tracked database; take it from the
        bemi pool so the revert is itself tracked, with a context saying what it reverted).
        """
        narrow = FilterArgs(table=table, schema=schema, since=since, until=until)
        plan = await plan_revert(self.store, conn, revert_selection(change, transaction, context, narrow), force=force)
        if not dry_run:
            if conn is None:
                raise QueryError("revert() needs conn=... (a connection to the tracked database) unless dry_run=True")
            await apply_plan(conn, plan)
        return plan

    # Read-your-writes.

    async def wait_for(
        self,
        lsn: int | str,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 (the issue asks for a bounded wait in one call)
        slot_name: str | None = None,
    ) -> int:
        """Wait until the worker has stored every transaction that committed before `lsn`; return its progress.

            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("UPDATE items SET ...")
                lsn = await bemi_asgi.current_lsn(conn)
            await bemi.wait_for(lsn)  # now history() includes the update

        Get `lsn` with `current_lsn(conn)` on the connection that wrote, after its COMMIT. Raises TimeoutError after
        `timeout` seconds. `slot_name` picks one worker (default: any of this database's). The rule:
        `bemi_asgi.history.wait`.
        """
        position = read_lsn(lsn) if isinstance(lsn, str) else lsn
        return await wait_for_lsn(
            await self.pool(), WORKER_STATE_SQL, STREAMS_SQL, position, timeout=timeout, slot_name=slot_name
        )
