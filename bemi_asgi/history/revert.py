"""Undoing stored changes: plan the statements first, then apply them in one transaction.

The plan restores each affected row to its state before the first selected change of that row, starting from the
row's latest stored state: an INSERT if the row is gone, a DELETE if it did not exist before, otherwise an UPDATE of
the columns that differ. Rows are handled in reverse commit order of their last selected change, so a child row
inserted after its parent is deleted before it.

A row that changed again after a selected change, by a change that is not selected, is a conflict: the revert is
refused unless forced (then the row is still restored to its state before the selection, undoing the later change
too). The check reads the stored history: a write the worker has not stored yet is not seen, so `wait_for` it first.
When applied, every statement must touch exactly one row, or the whole revert rolls back.

SQL safety: identifiers are quoted, every value is a query parameter passed as text, and cast to the column's type
read from the catalog (`$1::text::integer`): the values come back exactly as the worker stored them. JSON values are
written in PostgreSQL's text form: json documents for json/jsonb columns, array literals for arrays.

Baselines (SNAPSHOT, stored by `bemi-asgi backfill`) record a row's state, not a change: they are never undone
(selecting one alone is an error, a selection that includes some leaves them out), and one stored after a selected
change is no conflict.

Note: TRUNCATE cannot be reverted this way (restore from `table_as_of`), nor changes of tables without a primary key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from .._exceptions import QueryError, RevertConflictError
from ..capture.context import bemi_context
from .catalog import ColumnInfo, TableInfo, fetch_table_info
from .changes import SELECT_COLUMNS
from .filters import Where, json_param, quote_ident, require_aware, split_table
from .models import Change, Operation, change_from_record

if TYPE_CHECKING:
    from .client import Bemi

__all__ = ["RevertPlan", "RevertStatement", "apply_plan", "plan_revert", "to_pg_text"]

#: The context key a revert adds (over the caller's context) while it applies its statements.
CONTEXT_KEY = "bemi_revert"


@dataclass(frozen=True, slots=True)
class RevertStatement:
    """One statement of a plan: SQL with $n placeholders and its parameters (PostgreSQL text forms)."""

    sql: str
    params: tuple[str | None, ...]
    schema: str
    table: str
    primary_key: str


@dataclass(frozen=True, slots=True)
class RevertPlan:
    """What a revert undoes and how: the selected changes, the statements, and conflicts overridden by force."""

    changes: tuple[Change, ...]
    statements: tuple[RevertStatement, ...]
    conflicts: tuple[str, ...] = ()
    description: Mapping[str, Any] = field(default_factory=dict)


def to_pg_text(value: Any, column: ColumnInfo) -> str | None:
    """A stored JSON value in the PostgreSQL text form the column's type reads back."""
    if value is None:
        return None
    if column.is_json:
        return json.dumps(value, ensure_ascii=False)
    if column.is_array and isinstance(value, list):
        return _array_literal(value, column.element_is_json)
    return _scalar_text(value)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def _array_literal(items: list[Any], element_is_json: bool) -> str:
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list) and not element_is_json:
            parts.append(_array_literal(item, element_is_json))
        else:
            text = json.dumps(item, ensure_ascii=False) if element_is_json else _scalar_text(item)
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"


async def _select(
    bemi: Bemi,
    change: Change | None,
    transaction: Change | int | None,
    context: Mapping[str, Any] | None,
    table: str | None,
    schema: str | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[list[Change], dict[str, Any]]:
    """The selected changes in commit order, and a description of the selection for the revert's context."""
    if sum(selector is not None for selector in (change, transaction, context)) != 1:
        raise QueryError("revert() takes exactly one of change=, transaction= or context= to select what to undo")
    if change is not None:
        if not isinstance(change, Change):
            raise QueryError(f"change= takes a Change (from find or history), got {type(change).__name__}")
        return [change], {"change_id": change.id}
    where = Where()
    description: dict[str, Any]
    if transaction is not None:
        if isinstance(transaction, Change):
            where.add(f"commit_lsn = {where.param(transaction.commit_lsn)}::bigint")
            description = {"transaction_id": transaction.transaction_id}
        elif isinstance(transaction, int) and not isinstance(transaction, bool):
            where.add(f"transaction_id = {where.param(transaction)}::bigint")
            description = {"transaction_id": transaction}
        else:
            raise QueryError(f"transaction= takes a Change or a transaction id, got {type(transaction).__name__}")
    else:
        assert context is not None
        where.add(f"context @> {where.param(json_param(context, 'context'))}::jsonb")
        description = {"context": dict(context)}
    if table is not None:
        schema_name, table_name = split_table(table, schema)
        where.add(f'"schema" = {where.param(schema_name)} AND "table" = {where.param(table_name)}')
    elif schema is not None:
        where.add(f'"schema" = {where.param(schema)}')
    if since is not None:
        where.add(f"committed_at >= {where.param(require_aware(since, 'since'))}")
        description["since"] = since.isoformat()
    if until is not None:
        where.add(f"committed_at < {where.param(require_aware(until, 'until'))}")
        description["until"] = until.isoformat()
    pool = await bemi.pool()
    records = await pool.fetch(
        f"SELECT {SELECT_COLUMNS} FROM {bemi.changes_table_sql} WHERE {where.sql()} ORDER BY commit_lsn, ordinal",
        *where.params,
    )
    selected = [change_from_record(record) for record in records]
    if isinstance(transaction, int) and len({c.commit_lsn for c in selected}) > 1:
        raise QueryError(
            f"transaction id {transaction} matches several transactions (ids wrap around): pass transaction= a "
            "Change of the one to revert"
        )
    return selected, description


async def plan_revert(
    bemi: Bemi,
    conn: asyncpg.Connection | None,
    *,
    change: Change | None,
    transaction: Change | int | None,
    context: Mapping[str, Any] | None,
    table: str | None,
    schema: str | None,
    since: datetime | None,
    until: datetime | None,
    force: bool,
) -> RevertPlan:
    """Select the changes, check for conflicts and build the statements (see the module docstring)."""
    selected, description = await _select(bemi, change, transaction, context, table, schema, since, until)
    baselines = sum(item.operation is Operation.SNAPSHOT for item in selected)
    if baselines:
        if baselines == len(selected):
            raise QueryError(
                "nothing to revert: the selection holds only baselines (SNAPSHOT, stored by bemi-asgi backfill), "
                "which record a row's state and undo nothing; select the changes to undo instead"
            )
        selected = [item for item in selected if item.operation is not Operation.SNAPSHOT]
        description["baselines_left_out"] = baselines
    for item in selected:
        if item.operation is Operation.TRUNCATE:
            raise QueryError(
                f"change {item.id} is a TRUNCATE of {item.schema_}.{item.table}, which revert cannot undo: "
                "restore the rows from bemi.table_as_of(...) instead"
            )
        if item.primary_key is None:
            raise QueryError(f"{item.schema_}.{item.table} has no primary key: its changes cannot be reverted by row")
    # Each row's selected changes, rows ordered by their first selected change.
    rows: dict[tuple[str, str, str], list[Change]] = {}
    for item in selected:
        assert item.primary_key is not None
        rows.setdefault((item.schema_, item.table, item.primary_key), []).append(item)

    catalog = conn if conn is not None else await bemi.pool()
    tables: dict[tuple[str, str], TableInfo] = {}
    selected_ids = {item.id for item in selected}
    conflicts: list[str] = []
    planned: list[tuple[Change, RevertStatement]] = []
    for (schema_name, table_name, key), row_changes in rows.items():
        first, last = row_changes[0], row_changes[-1]
        history = await bemi._row_changes(schema_name, table_name, key, None)
        later = [
            item
            for item in history
            if (item.commit_lsn, item.ordinal) > (first.commit_lsn, first.ordinal)
            and item.id not in selected_ids
            and item.operation is not Operation.SNAPSHOT
        ]
        if later:
            conflicts.append(
                f"{schema_name}.{table_name} row {key} changed again after change {first.id}: "
                + ", ".join(f"{item.operation.value} in change {item.id}" for item in later)
            )
        current = _state_after(history)
        if first.operation is Operation.CREATE:
            target = None
        elif not first.before:
            raise QueryError(
                f"change {first.id} of {schema_name}.{table_name} stores no old row image, so it cannot be "
                "reverted: set REPLICA IDENTITY FULL on the table (bemi-asgi sql-migration does)"
            )
        else:
            target = dict(first.before)
        if (schema_name, table_name) not in tables:
            info = await fetch_table_info(catalog, schema_name, table_name)
            if info is None:
                raise QueryError(f"table {schema_name}.{table_name} does not exist in the database being reverted")
            if not info.primary_key:
                raise QueryError(f"{schema_name}.{table_name} has no primary key now: cannot address its rows")
            tables[(schema_name, table_name)] = info
        statement = build_statement(tables[(schema_name, table_name)], key, current, target)
        if statement is not None:
            planned.append((last, statement))
    if conflicts and not force:
        raise RevertConflictError(
            "revert refused, rows changed again after the changes to revert: "
            + "; ".join(conflicts)
            + ". Pass force=True to restore them anyway (undoing the later changes too)"
        )
    planned.sort(key=lambda pair: (pair[0].commit_lsn, pair[0].ordinal), reverse=True)
    description["change_ids"] = [item.id for item in selected[:100]]
    description["changes"] = len(selected)
    return RevertPlan(
        changes=tuple(selected),
        statements=tuple(statement for _, statement in planned),
        conflicts=tuple(conflicts),
        description=description,
    )


def _state_after(history: Sequence[Change]) -> dict[str, Any] | None:
    if not history:
        return None
    last = history[-1]
    return None if last.operation in (Operation.DELETE, Operation.TRUNCATE) else dict(last.after)


def build_statement(
    info: TableInfo, key: str, current: Mapping[str, Any] | None, target: Mapping[str, Any] | None
) -> RevertStatement | None:
    """The statement taking the row from `current` to `target` (None: the row does not exist); None if equal."""
    table_sql = f"{quote_ident(info.schema)}.{quote_ident(info.name)}"
    params: list[str | None] = []

    def value(column: ColumnInfo, item: Any) -> str:
        params.append(to_pg_text(item, column))
        return f"${len(params)}::text::{column.type_sql}"

    def key_condition(row: Mapping[str, Any]) -> str:
        parts = []
        for name in info.primary_key:
            column = info.column(name)
            assert column is not None
            if name not in row:
                raise QueryError(f"the stored row of {info.schema}.{info.name} {key} lacks key column {name}")
            parts.append(f"{quote_ident(name)} = {value(column, row[name])}")
        return " AND ".join(parts)

    if current is None and target is None:
        return None
    if current is None:
        assert target is not None
        columns = [column for column in info.columns if column.name in target and not column.generated]
        overriding = " OVERRIDING SYSTEM VALUE" if any(column.identity_always for column in columns) else ""
        names = ", ".join(quote_ident(column.name) for column in columns)
        values = ", ".join(value(column, target[column.name]) for column in columns)
        sql = f"INSERT INTO {table_sql} ({names}){overriding} VALUES ({values})"
    elif target is None:
        sql = f"DELETE FROM {table_sql} WHERE {key_condition(current)}"
    else:
        changed = [
            column
            for column in info.columns
            if column.name in target
            and not column.generated
            and (
                column.name not in current
                or current[column.name] != target[column.name]
                or type(current[column.name]) is not type(target[column.name])
            )
        ]
        if not changed:
            return None
        assignments = ", ".join(
            f"{quote_ident(column.name)} = {value(column, target[column.name])}" for column in changed
        )
        sql = f"UPDATE {table_sql} SET {assignments} WHERE {key_condition(current)}"
    return RevertStatement(sql, tuple(params), info.schema, info.name, key)


async def apply_plan(conn: asyncpg.Connection, plan: RevertPlan) -> None:
    """Run the plan's statements in one transaction, with the revert described in the Bemi context."""
    if not plan.statements:
        return
    with bemi_context({CONTEXT_KEY: dict(plan.description)}):
        async with conn.transaction():
            for statement in plan.statements:
                status = await conn.execute(statement.sql, *statement.params)
                if not status.endswith(" 1"):
                    raise RevertConflictError(
                        f"revert rolled back: {statement.sql.split(' ', 1)[0]} of {statement.schema}."
                        f"{statement.table} row {statement.primary_key} touched {status.rsplit(' ', 1)[-1]} rows "
                        "instead of 1: the row is not as the stored history says (a write not stored yet?)"
                    )
