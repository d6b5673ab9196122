"""Change browser page latency on a large `bemi.changes`, against the bare find() the timeline page runs.

    python benchmarks/ui.py [--rows 20000] [--changes-per-row 10] [--iterations 300] [--dsn URL]

Fills `bemi.changes` like benchmarks/queries.py (rows x changes-per-row changes, contexts with a user id out of
1000 and a request id), then requests pages through httpx's ASGI transport (rendering included, no network) and
prints p50/p95 and the ratio to `find(limit=50)` (the timeline's own query) measured in the same run. The scoped
cases narrow every query to one user id, as a tenant scope would.
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

from bemi_asgi import Bemi, create_pool
from bemi_asgi.ui import allow_all, bemi_ui
from benchmarks import queries
from benchmarks._support import Result, asgi_client


async def fill(dsn: str, rows: int, per_row: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(queries.MIGRATION)
        if await conn.fetchval("SELECT count(*) FROM bemi.changes") != rows * per_row:
            await conn.execute("TRUNCATE bemi.changes")
            await conn.execute(queries.FILL, rows, per_row, queries.T0)
            await conn.execute("VACUUM ANALYZE bemi.changes")
        total = await conn.fetchval("SELECT count(*) FROM bemi.changes")
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    print(f"bemi.changes: {total:,} changes, PostgreSQL {version}")


async def run(dsn: str, rows: int, per_row: int, iterations: int) -> dict[str, float]:
    """Fill, request every page, print the table; each case's p50 in ms."""
    await fill(dsn, rows, per_row)
    pool = await create_pool(dsn, min_size=1, max_size=1)  # the app's own pool, as the README suggests
    bemi = Bemi(pool)
    rng = random.Random(42)
    span = rows * per_row

    def scope(request: Any) -> dict[str, int]:
        return {"user_id": int(request.headers["x-scope"])}

    open_ui = bemi_ui(bemi, authorize=allow_all)
    scoped_ui = bemi_ui(bemi, authorize=allow_all, scope=scope)
    client = asgi_client(open_ui)
    scoped = asgi_client(scoped_ui)

    async def page(on: httpx.AsyncClient, url: str, params: dict[str, str], headers: dict[str, str]) -> None:
        response = await on.get(url, params=params, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{url} {params} answered {response.status_code}")

    def row() -> str:
        return str(rng.randrange(rows))

    def moment() -> str:
        return (queries.T0 + timedelta(milliseconds=rng.randrange(span))).replace(tzinfo=None).isoformat()

    def user() -> str:
        return str(rng.randrange(1000))

    cases: dict[str, Callable[[], Awaitable[object]]] = {
        "baseline find(limit=50)": lambda: bemi.changes.find(limit=50),
        "GET / (timeline)": lambda: page(client, "/", {}, {}),
        "GET /?c.user_id=N": lambda: page(client, "/", {"c.user_id": user()}, {}),
        "GET /row": lambda: page(client, "/row", {"table": "items", "key": row()}, {}),
        "GET /row&at=": lambda: page(client, "/row", {"table": "items", "key": row(), "at": moment()}, {}),
        "GET /request": lambda: page(client, "/request", {"id": f"req-{rng.randrange(span // 5)}"}, {}),
        "scoped GET /": lambda: page(scoped, "/", {}, {"x-scope": user()}),
    }
    results = await queries.timed(cases, iterations)
    await client.aclose()
    await scoped.aclose()
    await pool.close()
    return report(results, iterations)


def report(results: dict[str, list[float]], iterations: int, width: int = 28) -> dict[str, float]:
    """Print each page's p50, p95 and p50 relative to the baseline find(); return each p50 in ms."""
    base = queries.p(results["baseline find(limit=50)"], 50)
    print(f"\n{iterations} sequential requests each, the pages taking turns, one pooled connection\n")
    print(f"{'page':{width}} {'p50 ms':>8} {'p95 ms':>8} {'p50 / find':>11}")
    for label, samples in results.items():
        p50, p95 = queries.p(samples, 50), queries.p(samples, 95)
        print(f"{label:{width}} {p50:8.2f} {p95:8.2f} {p50 / base:10.1f}x")
    return {label: queries.p(samples, 50) for label, samples in results.items()}


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: each page's p50 relative to the timeline's own find()."""
    rows, iterations = (5_000, 100) if quick else (20_000, 300)
    return queries.latency_results("ui", run, rows, iterations, "baseline find(limit=50)")


if __name__ == "__main__":
    queries.latency_main(__doc__.splitlines()[0], run, rows=20_000, iterations=300)
