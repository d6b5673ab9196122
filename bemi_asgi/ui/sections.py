"""A change's section on the row, transaction, request and trace pages, written in Python: its header and its diff
table.

As Jinja macros (a macro per header, table, field and value cell) a page of a hundred changes cost ten times its
queries; `ChangeSections` writes the same HTML, every value escaped. The group pages hand it their whole list, the
row page its steps (a header of their own, linking to the row's state after each).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from markupsafe import Markup

from ..history.models import Change, Operation
from ..history.refs import Refs
from .rows import OPERATION_BADGES, Link, TimelineRows, escape_text, schema_change_html
from .view import FieldRow, TimelineFilters, field_rows, moment_param, time_texts

__all__ = ["ChangeSections"]

_MARKS = {"changed": "~", "added": "+", "removed": "\u2212", "same": ""}
_COLUMNS = '<colgroup><col class="mark"><col class="field"><col><col></colgroup>'
_ABSENT = '<span class="none">absent</span>'


_NO_FILTERS = TimelineFilters()
#: What a row page's step offers no revert of: these change no single row.
_NOT_REVERTIBLE = frozenset({Operation.TRUNCATE, Operation.SNAPSHOT, Operation.DDL})


def _moment(change: Change) -> str:
    """When the change was committed (a datetime's texts: digits and separators, nothing to escape)."""
    exact, shown = time_texts(change.committed_at)
    return f'<span class="time mono" title="{exact}">{shown}</span>'


class ChangeSections:
    """Writes changes as sections (a header, then the diff table), with the browser's references and chips."""

    def __init__(self, refs: Refs, rows: TimelineRows) -> None:
        self.refs = refs
        self.rows = rows

    def sections(self, link: Link, changes: Iterable[Change], *, with_database: bool) -> Markup:
        """A section per change (`with_database`: the header names each change's database, as on a trace page,
        whose changes may come from several)."""
        parts = []
        for change in changes:
            anchor = escape_text(self.refs.change(change))  # sealed once: the section's id and its row link's anchor
            parts.append(
                f'<section class="step" id="c{anchor}">\n'
                f"{self.header(link, change, anchor, with_database)}{self.diff_table(link, change)}</section>\n"
            )
        return Markup("".join(parts))

    def row_steps(
        self,
        link: Link,
        steps: Sequence[tuple[Change, Any]],
        *,
        schema: str,
        table: str,
        key: str,
        effective: Change | None,
        at: datetime | None,
        can_revert: bool,
    ) -> Markup:
        """A row page's history: a section per change (newest first), the one in effect marked, those after `at`
        marked as future, each linking to the row's state after it (`key` is the page's: a TRUNCATE or a schema
        change names no row)."""
        refs = self.refs
        row_params = {"schema": schema, "table": table, "key": key}
        parts = []
        for change, _state in steps:
            anchor = escape_text(refs.change(change))
            in_effect = effective is not None and change.id == effective.id
            classes = "step" + (" effective" if in_effect else "")
            if at is not None and change.committed_at > at:
                classes += " future"
            summary = schema_change_html(change) if change.operation is Operation.DDL else ""
            badge = ""
            if in_effect:
                badge = f'<span class="badge">in effect{" at the chosen moment" if at is not None else ""}</span>'
            transaction = refs.transaction(change)
            revert = ""
            if can_revert and change.operation not in _NOT_REVERTIBLE:
                href = link(
                    "/revert",
                    {
                        "change": refs.change(change),
                        "transaction": transaction,
                        "schema": change.schema_,
                        "table": change.table,
                        "key": change.primary_key,  # type: ignore[dict-item]  # a row's change names its row
                    },
                )
                revert = f'<a class="undo" href="{escape_text(href)}">Revert…</a> ·'
            after = escape_text(link("/row", {**row_params, "at": moment_param(change.committed_at)}))
            parts.append(
                f'<section class="{classes}" id="c{anchor}">\n  <header>\n'
                f"    {OPERATION_BADGES[change.operation]}\n{summary}    {_moment(change)}\n"
                f"{badge}    <span>{self.rows.context_chips(link, change, _NO_FILTERS)}</span>\n"
                f'    <span class="right">\n{revert}      <a href="{after}#as-of">state after this</a> ·\n'
                f"      {self._transaction_link(link, transaction)}\n"
                f"    </span>\n  </header>\n  {self.diff_table(link, change)}\n</section>\n"
            )
        return Markup("".join(parts))

    def header(self, link: Link, change: Change, anchor: str, with_database: bool) -> str:
        """What, where, when, in which context and transaction (`anchor`: the change's section id, escaped)."""
        schema, table = change.schema_, change.table
        place = escape_text(table if schema == "public" else f"{schema}.{table}")
        if with_database:
            place = f"{escape_text(change.database)} · {place}"
        if change.primary_key is not None:
            row = link("/row", {"schema": schema, "table": table, "key": change.primary_key})
            place += (
                f' <a href="{escape_text(row)}#c{anchor}" title="History of this row">'
                f"{escape_text(change.primary_key)}</a>"
            )
        summary = schema_change_html(change) if change.operation is Operation.DDL else ""
        return (
            f"<header>\n  {OPERATION_BADGES[change.operation]}\n"
            f'  <span class="mono">{place}</span>\n{summary}  {_moment(change)}\n'
            f"  <span>{self.rows.context_chips(link, change, _NO_FILTERS)}</span>\n"
            f'  <span class="right">{self._transaction_link(link, self.refs.transaction(change))}</span>\n</header>\n'
        )

    def _transaction_link(self, link: Link, transaction: str) -> str:
        """A link to the page of the transaction whose reference is `transaction`."""
        return (
            f'<a href="{escape_text(link("/transaction/" + transaction, ()))}" '
            f'title="Every change of this transaction">transaction {escape_text(self.refs.label(transaction))}</a>'
        )

    def diff_table(self, link: Link, change: Change) -> Markup:
        """The change's fields: the changed ones, then the unchanged ones folded away."""
        fields = field_rows(change)
        shown = [row for row in fields if row.status != "same"]
        same = [row for row in fields if row.status == "same"]
        parts = []
        if shown:
            parts.append(
                f'<table class="diff">\n  {_COLUMNS}\n'
                "  <thead><tr><th></th><th>Field</th><th>Before</th><th>After</th></tr></thead>\n  <tbody>\n"
            )
            parts += [self._row(link, change, row) for row in shown]
            parts.append("  </tbody>\n</table>\n")
        elif change.operation is Operation.TRUNCATE:
            parts.append('<p class="notice">The table was truncated: every row was removed.</p>\n')
        else:
            parts.append('<p class="notice">No value changed.</p>\n')
        if same:
            parts.append(
                f'<details class="unchanged">\n  <summary>{len(same)} unchanged field{"" if len(same) == 1 else "s"}'
                f'</summary>\n  <table class="diff">\n    {_COLUMNS}\n    <tbody>\n'
            )
            parts += [self._row(link, change, row) for row in same]
            parts.append("    </tbody>\n  </table>\n</details>\n")
        return Markup("".join(parts))

    def _row(self, link: Link, change: Change, row: FieldRow) -> str:
        return (
            f'<tr class="{row.status}">\n'
            f'  <td class="mark" title="{row.status}">{_MARKS[row.status]}</td>\n'
            f'  <td class="field">{escape_text(row.name)}</td>\n'
            f"  {self._cell(link, change, row.name, 'before', row.before, row.before_cut)}\n"
            f"  {self._cell(link, change, row.name, 'after', row.after, row.after_cut)}\n"
            "</tr>\n"
        )

    def _cell(self, link: Link, change: Change, name: str, side: str, text: str | None, cut: bool) -> str:
        """A value's cell: its (shortened) JSON text, with a link to the full value when it was cut."""
        if text is None:
            return f'<td class="value {side}">{_ABSENT}</td>'
        full = ""
        if cut:
            href = link(
                "/value",
                {
                    "schema": change.schema_,
                    "table": change.table,
                    "key": change.primary_key if change.primary_key is not None else "",
                    "transaction": self.refs.transaction(change),
                    "id": self.refs.change(change),
                    "field": name,
                    "side": side,
                },
            )
            full = f' <a class="full" href="{escape_text(href)}">full value</a>'
        return f'<td class="value {side}">{escape_text(text)}{full}</td>'
