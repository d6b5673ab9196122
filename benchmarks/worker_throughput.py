"""Worker throughput against `pg_recvlogical`, peak memory on a 1M-row transaction, and lag at a steady load.

    python benchmarks/worker_throughput.py [--changes 250000] [--repeat 3] [--chain-rounds 9] [--big-rows 1000000]
        [--lag-seconds 10]

Starts its own throwaway PostgreSQL (LocalPostgres), then:

1. Throughput: commits `--changes` row changes (transactions of 10 inserts, then of 10 updates, each with a
   `_bemi` context message) with five slots waiting. Times `pg_recvlogical` draining the WAL to /dev/null from
   one slot (the baseline: the walsender's decoding plus a client that does nothing), then the worker storing
   everything from another (until caught up, in a subprocess, with a keyed hash chain), the worker without the
   hash chain from the third (the chain's cost), and the worker into a second database whose `bemi.changes` has no
   secondary indexes (only its constraints' own) from the fourth, which separates the worker's CPU from what the
   destination's indexes cost; best of `--repeat` interleaved runs, and prints changes/s and the ratios (the
   chain's cost is the median of each round's, the chained and unchained runs side by side in it, over
   `--chain-rounds` rounds of those two). Every worker run stops at the end of the generated changes. Then
   `bemi-asgi verify`'s rate over the keyed chain of the same changes, stored once more from a fifth slot. Also the
   destination's own ceiling: the same rows COPYed again with nothing else running (no decoding at all), since on a
   small machine the destination's indexes bound the worker.
2. Memory: one transaction of `--big-rows` inserts whose context arrives at commit; the worker's peak RSS while
   storing it, and a check that every row got the context.
3. Lag: a steady 1,000 transactions/s (one insert + context each) for `--lag-seconds` with the worker running;
   p50/p99 of created_at - committed_at of the stored changes (created_at is the destination transaction's start,
   so this slightly underestimates the lag by the COPY's duration).

Run it from the repository root on an otherwise idle machine; numbers are for comparison within one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bemi_asgi.ops.migration import load_sql  # noqa: E402
from bemi_asgi.ops.postgres import LocalPostgres  # noqa: E402
from bemi_asgi.ops.verify import verify  # noqa: E402
from benchmarks._support import Result, throwaway_server  # noqa: E402

DESTINATION_SQL = load_sql("destination_up.sql")

GENERATE = """
CREATE PROCEDURE generate(transactions int, rows_per int, first int) LANGUAGE plpgsql AS $$
BEGIN
    FOR t IN 0 .. transactions - 1 LOOP
        INSERT INTO items (id, name, qty, price, meta)
        SELECT g, 'item ' || g, g % 100, (g % 1000) / 10.0, jsonb_build_object('tag', g % 7)
        FROM generate_series(first + t * rows_per, first + (t + 1) * rows_per - 1) AS g;
        PERFORM pg_logical_emit_message(true, '_bemi', json_build_object('user_id', t, 'path', '/items')::text);
        COMMIT;
    END LOOP;
END $$;
CREATE PROCEDURE touch(transactions int, rows_per int, first int) LANGUAGE plpgsql AS $$
BEGIN
    FOR t IN 0 .. transactions - 1 LOOP
        UPDATE items SET qty = qty + 1
        WHERE id BETWEEN first + t * rows_per AND first + (t + 1) * rows_per - 1;
        PERFORM pg_logical_emit_message(true, '_bemi', json_build_object('user_id', t, 'path', '/touch')::text);
        COMMIT;
    END LOOP;
END $$;
"""


def worker_command(dsn: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bemi_asgi", "worker", "--source", dsn, "--quiet", *extra]


#: The hash chain's key for the throughput runs: the keyed chain (HMAC) is the one to recommend and to measure.
CHAIN_KEY = "benchmark chain key, 32 bytes long"

#: The worker for the throughput runs: what `worker_command` runs, less the command line's own start (Typer loading
#: rich: about 0.3 s of CPU, which in a run of a few seconds read as a share of the chain's cost). Arguments: source,
#: slot, `chained` or `unchained` (the chain keyed with BEMI_CHAIN_KEY, or none), destination, and the WAL position
#: to stop at: the end of the generated changes, like pg_recvlogical's --endpos. (Run until caught up, a worker would
#: also read through the WAL the runs before it wrote into `bemi.changes`: a later run had more WAL to read, which
#: made the rounds slow down one after another.)
WORKER = """
import asyncio, sys
import bemi_asgi.cli
from bemi_asgi._pgtext import parse_lsn
from bemi_asgi.worker.chain import chain_key
from bemi_asgi.worker.pipeline import Worker
source, slot, chain, destination, end = sys.argv[1:]
worker = Worker(source, destination=destination, slot=slot, chain=chain == "chained", chain_key=chain_key())
asyncio.run(worker.run(until_lsn=parse_lsn(end)))
"""


def worker_script(source: str, slot: str, chain: str, destination: str, end: str) -> list[str]:
    return [sys.executable, "-c", WORKER, source, slot, chain, destination, end]


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes, sampled every 20 ms
    cpu: float  # the command's own CPU seconds
    server_cpu: float  # CPU seconds of all PostgreSQL processes meanwhile (walsender, destination backend, ...)


def server_cpu_times(server: LocalPostgres) -> dict[int, float]:
    postmaster = psutil.Process(int((server.data_dir / "postmaster.pid").read_text().split()[0]))
    times = {}
    for process in [postmaster, *postmaster.children()]:
        try:
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
        except psutil.NoSuchProcess:
            pass
    return times


def run_measured(command: list[str], server: LocalPostgres, env: dict[str, str] | None = None) -> Measured:
    """Run `command` to completion, measuring time, memory and CPU (its own and the server's)."""
    before = server_cpu_times(server)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, env=env)
    peak = 0
    handle = psutil.Process(process.pid)
    last = dict(before)
    while process.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        last.update(server_cpu_times(server))  # backends exit with the command: keep their last reading
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    last.update(server_cpu_times(server))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {stderr}")
    cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    server_cpu = sum(value - before.get(pid, 0.0) for pid, value in last.items())
    return Measured(elapsed, peak, cpu, server_cpu)


def prepare(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, price numeric, meta jsonb,"
            " created_at timestamptz DEFAULT now())"
        )
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
        conn.execute("CREATE PUBLICATION bemi FOR TABLE items")
        conn.execute(GENERATE)


#: The database of the destination without secondary indexes.
BARE = "bare"


def destination_database(server: LocalPostgres, name: str) -> str:
    """A database `name` holding the destination's tables; its URL. What a worker stores there, its source
    database's slots read past without decoding (the walsender skips another database's records)."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
    return dsn


def prepare_bare(server: LocalPostgres) -> str:
    """A destination database whose `bemi.changes` keeps only the indexes its constraints need; its URL."""
    dsn = destination_database(server, BARE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """DO $$ DECLARE i regclass; BEGIN
                FOR i IN SELECT indexrelid::regclass FROM pg_index WHERE indrelid = 'bemi.changes'::regclass
                         AND indexrelid NOT IN (SELECT conindid FROM pg_constraint
                                                WHERE conrelid = 'bemi.changes'::regclass)
                LOOP EXECUTE format('DROP INDEX %s', i); END LOOP; END $$"""
        )
    return dsn


def reset(dsn: str, *slots: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A walsender can hold its slot for a moment after its client exits.
        while conn.execute("SELECT count(*) FROM pg_replication_slots WHERE active").fetchone() != (0,):
            time.sleep(0.05)
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
        conn.execute("TRUNCATE bemi.changes, bemi.worker_state, bemi.chain, bemi.chain_anchors, items")
        conn.execute("CHECKPOINT")
        for slot in slots:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])


def wal_position(conn: psycopg.Connection[Any]) -> str:
    """The server's current WAL position, as `pg_current_wal_lsn()` prints it."""
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def count(dsn: str, where: str = "true") -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM bemi.changes WHERE {where}").fetchone()
        assert row is not None
        return int(row[0])


def slot_names(repeat: int, chain_rounds: int) -> list[str]:
    """The slots of `throughput`'s runs: each reads the generated changes once."""
    return [
        *(f"{kind}{n}" for n in range(repeat) for kind in ("recv", "bare")),
        *(f"{kind}{n}" for n in range(max(repeat, chain_rounds)) for kind in ("bemi", "plain")),
        "verify",
    ]


def throughput(server: LocalPostgres, dsn: str, changes: int, repeat: int, chain_rounds: int) -> dict[str, float]:
    """Prints the figures; returns the changes/s of pg_recvlogical, the worker (into `bemi.changes` as migrated,
    without the hash chain, and without secondary indexes) and the destination alone, and the CPU seconds of the
    best runs. The chained and unchained workers run `chain_rounds` times (at least `repeat`): single runs vary
    by more than the chain costs, so its cost is the median of many rounds."""
    bare = prepare_bare(server)
    rounds = max(repeat, chain_rounds)
    reset(dsn, *slot_names(repeat, chain_rounds))
    transactions = changes // 20
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CALL generate(%s, 10, 0)", [transactions])
        conn.execute("CALL touch(%s, 10, 0)", [transactions])
        end = wal_position(conn)
    total = transactions * 20
    print(f"generated {total:,} changes in {2 * transactions:,} transactions ({time.perf_counter() - started:.1f} s)")

    recv_runs: list[Measured] = []
    worker_runs: list[Measured] = []
    plain_runs: list[Measured] = []
    bare_runs: list[Measured] = []
    keyed = {**os.environ, "BEMI_CHAIN_KEY": CHAIN_KEY}
    for n in range(rounds):  # interleaved, best of `repeat`: the machine may be busy with other work
        if n < repeat:
            recv = [
                str(server.bin("pg_recvlogical")), "-d", dsn, "--slot", f"recv{n}", "--start", "-f", "/dev/null",
                "-o", "proto_version=1", "-o", "publication_names=bemi", "-o", "messages=true", "--endpos", end,
                "--no-loop",
            ]  # fmt: skip
            recv_runs.append(run_measured(recv, server))
        chained = (worker_runs, worker_script(dsn, f"bemi{n}", "chained", dsn, end), keyed, dsn)
        unchained = (plain_runs, worker_script(dsn, f"plain{n}", "unchained", dsn, end), None, dsn)
        bare_run = (bare_runs, worker_script(dsn, f"bare{n}", "chained", bare, end), keyed, bare)
        # The chained and unchained runs swap places every round, so neither always follows the same work.
        order = [chained, unchained] if n % 2 == 0 else [unchained, chained]
        for runs, command, env, into in [*order, bare_run] if n < repeat else order:
            with psycopg.connect(into, autocommit=True) as conn:
                conn.execute("TRUNCATE bemi.changes, bemi.worker_state, bemi.chain")
                # Every run starts with clean shared buffers, not with the dirty pages of the run before it.
                conn.execute("CHECKPOINT")
            runs.append(run_measured(command, server, env))
            stored = count(into)
            assert stored == total, f"the worker stored {stored:,} of {total:,} changes"
    recv_best = min(recv_runs, key=lambda run: run.seconds)
    worker_best = min(worker_runs, key=lambda run: run.seconds)
    plain_best = min(plain_runs, key=lambda run: run.seconds)
    bare_best = min(bare_runs, key=lambda run: run.seconds)
    recv_rate, worker_rate = total / recv_best.seconds, total / worker_best.seconds
    plain_rate, bare_rate = total / plain_best.seconds, total / bare_best.seconds
    print(f"pg_recvlogical: {recv_best.seconds:6.2f} s  {recv_rate:10,.0f} changes/s  (drains to /dev/null; "
          f"runs {', '.join(f'{run.seconds:.2f}' for run in recv_runs)}; CPU {recv_best.cpu:.1f} s client + "
          f"{recv_best.server_cpu:.1f} s server)")  # fmt: skip
    print(f"worker:         {worker_best.seconds:6.2f} s  {worker_rate:10,.0f} changes/s  (stored in bemi.changes, "
          f"process start included; runs {', '.join(f'{run.seconds:.2f}' for run in worker_runs)}; CPU "
          f"{worker_best.cpu:.1f} s worker + {worker_best.server_cpu:.1f} s server (walsender + destination); "
          f"peak RSS {max(run.peak_rss for run in worker_runs) / 2**20:.0f} MB)")  # fmt: skip
    # The chain's cost per round (the two runs are neighbours, so a slow spell of the machine mostly hits both),
    # then the median: the best runs of each variant alone can come from different spells.
    costs = sorted(1 - plain.seconds / chained.seconds for chained, plain in zip(worker_runs, plain_runs, strict=True))
    chain_cost = statistics.median(costs)
    pairs = list(zip(worker_runs, plain_runs, strict=True))
    cpu_cost = statistics.median(chained.cpu / plain.cpu - 1 for chained, plain in pairs)
    chained_cpu = statistics.median(run.cpu for run in worker_runs) / total * 1e6
    plain_cpu = statistics.median(run.cpu for run in plain_runs) / total * 1e6
    print(f"worker without the hash chain: {plain_best.seconds:6.2f} s  {plain_rate:10,.0f} changes/s  (runs "
          f"{', '.join(f'{run.seconds:.2f}' for run in plain_runs)}; CPU {plain_best.cpu:.1f} s worker + "
          f"{plain_best.server_cpu:.1f} s server)")  # fmt: skip
    print(f"the keyed chain costs {chain_cost:.1%} of the throughput (target < 10%; median of the rounds' "
          f"{', '.join(f'{cost:.1%}' for cost in costs)}; {1 - worker_rate / plain_rate:.1%} best against best); "
          f"worker CPU per change (medians) {chained_cpu:.1f} us chained, {plain_cpu:.1f} us without, "
          f"{cpu_cost:+.1%} by round)")  # fmt: skip
    print(f"ratio worker/pg_recvlogical: {worker_rate / recv_rate:.2f}x (target >= 0.5x)")
    print(f"worker, no secondary indexes: {bare_best.seconds:6.2f} s  {bare_rate:10,.0f} changes/s  (ratio "
          f"{bare_rate / recv_rate:.2f}x; runs {', '.join(f'{run.seconds:.2f}' for run in bare_runs)}; CPU "
          f"{bare_best.cpu:.1f} s worker + {bare_best.server_cpu:.1f} s server)")  # fmt: skip
    verify_rate = verify_throughput(server, dsn, keyed, total, end)
    print(f"verify: {verify_rate:10,.0f} changes/s  (`bemi-asgi verify` of the keyed chain over the same changes; "
          f"verify/worker {verify_rate / worker_rate:.2f}x)")  # fmt: skip
    ceiling = max(destination_ceiling(dsn) for _ in range(repeat))
    print(f"destination alone: {ceiling:10,.0f} rows/s  (the same rows COPYed in 10k batches into a copy of "
          f"bemi.changes with its indexes; worker/destination {worker_rate / ceiling:.2f}x)")  # fmt: skip
    return {
        "pg_recvlogical": recv_rate,
        "worker": worker_rate,
        "unchained": plain_rate,
        "chain cost": chain_cost,
        "worker without indexes": bare_rate,
        "destination": ceiling,
        "verify": verify_rate,
        "worker CPU": min(run.cpu for run in worker_runs),
        "worker CPU without the chain": min(run.cpu for run in plain_runs),
        "worker CPU without indexes": min(run.cpu for run in bare_runs),
    }


def verify_throughput(server: LocalPostgres, dsn: str, keyed: dict[str, str], total: int, end: str) -> float:
    """Changes/s of verifying the keyed chain of `total` changes (up to WAL position `end`), stored by the worker
    from the `verify` slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE bemi.changes, bemi.worker_state, bemi.chain")
    run_measured(worker_script(dsn, "verify", "chained", dsn, end), server, keyed)
    started = time.perf_counter()
    reports = verify(dsn, key=CHAIN_KEY.encode())
    seconds = time.perf_counter() - started
    chained = [report for report in reports if report.kind == "changes" and report.changes]
    if len(chained) != 1 or not chained[0].intact or chained[0].changes != total:
        raise RuntimeError(f"verify did not find the {total:,} changes intact: {[r.describe() for r in reports]}")
    return total / seconds


def destination_ceiling(dsn: str) -> float:
    """Rows/s of storing the worker's rows again with asyncpg COPY alone: the most any worker could reach."""
    import asyncio

    import asyncpg

    from bemi_asgi.worker.destination import COLUMNS

    async def measure() -> float:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE bemi.ceiling (LIKE bemi.changes INCLUDING ALL)")
            columns = ", ".join(f'"{name}"' + ("::text" if name in ("before", "after", "context") else "")
                                for name in COLUMNS)  # fmt: skip
            records = [tuple(row) for row in await conn.fetch(f"SELECT {columns} FROM bemi.changes")]
            started = time.perf_counter()
            for start in range(0, len(records), 10_000):
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "ceiling", schema_name="bemi", columns=COLUMNS, records=records[start : start + 10_000]
                    )
            return len(records) / (time.perf_counter() - started)
        finally:
            await conn.execute("DROP TABLE IF EXISTS bemi.ceiling")
            await conn.close()

    return asyncio.run(measure())


def memory(server: LocalPostgres, dsn: str, rows: int) -> tuple[float, int]:
    """Prints the figures; returns the seconds and the worker's peak RSS in bytes."""
    reset(dsn, "bemi")
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO items (id, name, qty, price, meta) SELECT g, 'item ' || g, g %% 100, g / 10.0,"
            " jsonb_build_object('tag', g %% 7) FROM generate_series(1, %s) g",
            [rows],
        )
        conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"job\": \"import\"}')")
    measured = run_measured(worker_command(dsn, "--until-caught-up"), server)
    seconds, peak = measured.seconds, measured.peak_rss
    right = count(dsn, 'context = \'{"job": "import"}\'')
    assert right == rows, f"{right:,} of {rows:,} rows have the transaction's context"
    print(f"one {rows:,}-row transaction: stored in {seconds:.1f} s, worker peak RSS {peak / 2**20:.0f} MB "
          f"(target < 200 MB), every row with its context")  # fmt: skip
    return seconds, peak


def lag(dsn: str, seconds: float, rate: int = 1000) -> tuple[float, float, float]:
    """Prints the figures; returns the rate achieved and the p50 and p99 lag in ms."""
    reset(dsn, "bemi")
    worker = subprocess.Popen(worker_command(dsn), cwd=ROOT, stderr=subprocess.PIPE)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while count(dsn) == 0:  # wait for the worker to be streaming
                conn.execute("BEGIN; INSERT INTO items (id) VALUES (-1) ON CONFLICT DO NOTHING; COMMIT")
                time.sleep(0.05)
            conn.execute("TRUNCATE bemi.changes")
            started = time.perf_counter()
            n = 0
            while (elapsed := time.perf_counter() - started) < seconds:
                ahead = n / rate - elapsed
                if ahead > 0:
                    time.sleep(ahead)
                conn.execute(
                    f"BEGIN; INSERT INTO items (id, name) VALUES ({n}, 'x');"
                    f" SELECT pg_logical_emit_message(true, '_bemi', '{{\"n\": {n}}}'); COMMIT"
                )
                n += 1
            achieved = n / (time.perf_counter() - started)
        while count(dsn, "context ? 'n'") < n:
            time.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    with psycopg.connect(dsn) as conn:
        lags = [
            float(row[0])
            for row in conn.execute(
                "SELECT extract(epoch FROM created_at - committed_at) FROM bemi.changes WHERE context ? 'n'"
            )
        ]
    lags.sort()
    p50 = statistics.median(lags) * 1000
    p99 = lags[int(len(lags) * 0.99) - 1] * 1000
    print(f"lag at {achieved:,.0f} tx/s for {seconds:.0f} s: p50 {p50:.0f} ms, p99 {p99:.0f} ms (target p99 < 200 ms)")
    return achieved, p50, p99


#: Autovacuum off: whether it starts on `bemi.changes` during a run or after it is chance, and one run in a few
#: slowed by it made the rounds' spread wider than the chain's cost.
SETTINGS = {"max_wal_size": "4GB", "checkpoint_timeout": "30min", "autovacuum": "off"}


def settings(repeat: int, chain_rounds: int) -> dict[str, str]:
    """`SETTINGS`, with room for every slot of `throughput` (many rounds need more than the server's default)."""
    return {**SETTINGS, "max_replication_slots": str(max(32, len(slot_names(repeat, chain_rounds)) + 1))}


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks` (`quick`: 100k changes, best of 3, the chain's cost over 7 rounds, a
    200k-row transaction, 3 s of lag; the worker's process start weighs more in the smaller run)."""
    changes, repeat, chain_rounds, big_rows, lag_seconds = (
        (100_000, 3, 7, 200_000, 3.0) if quick else (250_000, 3, 9, 1_000_000, 10.0)
    )
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    with throwaway_server(settings(repeat, chain_rounds)) as server:
        dsn = server.dsn()
        prepare(dsn)
        rates = throughput(server, dsn, changes, repeat, chain_rounds)
        seconds, peak = memory(server, dsn, big_rows)
        achieved, p50, p99 = lag(dsn, lag_seconds)
    recv = rates["pg_recvlogical"]
    return [
        Result(
            "worker",
            f"pg_recvlogical to /dev/null, {changes:,} changes",
            f"{recv:,.0f} changes/s",
            None,
            "pg_recvlogical",
        ),
        Result(
            "worker",
            "worker into bemi.changes (keyed hash chain)",
            f"{rates['worker']:,.0f} changes/s, worker CPU {rates['worker CPU']:.2f} s",
            rates["worker"] / recv,
            "pg_recvlogical",
        ),
        Result(
            "worker",
            "worker without the hash chain",
            f"{rates['unchained']:,.0f} changes/s, worker CPU {rates['worker CPU without the chain']:.2f} s",
            1 - rates["chain cost"],
            "chained/unchained (median of rounds)",
        ),
        Result(
            "worker",
            "worker into bemi.changes without secondary indexes",
            f"{rates['worker without indexes']:,.0f} changes/s, worker CPU {rates['worker CPU without indexes']:.2f} s",
            rates["worker without indexes"] / recv,
            "pg_recvlogical",
        ),
        Result("worker", "the same rows COPYed alone (destination ceiling)", f"{rates['destination']:,.0f} rows/s"),
        Result(
            "worker",
            "bemi-asgi verify of the keyed chain",
            f"{rates['verify']:,.0f} changes/s",
            rates["verify"] / rates["worker"],
            "worker (chained)",
        ),
        Result("worker", f"one {big_rows:,}-row transaction", f"{seconds:.1f} s, peak RSS {peak / 2**20:.0f} MB"),
        Result("worker", f"lag at {achieved:,.0f} tx/s", f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=250_000)
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="0 skips the memory measurement")
    parser.add_argument("--lag-seconds", type=float, default=10, help="0 skips the lag measurement")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs (the best one counts)")
    parser.add_argument("--chain-rounds", type=int, default=9, help="chained and unchained runs (the median counts)")
    args = parser.parse_args()

    os.environ.setdefault("PYTHONPATH", str(ROOT))
    with throwaway_server(settings(args.repeat, args.chain_rounds)) as server:
        dsn = server.dsn()
        prepare(dsn)
        throughput(server, dsn, args.changes, args.repeat, args.chain_rounds)
        if args.big_rows:
            memory(server, dsn, args.big_rows)
        if args.lag_seconds:
            lag(dsn, args.lag_seconds)


if __name__ == "__main__":
    main()
