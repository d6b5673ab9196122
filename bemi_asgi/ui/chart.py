"""The overview's chart and table, laid out for the template: stacked bars of changes per time bucket (one colour
per operation, drawn as SVG by the server, no script) and the changes per table and operation.

Pure geometry over `bemi_asgi.history.activity.Activity`; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from ..history.activity import Activity
from .view import OPERATIONS

__all__ = ["Bar", "Chart", "TableRow", "Tick", "chart", "table_rows"]

WIDTH, HEIGHT = 960, 220
#: Room for the count labels on the left and the time labels below.
LEFT, BOTTOM, TOP = 48, 22, 8
X_LABELS = 6


@dataclass(frozen=True)
class Bar:
    """One operation's part of one bucket's bar."""

    x: float
    y: float
    width: float
    height: float
    operation: str
    start: datetime
    changes: int


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    baseline: float
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]


@dataclass(frozen=True)
class TableRow:
    """A table's changes in the period per operation, and its bar's share of the busiest table's."""

    table: str
    per_operation: dict[str, int]
    total: int
    share: float


def chart(activity: Activity) -> Chart:
    """Stacked bars, one per bucket from `since` to `until`, scaled to the busiest bucket."""
    buckets = max(1, math.ceil((activity.until - activity.since) / activity.bucket))
    per_bucket: dict[datetime, dict[str, int]] = {}
    for (start, _schema, _table, operation), changes in activity.counts.items():
        slot = per_bucket.setdefault(start, {})
        slot[operation] = slot.get(operation, 0) + changes
    peak = _round_up(max((sum(ops.values()) for ops in per_bucket.values()), default=0))
    plot_width, plot_height = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    step = plot_width / buckets
    baseline = float(TOP + plot_height)
    bars: list[Bar] = []
    for start, ops in sorted(per_bucket.items()):
        index = round((start - activity.since) / activity.bucket)
        y = baseline
        for operation in OPERATIONS:
            changes = ops.get(operation, 0)
            if not changes:
                continue
            height = plot_height * changes / peak
            y -= height
            bars.append(Bar(LEFT + index * step + 1, y, max(step - 2, 1), height, operation, start, changes))
    y_ticks = [Tick(baseline - plot_height * part / 4, f"{peak * part // 4:,}") for part in range(5)]
    every = max(1, math.ceil(buckets / X_LABELS))
    x_ticks = [
        Tick(LEFT + index * step, _time_label(activity.since + activity.bucket * index, activity))
        for index in range(0, buckets, every)
    ]
    return Chart(WIDTH, HEIGHT, LEFT, baseline, bars, y_ticks, x_ticks)


def table_rows(activity: Activity) -> list[TableRow]:
    """Each table's changes per operation, busiest first."""
    tables: dict[str, dict[str, int]] = {}
    for (_start, schema, table, operation), changes in activity.counts.items():
        name = table if schema == "public" else f"{schema}.{table}"
        slot = tables.setdefault(name, {})
        slot[operation] = slot.get(operation, 0) + changes
    busiest = max((sum(ops.values()) for ops in tables.values()), default=1)
    rows = [TableRow(name, ops, sum(ops.values()), sum(ops.values()) / busiest) for name, ops in tables.items()]
    return sorted(rows, key=lambda row: (-row.total, row.table))


def _round_up(peak: int) -> int:
    """A scale top at or above `peak` that splits into four round steps (4, 8, 20, 40, 80, 200, ...)."""
    if peak <= 4:
        return 4
    magnitude: int = 10 ** (len(str(peak)) - 1)
    for factor in (1, 2, 4, 5, 8, 10):
        top = factor * magnitude
        if top >= peak and top % 4 == 0:
            return top
    return 4 * -(-peak // 4)


def _time_label(moment: datetime, activity: Activity) -> str:
    moment = moment.astimezone(UTC)
    if activity.bucket.days >= 1:
        return moment.strftime("%b %d")
    if activity.until - activity.since > activity.bucket * 24 and activity.bucket.seconds >= 3600:
        return moment.strftime("%b %d %H:%M")
    return moment.strftime("%H:%M")
