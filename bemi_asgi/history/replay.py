"""Replaying one row's changes in commit order: its state after them, and which change set each column.

Pure functions over `Change` lists that hold the row's own changes and its table's TRUNCATEs and schema changes
(DDL), in commit order. A TRUNCATE ends the row's existence like a DELETE; a later CREATE starts it again. A schema
change renames and drops the row's columns, adds a column without a default as None (what PostgreSQL gives the
existing rows), and a DROP TABLE ends the row. A column added with a default is left out until a change of the row
stores its value: the history does not know what the default gave it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .models import Change, Operation

__all__ = [
    "ColumnChanges",
    "apply_schema_change",
    "blame_columns",
    "column_changes",
    "row_states",
    "table_columns",
    "without_idle_truncates",
]


@dataclass(frozen=True, slots=True)
class ColumnChanges:
    """What a schema change did to its table's columns."""

    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    #: (old name, new name)
    renamed: tuple[tuple[str, str], ...] = ()
    #: (name, old type, new type)
    retyped: tuple[tuple[str, str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.dropped or self.renamed or self.retyped)


def table_columns(definition: Mapping[str, Any]) -> dict[str, Any] | None:
    """The columns of a stored table definition (a DDL change's `before` or `after`); None: no table."""
    columns = definition.get("columns")
    return dict(columns) if isinstance(columns, Mapping) else None


def column_changes(change: Change) -> ColumnChanges:
    """The columns a DDL change added, dropped, renamed or retyped; columns match by number across a RENAME."""
    before = table_columns(change.before) or {}
    after = table_columns(change.after) or {}
    by_number = {column.get("number"): name for name, column in after.items()}
    renamed, dropped, retyped, kept = [], [], [], set()
    for name, column in before.items():
        new_name = by_number.get(column.get("number"))
        if new_name is None:
            dropped.append(name)
            continue
        kept.add(new_name)
        if new_name != name:
            renamed.append((name, new_name))
        if after[new_name].get("type") != column.get("type"):
            retyped.append((new_name, str(column.get("type")), str(after[new_name].get("type"))))
    added = tuple(name for name in after if name not in kept)
    return ColumnChanges(added, tuple(dropped), tuple(renamed), tuple(retyped))


def apply_schema_change(state: dict[str, Any], change: Change) -> dict[str, Any] | None:
    """The row `state` under the columns a DDL change left (None after DROP TABLE)."""
    after = table_columns(change.after)
    if after is None:
        return None
    found = column_changes(change)
    renames = dict(found.renamed)
    row = {renames.get(name, name): value for name, value in state.items() if name not in found.dropped}
    for name in found.added:
        if "default" not in after[name]:
            row[name] = None
    return row


def row_states(changes: Iterable[Change]) -> Iterator[tuple[Change, dict[str, Any] | None]]:
    """Yield each change with the row as it was right after it (None: the row did not exist)."""
    state: dict[str, Any] | None = None
    for change in changes:
        if change.operation is Operation.DDL:
            state = None if state is None else apply_schema_change(state, change)
        else:
            state = None if change.operation in (Operation.DELETE, Operation.TRUNCATE) else dict(change.after)
        yield change, state


def without_idle_truncates(changes: Iterable[Change]) -> list[Change]:
    """Drop the table's TRUNCATEs and schema changes that happened while the row did not exist, and the schema
    changes that left its columns as they were (an index, a constraint): they are not part of its history."""
    kept: list[Change] = []
    exists = False
    for change in changes:
        if change.operation is Operation.TRUNCATE:
            if exists:
                kept.append(change)
            exists = False
            continue
        if change.operation is Operation.DDL:
            if exists and (table_columns(change.after) is None or column_changes(change)):
                kept.append(change)
                exists = table_columns(change.after) is not None
            continue
        kept.append(change)
        exists = change.operation is not Operation.DELETE
    return kept


def blame_columns(changes: Iterable[Change]) -> dict[str, Change]:
    """For each column of the row's final state, the change that last set its value; {} if the row is gone.

    A CREATE sets every column. An UPDATE sets the columns whose value differs from the row's previous state (the
    state replayed so far, which also covers an UPDATE stored without a full `before` image).
    """
    setters: dict[str, Change] = {}
    previous: dict[str, Any] | None = None
    for change, state in row_states(changes):
        if state is None:
            setters = {}
        elif change.operation is Operation.DDL:
            # Values keep the change that set them under their new names; a column the DDL added is its own.
            renames = dict(column_changes(change).renamed)
            moved = {renames.get(name, name): setter for name, setter in setters.items()}
            setters = {name: moved.get(name, change) for name in state}
        elif change.operation is Operation.CREATE or previous is None:
            setters = dict.fromkeys(state, change)
        else:
            old = {**previous, **change.before} if change.before else previous
            setters = {name: setters[name] for name in state if name in setters}
            for name, value in state.items():
                if name not in old or old[name] != value or type(old[name]) is not type(value):
                    setters[name] = change
        previous = state
    return setters
