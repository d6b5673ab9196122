"""Replaying one row's changes in commit order: its state after them, and which change set each column.

Pure functions over `Change` lists that hold the row's own changes and its table's TRUNCATEs, in commit order.
A TRUNCATE ends the row's existence like a DELETE; a later CREATE starts it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .models import Change, Operation

__all__ = ["blame_columns", "row_states", "without_idle_truncates"]


def row_states(changes: Iterable[Change]) -> Iterator[tuple[Change, dict[str, Any] | None]]:
    """Yield each change with the row as it was right after it (None: the row did not exist)."""
    state: dict[str, Any] | None = None
    for change in changes:
        state = None if change.operation in (Operation.DELETE, Operation.TRUNCATE) else dict(change.after)
        yield change, state


def without_idle_truncates(changes: Iterable[Change]) -> list[Change]:
    """Drop the table's TRUNCATEs that happened while the row did not exist: they are not part of its history."""
    kept: list[Change] = []
    exists = False
    for change in changes:
        if change.operation is Operation.TRUNCATE:
            if exists:
                kept.append(change)
            exists = False
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
