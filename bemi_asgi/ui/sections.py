"""A change's section on the row, transaction, request and trace pages, written in Python: its header and its diff
table.

As Jinja macros (a macro per header, table, field and value cell) a page of a hundred changes cost ten times its
queries; `ChangeSections` writes the same HTML, every value escaped. The group pages hand it their whole list, the
row page (which has a header of its own) its diff tables through the `diff_table` macro.
"""

from __future__ import annotations

from collections.abc import Iterable

from markupsafe import Markup

from ..history.models import Change, Operation
from ..history.refs import Refs
from .rows import Link, TimelineRows, escape_text
from .view import FieldRow, TimelineFilters, field_rows, format_time, schema_change_summary

__all__ = ["ChangeSections"]

_MARKS = {"changed": "~", "added": "+", "removed": "\u2212", "same": ""}
_COLUMNS = '<colgroup><col class="mark"><col class="field"><col><col></colgroup>'
_ABSENT = '<span class="none">absent</span>'


_NO_FILTERS = TimelineFilters()


class ChangeSections:
    """Writes changes as sections (a header, then the diff table), with the browser's references and chips."""

    def __init__(self, refs: Refs, rows: TimelineRows) -> None:
        self.refs = refs
        self.rows = rows

    def sections(self, link: Link, changes: Iterable[Change], *, with_database: bool) -> Markup:
        """A section per change (`with_database`: the header names each change's database, as on a trace page,
        whose changes may come from several)."""
        return Markup(
            "".join(
                f'<section class="step" id="c{escape_text(self.refs.change(change))}">\n'
                f"{self.header(link, change, with_database)}{self.diff_table(link, change)}</section>\n"
                for change in changes
            )
        )

    def header(self, link: Link, change: Change, with_database: bool) -> str:
        """What, where, when, in which context and transaction."""
        operation = escape_text(change.operation.value)
        schema, table = change.schema_, change.table
        place = escape_text(table if schema == "public" else f"{schema}.{table}")
        if with_database:
            place = f"{escape_text(change.database)} · {place}"
        if change.primary_key is not None:
            row = link("/row", {"schema": schema, "table": table, "key": change.primary_key})
            place += (
                f' <a href="{escape_text(row)}#c{escape_text(self.refs.change(change))}" title="History of this row">'
                f"{escape_text(change.primary_key)}</a>"
            )
        summary = ""
        if change.operation is Operation.DDL:
            summary = f'<span class="schema-change">{escape_text(schema_change_summary(change))}</span>'
        transaction = self.refs.transaction(change)
        return (
            f'<header>\n  <span class="op op-{operation}">{operation}</span>\n'
            f'  <span class="mono">{place}</span>\n{summary}'
            f'  <span class="time mono" title="{change.committed_at.isoformat()}">{format_time(change.committed_at)}'
            f"</span>\n  <span>{self.rows.context_chips(link, change, _NO_FILTERS)}</span>\n"
            f'  <span class="right"><a href="{escape_text(link("/transaction/" + transaction, ()))}" '
            f'title="Every change of this transaction">transaction {escape_text(self.refs.label(transaction))}</a>'
            "</span>\n</header>\n"
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
