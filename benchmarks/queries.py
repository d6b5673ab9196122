"""Query-helper latency on a large `bemi.changes`: history, as_of and find(context=...) p50 for one row.

    python benchmarks/queries.py [--rows 100000] [--changes-per-row 10] [--iterations 2000] [--dsn URL]

Fills `bemi.changes` (the shipped migration, indexes included) with rows x changes-per-row changes (1M by default)
in one INSERT ... SELECT generate_series: each row gets a CREATE then UPDATEs, interleaved across the table in
commit order as real traffic is (a row's changes are far apart on disk), five changes per transaction, contexts
with a user id (1000 users) and a request id. Then it times each helper sequentially through one asyncpg pool and
prints absolute p50/p95 and the ratio to a bare `SELECT 1` round trip through the same pool, measured in the same
run. The last case creates the opt-in B-tree on the context key `user_id` (`context_index_sql`), times
find(context=user) again, and drops it. Without --dsn it starts a throwaway local PostgreSQL (the test suite's) and
removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_asgi import Bemi, create_pool
from bemi_asgi.history.store import context_index_sql
from bemi_asgi.ops.migration import load_sql
from benchmarks._support import Result, in_turn, throwaway_server

MIGRATION = load_sql("destination_up.sql")
T0 = datetime(2025, 1, 1, tzinfo=UTC)

FILL = """
INSERT INTO bemi.changes (primary_key, "before", "after", context, database, "schema", "table", operation,
                          committed_at, queued_at, transaction_id, position, commit_lsn, ordinal, stream)
SELECT r::text,
       CASE WHEN n = 0 THEN '{}'::jsonb
            ELSE jsonb_build_object('id', r, 'name', 'item ' || r, 'qty', n - 1, 'note', repeat('x', 40)) END,
       jsonb_build_object('id', r, 'name', 'item ' || r, 'qty', n, 'note', repeat('x', 40)),
       jsonb_build_object('user_id', g % 1000, 'request_id', 'req-' || (g / 5), 'endpoint', 'PATCH /items'),
       'app', 'public', 'items', CASE WHEN n = 0 THEN 'CREATE' ELSE 'UPDATE' END,
       $3::timestamptz + g * interval '1 millisecond', $3::timestamptz + g * interval '1 millisecond',
       1000 + g / 5, (g / 5) * 4096 + (g % 5) * 64, (g / 5) * 4096 + 1024, g % 5, 1
  FROM generate_series(0, $1::int * $2::int - 1) AS g,
       LATERAL (SELECT g % $1::int AS r, g / $1::int AS n) AS k
"""

USER_INDEX_SIZE = "SELECT pg_size_pretty(pg_relation_size('bemi.changes_context_user_id_idx'))"


async def timed(cases: dict[str, Callable[[], Awaitable[object]]], iterations: int) -> dict[str, list[float]]:
    """Each case's call times in ms. The cases take turns, one call each per round (from a different first case
    every round), so that they share the machine's fast and slow spells and their ratios hold within a run."""
    for _ in range(min(50, iterations)):  # warm the pool's statement caches and the buffer cache
        for fn in cases.values():
            await fn()
    samples: dict[str, list[float]] = {label: [] for label in cases}
    turns = list(cases.items())
    for round_number in range(iterations):
        for label, fn in in_turn(turns, round_number):
            start = time.perf_counter()
            await fn()
            samples[label].append((time.perf_counter() - start) * 1000)
    return samples


def p(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1] if q != 50 else statistics.median(samples)


async def run(dsn: str, rows: int, per_row: int, iterations: int) -> dict[str, float]:
    """Fill, time every case, print the table; each case's p50 in ms."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(MIGRATION)
        if await conn.fetchval("SELECT count(*) FROM bemi.changes") != rows * per_row:
            await conn.execute("TRUNCATE bemi.changes")
            start = time.perf_counter()
            await conn.execute(FILL, rows, per_row, T0)
            await conn.execute("VACUUM ANALYZE bemi.changes")
            print(f"filled {rows * per_row:,} changes in {time.perf_counter() - start:.1f} s", flush=True)
        total = await conn.fetchval("SELECT count(*) FROM bemi.changes")
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('bemi.changes'))")
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    print(f"bemi.changes: {total:,} changes, {size} with indexes, PostgreSQL {version}")

    pool = await create_pool(dsn, min_size=1, max_size=1)  # the app's own pool, as the README suggests
    bemi = Bemi(pool)
    plain_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    plain = Bemi(plain_pool)
    rng = random.Random(42)
    span = rows * per_row  # milliseconds of history

    def any_row() -> int:
        return rng.randrange(rows)

    def any_time() -> datetime:
        return T0 + timedelta(milliseconds=rng.randrange(span))

    cases: dict[str, Callable[[], Awaitable[object]]] = {
        "baseline SELECT 1": lambda: pool.fetchval("SELECT 1"),
        "history(row)": lambda: bemi.history("items", any_row()),
        "as_of(row, at=time)": lambda: bemi.as_of("items", any_row(), at=any_time()),
        "blame(row)": lambda: bemi.blame("items", any_row()),
        "find(context=user, limit=20)": lambda: bemi.changes.find(context={"user_id": rng.randrange(1000)}, limit=20),
        "find(context=request)": lambda: bemi.changes.find(context={"request_id": f"req-{rng.randrange(span // 5)}"}),
        "find(table, row)": lambda: bemi.changes.find(table="items", primary_key=any_row(), limit=20),
        # What the reset query asyncpg sends when a connection goes back costs: a plain pool resets after every read.
        "history(row), plain asyncpg pool": lambda: plain.history("items", any_row()),
    }
    results = await timed(cases, iterations)
    await pool.execute(context_index_sql("user_id", concurrently=False))
    await pool.execute("ANALYZE bemi.changes")
    print(f"the user_id index: {await pool.fetchval(USER_INDEX_SIZE)}")
    indexed = Bemi(pool)  # a store that reads the catalog's indexes afresh
    label = "find(context=user, limit=20), user_id index"
    find_user = {label: lambda: indexed.changes.find(context={"user_id": rng.randrange(1000)}, limit=20)}
    results |= await timed(find_user, iterations)
    await pool.execute("DROP INDEX bemi.changes_context_user_id_idx")
    await pool.close()
    await plain_pool.close()
    base = p(results["baseline SELECT 1"], 50)
    print(f"\n{iterations} sequential calls each, the cases taking turns, one pooled connection\n")
    print(f"{'query':44} {'p50 ms':>8} {'p95 ms':>8} {'p50 / SELECT 1':>15}")
    for label, samples in results.items():
        print(f"{label:44} {p(samples, 50):8.3f} {p(samples, 95):8.3f} {p(samples, 50) / base:14.1f}x")
    history, as_of = p(results["history(row)"], 50), p(results["as_of(row, at=time)"], 50)
    print(f"\ntargets: history p50 < 2 ms: {history:.3f} ms ({'ok' if history < 2 else 'MISSED'}); "
          f"as_of p50 < 5 ms: {as_of:.3f} ms ({'ok' if as_of < 5 else 'MISSED'})")  # fmt: skip
    return {label: p(samples, 50) for label, samples in results.items()}


Run = Callable[[str, int, int, int], Awaitable[dict[str, float]]]
_SETTINGS = {"shared_buffers": "'256MB'"}


def latency_results(benchmark: str, run: Run, rows: int, iterations: int, baseline: str) -> list[Result]:
    """Run a latency benchmark (`run(dsn, rows, changes_per_row, iterations)` -> p50 ms per case) on a throwaway
    server, as `Result` lines relative to its `baseline` case."""
    with throwaway_server(_SETTINGS) as server:
        p50 = asyncio.run(run(server.dsn(), rows, 10, iterations))
    base = p50[baseline]
    return [
        Result(
            benchmark,
            f"{label} on {rows * 10:,} changes",
            f"p50 {ms:.3f} ms",
            None if label == baseline else ms / base,
            baseline.removeprefix("baseline "),
        )
        for label, ms in p50.items()
    ]


def latency_main(description: str, run: Run, *, rows: int, iterations: int) -> None:
    """The command line of a latency benchmark: sizes, and an existing database or a throwaway server."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--changes-per-row", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--dsn", help="an existing database to fill and query (default: a throwaway server)")
    args = parser.parse_args()
    if args.dsn:
        asyncio.run(run(args.dsn, args.rows, args.changes_per_row, args.iterations))
        return
    with throwaway_server(_SETTINGS) as server:
        asyncio.run(run(server.dsn(), args.rows, args.changes_per_row, args.iterations))


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: p50 of each helper relative to a bare `SELECT 1` round trip
    (`quick`: 200k stored changes instead of 1M, fewer calls)."""
    rows, iterations = (20_000, 300) if quick else (100_000, 2000)
    return latency_results("queries", run, rows, iterations, "baseline SELECT 1")


if __name__ == "__main__":
    latency_main(__doc__.splitlines()[0], run, rows=100_000, iterations=2000)
