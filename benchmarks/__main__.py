"""Run every benchmark and print one table of figures and ratios, with the machine they were measured on.

    python -m benchmarks [--quick] [--only NAME ...] [--markdown FILE]

Each benchmark also runs alone (`python -m benchmarks.middleware`, ...) with its own options and fuller output;
here each one's `results(quick)` is called in turn and its lines gathered. `--quick` uses smaller sizes (fewer
requests, rows and rounds) that still give meaningful ratios, in a few minutes. Every ratio is against a baseline
measured in the same run, on the same machine: compare ratios across machines, not absolute figures.
`--markdown FILE` also writes the table as Markdown (the README's performance section is generated that way).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bemi_asgi.ops.postgres import find_bin_dir
from benchmarks._support import Result

ROOT = Path(__file__).resolve().parent.parent

#: Module name and what it compares, in the order they run.
BENCHMARKS = {
    "middleware": "BemiMiddleware against the bare app (ASGI in process)",
    "write_overhead": "the bemi pool against a plain asyncpg pool",
    "server_emission": "pgbench transactions with the message statement against plain ones",
    "decode": "pgoutput decoding against touching each message",
    "worker_throughput": "the worker against pg_recvlogical; memory; lag",
    "destination": "COPY into bemi.changes, and each index, against the heap alone",
    "tracking_overhead": "worker with column rules against no rules",
    "sharding": "two workers on two publications against one worker on both",
    "backfill": "backfill baselines against COPY TO of the same table",
    "queries": "query helpers against SELECT 1",
    "ui": "change browser pages against find()",
    "overview": "the change browser's overview page against find()",
}


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        if found := re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE):
            cpu = found.group(1).strip()
    except OSError:
        pass
    memory = "?"
    try:
        if found := re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE):
            memory = f"{int(found.group(1)) / 2**20:.1f} GiB"
    except OSError:
        pass
    postgres = subprocess.run([str(find_bin_dir() / "postgres"), "--version"], capture_output=True, text=True)
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "PostgreSQL": postgres.stdout.strip().removeprefix("postgres (PostgreSQL) "),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "OS": f"{platform.system()} {platform.release()}",
    }


def ratio_text(result: Result) -> str:
    if result.ratio is None:
        return "baseline" if result.against else ""
    return f"{result.ratio:.2f}x {result.against}"


def table(results: list[Result]) -> list[tuple[str, str, str, str]]:
    return [(r.benchmark, r.case, r.figure, ratio_text(r)) for r in results]


def plain_text(info: dict[str, str], rows: list[tuple[str, str, str, str]], header: str) -> str:
    widths = [max(len(row[i]) for row in [("benchmark", "case", "figure", "ratio"), *rows]) for i in range(4)]
    lines = [header, *(f"  {key}: {value}" for key, value in info.items()), ""]
    for row in [("benchmark", "case", "figure", "ratio"), *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def markdown(info: dict[str, str], rows: list[tuple[str, str, str, str]], header: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [header, "", "| | |", "|---|---|", *(f"| {key} | {cell(value)} |" for key, value in info.items()), ""]
    lines += ["| benchmark | case | figure | ratio |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(cell(c) for c in row)} |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes in all")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run just these benchmarks")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as Markdown")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))  # the worker subprocesses import this tree
    info = machine()
    results: list[Result] = []
    for name in args.only or BENCHMARKS:
        print(f"\n== {name}: {BENCHMARKS[name]}", flush=True)
        collect: Callable[[bool], list[Result]] = importlib.import_module(f"benchmarks.{name}").results
        results += collect(args.quick)
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    sizes = "reduced sizes" if args.quick else "full sizes"
    header = f"Measured {when} with `python -m benchmarks{' --quick' if args.quick else ''}` ({sizes}) on:"
    rows = table(results)
    print("\n" + plain_text(info, rows, header))
    if args.markdown is not None:
        args.markdown.write_text(markdown(info, rows, header))
        print(f"\nwrote {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
