"""What tracking rules cost the worker: no rules vs column rules, and optionally vs another source tree.

    python -m benchmarks.tracking_overhead [--changes 100000] [--repeat 3] [--baseline-tree DIR]

Starts its own throwaway PostgreSQL, commits `--changes` row changes (transactions of 10 inserts, then of 10
updates, each with a `_bemi` context, as `benchmarks.worker_throughput` does), then stores them all with the
worker (a subprocess, one slot per run, `--until-lsn` the end of those changes, into a destination database of its
own) in these variants, interleaved in a rotating order, `--repeat` rounds:

    no rules        this tree, no configuration (the row path must not be slower than before rules existed)
    rules           this tree, `items`: one column ignored, one masked, one hashed, no-op updates dropped
    baseline tree   with --baseline-tree DIR: the worker of another checkout (e.g. `git archive worker`), no rules;
                    `--until-caught-up` if its command line has no `--until-lsn` (it then also reads through the
                    WAL the runs before it wrote)

It prints changes/s (wall time, process start included) and the worker process's own CPU seconds, which is what
the row path costs (wall time on a small machine is mostly the destination's), with ratios to `no rules`: the
best wall time's, and the median over rounds of each round's CPU ratio (the variants of a round run seconds apart, so
the machine's slow spells mostly cancel out).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bemi_asgi.ops.postgres import LocalPostgres  # noqa: E402
from benchmarks._support import Result, in_turn, round_ratios  # noqa: E402
from benchmarks.worker_throughput import count, destination_database, prepare, reset, wal_position  # noqa: E402

CONFIG = """
drop_noop_updates = true
[tables."public.items"]
ignore = ["created_at"]
mask = ["name"]
hash = ["meta"]
"""


def run(tree: Path, dsn: str, destination: str, slot: str, end: str, *extra: str) -> tuple[float, float]:
    """Run the worker of `tree` until WAL position `end`: wall seconds and the process's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(tree), "BEMI_HASH_KEY": "benchmark-key-0123456789"}
    command = [sys.executable, "-m", "bemi_asgi", "worker", "--source", dsn, "--destination", destination]
    knows_until_lsn = "--until-lsn" in (tree / "bemi_asgi" / "cli.py").read_text()
    stop = ["--until-lsn", end] if knows_until_lsn else ["--until-caught-up"]
    subprocess.run([*command, "--quiet", *stop, "--slot", slot, *extra], cwd=tree, env=env, check=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


class Figures(NamedTuple):
    """A variant's best changes/s, its best worker CPU seconds, and the median of its rounds' CPU ratios to no
    rules."""

    rate: float
    cpu: float
    cpu_ratio: float


def measure(changes: int, repeat: int, baseline_tree: Path | None = None) -> dict[str, Figures]:
    """Run every variant, print the table; each variant's `Figures`."""
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-bench-"))
    base.chmod(0o755)
    config = base / "bemi.toml"
    config.write_text(CONFIG)
    variants: dict[str, tuple[Path, list[str]]] = {"no rules": (ROOT, []), "rules": (ROOT, ["--config", str(config)])}
    if baseline_tree is not None:
        variants["baseline tree"] = (baseline_tree.resolve(), [])
    server = LocalPostgres(base / "data", settings={"max_wal_size": "4GB", "checkpoint_timeout": "30min"})
    try:
        server.init()
        server.start()
        dsn = server.dsn()
        prepare(dsn)
        destination = destination_database(server, "destination")
        slots = [f"s{n}_{i}" for n in range(repeat) for i in range(len(variants))]
        reset(dsn, *slots)
        transactions = changes // 20
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CALL generate(%s, 10, 0)", [transactions])
            conn.execute("CALL touch(%s, 10, 0)", [transactions])
            end = wal_position(conn)
        total = transactions * 20
        print(f"{total:,} changes in {2 * transactions:,} transactions")
        measured: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        items = list(enumerate(variants.items()))
        for n in range(repeat):
            for i, (name, (tree, extra)) in in_turn(items, n):
                with psycopg.connect(destination, autocommit=True) as conn:
                    conn.execute("TRUNCATE bemi.changes, bemi.worker_state, bemi.chain")
                measured[name].append(run(tree, dsn, destination, f"s{n}_{i}", end, *extra))
                stored = count(destination)
                assert stored > 0, f"{name}: nothing stored"
        best: dict[str, Figures] = {}
        wall_ref = min(seconds for seconds, _ in measured["no rules"])
        for name, runs in measured.items():
            wall, cpu = min(seconds for seconds, _ in runs), min(cpu for _, cpu in runs)
            # Each round's CPU against no rules' in the same round: the machine's slow spells cancel out.
            ratio = statistics.median(round_ratios((c for _, c in runs), (c for _, c in measured["no rules"])))
            listed = ", ".join(f"{s:.2f}/{c:.2f}" for s, c in runs)
            print(f"{name:14} {total / wall:10,.0f} changes/s ({wall_ref / wall:.2f}x)   worker CPU {cpu:5.2f} s "
                  f"({ratio:.2f}x of no rules, median of rounds)   runs (wall/CPU s): {listed}")  # fmt: skip
            best[name] = Figures(total / wall, cpu, ratio)
        return best
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: the worker with column rules relative to no rules."""
    best = measure(50_000 if quick else 100_000, 3)
    return [
        Result(
            "tracking_overhead",
            f"{name}: changes/s, worker CPU",
            f"{figures.rate:,.0f} changes/s, {figures.cpu:.2f} s CPU",
            None if name == "no rules" else figures.cpu_ratio,
            "worker CPU with no rules (median of rounds)",
        )
        for name, figures in best.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose worker to compare with")
    args = parser.parse_args()
    measure(args.changes, args.repeat, args.baseline_tree)


if __name__ == "__main__":
    main()
