"""What happened in a period: changes counted per time bucket, table and operation, and the context values (users,
endpoints) behind the most changes. The change browser's overview page draws it.

One query answers all of it (grouping sets over one scan) and reads at most MAX_COUNTED changes, the period's
latest, found through the filter's indexes (`committed_at` for the period, the context GIN index for a scope or a
context filter): its cost follows the changes in the period up to that bound, never the table's size. A period
holding more is counted from its latest MAX_COUNTED changes, and `Activity.counted_since` says from when.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .filters import ChangeFilter, FilterArgs, require_aware
from .store import CHANGES_SQL, ChangeStore

__all__ = ["BUCKETS", "Activity", "TopValue", "activity", "bucket_for"]

#: The bucket widths a period is drawn with, the narrowest that keeps it within MAX_BUCKETS bars.
BUCKETS = tuple(
    timedelta(**unit)
    for unit in (
        {"minutes": 1},
        {"minutes": 5},
        {"minutes": 15},
        {"hours": 1},
        {"hours": 3},
        {"hours": 6},
        {"days": 1},
        {"days": 7},
        {"days": 30},
    )
)
MAX_BUCKETS = 96
#: The context values listed per key.
TOP_VALUES = 5
#: The most changes one overview reads (measured: `python -m benchmarks --only overview`).
MAX_COUNTED = 50_000


@dataclass(frozen=True)
class TopValue:
    """A context value (its JSON text) and how many of the period's changes carry it."""

    value: str
    changes: int


@dataclass(frozen=True)
class Activity:
    """Counts for a period `[since, until)` cut into buckets of `bucket` from `since`."""

    since: datetime
    until: datetime
    bucket: timedelta
    #: (bucket start, schema, table, operation) -> changes.
    counts: dict[tuple[datetime, str, str, str], int] = field(default_factory=dict)
    #: context key -> its values behind the most changes, most first.
    top: dict[str, list[TopValue]] = field(default_factory=dict)
    #: When the period held more than MAX_COUNTED changes: the oldest counted one's time (earlier ones are not).
    counted_since: datetime | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def bucket_for(since: datetime, until: datetime) -> timedelta:
    """The narrowest bucket width that cuts the period into at most MAX_BUCKETS buckets."""
    span = until - since
    return next((width for width in BUCKETS if span / width <= MAX_BUCKETS), BUCKETS[-1])


async def activity(
    store: ChangeStore,
    filters: FilterArgs,
    *,
    since: datetime,
    until: datetime,
    keys: Sequence[str],
    limit: int = MAX_COUNTED,
) -> Activity:
    """Count the changes matching `filters` committed in `[since, until)` (which replace the filters' own period),
    per bucket, table and operation, and the top TOP_VALUES values (JSON text) of each context key in `keys`; at
    most `limit` changes, the latest."""
    since, until = require_aware(since, "since"), require_aware(until, "until")
    width = bucket_for(since, until)
    selection = ChangeFilter(FilterArgs(**{**filters, "since": since, "until": until}), caller="overview")
    where = selection.where()
    values = [f"context -> {where.param(key)}::text AS v{i}" for i, key in enumerate(keys)]
    bucket = f"date_bin({where.param(width)}::interval, committed_at, {where.param(since)}::timestamptz)"
    per_value = "".join(f"GROUPING(v{i}) AS not_v{i}, v{i}::text, " for i in range(len(keys)))
    sets = ", ".join(['(bucket, "schema", "table", operation)', *(f"(v{i})" for i in range(len(keys))), "()"])
    # With a context filter (a scope, a user) the GIN index finds the few matching changes, which are then sorted;
    # ordering by the bare column would have the planner walk the committed_at index through every change of the
    # period looking for them (measured: 5x slower than counting all of them, at 1M).
    latest = "committed_at + interval '0' DESC" if filters.get("context") else "committed_at DESC"
    sql = f"""
        WITH counted AS (
            SELECT committed_at, "schema", "table", operation{"".join(", " + value for value in values)}
              FROM {CHANGES_SQL} WHERE {where.sql()}
             ORDER BY {latest} LIMIT {where.param(limit)})
        SELECT GROUPING(bucket) AS not_chart, {per_value}
               bucket, "schema", "table", operation, count(*) AS changes, min(committed_at) AS oldest
          FROM (SELECT *, {bucket} AS bucket FROM counted) AS c
         GROUP BY GROUPING SETS ({sets})
    """
    async with store.reading() as conn:
        records = await conn.fetch(sql, *where.params)
    counts: dict[tuple[datetime, str, str, str], int] = {}
    found: dict[str, list[TopValue]] = {key: [] for key in keys}
    total, oldest = 0, None
    for record in records:
        if record["not_chart"] == 0:
            counts[(record["bucket"], record["schema"], record["table"], record["operation"])] = record["changes"]
            continue
        per_key = [i for i in range(len(keys)) if record[f"not_v{i}"] == 0]
        if per_key:
            value = record[f"v{per_key[0]}"]
            if value is not None:  # changes without the key
                found[keys[per_key[0]]].append(TopValue(value, record["changes"]))
        else:
            total, oldest = record["changes"], record["oldest"]
    top = {
        key: sorted(items, key=lambda item: (-item.changes, item.value))[:TOP_VALUES] for key, items in found.items()
    }
    return Activity(since, until, width, counts, top, oldest if total >= limit else None)
