"""The timeline's row, written in Python: the browser's hot path.

A timeline page is fifty of these rows, each a dozen links, chips and shortened values. As Jinja macros they cost
more than everything else on the page (Jinja's per-call overhead, paid some thirty times a row), so the
`timeline_row` macro hands over to `TimelineRows`, which writes the same HTML with every value escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from markupsafe import Markup, escape

from ..history.filters import TRACE_ID_KEY
from ..history.models import Change, Operation
from ..history.refs import Refs
from .view import (
    CONTEXT_PARAM_PREFIX,
    TimelineFilters,
    context_value_text,
    format_time,
    json_text,
    schema_change_summary,
    shorten,
    trace_id_of,
)

__all__ = ["Link", "TimelineRows"]

#: The page's link builder: a path and its query parameters to a URL under the browser's mount point.
Link = Callable[[str, Sequence[tuple[str, str]] | Mapping[str, str]], str]
#: The trace viewer's address of a trace id and span id, or None (no viewer configured).
ViewerLink = Callable[[str, Any], str | None]

_IMAGE_OF = {Operation.CREATE: "after", Operation.SNAPSHOT: "after"}


class TimelineRows:
    """Writes timeline rows with the browser's references, request-id key and trace viewer link."""

    def __init__(self, refs: Refs, request_id_key: str, viewer_link: ViewerLink) -> None:
        self.refs = refs
        self.request_id_key = request_id_key
        self.viewer_link = viewer_link

    def __call__(self, link: Link, change: Change, filters: TimelineFilters, new: bool = False) -> Markup:
        """One `<tr>` of the timeline (`new`: marked as arrived over the live stream)."""
        anchor = escape(self.refs.change(change))
        transaction = self.refs.transaction(change)
        table = change.table if change.schema_ == "public" else f"{change.schema_}.{change.table}"
        table_filter = TimelineFilters(table=f"{change.schema_}.{change.table}").params()
        if change.primary_key is None:
            key = Markup('<span class="muted">—</span>')
        else:
            row = link("/row", {"schema": change.schema_, "table": change.table, "key": change.primary_key})
            key = Markup(
                f'<a href="{escape(row)}#c{anchor}" title="History of this row">'
                f"{escape(shorten(change.primary_key, 30))}</a>"
            )
        operation = change.operation.value
        marker = ' class="new"' if new else ""
        return Markup(
            f'<tr id="c{anchor}"{marker}>\n'
            f'  <td class="time" title="{escape(change.committed_at.isoformat())}">'
            f"{escape(format_time(change.committed_at))}</td>\n"
            f'  <td><span class="op op-{escape(operation)}">{escape(operation)}</span></td>\n'
            f'  <td class="mono"><a href="{escape(link("/", table_filter))}" title="Only this table">'
            f"{escape(table)}</a></td>\n"
            f'  <td class="mono">{key}</td>\n'
            f'  <td class="summary">{self.summary(change)}</td>\n'
            f"  <td>{self.context_chips(link, change, filters)}</td>\n"
            f'  <td class="mono"><a href="{escape(link("/transaction/" + transaction, ()))}" '
            f'title="Every change of this transaction">{escape(self.refs.label(transaction))}</a></td>\n'
            "</tr>\n"
        )

    @staticmethod
    def summary(change: Change) -> Markup:
        """What the change did, in a line or three."""
        if change.operation is Operation.TRUNCATE:
            return Markup('<span class="muted">every row removed</span>')
        if change.operation is Operation.DDL:
            return Markup(f'<span class="schema-change">{escape(schema_change_summary(change))}</span>')
        if change.operation is Operation.UPDATE:
            diff = change.diff
            if not diff:
                return Markup('<span class="muted">no value changed</span>')
            parts = [
                f'<div><b>{escape(name)}</b>: <span class="from">{escape(shorten(json_text(field.before), 40))}'
                f'</span> → <span class="to">{escape(shorten(json_text(field.after), 40))}</span></div>'
                for name, field in list(diff.items())[:3]
            ]
            if len(diff) > 3:
                parts.append(f'<div class="muted">and {len(diff) - 3} more</div>')
            return Markup("\n".join(parts))
        image: dict[str, Any] = getattr(change, _IMAGE_OF.get(change.operation, "before"))
        plural = "" if len(image) == 1 else "s"
        return Markup(f'<span class="muted">{len(image)} field{plural}:</span> {escape(shorten(json_text(image), 70))}')

    def context_chips(self, link: Link, change: Change, filters: TimelineFilters) -> Markup:
        """The change's context pairs as chips: a request id links to its request, a trace id to its trace (and the
        trace viewer), any other pair filters by it."""
        if not change.context:
            return Markup('<span class="muted">no context</span>')
        chips = []
        base = None
        for key, value in change.context.items():
            text = context_value_text(value)
            key_html, text_html = escape(key), escape(text)
            viewer = None
            if key == self.request_id_key:
                href, title = link("/request", {"id": text}), "Every change of this request"
            elif key == TRACE_ID_KEY and trace_id_of(value):
                href, title = link("/trace/" + value, ()), "Every change of this trace"
                viewer = self.viewer_link(value, change.context.get("span_id"))
            else:
                if key in filters.context:
                    params = filters.with_context(key, value).params()
                else:  # the same parameters, without building new filters for every chip
                    base = filters.params(cursor=None) if base is None else base
                    params = [*base, (CONTEXT_PARAM_PREFIX + key, text)]
                href, title = link("/", params), f"Filter by {key_html}={text_html}"
            chips.append(f'<a class="chip" href="{escape(href)}" title="{title}">')
            chips.append(f'<span class="k">{key_html}=</span>{text_html}</a>\n')
            if viewer:
                chips.append(
                    f'<a class="chip viewer" href="{escape(viewer)}" rel="noreferrer" '
                    'title="Open this trace in the trace viewer">trace viewer ↗</a>\n'
                )
        return Markup("".join(chips))
