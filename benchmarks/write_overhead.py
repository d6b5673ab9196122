"""What carrying the context costs: plain asyncpg pool vs the bemi pool with a context set, same run.

    python -m benchmarks.write_overhead [--dsn postgresql://...] [--seconds 0.2] [--rounds 40] [--fsync]

Without --dsn (or $BEMI_BENCH_DSN) it starts a throwaway local PostgreSQL (wal_level=logical; fsync off unless
--fsync). Each workload runs for --seconds per round on both pools, alternating which goes first, for --rounds
rounds. A round's ratio is the bemi pool's transactions over the plain pool's in that round, measured back to back,
so the load other processes put on the machine, which drifts over seconds, weighs on both alike; the figure is the
median of the rounds' ratios, printed with their interquartile range (the spread). Targets: single-row insert
transactions >= 0.95x at 8 connections, read-only transactions and autocommit reads >= 0.97x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import asyncpg

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bemi_asgi
from benchmarks._support import DURABLE, Result, throwaway_server

Pool = Any  # asyncpg.Pool of either connection class
T = TypeVar("T")
Work = Callable[[asyncpg.Connection, int], Awaitable[None]]
CONTEXT = {"user_id": 12345, "endpoint": "POST /orders", "request_id": "3f2b9c1e-8a4d-4e0b-9c7a-1d2e3f4a5b6c"}


async def write_transaction(conn: asyncpg.Connection, i: int) -> None:
    async with conn.transaction():
        await conn.execute("INSERT INTO bench (v, note) VALUES ($1, 'x')", i)


async def read_transaction(conn: asyncpg.Connection, i: int) -> None:
    async with conn.transaction():
        await conn.fetchval("SELECT v FROM bench WHERE id = $1", i % 1000 + 1)


async def declared_read_only_transaction(conn: asyncpg.Connection, i: int) -> None:
    async with conn.transaction(readonly=True):
        await conn.fetchval("SELECT v FROM bench WHERE id = $1", i % 1000 + 1)


async def autocommit_write(conn: asyncpg.Connection, i: int) -> None:
    await conn.execute("INSERT INTO bench (v, note) VALUES ($1, 'x')", i)


async def autocommit_read(conn: asyncpg.Connection, i: int) -> None:
    await conn.fetchval("SELECT v FROM bench WHERE id = $1", i % 1000 + 1)


async def measure(pool: Pool, work: Work, connections: int, seconds: float, with_context: bool) -> int:
    """Run `work` on `connections` concurrent workers for `seconds`; return the transactions done."""
    deadline = time.perf_counter() + seconds
    counts = [0] * connections

    async def worker(n: int) -> None:
        i = n
        while time.perf_counter() < deadline:
            async with pool.acquire() as conn:
                await work(conn, i)
            i += connections
            counts[n] += 1

    async def run_all() -> None:
        await asyncio.gather(*(worker(n) for n in range(connections)))

    if with_context:
        with bemi_asgi.bemi_context(CONTEXT):
            await run_all()
    else:
        await run_all()
    return sum(counts)


class Ratio(NamedTuple):
    """A workload's bemi/plain ratio: the median over rounds, with the first and third quartiles."""

    median: float
    low: float
    high: float


async def bench(dsn: str, seconds: float, rounds: int) -> list[tuple[str, int, Ratio, float]]:
    """Each workload's name, connections, bemi/plain ratio and the plain pool's transactions per second."""
    setup = await asyncpg.connect(dsn)
    await setup.execute(
        "DROP TABLE IF EXISTS bench; CREATE TABLE bench (id bigserial PRIMARY KEY, v int, note text);"
        "ALTER TABLE bench REPLICA IDENTITY FULL;"
        "INSERT INTO bench (v) SELECT g FROM generate_series(1, 1000) g;"
    )
    await setup.close()
    workloads: list[tuple[str, Work, int]] = [
        ("write transaction", write_transaction, 1),
        ("write transaction", write_transaction, 8),
        ("read-only transaction", read_transaction, 1),
        ("read-only transaction", read_transaction, 8),
        ("READ ONLY transaction", declared_read_only_transaction, 8),
        ("autocommit write", autocommit_write, 8),
        ("autocommit read", autocommit_read, 8),
    ]
    plain = await asyncpg.create_pool(dsn, min_size=8, max_size=8)
    tracked = await bemi_asgi.create_pool(dsn, min_size=8, max_size=8)
    results = []
    try:
        for name, work, connections in workloads:
            # Warm both pools' statement caches and the server before counting.
            await measure(plain, work, connections, 0.2, False)
            await measure(tracked, work, connections, 0.2, True)
            plain_total, ratios = 0, []
            for r in range(rounds):
                order = [("plain", plain, False), ("bemi", tracked, True)]
                done = {}
                for label, pool, with_context in order if r % 2 == 0 else reversed(order):
                    done[label] = await measure(pool, work, connections, seconds, with_context)
                plain_total += done["plain"]
                ratios.append(done["bemi"] / done["plain"])
            low, median, high = statistics.quantiles(ratios, n=4)
            ratio = Ratio(median, low, high)
            per_second = plain_total / (seconds * rounds)
            print(
                f"{name:<22} {connections} conn: plain {per_second:8.0f} tx/s  "
                f"ratio {ratio.median:.3f}x (rounds' quartiles {ratio.low:.3f}-{ratio.high:.3f})",
                flush=True,
            )
            results.append((name, connections, ratio, per_second))
    finally:
        await plain.close()
        await tracked.close()
    return results


def with_server(run: Callable[[str], T], settings: Mapping[str, str] | None = None) -> T:
    """Run `run(dsn)` against a throwaway local PostgreSQL (with `settings` over its defaults)."""
    with throwaway_server(settings) as server:
        print(f"PostgreSQL {server.version}, local throwaway cluster, {settings or 'fsync off'}", flush=True)
        return run(server.dsn())


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: the bemi pool's throughput relative to a plain asyncpg pool."""
    seconds, rounds = (0.2, 12) if quick else (0.2, 40)
    measured = with_server(lambda dsn: asyncio.run(bench(dsn, seconds, rounds)))
    return [
        Result(
            "write_overhead",
            f"{name}, {connections} conn",
            f"{per_second:,.0f} tx/s plain, rounds {ratio.low:.2f}-{ratio.high:.2f}x",
            ratio.median,
            "plain asyncpg pool",
        )
        for name, connections, ratio, per_second in measured
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("BEMI_BENCH_DSN"), help="an existing database (wal_level=logical)"
    )
    parser.add_argument("--seconds", type=float, default=0.2, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds per workload")
    parser.add_argument("--fsync", action="store_true", help="the throwaway server with fsync on, as in production")
    args = parser.parse_args()
    if args.dsn:
        asyncio.run(bench(args.dsn, args.seconds, args.rounds))
        return
    with_server(lambda dsn: asyncio.run(bench(dsn, args.seconds, args.rounds)), DURABLE if args.fsync else None)


if __name__ == "__main__":
    main()
