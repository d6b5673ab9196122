"""What the context message costs the server alone: pgbench transactions with and without it, no Python in the loop.

    python -m benchmarks.server_emission [--seconds 5] [--rounds 3] [--clients 8]

Starts a throwaway PostgreSQL with fsync on (and full_page_writes), then another with both off, and runs pgbench
(the server's own) at `--clients` connections on two workloads, a one-row insert and a one-row indexed read, each a
transaction of BEGIN, the statement, COMMIT, in three variants:

    plain                   BEGIN; statement; COMMIT
    + SELECT 1 with COMMIT  the COMMIT's query also runs `SELECT 1`: what any second statement costs
    + message with COMMIT   the COMMIT's query also runs the bemi pool's message statement (`emit_sql`, the text
                            the pool sends, for a three-key context): it writes the message in a transaction that
                            wrote, nothing in one that only read

each with `-M simple` (every query parsed and planned each time, as the pool sends the COMMIT) and `-M prepared`
(each statement parsed once per connection: the message as a statement the server does not re-plan). pgbench
cannot prepare two statements as one, so in prepared mode the extra statement and COMMIT are two round trips.
The variants take turns in every round (a different one first each round); each figure is the median over rounds of
the variant's transactions per second over the plain variant's in the same round.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import psycopg

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_asgi.capture.context import validate
from bemi_asgi.capture.pool import emit_sql
from bemi_asgi.ops.postgres import LocalPostgres
from benchmarks._support import DURABLE, Result, in_turn, round_ratios, throwaway_server

#: The context of every message: string values, so that its JSON text holds no `:` before a letter or digit, which
#: pgbench would read as one of its variables.
CONTEXT = {"user_id": "12345", "endpoint": "POST /orders", "request_id": "3f2b9c1e-8a4d-4e0b-9c7a-1d2e3f4a5b6c"}
SETUP = (
    "CREATE TABLE items (id bigserial PRIMARY KEY, v integer NOT NULL)",
    "INSERT INTO items (v) SELECT g FROM generate_series(1, 10000) AS g",
    "VACUUM ANALYZE items",
)
STATEMENTS = {
    "write": "\\set v random(1, 1000000)\nINSERT INTO items (v) VALUES (:v)",
    "read": "\\set id random(1, 10000)\nSELECT v FROM items WHERE id = :id",
}
FSYNC = {"fsync on": DURABLE, "fsync off": {}}
MODES = ("simple", "prepared")


class Figure(NamedTuple):
    case: str
    plain_tps: float
    ratio: float
    low: float
    high: float


def message_statement() -> str:
    """The message statement the bemi pool sends with COMMIT, without its closing semicolon."""
    sql = emit_sql(validate(CONTEXT)).removesuffix(";")
    assert not re.search(r":\w", sql), f"pgbench would read a variable in {sql!r}"
    return sql


def script(statement: str, extra: str | None, mode: str) -> str:
    """A pgbench script: BEGIN, `statement`, then COMMIT, with `extra` in the COMMIT's query (its own command in
    prepared mode, which cannot prepare two statements as one)."""
    commit = "COMMIT;" if extra is None else f"{extra} \\; COMMIT;" if mode == "simple" else f"{extra};\nCOMMIT;"
    return f"BEGIN;\n{statement};\n{commit}\n"


def pgbench_tps(server: LocalPostgres, dsn: str, path: Path, mode: str, seconds: int, clients: int) -> float:
    threads = min(clients, 2)
    command = [str(server.bin("pgbench")), "-n", "-M", mode, "-T", str(seconds), "-c", str(clients),
               "-j", str(threads), "-f", str(path), dsn]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds * 10 + 60).stdout
    found = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
    assert found is not None, out
    return float(found.group(1))


def turns(run: Callable[[Path], float], scripts: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    """Each variant's transactions per second in every round, the variants taking turns (a different one first
    each round, so that none always follows the same one)."""
    tps: dict[str, list[float]] = {name: [] for name in scripts}
    for n in range(rounds):
        for name in in_turn(list(scripts), n):
            tps[name].append(run(scripts[name]))
    return tps


def figures(tps: dict[str, list[float]], label: str) -> list[Figure]:
    """Each variant but `plain` against it: the median of the rounds' ratios, and the lowest and highest."""
    plain = tps["plain"]
    found = []
    for name, rates in tps.items():
        if name == "plain":
            continue
        ratios = round_ratios(rates, plain)
        case = label.format(name)
        found.append(Figure(case, statistics.median(plain), statistics.median(ratios), ratios[0], ratios[-1]))
    return found


def measure(seconds: int, rounds: int, clients: int) -> list[Figure]:
    """Every workload, variant, mode and fsync setting; print and return each variant's figure."""
    extras = {"plain": None, "+ SELECT 1 with COMMIT": "SELECT 1", "+ message with COMMIT": message_statement()}
    measured: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="bemi-asgi-pgbench-") as directory:
        for fsync, settings in FSYNC.items():
            with throwaway_server(settings) as server:
                dsn = server.dsn()
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for sql in SETUP:
                        conn.execute(sql)
                for mode, (workload, statement) in itertools.product(MODES, STATEMENTS.items()):
                    scripts = {}
                    for name, extra in extras.items():
                        scripts[name] = Path(directory) / f"{workload}-{mode}-{len(scripts)}.sql"
                        scripts[name].write_text(script(statement, extra, mode))
                    run = functools.partial(pgbench_tps, server, dsn, mode=mode, seconds=seconds, clients=clients)
                    label = f"{workload} transaction {{}}, -M {mode}, {fsync}, {clients} conn"
                    for figure in figures(turns(run, scripts, rounds), label):
                        measured.append(figure)
                        print(f"{figure.case:70} {figure.ratio:.2f}x plain ({figure.low:.2f}-{figure.high:.2f}), "
                              f"plain {figure.plain_tps:,.0f} tx/s", flush=True)  # fmt: skip
    return measured


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: each variant's transactions per second relative to plain ones."""
    seconds, rounds = (2, 2) if quick else (5, 3)
    return [
        Result(
            "server_emission",
            figure.case,
            f"{figure.plain_tps:,.0f} tx/s plain, rounds {figure.low:.2f}-{figure.high:.2f}x",
            figure.ratio,
            "plain pgbench transaction",
        )
        for figure in measure(seconds, rounds, 8)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="length of one pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant, taking turns")
    parser.add_argument("--clients", type=int, default=8, help="pgbench's connections")
    args = parser.parse_args()
    measure(args.seconds, args.rounds, args.clients)


if __name__ == "__main__":
    main()
