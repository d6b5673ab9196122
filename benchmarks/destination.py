"""The destination's ceiling: COPY into `bemi.changes` with nothing else running, and what each index costs.

    python -m benchmarks.destination [--rows 200000] [--repeat 3]

Fills `bemi.changes` (the shipped migration) with rows like the worker's (benchmarks/queries.py's fill: a CREATE
then UPDATEs per row, rows interleaved in commit order, contexts with a user id and a request id), reads them into
memory, then stores them again with asyncpg's binary COPY, 10,000 rows per transaction as the worker does, into a
fresh copy of the table:

- without any index (the heap alone): the baseline;
- with one of the shipped indexes: the index's own cost per row;
- with every shipped index: the destination's ceiling, the most any worker could store;
- with the opt-in B-tree on the context key `user_id` (`context_index_sql`) alone, and with every shipped index
  and it: what that index costs each stored row.

Best of `--repeat` interleaved runs. Each line gives rows/s of wall time and rows per second of the server
backend's own CPU time, which other work on a shared machine disturbs much less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_asgi.history.store import context_index_sql
from bemi_asgi.worker.destination import COLUMNS
from benchmarks import queries
from benchmarks._support import Result, throwaway_server

BATCH = 10_000


@dataclass(frozen=True)
class Copied:
    seconds: float
    cpu: float  # the server backend's CPU seconds


async def copy_into(conn: asyncpg.Connection, indexes: list[str], records: list[tuple[object, ...]]) -> Copied:
    """COPY `records` into a fresh copy of bemi.changes that has just `indexes` (CREATE INDEX statements)."""
    await conn.execute(
        "DROP TABLE IF EXISTS bemi.ceiling;"
        " CREATE TABLE bemi.ceiling (LIKE bemi.changes INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS)"
    )
    for statement in indexes:
        await conn.execute(statement)
    await conn.execute("CHECKPOINT")  # the previous case's dirty pages are not this one's to write
    backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
    cpu_before = sum(backend.cpu_times()[:2])
    started = time.perf_counter()
    for start in range(0, len(records), BATCH):
        async with conn.transaction():
            await conn.copy_records_to_table(
                "ceiling", schema_name="bemi", columns=COLUMNS, records=records[start : start + BATCH]
            )
    return Copied(time.perf_counter() - started, sum(backend.cpu_times()[:2]) - cpu_before)


async def shipped_indexes(conn: asyncpg.Connection) -> dict[str, str]:
    """Each index of the migrated bemi.changes, by name, as a CREATE INDEX on bemi.ceiling."""
    rows = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'bemi' AND tablename = 'changes'"
    )
    return {
        row["indexname"]: re.sub(
            r"INDEX (\w+) ON bemi\.changes", r"INDEX \1_ceiling ON bemi.ceiling", row["indexdef"], count=1
        )
        for row in rows
    }


async def run(dsn: str, rows: int, repeat: int) -> dict[str, Copied]:
    """Fill, COPY every case `repeat` times (interleaved), print the table; the best run of each case."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(queries.MIGRATION)
        await conn.execute("TRUNCATE bemi.changes")
        await conn.execute(queries.FILL, rows // 10, 10, queries.T0)
        columns = ", ".join(
            f'"{name}"' + ("::text" if name in ("before", "after", "context") else "") for name in COLUMNS
        )
        records = [
            tuple(row) for row in await conn.fetch(f"SELECT {columns} FROM bemi.changes ORDER BY commit_lsn, ordinal")
        ]
        indexes = await shipped_indexes(conn)
        cases = {"heap alone": [], **{f"+ {name}": [statement] for name, statement in indexes.items()}}
        cases["bemi.changes (every index)"] = list(indexes.values())
        user_index = (
            context_index_sql("user_id", concurrently=False)
            .replace('"bemi"."changes"', "bemi.ceiling")
            .replace("changes_context_user_id_idx", "changes_context_user_id_idx_ceiling")
        )
        cases["+ changes_context_user_id_idx (opt-in)"] = [user_index]
        cases["every index + the opt-in user_id index"] = [*indexes.values(), user_index]
        runs: dict[str, list[Copied]] = {label: [] for label in cases}
        for _ in range(repeat):
            for label, statements in cases.items():
                runs[label].append(await copy_into(conn, statements, records))
        await conn.execute("DROP TABLE bemi.ceiling")
    finally:
        await conn.close()
    best = {
        label: Copied(min(copied.seconds for copied in copies), min(copied.cpu for copied in copies))
        for label, copies in runs.items()
    }
    heap = best["heap alone"]
    print(f"\n{len(records):,} rows, COPY in {BATCH:,}-row transactions, best of {repeat}\n")
    print(f"{'table':44} {'rows/s':>10} {'rows/CPU-s':>11} {'CPU us/row':>11} {'over heap':>10}")
    for label, copied in best.items():
        extra = (copied.cpu - heap.cpu) / len(records) * 1e6
        print(f"{label:44} {len(records) / copied.seconds:10,.0f} {len(records) / copied.cpu:11,.0f} "
              f"{copied.cpu / len(records) * 1e6:11.2f} {extra:10.2f}")  # fmt: skip
    return {label: Copied(copied.seconds / len(records), copied.cpu / len(records)) for label, copied in best.items()}


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: the ceiling and each index's CPU per row, against the heap alone."""
    rows, repeat = (100_000, 2) if quick else (200_000, 3)
    with throwaway_server({"max_wal_size": "4GB", "checkpoint_timeout": "30min"}) as server:
        per_row = asyncio.run(run(server.dsn(), rows, repeat))
    heap = per_row["heap alone"]
    return [
        Result(
            "destination",
            f"COPY {rows:,} rows: {label}",
            f"{1 / copied.seconds:,.0f} rows/s, {copied.cpu * 1e6:.2f} us CPU/row",
            None if label == "heap alone" else copied.cpu / heap.cpu,
            "server CPU of the heap alone",
        )
        for label, copied in per_row.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (the best one counts)")
    args = parser.parse_args()
    with throwaway_server({"max_wal_size": "4GB", "checkpoint_timeout": "30min"}) as server:
        asyncio.run(run(server.dsn(), args.rows, args.repeat))


if __name__ == "__main__":
    main()
