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

Values the worker did not store are never written back: a masked value is stored as the mask marker (a known
value: written into a password column it would authenticate), a hashed one as its HMAC, an ignored one not at all.
The worker records its column rules in `bemi.tracking_rules` before it stores anything; a plan that would write such
a value, address a row by a hashed key, or re-create a row without an ignored column is refused, naming the
columns. A column counts as redacted when a recorded rule for the table (or a partitioned table it belongs to)
names it and its stored value has the redacted form (the marker, 64 hex digits, absent): a clear value of that form
is refused too, a redacted one is never written. Masked and ignored columns that a reverted UPDATE may have changed
are left as they are now (the history cannot say whether they changed).

Baselines (SNAPSHOT, stored by `bemi-asgi backfill`) record a row's state, not a change: they are never undone
(selecting one alone is an error, a selection that includes some leaves them out), and one stored after a selected
change is no conflict.

Note: TRUNCATE cannot be reverted this way (restore from `table_as_of`), nor changes of tables without a primary key.
Changes stored by a worker that did not record its rules (before `bemi.tracking_rules` existed) are not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import asyncpg

from .._exceptions import QueryError, RevertConflictError
from .._pgtext import quote_ident, quote_qualified
from ..capture.context import bemi_context
from .catalog import ColumnInfo, TableInfo, fetch_table_info
from .filters import ChangeFilter, FilterArgs, Where, require_aware
from .models import Change, Operation
from .replay import row_states
from .store import ChangeStore, history_grants

__all__ = [
    "RevertPlan",
    "RevertSelection",
    "RevertStatement",
    "apply_plan",
    "plan_revert",
    "revert_selection",
    "to_pg_text",
]

#: The context key a revert adds (over the caller's context) while it applies its statements.
CONTEXT_KEY = "bemi_revert"
#: Where the worker records the column rules of each run (destination_up.sql).
RULES_TABLE = "bemi.tracking_rules"
#: What a hashed value is stored as: HMAC-SHA256 in lower-case hex.
_HASH_FORM = re.compile(r"[0-9a-f]{64}")
#: A column's recorded redactions: ("ignore" | "mask" | "hash", the mask marker or None).
Redactions = Mapping[str, frozenset[tuple[str, str | None]]]


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


@dataclass(frozen=True, slots=True)
class RevertSelection:
    """What a revert undoes: one change, or the changes a filter matches; and its description for the context."""

    change: Change | None
    matching: ChangeFilter | None
    description: Mapping[str, Any]
    #: A transaction id given as an int: it must match a single transaction (ids wrap around).
    transaction_id: int | None = None


def revert_selection(
    change: Change | None,
    transaction: Change | int | None,
    context: Mapping[str, Any] | None,
    narrow: FilterArgs,
) -> RevertSelection:
    """Check the selectors of `Bemi.revert` (exactly one of change, transaction, context; `narrow` narrows the
    last two to a table or schema and a time range) and say what they select."""
    if sum(selector is not None for selector in (change, transaction, context)) != 1:
        raise QueryError("revert() takes exactly one of change=, transaction= or context= to select what to undo")
    if context is not None and not context:
        raise QueryError(
            "revert(context={}) is an empty selector, which would select every stored change: give the context keys "
            "of the writes to undo"
        )
    if change is not None:
        if not isinstance(change, Change):
            raise QueryError(f"change= takes a Change (from find or history), got {type(change).__name__}")
        return RevertSelection(change, None, {"change_id": change.id})
    description: dict[str, Any]
    if isinstance(transaction, Change):
        selection = ChangeFilter(narrow, commit_lsn=transaction.commit_lsn, caller="revert")
        description = {"transaction_id": transaction.transaction_id}
    elif transaction is not None:
        if isinstance(transaction, bool) or not isinstance(transaction, int):
            raise QueryError(f"transaction= takes a Change or a transaction id, got {type(transaction).__name__}")
        selection = ChangeFilter({**narrow, "transaction_id": transaction}, caller="revert")
        description = {"transaction_id": transaction}
    else:
        assert context is not None
        selection = ChangeFilter({**narrow, "context": context}, caller="revert")
        description = {"context": dict(context)}
    for bound, moment in (("since", narrow.get("since")), ("until", narrow.get("until"))):
        if moment is not None:
            description[bound] = require_aware(moment, bound).isoformat()
    return RevertSelection(None, selection, description, transaction if isinstance(transaction, int) else None)


async def _select(store: ChangeStore, chosen: RevertSelection) -> list[Change]:
    """The selected changes in commit order."""
    if chosen.change is not None:
        # Planned from the stored row, never from the object given (which anyone can build with any values).
        # Looked up by the exactly-once key, the primary key.
        by_key = Where()
        by_key.add(
            f"commit_lsn = {by_key.param(chosen.change.commit_lsn)}::bigint "
            f"AND ordinal = {by_key.param(chosen.change.ordinal)}::integer "
            f"AND stream = {by_key.param(chosen.change.stream)}::integer"
        )
        stored = await store.select(by_key)
        if not stored:
            raise QueryError(
                f"no stored change {chosen.change.id} (commit LSN {chosen.change.commit_lsn}, ordinal "
                f"{chosen.change.ordinal}): pass a Change from find or history"
            )
        return stored
    assert chosen.matching is not None
    selected = await store.select(chosen.matching.where())
    if chosen.transaction_id is not None and len({c.commit_lsn for c in selected}) > 1:
        raise QueryError(
            f"transaction id {chosen.transaction_id} matches several transactions (ids wrap around): pass "
            "transaction= a Change of the one to revert"
        )
    return selected


async def plan_revert(
    store: ChangeStore, conn: asyncpg.Connection | None, chosen: RevertSelection, *, force: bool
) -> RevertPlan:
    """Select the changes, check for conflicts and build the statements (see the module docstring)."""
    selected = await _select(store, chosen)
    description = dict(chosen.description)
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
        if item.operation is Operation.DDL:
            raise QueryError(
                f"change {item.id} is a schema change ({item.after.get('command_tag')}) of {item.schema_}."
                f"{item.table}, which revert cannot undo: write the migration that undoes it"
            )
        if item.primary_key is None:
            raise QueryError(f"{item.schema_}.{item.table} has no primary key: its changes cannot be reverted by row")
    # Each row's selected changes, rows ordered by their first selected change.
    rows: dict[tuple[str, str, str], list[Change]] = {}
    for item in selected:
        assert item.primary_key is not None
        rows.setdefault((item.schema_, item.table, item.primary_key), []).append(item)

    catalog = conn if conn is not None else await store.pool()
    tables: dict[tuple[str, str], TableInfo] = {}
    redactions: dict[tuple[str, str], Redactions] = {}
    selected_ids = {item.id for item in selected}
    conflicts: list[str] = []
    planned: list[tuple[Change, RevertStatement]] = []
    for (schema_name, table_name, key), row_changes in rows.items():
        first, last = row_changes[0], row_changes[-1]
        history = await store.row_changes(schema_name, table_name, key)
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
            redactions[(schema_name, table_name)] = await _redactions(store, catalog, first.database, info)
        redacted = redacted_values(
            tables[(schema_name, table_name)], current, target, redactions[schema_name, table_name]
        )
        if redacted:
            raise QueryError(
                f"revert refused: change {first.id} of {schema_name}.{table_name} row {key} needs values the worker "
                f"did not store, by the tracking rules: {', '.join(redacted)}. Restore this row another way"
            )
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
    _, state = list(row_states(history))[-1]
    return state


async def _redactions(
    store: ChangeStore, catalog: asyncpg.Connection | asyncpg.Pool, database: str, info: TableInfo
) -> Redactions:
    """The column rules recorded by the workers of `database` for this table (or a partitioned table it belongs
    to), strictest kind first within each recorded set, all sets together (when the rules changed, any of them)."""
    pool = await store.pool()
    if await pool.fetchval("SELECT to_regclass($1) IS NULL", RULES_TABLE):
        return {}
    with history_grants():
        records = await pool.fetch(f"SELECT rules::text AS rules FROM {RULES_TABLE} WHERE database = $1", database)
    if not records:
        return {}
    names = [f"{info.schema}.{info.name}"] + [
        row["name"]
        for row in await catalog.fetch(
            "SELECT n.nspname::text || '.' || c.relname::text AS name"
            " FROM pg_partition_ancestors(to_regclass(format('%I.%I', $1::text, $2::text))) a"
            " JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
            info.schema,
            info.name,
        )
    ]
    found: dict[str, set[tuple[str, str | None]]] = {}
    for record in records:
        rules = json.loads(record["rules"])
        kinds: dict[str, set[str]] = {"ignore": set(), "mask": set(), "hash": set()}
        for pattern, columns in rules.get("tables", []):
            if any(fnmatchcase(name, pattern) for name in names):
                for kind, names_of_kind in columns.items():
                    kinds.setdefault(kind, set()).update(names_of_kind)
        marker = rules.get("mask_marker")
        for column in kinds["ignore"] | kinds["mask"] | kinds["hash"]:
            # As the worker applies them: ignore over mask over hash.
            kind = "ignore" if column in kinds["ignore"] else "mask" if column in kinds["mask"] else "hash"
            found.setdefault(column, set()).add((kind, marker if kind == "mask" else None))
    return {column: frozenset(kinds_found) for column, kinds_found in found.items()}


def redacted_values(
    info: TableInfo, current: Mapping[str, Any] | None, target: Mapping[str, Any] | None, redactions: Redactions
) -> list[str]:
    """The columns whose stored values the statement from `current` to `target` would need but the worker did not
    store, each as `name (masked|hashed|ignored)`: values it writes, key values it addresses the row by, and
    columns a re-created row would lack."""
    if not redactions:
        return []
    found: dict[str, None] = {}

    def check(name: str, value: Any) -> None:
        for kind, marker in redactions.get(name, ()):
            if (kind == "mask" and value is not None and value == marker) or (
                kind == "hash" and isinstance(value, str) and _HASH_FORM.fullmatch(value)
            ):
                found[f"{name} ({kind}ed)"] = None

    if target is not None:
        for column in _written_columns(info, current, target):
            check(column.name, target[column.name])
        if current is None:
            for column in info.columns:
                kinds = {kind for kind, _ in redactions.get(column.name, ())}
                if column.name not in target and not column.generated and "ignore" in kinds:
                    found[f"{column.name} (ignored)"] = None
    if current is not None:
        for name in info.primary_key:
            check(name, current.get(name))
    return list(found)


def _written_columns(info: TableInfo, current: Mapping[str, Any] | None, target: Mapping[str, Any]) -> list[ColumnInfo]:
    """The columns a statement taking the row to `target` writes: all stored ones for an INSERT (current None),
    those that differ for an UPDATE. Generated columns are never written."""
    if current is None:
        return [column for column in info.columns if column.name in target and not column.generated]
    return [
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


def build_statement(
    info: TableInfo, key: str, current: Mapping[str, Any] | None, target: Mapping[str, Any] | None
) -> RevertStatement | None:
    """The statement taking the row from `current` to `target` (None: the row does not exist); None if equal."""
    table_sql = quote_qualified(info.schema, info.name)
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
        columns = _written_columns(info, None, target)
        overriding = " OVERRIDING SYSTEM VALUE" if any(column.identity_always for column in columns) else ""
        names = ", ".join(quote_ident(column.name) for column in columns)
        values = ", ".join(value(column, target[column.name]) for column in columns)
        sql = f"INSERT INTO {table_sql} ({names}){overriding} VALUES ({values})"
    elif target is None:
        sql = f"DELETE FROM {table_sql} WHERE {key_condition(current)}"
    else:
        changed = _written_columns(info, current, target)
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
