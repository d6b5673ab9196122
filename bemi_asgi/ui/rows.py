"""The timeline's rows, written in Python: the browser's hot path.

A timeline page is fifty of these rows, each a dozen links, chips and shortened values. As Jinja macros they cost
more than everything else on the page (Jinja's per-call overhead, paid some thirty times a row), so the timeline
hands its whole table body to `TimelineRows`, which writes the same HTML with every value escaped. One page's
rows share their links' common parts (the filters' query string, each table's filter link), built once a page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from markupsafe import Markup

from ..history.filters import TRACE_ID_KEY
from ..history.models import Change, Operation, changed_columns
from ..history.refs import Refs
from .view import (
    CONTEXT_PARAM_PREFIX,
    TimelineFilters,
    context_value_text,
    json_text,
    query_text,
    schema_change_summary,
    shorten,
    time_texts,
    trace_id_of,
)

__all__ = ["Link", "TimelineRows"]

#: The page's link builder: a path and its query parameters to a URL under the browser's mount point.
Link = Callable[[str, Sequence[tuple[str, str]] | Mapping[str, str]], str]
#: The trace viewer's address of a trace id and span id, or None (no viewer configured).
ViewerLink = Callable[[str, Any], str | None]


def escape_text(text: str) -> str:
    """`text` escaped for HTML as markupsafe escapes it (the same five characters, the same entities), as a plain
    str: markupsafe's `escape` makes a `Markup` object of every value, which costs more than the escaping itself on
    the few hundred values of a page. (`tests/test_ui.py` checks the two agree.)"""
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#39;").replace('"', "&#34;")
    )


def schema_change_html(change: Change) -> str:
    """A schema change in a line (HTML)."""
    return f'<span class="schema-change">{escape_text(schema_change_summary(change))}</span>'


def _short_json(value: Any, limit: int) -> str:
    if type(value) is int:  # its JSON text is its digits, with nothing to escape (the commonest changed value)
        return shorten(str(value), limit)
    return escape_text(shorten(json_text(value), limit))


_IMAGE_OF = {Operation.CREATE: "after", Operation.SNAPSHOT: "after"}
#: Each operation's badge (the operations are fixed words), and its timeline cell.
OPERATION_BADGES = {
    op: f'<span class="op op-{escape_text(op.value)}">{escape_text(op.value)}</span>' for op in Operation
}
_OPERATION_CELL = {op: f"  <td>{badge}</td>\n" for op, badge in OPERATION_BADGES.items()}
_NEW = ' class="new"'
#: Context values that are their own chip's key (hashable, and equal only when their text is the same).
_SCALARS = frozenset({str, int, bool})
_NO_KEY = '<span class="muted">—</span>'
_NO_CONTEXT = '<span class="muted">no context</span>'


class TimelineRows:
    """Writes timeline rows with the browser's references, request-id key and trace viewer link."""

    def __init__(self, refs: Refs, request_id_key: str, viewer_link: ViewerLink) -> None:
        self.refs = refs
        self.request_id_key = request_id_key
        self.viewer_link = viewer_link

    def rows(self, link: Link, changes: Iterable[Change], filters: TimelineFilters, new: bool = False) -> Markup:
        """A timeline's table body: every change's row (`new`: marked as arrived over the live stream)."""
        page = _PageRows(self, link, filters)
        return Markup("".join([f"  {page.row(change, new)}" for change in changes]))

    def context_chips(self, link: Link, change: Change, filters: TimelineFilters) -> Markup:
        """The change's context pairs as chips: a request id links to its request, a trace id to its trace (and the
        trace viewer), any other pair filters by it."""
        return Markup(_PageRows(self, link, filters).context_chips(change))

    @staticmethod
    def summary(change: Change) -> str:
        """What the change did, in a line or three (HTML)."""
        if change.operation is Operation.TRUNCATE:
            return '<span class="muted">every row removed</span>'
        if change.operation is Operation.DDL:
            return schema_change_html(change)
        if change.operation is Operation.UPDATE:
            before, after = change.before, change.after
            names = list(changed_columns(before, after))
            if not names:
                return '<span class="muted">no value changed</span>'
            parts = [
                f'<div><b>{escape_text(name)}</b>: <span class="from">{_short_json(before.get(name), 40)}</span> → '
                f'<span class="to">{_short_json(after.get(name), 40)}</span></div>'
                for name in names[:3]
            ]
            if len(names) > 3:
                parts.append(f'<div class="muted">and {len(names) - 3} more</div>')
            return "\n".join(parts)
        image: dict[str, Any] = getattr(change, _IMAGE_OF.get(change.operation, "before"))
        plural = "" if len(image) == 1 else "s"
        return f'<span class="muted">{len(image)} field{plural}:</span> {_short_json(image, 70)}'


class _PageRows:
    """The rows of one page: its links' common parts, built once, and each row's HTML."""

    def __init__(self, rows: TimelineRows, link: Link, filters: TimelineFilters) -> None:
        self.rows = rows
        self.link = link
        self.filters = filters
        self._table_hrefs: dict[tuple[str, str], str] = {}
        #: The row link of each table (as HTML), but for the key, which comes last.
        self._row_hrefs: dict[tuple[str, str], str] = {}
        #: Each context pair's chip but a trace id's (pairs repeat from row to row: an endpoint, a user).
        self._chips: dict[tuple[str, type, Any], str] = {}
        self._filter_prefix: str | None = None
        self._transaction_prefix = link("/transaction/", ())
        self._transaction_cells: dict[int, str] = {}
        # Link prefixes are escaped once a page: what follows them is `query_text`'s output, whose characters
        # (letters, digits, `_.~-+%`) HTML leaves as they are.
        self._request_prefix = escape_text(link("/request", {"id": ""}))
        #: Each context key as HTML, and as a filter parameter's name (keys repeat from row to row).
        self._keys: dict[str, tuple[str, str]] = {}

    def row(self, change: Change, new: bool) -> str:
        refs, link = self.rows.refs, self.link
        anchor = escape_text(refs.change(change))
        transaction_cell = self._transaction_cells.get(change.transaction_id)
        if transaction_cell is None:  # the same for each change of a transaction (and sealing one costs)
            transaction = refs.transaction(change)
            transaction_cell = self._transaction_cells[change.transaction_id] = (
                f'  <td class="mono"><a href="{escape_text(self._transaction_prefix + transaction)}" '
                f'title="Every change of this transaction">{escape_text(refs.label(transaction))}</a></td>\n'
            )
        schema, table = change.schema_, change.table
        table_href = self._table_hrefs.get((schema, table))
        if table_href is None:
            table_href = escape_text(link("/", TimelineFilters(table=f"{schema}.{table}").params()))
            self._table_hrefs[(schema, table)] = table_href
        if change.primary_key is None:
            key = _NO_KEY
        else:
            row = self._row_hrefs.get((schema, table))
            if row is None:
                row = link("/row", {"schema": schema, "table": table, "key": ""})
                row = self._row_hrefs[(schema, table)] = escape_text(row)
            key = (
                f'<a href="{row}{query_text(change.primary_key)}#c{anchor}" title="History of this row">'
                f"{escape_text(shorten(change.primary_key, 30))}</a>"
            )
        exact, shown = time_texts(change.committed_at)  # a datetime's texts: digits and separators, nothing to escape
        return (
            f'<tr id="c{anchor}"{_NEW if new else ""}>\n'
            f'  <td class="time" title="{exact}">{shown}</td>\n'
            f"{_OPERATION_CELL[change.operation]}"
            f'  <td class="mono"><a href="{table_href}" title="Only this table">'
            f"{escape_text(table if schema == 'public' else f'{schema}.{table}')}</a></td>\n"
            f'  <td class="mono">{key}</td>\n'
            f'  <td class="summary">{self.rows.summary(change)}</td>\n'
            f"  <td>{self.context_chips(change)}</td>\n"
            f"{transaction_cell}</tr>\n"
        )

    def context_chips(self, change: Change) -> str:
        if not change.context:
            return _NO_CONTEXT
        chips = []
        for key, value in change.context.items():
            if key == TRACE_ID_KEY and trace_id_of(value):
                chips.append(self._trace_chip(value, change.context.get("span_id")))
                continue
            # By the value itself when it is text, an integer or a boolean, with its type (1 and True are equal keys):
            # its text is then written once a page.
            known = (key, type(value), value) if type(value) in _SCALARS else (key, object, context_value_text(value))
            chip = self._chips.get(known)
            if chip is None:
                text = context_value_text(value)
                chip = self._chips[known] = self._chip(key, value, text)
            chips.append(chip)
        return "".join(chips)

    def _chip(self, key: str, value: Any, text: str) -> str:
        """A context pair's chip: a request id links to its request, any other pair filters by it."""
        known = self._keys.get(key)
        if known is None:
            known = self._keys[key] = (escape_text(key), query_text(CONTEXT_PARAM_PREFIX + key))
        key_html, param = known
        text_html = escape_text(text)
        if key == self.rows.request_id_key:
            href, title = self._request_prefix + query_text(text), "Every change of this request"
        else:
            if key in self.filters.context:
                href = escape_text(self.link("/", self.filters.with_context(key, value).params()))
            else:  # the page's filters and this pair: the filters' part is the same for every chip
                href = f"{self._filters_href()}{param}={query_text(text)}"
            title = f"Filter by {key_html}={text_html}"
        return f'<a class="chip" href="{href}" title="{title}"><span class="k">{key_html}=</span>{text_html}</a>\n'

    def _trace_chip(self, trace_id: str, span_id: Any) -> str:
        """A trace id's chip, linking to its trace page, and to the trace viewer when there is one."""
        key_html, text_html = escape_text(TRACE_ID_KEY), escape_text(trace_id)
        href = escape_text(self.link("/trace/" + trace_id, ()))
        chip = (
            f'<a class="chip" href="{href}" title="Every change of this trace"><span class="k">{key_html}=</span>'
            f"{text_html}</a>\n"
        )
        viewer = self.rows.viewer_link(trace_id, span_id)
        if viewer:
            chip += (
                f'<a class="chip viewer" href="{escape_text(viewer)}" rel="noreferrer" '
                'title="Open this trace in the trace viewer">trace viewer ↗</a>\n'
            )
        return chip

    def _filters_href(self) -> str:
        """The timeline's link with the page's filters (first page), ready for one more parameter, as HTML."""
        if self._filter_prefix is None:
            params = self.filters.params(cursor=None)
            self._filter_prefix = escape_text(self.link("/", params) + ("&" if params else "?"))
        return self._filter_prefix
