"""The change browser's overview page on a large `bemi.changes`, against the bare find() the timeline runs.

    python benchmarks/overview.py [--rows 100000] [--changes-per-row 10] [--iterations 30] [--dsn URL]

Fills `bemi.changes` like benchmarks/queries.py (1M changes by default, all committed within 17 minutes: every one
falls in the overview's period, its worst case), then requests /overview for that period through httpx's ASGI
transport (query and SVG rendering, no network): the whole history (the page counts the period's latest
`MAX_COUNTED`), one user's changes as a filter (1 user in 1000), and under a scope of one user. Prints p50/p95
and the ratio to `find(limit=50)` measured in the same run.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_asgi import Bemi
from bemi_asgi.history.activity import MAX_COUNTED
from bemi_asgi.ui import allow_all, bemi_ui
from benchmarks import queries, ui
from benchmarks._support import Result, asgi_client


async def run(dsn: str, rows: int, per_row: int, iterations: int) -> dict[str, float]:
    """Fill, request each case, print the table; each case's p50 in ms."""
    await ui.fill(dsn, rows, per_row)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    bemi = Bemi(pool)
    rng = random.Random(42)
    period = {
        "since": queries.T0.replace(tzinfo=None).isoformat(),
        "until": (queries.T0 + timedelta(milliseconds=rows * per_row)).replace(tzinfo=None).isoformat(),
    }

    def scope(request: Any) -> dict[str, int]:
        return {"user_id": int(request.headers["x-scope"])}

    open_ui = bemi_ui(bemi, authorize=allow_all, overview_keys=("user_id", "endpoint"))
    scoped_ui = bemi_ui(bemi, authorize=allow_all, scope=scope, overview_keys=("user_id", "endpoint"))
    client = asgi_client(open_ui)
    scoped = asgi_client(scoped_ui)

    async def page(on: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str]) -> None:
        response = await on.get("/overview", params={**period, **params}, headers=headers)
        if response.status_code != 200 or '<rect class="bar' not in response.text:
            raise RuntimeError(f"/overview {params} answered {response.status_code} without a chart")

    def user() -> str:
        return str(rng.randrange(1000))

    cases: dict[str, Callable[[], Awaitable[object]]] = {
        "baseline find(limit=50)": lambda: bemi.changes.find(limit=50),
        f"GET /overview (every change, latest {MAX_COUNTED:,} counted)": lambda: page(client, {}, {}),
        "GET /overview?c.user_id=N": lambda: page(client, {"c.user_id": user()}, {}),
        "scoped GET /overview": lambda: page(scoped, {}, {"x-scope": user()}),
    }
    results = await queries.timed(cases, iterations)
    await client.aclose()
    await scoped.aclose()
    await pool.close()
    return ui.report(results, iterations, width=50)


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: the overview's p50 relative to the timeline's own find()."""
    rows, iterations = (20_000, 10) if quick else (100_000, 30)
    return queries.latency_results("overview", run, rows, iterations, "baseline find(limit=50)")


if __name__ == "__main__":
    queries.latency_main(__doc__.splitlines()[0], run, rows=100_000, iterations=30)
