"""Sharded capture: two workers, each streaming one of two publications of disjoint tables, against one worker
streaming both, on the same load.

    python -m benchmarks.sharding [--changes 100000] [--repeat 3]

Starts its own throwaway PostgreSQL and commits `--changes` row changes: transactions inserting 10 rows into
`orders` and 10 into `payments`, each with a `_bemi` context, so every transaction touches both shards. Before the
load, it creates per round three slots: one for the single worker (publication `bemi`, both tables) and one per
shard (`shard_orders`, `shard_payments`). Then, interleaved, best of `--repeat`:

    one worker            `bemi-asgi worker --until-lsn END` on both tables (END: where the load ended)
    two sharded workers   two such processes side by side, one per shard; wall time until both are done

It prints the aggregate changes/s (wall time, process starts included) and the workers' CPU per change (user +
system of the worker processes). Not counted: the source's walsenders, which each decode the whole WAL (every
shard's slot reads every transaction, then drops the changes of the other shards' tables), and the destination's
COPY into `bemi.changes` (in a database of its own, so that no run decodes what the runs before it stored), which
both layouts pay the same for.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bemi_asgi.ops.migration import migration_sql  # noqa: E402
from benchmarks._support import Result, throwaway_server  # noqa: E402
from benchmarks.worker_throughput import count, destination_database, wal_position  # noqa: E402

SHARDS = ("orders", "payments")
ROWS_PER_TABLE = 10

SCHEMA = """
CREATE TABLE orders (id bigint PRIMARY KEY, n int NOT NULL, note text);
CREATE TABLE payments (id bigint PRIMARY KEY, n int NOT NULL, note text);
CREATE PROCEDURE generate(transactions int, per_table int) LANGUAGE plpgsql AS $$
BEGIN
    FOR t IN 1 .. transactions LOOP
        INSERT INTO orders SELECT t::bigint * per_table + i, i, 'order' FROM generate_series(0, per_table - 1) i;
        INSERT INTO payments SELECT t::bigint * per_table + i, i, 'payment' FROM generate_series(0, per_table - 1) i;
        PERFORM pg_logical_emit_message(true, '_bemi', '{"request_id": ' || t || '}');
        COMMIT;
    END LOOP;
END $$;
"""


def start(dsn: str, destination: str, end: str, slot: str, publication: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "bemi_asgi", "worker", "--source", dsn, "--destination", destination]
    return subprocess.Popen([*command, "--quiet", "--until-lsn", end, "--slot", slot, "--publication", publication],
                            cwd=ROOT)  # fmt: skip


def run(dsn: str, destination: str, end: str, workers: list[tuple[str, str]]) -> tuple[float, float]:
    """Run one worker per (slot, publication) side by side until all have stored what committed before WAL
    position `end`: wall and their CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    processes = [start(dsn, destination, end, slot, publication) for slot, publication in workers]
    for process in processes:
        assert process.wait() == 0, "a worker failed"
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def measure(changes: int, repeat: int) -> dict[str, tuple[float, float]]:
    """Print the table; return each variant's best changes/s and its CPU microseconds per change."""
    with throwaway_server({"max_wal_size": "4GB", "checkpoint_timeout": "30min"}) as server:
        dsn = server.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute(migration_sql(tables=[f"public.{table}" for table in SHARDS]).encode())
            for shard in SHARDS:
                conn.execute(migration_sql(publication=f"shard_{shard}", tables=[f"public.{shard}"], parts=["source"]))
            for n in range(repeat):
                for slot in (f"one_{n}", *(f"{shard}_{n}" for shard in SHARDS)):
                    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
            transactions = changes // (ROWS_PER_TABLE * len(SHARDS))
            started = time.perf_counter()
            conn.execute("CALL generate(%s, %s)", [transactions, ROWS_PER_TABLE])
            end = wal_position(conn)
        total = transactions * ROWS_PER_TABLE * len(SHARDS)
        destination = destination_database(server, "destination")
        print(f"generated {total:,} changes in {transactions:,} transactions ({time.perf_counter() - started:.1f} s)")
        variants = {
            "one worker": lambda n: [(f"one_{n}", "bemi")],
            "two sharded workers": lambda n: [(f"{shard}_{n}", f"shard_{shard}") for shard in SHARDS],
        }
        measured: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        names = list(variants)
        for n in range(repeat):
            for name in names[n % 2 :] + names[: n % 2]:  # alternate which goes first
                with psycopg.connect(destination, autocommit=True) as conn:
                    conn.execute("TRUNCATE bemi.changes, bemi.worker_state, bemi.chain")
                    conn.execute("CHECKPOINT")
                measured[name].append(run(dsn, destination, end, variants[name](n)))
                stored = count(destination)
                assert stored == total, f"{name}: stored {stored:,} of {total:,} changes"
        best: dict[str, tuple[float, float]] = {}
        for name, runs in measured.items():
            wall, cpu = min(seconds for seconds, _ in runs), min(cpu for _, cpu in runs)
            best[name] = (total / wall, cpu / total * 1e6)
            listed = ", ".join(f"{s:.2f}/{c:.2f}" for s, c in runs)
            print(f"{name:20} {total / wall:10,.0f} changes/s   worker CPU {cpu / total * 1e6:6.1f} us/change   "
                  f"runs (wall/CPU s): {listed}")  # fmt: skip
        return best


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: two sharded workers relative to one."""
    best = measure(40_000 if quick else 100_000, 1 if quick else 3)
    one_rate, one_cpu = best["one worker"]
    two_rate, two_cpu = best["two sharded workers"]
    return [
        Result("sharding", "one worker, both tables", f"{one_rate:,.0f} changes/s, {one_cpu:.1f} us CPU/change",
               None, "changes/s of one worker"),
        Result("sharding", "two sharded workers, aggregate", f"{two_rate:,.0f} changes/s", two_rate / one_rate,
               "changes/s of one worker"),
        Result("sharding", "two sharded workers, CPU per change", f"{two_cpu:.1f} us CPU/change", two_cpu / one_cpu,
               "CPU per change of one worker"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    measure(args.changes, args.repeat)


if __name__ == "__main__":
    main()
