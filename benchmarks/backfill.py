"""How fast `bemi-asgi backfill` stores baselines, against PostgreSQL merely copying the same table out.

    python -m benchmarks.backfill [--rows 200000] [--repeat 3] [--batch-rows 5000]

Starts its own throwaway PostgreSQL with a table of `--rows` rows (integer key, text, integer, numeric, text[],
jsonb, timestamptz: the types the value conversion treats differently), the migration and the worker's slot, then
measures, best of `--repeat`:

    COPY TO         `COPY (SELECT * FROM items ORDER BY id) TO STDOUT`, read whole by psycopg: the source's
                    ceiling, what reading the table costs at all
    INSERT again    the stored baselines inserted into an emptied bemi.changes again, server-side (INSERT ...
                    SELECT): the destination's ceiling, its indexes included
    backfill        `bemi-asgi backfill` (a subprocess, process start included): keyset pages read in the
                    exported snapshot, converted, COPYed into bemi.changes with their progress; its peak RSS

Each run starts from an empty bemi.changes and bemi.backfill_state. Ratios are rows/s relative to COPY TO.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bemi_asgi.ops.migration import migration_sql  # noqa: E402
from benchmarks._support import Result, throwaway_server  # noqa: E402

SCHEMA = """
CREATE TABLE items (
    id integer PRIMARY KEY, name text NOT NULL, qty integer, price numeric(10, 2), tags text[], meta jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


def prepare(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "INSERT INTO items (id, name, qty, price, tags, meta)"
            " SELECT g, 'item number ' || g, g %% 1000, g / 7.0, ARRAY['a', 'b' || g],"
            " jsonb_build_object('n', g, 'k', 'v')"
            " FROM generate_series(1, %s) g",
            [rows],
        )
        conn.execute("VACUUM ANALYZE items")
        conn.execute(migration_sql(tables=["public.items"]))
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE bemi.changes, bemi.backfill_state")
        conn.execute("CHECKPOINT")


def copy_to(dsn: str) -> float:
    started = time.perf_counter()
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor() as cursor,
        cursor.copy("COPY (SELECT * FROM items ORDER BY id) TO STDOUT") as copy,
    ):
        for _ in copy:
            pass
    return time.perf_counter() - started


# `python -m bemi_asgi backfill ...` that prints its peak RSS (VmHWM, kB) last on stderr: the rusage of a child
# also counts what it shared with the parent before exec.
_REPORTING_PEAK = (
    "import atexit, runpy, sys\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    print('VmHWM', status.split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "sys.argv = ['bemi-asgi', *sys.argv[1:]]\n"
    "runpy.run_module('bemi_asgi', run_name='__main__')\n"
)


def backfill(dsn: str, batch_rows: int) -> tuple[float, float, float]:
    """Wall seconds of one `bemi-asgi backfill` run, its process's CPU seconds and peak RSS in MB."""
    started = time.perf_counter()
    command = [sys.executable, "-c", _REPORTING_PEAK, "backfill", "--source", dsn, "--quiet", "--batch-rows"]
    process = subprocess.Popen(
        [*command, str(batch_rows)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, f"bemi-asgi backfill exited with {process.returncode}: {stderr}"
    peak_kb = int(stderr.rsplit("VmHWM", 1)[1].split()[0])
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime, peak_kb / 1024


def insert_again(dsn: str) -> float:
    """Insert the baselines just stored again, server-side, into an emptied bemi.changes: the destination alone,
    its indexes included (and no client memory, which would blur the next run's peak RSS)."""
    columns = ", ".join(
        f'"{name}"'
        for name in (
            "primary_key", "before", "after", "context", "database", "schema", "table", "operation", "committed_at",
            "queued_at", "transaction_id", "position", "commit_lsn", "ordinal", "stream",
        )
    )  # fmt: skip
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TEMPORARY TABLE stored AS SELECT {columns} FROM bemi.changes")
        conn.execute("TRUNCATE bemi.changes")
        conn.execute("CHECKPOINT")
        started = time.perf_counter()
        conn.execute(f"INSERT INTO bemi.changes ({columns}) SELECT {columns} FROM stored")
        return time.perf_counter() - started


def measure(rows: int, repeat: int, batch_rows: int) -> dict[str, float]:
    """Print the table; each case's best rows/s (and the backfill's peak RSS under "rss")."""
    settings = {"max_wal_size": "4GB", "checkpoint_timeout": "30min"}
    with throwaway_server(settings) as server:
        dsn = server.dsn()
        prepare(dsn, rows)
        times: dict[str, list[float]] = {"COPY TO": [], "INSERT again": [], "backfill": []}
        rss: list[float] = []
        cpu: list[float] = []
        for _ in range(repeat):
            times["COPY TO"].append(copy_to(dsn))
            reset(dsn)
            seconds, cpu_seconds, peak = backfill(dsn, batch_rows)
            times["backfill"].append(seconds)
            cpu.append(cpu_seconds)
            rss.append(peak)
            with psycopg.connect(dsn) as conn:
                stored = conn.execute("SELECT count(*) FROM bemi.changes WHERE operation = 'SNAPSHOT'").fetchone()
            assert stored == (rows,), stored
            times["INSERT again"].append(insert_again(dsn))
        best = {name: rows / min(runs) for name, runs in times.items()}
        print(f"{rows:,} rows, batches of {batch_rows:,}")
        for name, rate in best.items():
            listed = ", ".join(f"{s:.2f}" for s in times[name])
            print(f"{name:10} {rate:12,.0f} rows/s ({rate / best['COPY TO']:.3f}x COPY TO)   runs (s): {listed}")
        print(f"backfill process: {min(cpu):.2f} s CPU, peak RSS {max(rss):.0f} MB (runs: {rss})")
        return {**best, "rss": max(rss), "cpu": min(cpu)}


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: baseline rows/s relative to COPY TO of the same table."""
    rows = 50_000 if quick else 200_000
    best = measure(rows, 1 if quick else 3, 5_000)
    against = "COPY TO"
    return [
        Result(
            "backfill", f"COPY (SELECT ...) TO STDOUT, {rows:,} rows", f"{best['COPY TO']:,.0f} rows/s", None, against
        ),
        Result(
            "backfill",
            "the baselines inserted again, server-side (destination ceiling)",
            f"{best['INSERT again']:,.0f} rows/s",
        ),
        Result(
            "backfill",
            f"bemi-asgi backfill, {rows:,} rows",
            f"{best['backfill']:,.0f} rows/s, {best['cpu']:.1f} s CPU, peak RSS {best['rss']:.0f} MB",
            best["COPY TO"] / best["backfill"],
            "time of COPY TO",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=5_000)
    args = parser.parse_args()
    measure(args.rows, args.repeat, args.batch_rows)


if __name__ == "__main__":
    main()
