"""Many databases, one history, captured for real: several workers, each streaming one source stream into one
`bemi.changes`, checked against the ground truth of each source.

- Sharded capture: one database split over two publications of disjoint tables, one slot and one worker each.
  Context messages ignore publications, so both slots receive every transaction's context.
- Three sources on two clusters (one cluster with two databases) and a destination in a third database, under
  pgbench's TPC-B load with each transaction's context, the workers killed by SIGKILL at random moments and
  restarted; then every source's stored changes equal its pgbench ground truth, each with its own context.

`BEMI_FAULT_SEED=N` replays the kill points of a run (each run prints its seed); `BEMI_LONG_TESTS=1` runs longer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from bemi_asgi.ops.migration import migration_sql, slot_sql
from bemi_asgi.ops.postgres import LocalPostgres, throwaway_cluster
from bemi_asgi.worker.pipeline import Worker

from .conftest import PgServer, drop_database
from .test_faults import assert_matches_pgbench_ground_truth, catch_up, pgbench, worker_command
from .worker_support import emit

ROOT = Path(__file__).parent.parent
LONG = os.environ.get("BEMI_LONG_TESTS", "") not in ("", "0")

pytestmark = pytest.mark.timeout(900 if LONG else 300)


def fetch(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, args or None).fetchall()


# -- sharded capture of one database ------------------------------------------------------------------------------


async def test_two_publications_two_workers_store_each_change_once_with_its_context(database: str) -> None:
    """One database split over two publications (orders, payments) with a slot and a worker each: transactions
    touching both shards have each change stored once, by the worker of its table's shard, with the context of its
    transaction; transactions touching one shard reach only that shard's stream."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
        conn.execute("CREATE TABLE payments (id int PRIMARY KEY, amount int)")
        conn.execute(migration_sql(publication="shard_orders", tables=["public.orders"]).encode())
        conn.execute(migration_sql(publication="shard_payments", tables=["public.payments"], parts=["source"]).encode())
        for shard in ("orders", "payments"):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [f"shard_{shard}"])
    expected: list[tuple[str, str, str, str]] = []  # table, key, operation, request id of its transaction
    with psycopg.connect(database) as conn:
        for n in range(1, 41):
            request = f"r{n}"
            if n % 4 != 0:  # both shards, the payment first
                conn.execute("INSERT INTO payments VALUES (%s, %s)", [n, n * 10])
                expected.append(("payments", str(n), "CREATE", request))
            conn.execute("INSERT INTO orders VALUES (%s, %s)", [n, n])
            expected.append(("orders", str(n), "CREATE", request))
            if n % 5 == 0:
                conn.execute("UPDATE payments SET amount = %s WHERE id = 1", [n])
                expected.append(("payments", "1", "UPDATE", request))
            emit(conn, {"request_id": request})
            conn.commit()
    shards = ("orders", "payments")
    workers = [Worker(database, slot=f"shard_{shard}", publication=f"shard_{shard}") for shard in shards]
    await asyncio.gather(*(worker.run(until_caught_up=True) for worker in workers))
    rows = fetch(
        database,
        """SELECT c."table", c.primary_key, c.operation, c.context->>'request_id', s.slot_name
             FROM bemi.changes c JOIN bemi.streams s ON s.id = c.stream""",
    )
    assert sorted(row[:4] for row in rows) == sorted(expected)
    assert {(row[0], row[4]) for row in rows} == {("orders", "shard_orders"), ("payments", "shard_payments")}
    assert [worker.stats.changes for worker in workers] == [40, 30 + 8]


# -- three sources on two clusters, one destination ---------------------------------------------------------------

LOAD_SECONDS = 60 if LONG else 8
KILLS = 40 if LONG else 6

#: pgbench's TPC-B transaction with a context naming its source and account, emitted before COMMIT as the pool does.
TPCB_WITH_CONTEXT = """\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
SELECT pg_logical_emit_message(true, '_bemi', '{{"source": "{name}", "aid": ' || :aid || '}}');
END;
"""

#: The columns copied from the destination back to a source, to check them there against the source's tables.
COPIED = (
    'primary_key, "before", "after", context, database, "schema", "table", operation, committed_at, queued_at,'
    " transaction_id, position, commit_lsn, ordinal, stream"
)


@pytest.fixture
def second_cluster() -> Iterator[LocalPostgres]:
    """Another PostgreSQL cluster (its own system identifier) beside the session's server."""
    with throwaway_cluster("bemi-asgi-second-") as server:
        yield server


def create_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin_dsn.rsplit("/", 1)[0] + "/" + name


def prepare_source(server: PgServer, dsn: str, slot: str) -> None:
    """pgbench's tables, the source migration, and the slot made by the migration (`--create-slot`)."""
    subprocess.run(pgbench(server, dsn, "-i", "-q", "-s", "1"), check=True, capture_output=True, timeout=120)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(migration_sql(parts=["source"]).encode())
        conn.execute(slot_sql(slot).encode())


def assert_stream_matches_its_source(destination: str, source: str, name: str, slot: str) -> int:
    """The destination's changes of this source's stream, copied into the source database's own `bemi.changes`,
    against pgbench's ground truth there; every change carries its own transaction's context."""
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(migration_sql(parts=["destination"]).encode())
        identifier = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        database = conn.execute("SELECT current_database()").fetchone()
    (stream,) = fetch(
        destination,
        "SELECT id FROM bemi.streams WHERE system_identifier = %s AND database = %s AND slot_name = %s",
        *(identifier or ()),
        *(database or ()),
        slot,
    )
    with psycopg.connect(destination) as out, psycopg.connect(source) as into:
        select = f"COPY (SELECT {COPIED} FROM bemi.changes WHERE stream = {int(stream[0])}) TO STDOUT"
        with (
            out.cursor().copy(select) as reading,
            into.cursor().copy(f"COPY bemi.changes ({COPIED}) FROM STDIN") as writing,
        ):
            for data in reading:
                writing.write(data)
    transactions = assert_matches_pgbench_ground_truth(source)
    wrong_context = fetch(
        source,
        """SELECT count(*) FROM bemi.changes c
             JOIN (SELECT transaction_id, (after->>'aid')::int AS aid FROM bemi.changes
                    WHERE "table" = 'pgbench_history') h USING (transaction_id)
            WHERE c.context <> jsonb_build_object('source', %s::text, 'aid', h.aid)""",
        name,
    )
    assert wrong_context == [(0,)], name
    return transactions


def test_three_sources_on_two_clusters_into_one_destination(
    database: str, pg_server: PgServer, second_cluster: LocalPostgres, tmp_path: Path
) -> None:
    """Three sources (two databases of one cluster, one of another, two of them with the same database name and
    all with the same slot name) stream into one destination under pgbench load with contexts, their workers
    killed by SIGKILL at random moments and restarted: each source's changes equal its own ground truth, none
    duplicated or missing, each with its transaction's context, in three distinct streams."""
    seed = int(os.environ.get("BEMI_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"BEMI_FAULT_SEED={seed}")
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(migration_sql(parts=["destination"]).encode())
    suffix = f"{os.getpid()}_{database.rsplit('_', 1)[-1]}"
    names = {"a_shop": f"shop_{suffix}", "a_crm": f"crm_{suffix}", "b_shop": f"shop_{suffix}"}
    # Slot names are a cluster's: the two databases of the first cluster need two; the other cluster's is "bemi" too.
    slots = {"a_shop": "bemi", "a_crm": "bemi_crm", "b_shop": "bemi"}
    sources = {
        "a_shop": create_database(pg_server.admin_dsn, names["a_shop"]),
        "a_crm": create_database(pg_server.admin_dsn, names["a_crm"]),
        "b_shop": create_database(second_cluster.dsn(), names["b_shop"]),
    }
    workers: dict[str, subprocess.Popen[bytes]] = {}
    loads: list[subprocess.Popen[bytes]] = []
    try:
        for name, source in sources.items():
            prepare_source(pg_server, source, slots[name])
            script = tmp_path / f"{name}.sql"
            script.write_text(TPCB_WITH_CONTEXT.format(name=name))

        def start_worker(name: str) -> None:
            command = worker_command(sources[name], "--destination", database, "--slot", slots[name])
            workers[name] = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)

        for name in sources:
            start_worker(name)
        for name, source in sources.items():
            command = pgbench(pg_server, source, "-n", "-T", str(LOAD_SECONDS), "-c", "2", "-j", "1",
                              "-f", str(tmp_path / f"{name}.sql"))  # fmt: skip
            loads.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        kills = 0
        while kills < KILLS and any(load.poll() is None for load in loads):
            time.sleep(rng.uniform(0.1, 1.5 * LOAD_SECONDS / KILLS))
            victim = rng.choice(sorted(sources))
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            start_worker(victim)
            kills += 1
        for load in loads:
            output, _ = load.communicate(timeout=LOAD_SECONDS + 120)
            assert load.returncode == 0, output.decode()
        assert kills >= min(KILLS, 3), f"seed {seed}: only {kills} kills"
    finally:
        for process in [*workers.values(), *loads]:
            if process.poll() is None:
                process.kill()
                process.wait()
    try:
        for name in sources:
            catch_up(sources[name], "--destination", database, "--slot", slots[name])
        checked = {
            name: assert_stream_matches_its_source(database, source, name, slots[name])
            for name, source in sources.items()
        }
        assert fetch(database, "SELECT count(*), count(DISTINCT system_identifier) FROM bemi.streams") == [(3, 2)]
        print(f"seed {seed}: {kills} SIGKILLs; TPC-B transactions stored exactly once per source: {checked}")
    finally:
        drop_database(pg_server.admin_dsn, names["a_shop"])
        drop_database(pg_server.admin_dsn, names["a_crm"])
