"""pgoutput decode rate on a real captured stream, in process.

    python -m benchmarks.decode [--rows N] [--per-transaction K] [--rounds R]

Starts a throwaway local PostgreSQL, inserts N rows of a 6-column table (K rows per transaction) and captures
the pgoutput messages once with `pg_logical_slot_peek_binary_changes`, then stops the server. Each message is held
as the worker receives it: a memoryview of the payload of an XLogData frame. Then, in interleaved rounds (each
variant keeps its best round, so a noisy neighbour slows all alike):

    baseline       bytes(buf[:1]) per message: the floor of touching each buffer from Python
    decode         bemi_asgi.worker.pgoutput.decode per message
    decode+values  decode, plus each Insert's row as stored JSON by the general path (row_json with the columns'
                   rules, then object_json): the worker's cost when its fast path does not apply

It prints messages/s for each and the ratio of the baseline's time to each variant's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg

from bemi_asgi.ops.postgres import LocalPostgres
from bemi_asgi.worker.pgoutput import Insert, Relation, decode
from bemi_asgi.worker.values import ValueEncoder, column_rule, object_json, row_json, value_encoder
from benchmarks._support import Result

TABLE = """
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    customer text NOT NULL,
    total numeric(12, 2) NOT NULL,
    status text,
    paid boolean NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


def capture(rows: int, per_transaction: int) -> list[memoryview]:
    """The pgoutput messages of `rows` inserts, each as a memoryview into a copy of its XLogData frame."""
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-bench-"))
    base.chmod(0o755)  # the server may run as another user
    try:
        with LocalPostgres(base / "data") as server, psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(TABLE)
            conn.execute("CREATE PUBLICATION bench FOR TABLE orders")
            conn.execute("SELECT pg_create_logical_replication_slot('bench', 'pgoutput')")
            for start in range(0, rows, per_transaction):
                conn.execute(
                    "INSERT INTO orders (id, customer, total, status, paid) "
                    "SELECT g, 'customer ' || g, (g %% 1000) * 1.25, CASE WHEN g %% 3 = 0 THEN 'shipped' END, "
                    "g %% 2 = 0 FROM generate_series(%s::bigint, %s::bigint) g",
                    [start + 1, min(start + per_transaction, rows)],
                )
            data = conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes('bench', NULL, NULL, 'proto_version', '1', "
                "'publication_names', 'bench', 'messages', 'true')"
            ).fetchall()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    header = b"w" + bytes(24)  # 'w', start LSN, end LSN, send time: the replication stream's XLogData framing
    return [memoryview(header + bytes(payload))[len(header) :] for (payload,) in data]


def baseline(buffers: Sequence[memoryview]) -> None:
    for buf in buffers:
        bytes(buf[:1])


def decode_only(buffers: Sequence[memoryview]) -> None:
    for buf in buffers:
        decode(buf)


def decode_and_convert(buffers: Sequence[memoryview]) -> None:
    relations: dict[int, tuple[Relation, list[ValueEncoder]]] = {}
    for buf in buffers:
        message = decode(buf)
        if type(message) is Insert:
            relation, encoders = relations[message.relation_oid]
            object_json(row_json(relation.columns, message.new, encoders))
        elif type(message) is Relation:
            relations[message.oid] = (message, [value_encoder(*column_rule(c.type_oid)) for c in message.columns])


def measure(rows: int, per_transaction: int, rounds: int) -> tuple[int, dict[str, float]]:
    """Capture, then time each variant (best of `rounds`); prints the table. Messages and best seconds."""
    buffers = capture(rows, per_transaction)
    inserts = sum(1 for buf in buffers if buf[0] == ord("I"))
    print(f"captured {len(buffers):,} messages ({inserts:,} inserts of a 6-column row, {per_transaction:,} per "
          f"transaction), {sum(map(len, buffers)) / len(buffers):.0f} bytes per message on average")  # fmt: skip
    variants: dict[str, Callable[[Sequence[memoryview]], None]] = {
        "baseline bytes(buf[:1])": baseline,
        "decode": decode_only,
        "decode+values": decode_and_convert,
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run(buffers)
            best[name] = min(best[name], time.perf_counter() - started)
    floor = best["baseline bytes(buf[:1])"]
    print(f"{'variant':<26}{'messages/s':>14}{'µs/message':>12}{'time vs baseline':>18}")
    for name, seconds in best.items():
        rate = len(buffers) / seconds
        print(f"{name:<26}{rate:>14,.0f}{seconds / len(buffers) * 1e6:>12.2f}{seconds / floor:>17.1f}x")
    return len(buffers), best


def results(quick: bool = False) -> list[Result]:
    """The figures for `python -m benchmarks`: messages/s, and time per message relative to touching each
    buffer from Python (how many times the floor)."""
    messages, best = measure(20_000 if quick else 100_000, 1_000, 3 if quick else 5)
    floor = best["baseline bytes(buf[:1])"]
    return [
        Result(
            "decode",
            name,
            f"{messages / seconds:,.0f} messages/s",
            None if seconds == floor else seconds / floor,
            "time of bytes(buf[:1])",
        )
        for name, seconds in best.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--per-transaction", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    measure(args.rows, args.per_transaction, args.rounds)


if __name__ == "__main__":
    main()
