"""A change's diff table, written in Python: every row, transaction, request and trace page shows one per change.

As Jinja macros (a macro per table, per field and per value cell) a page of a hundred changes cost ten times its
queries; `DiffTables` writes the same table, every value escaped, and the `diff_table` macro hands over to it.
"""

from __future__ import annotations

from markupsafe import Markup

from ..history.models import Change, Operation
from ..history.refs import Refs
from .rows import Link, escape_text
from .view import FieldRow, field_rows

__all__ = ["DiffTables"]

_MARKS = {"changed": "~", "added": "+", "removed": "\u2212", "same": ""}
_COLUMNS = '<colgroup><col class="mark"><col class="field"><col><col></colgroup>'
_ABSENT = '<span class="none">absent</span>'


class DiffTables:
    """Writes a change's fields as the diff table: the changed ones, then the unchanged ones folded away."""

    def __init__(self, refs: Refs) -> None:
        self.refs = refs

    def __call__(self, link: Link, change: Change) -> Markup:
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
