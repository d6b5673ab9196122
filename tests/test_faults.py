"""The capture pipeline under the faults production brings: a worker killed at random points under pgbench's
TPC-B load, its replication connection terminated, its destination and its source restarted, an idle source.

Every test ends with the same check: the stored changes equal the ground truth exactly (nothing lost, nothing
stored twice, the last stored state of each row equal to the table).

The normal suite runs short versions. `BEMI_LONG_TESTS=1 pytest tests/test_faults.py` runs the long ones: a
minute of pgbench with a dozen SIGKILLs, and more rounds of every other fault.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import bemi_asgi
from bemi_asgi._pgtext import parse_lsn
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.ops.postgres import LocalPostgres
from bemi_asgi.worker.pipeline import Worker

from .conftest import PgServer
from .worker_support import DESTINATION_SQL, changes, current_wal_lsn, drain, emit, prepare_source

ROOT = Path(__file__).parent.parent
LONG = os.environ.get("BEMI_LONG_TESTS", "") not in ("", "0")

pytestmark = pytest.mark.timeout(900 if LONG else 180)


def scalar(dsn: str, query: str, *args: Any) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, args or None).fetchone()
        assert row is not None
        return row[0]


def slot_positions(dsn: str, slot: str = "bemi") -> tuple[int, int]:
    """The slot's (confirmed_flush_lsn, restart_lsn)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [slot],
        ).fetchone()
    assert row is not None
    return parse_lsn(row[0]), parse_lsn(row[1])


def worker_command(source: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bemi_asgi", "worker", "--quiet", "--source", source, *extra]


def catch_up(source: str, *extra: str) -> None:
    """Run the CLI worker with --until-caught-up; it must exit 0."""
    result = subprocess.run(worker_command(source, "--until-caught-up", *extra), cwd=ROOT, capture_output=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()


# -- read-your-writes with the destination in the source database ------------------------------------------------


async def test_wait_for_ends_without_waiting_for_the_status_interval(database: str) -> None:
    """When the worker's own insert into bemi.changes is the last WAL before the position waited for, the worker
    still confirms past it on the walsender's next keepalive, not a status interval later."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    worker = Worker(database, status_interval=3600)  # only the keepalive path can confirm in time
    task = asyncio.create_task(worker.run())
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=1)
    bemi = bemi_asgi.Bemi(pool)
    try:
        for i in range(3):
            async with pool.acquire() as conn:
                with bemi_asgi.bemi_context(i=i):
                    await conn.execute("INSERT INTO items VALUES ($1)", i)
                # Wait until the worker stored it, so that its own write is in the WAL before the position.
                while await conn.fetchval("SELECT count(*) FROM bemi.changes") <= i:
                    assert not task.done(), task
                    await asyncio.sleep(0.01)
                lsn = await bemi_asgi.current_lsn(conn)
            assert lsn > await pool.fetchval("SELECT max(commit_lsn) FROM bemi.changes")
            # Neither the worker's status interval (an hour) nor the walsender's reply request (half its 60 s
            # timeout) comes within 10 s: only confirming on the walsender's keepalive ends this wait.
            await bemi.wait_for(lsn, timeout=10)
    finally:
        worker.stop()
        await task
        await pool.close()
    assert [c["context"] for c in changes(database)] == [{"i": 0}, {"i": 1}, {"i": 2}]


# -- pgbench TPC-B with a worker killed at random points ----------------------------------------------------------

PGBENCH_SECONDS = 60 if LONG else 6
# The long run kills until its pgbench run ends; the short one makes exactly 3 kills, starting pgbench again when a
# loaded machine runs the 6 s out before the third (a worker takes seconds to start there).
PGBENCH_KILLS = 1000 if LONG else 3


def pgbench(server: PgServer, dsn: str, *args: str) -> list[str]:
    """pgbench's command line for `dsn` (pgbench reads a URL where a database name goes)."""
    return [str(server.bin("pgbench")), *args, dsn]


def prepare_pgbench(server: PgServer, dsn: str) -> None:
    """pgbench's tables (scale 1: 100,000 accounts, 10 tellers, 1 branch), the migration tracking schema public
    (pgbench_history, which has no primary key, gets REPLICA IDENTITY FULL like every table), and the slot."""
    subprocess.run(pgbench(server, dsn, "-i", "-q", "-s", "1"), check=True, capture_output=True, timeout=120)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(migration_sql())
        identity = conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'pgbench_history'").fetchone()
        assert identity == ("f",)
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")


def assert_matches_pgbench_ground_truth(dsn: str) -> int:
    """Check the stored changes against pgbench's own record of what it did; return the transactions checked.

    Each TPC-B transaction updates one account, one teller and one branch by `delta` and inserts one history row
    with that delta, so pgbench_history is the ground truth for all four tables."""
    with psycopg.connect(dsn) as conn:

        def value(query: str) -> Any:
            row = conn.execute(query).fetchone()
            assert row is not None
            return row[0]

        history = value("SELECT count(*) FROM pgbench_history")
        assert history > 0
        per_table = dict(
            conn.execute("""SELECT "table" || ' ' || operation, count(*) FROM bemi.changes GROUP BY 1""").fetchall()
        )
        assert per_table == {
            "pgbench_history CREATE": history,
            "pgbench_accounts UPDATE": history,
            "pgbench_tellers UPDATE": history,
            "pgbench_branches UPDATE": history,
        }
        # One CREATE per history row, with the row's values (as multisets: history rows can repeat).
        stored_history = """SELECT (after->>'tid')::int, (after->>'bid')::int, (after->>'aid')::int,
                                   (after->>'delta')::int, (after->>'mtime')::timestamp
                              FROM bemi.changes WHERE "table" = 'pgbench_history'"""
        table_history = "SELECT tid, bid, aid, delta, mtime FROM pgbench_history"
        assert value(f"SELECT count(*) FROM ({table_history} EXCEPT ALL {stored_history}) x") == 0
        assert value(f"SELECT count(*) FROM ({stored_history} EXCEPT ALL {table_history}) x") == 0
        for table, key, balance in (
            ("pgbench_accounts", "aid", "abalance"),
            ("pgbench_tellers", "tid", "tbalance"),
            ("pgbench_branches", "bid", "bbalance"),
        ):
            # Per row: as many updates as history rows name it, and the balance deltas add up to the history's
            # and to the final balance (every balance starts at 0).
            mismatched = value(f"""
                WITH c AS (SELECT primary_key::int AS k, count(*) AS n,
                                  sum((after->>'{balance}')::bigint - (before->>'{balance}')::bigint) AS d
                             FROM bemi.changes WHERE "table" = '{table}' GROUP BY 1),
                     h AS (SELECT {key} AS k, count(*) AS n, sum(delta) AS d FROM pgbench_history GROUP BY 1)
                SELECT count(*) FROM {table} t LEFT JOIN c ON c.k = t.{key} LEFT JOIN h ON h.k = t.{key}
                 WHERE c.n IS DISTINCT FROM h.n OR c.d IS DISTINCT FROM h.d
                    OR t.{balance} <> coalesce(c.d, 0)""")
            assert mismatched == 0, f"{mismatched} rows of {table} disagree with pgbench_history"
            # The last stored state of each changed row is the row in the table.
            stale = value(f"""
                SELECT count(*) FROM {table} t
                  JOIN (SELECT DISTINCT ON (primary_key) primary_key, after FROM bemi.changes
                         WHERE "table" = '{table}' ORDER BY primary_key, commit_lsn DESC, ordinal DESC) l
                    ON l.primary_key = t.{key}::text
                 WHERE l.after <> to_jsonb(t)""")
            assert stale == 0, f"{stale} rows of {table} differ from their last stored state"
        # Each update's `before` is the previous update's `after`: no update of a row is missing in between.
        broken = value("""
            SELECT count(*) FROM (
                SELECT before, lag(after) OVER (PARTITION BY "table", primary_key ORDER BY commit_lsn, ordinal) AS prev
                  FROM bemi.changes WHERE operation = 'UPDATE') x
             WHERE prev IS NOT NULL AND prev <> before""")
        assert broken == 0
        return int(history)


def stored_count(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM bemi.changes"))


def test_pgbench_with_worker_killed_at_random_points(database: str, pg_server: PgServer) -> None:
    """Under pgbench's TPC-B load, a CLI worker killed with SIGKILL at random points and restarted, then run
    --until-caught-up, stores exactly one change per account, teller and branch update and per history row."""
    prepare_pgbench(pg_server, database)
    seed = int(os.environ.get("BEMI_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"BEMI_FAULT_SEED={seed}")  # shown with a failure: replays the same kill points

    def start_load() -> subprocess.Popen[bytes]:
        command = pgbench(pg_server, database, "-n", "-T", str(PGBENCH_SECONDS), "-c", "4", "-j", "2")
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    load = start_load()
    kills = 0
    try:
        while kills < PGBENCH_KILLS:
            if load.poll() is not None:
                output, _ = load.communicate()
                assert load.returncode == 0, output.decode()
                if LONG:
                    break
                load = start_load()
            before = stored_count(database)
            worker = subprocess.Popen(worker_command(database), cwd=ROOT, stderr=subprocess.PIPE)
            try:
                # Let it store something (so each life makes progress), then kill it at a random moment.
                while stored_count(database) <= before and load.poll() is None:
                    assert worker.poll() is None, worker.communicate()
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, 0.8))
            finally:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
            kills += 1
        output, _ = load.communicate(timeout=PGBENCH_SECONDS + 120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, output.decode()
    assert kills >= min(PGBENCH_KILLS, 3), f"seed {seed}: only {kills} kills"
    catch_up(database)
    transactions = assert_matches_pgbench_ground_truth(database)
    print(f"seed {seed}: {kills} SIGKILLs, {transactions} TPC-B transactions stored exactly once")


# -- connections terminated, destination and source restarted ------------------------------------------------------

ITEMS = "CREATE TABLE items (id int PRIMARY KEY, batch int NOT NULL, note text)"
ROWS_PER_TRANSACTION = 20


@pytest.fixture
def servers() -> Iterator[tuple[LocalPostgres, LocalPostgres]]:
    """Two dedicated clusters, a source and a destination, that a test may restart (the session's server is
    shared by every test)."""
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-faults-"))
    base.chmod(0o755)  # the servers may run as another user
    source, destination = LocalPostgres(base / "source"), LocalPostgres(base / "destination")
    try:
        for server in (source, destination):
            server.init()
            server.start()
        yield source, destination
    finally:
        for server in (source, destination):
            server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


class Producer(threading.Thread):
    """Commits numbered transactions of ROWS_PER_TRANSACTION inserts and one update, each with context
    {"batch": n}, reconnecting whenever the server goes away, until told to `finish()`.

    A transaction whose COMMIT was cut off may or may not have committed: the table is the ground truth."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.attempted = 0
        self.failures = 0
        self._finish = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._finish.is_set():
                try:
                    self._produce()
                except psycopg.OperationalError:
                    self.failures += 1
                    time.sleep(0.05)
        except BaseException as exc:
            self.error = exc
            raise

    def finish(self) -> None:
        self._finish.set()
        self.join()
        assert self.error is None

    def _produce(self) -> None:
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            while not self._finish.is_set():
                batch = self.attempted
                self.attempted += 1
                first = batch * ROWS_PER_TRANSACTION
                conn.execute(
                    "INSERT INTO items SELECT g, %s FROM generate_series(%s::int, %s::int) g",
                    [batch, first, first + ROWS_PER_TRANSACTION - 1],
                )
                conn.execute("UPDATE items SET note = 'updated' WHERE id = %s", [first])
                emit(conn, {"batch": batch})
                conn.commit()
                time.sleep(0.002)  # leave the worker some CPU


def assert_items_stored_exactly_once(source: str, destination: str) -> int:
    """Every row of `items` has exactly one CREATE and one UPDATE stored, with its transaction's context, and
    nothing else is stored; return the rows checked."""
    with psycopg.connect(source) as conn:
        rows = {int(i): (int(b), note) for i, b, note in conn.execute("SELECT id, batch, note FROM items")}
    stored = changes(destination)
    creates = [c for c in stored if c["operation"] == "CREATE"]
    updates = [c for c in stored if c["operation"] == "UPDATE"]
    assert len(creates) + len(updates) == len(stored)
    assert sorted(int(c["primary_key"]) for c in creates) == sorted(rows)
    assert all(c["context"] == {"batch": c["after"]["batch"]} for c in stored)
    updated = {i for i, (_, note) in rows.items() if note == "updated"}
    assert sorted(int(c["primary_key"]) for c in updates) == sorted(updated)
    assert updated == {i for i in rows if i % ROWS_PER_TRANSACTION == 0}
    return len(rows)


async def wait_for_progress(destination: str, task: asyncio.Task[None], producer: Producer) -> None:
    """Wait until the worker stores more changes than it has now."""
    start = await asyncio.to_thread(stored_count, destination)
    while await asyncio.to_thread(stored_count, destination) <= start:
        assert not task.done(), task
        assert producer.error is None
        await asyncio.sleep(0.02)


def terminate_walsender(dsn: str) -> int:
    """Terminate the replication connection from the server side; the number of walsenders terminated."""
    return int(scalar(dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication"))


async def test_terminated_walsender_and_restarted_destination_and_source(
    servers: tuple[LocalPostgres, LocalPostgres],
) -> None:
    """With its walsender terminated by the server, its destination server restarted and its source server
    crashed and restarted (so the slot may resend what it had confirmed), all while changes are committed, the
    worker stores every committed change exactly once with its context."""
    source_server, destination_server = servers
    source, destination = source_server.dsn(), destination_server.dsn()
    prepare_source(source, ITEMS, ["items"])
    with psycopg.connect(destination, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
    worker = Worker(source, destination=destination, max_backoff=0.5)
    task = asyncio.create_task(worker.run())
    producer = Producer(source)
    producer.start()
    terminated = 0
    try:
        for _ in range(5 if LONG else 1):
            await wait_for_progress(destination, task, producer)
            terminated += await asyncio.to_thread(terminate_walsender, source)
            await wait_for_progress(destination, task, producer)
            await asyncio.to_thread(destination_server.restart, mode="immediate")
            await wait_for_progress(destination, task, producer)
            await asyncio.to_thread(source_server.restart, mode="immediate")
            await wait_for_progress(destination, task, producer)
    finally:
        await asyncio.to_thread(producer.finish)
        worker.stop()
        await task
    assert terminated >= 1
    assert worker.stats.reconnects >= 3
    assert producer.failures >= 1  # the source restart did cut the application off
    await drain(source, destination=destination)
    assert assert_items_stored_exactly_once(source, destination) > 0


# -- an idle source --------------------------------------------------------------------------------------------------


def test_idle_source_slot_keeps_advancing(database: str) -> None:
    """With the CLI worker at its default intervals and only untracked tables written (and then nothing at all),
    the slot's confirmed_flush_lsn follows the source's WAL position and its restart_lsn moves on, so the source
    does not keep WAL for it."""
    prepare_source(database, ITEMS + "; CREATE TABLE untracked (id int)", ["items"])
    worker = subprocess.Popen(worker_command(database), cwd=ROOT, stderr=subprocess.PIPE)
    try:
        _, first_restart = slot_positions(database)
        deadline = time.monotonic() + 120
        with psycopg.connect(database, autocommit=True) as conn:
            # Untracked writes for a while, then none: each phase must end confirmed.
            for phase_seconds, writing in ((20 if LONG else 2, True), (20 if LONG else 2, False)):
                phase_end = time.monotonic() + phase_seconds
                while time.monotonic() < phase_end:
                    if writing:
                        with conn.transaction():
                            conn.execute("INSERT INTO untracked SELECT generate_series(1, 100)")
                            emit(conn, {"job": "untracked"})
                    time.sleep(0.01)
                conn.execute("CHECKPOINT")  # logs the running transactions a slot needs to move restart_lsn
                written = current_wal_lsn(database)
                while slot_positions(database)[0] < written:
                    assert worker.poll() is None, worker.communicate()
                    assert time.monotonic() < deadline, f"the slot stays behind {written}"
                    time.sleep(0.05)
            while slot_positions(database)[1] <= first_restart:
                assert worker.poll() is None, worker.communicate()
                assert time.monotonic() < deadline, "the slot's restart_lsn does not move"
                conn.execute("CHECKPOINT")
                time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 0, stderr.decode()
    assert stored_count(database) == 0
