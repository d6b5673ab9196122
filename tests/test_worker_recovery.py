"""The worker under failure: killed, stopped, its connections cut, its destination gone for a while.

Every test checks the same end state: each source row change is stored exactly once, with its own context.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bemi_asgi.worker.pipeline import Worker

from .conftest import PgServer, drop_database
from .worker_support import DESTINATION_SQL, changes, drain, emit, prepare_source

ROOT = Path(__file__).parent.parent
ITEMS = "CREATE TABLE items (id int PRIMARY KEY, batch int NOT NULL)"
ROWS_PER_TRANSACTION = 50

pytestmark = pytest.mark.timeout(120)


class Producer(threading.Thread):
    """Commits numbered transactions of ROWS_PER_TRANSACTION inserts, each with context {"batch": n}, until it
    has committed `transactions` or is told to `finish()`."""

    def __init__(self, dsn: str, transactions: int = 1_000_000) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.transactions = transactions
        self.committed = 0
        self._finish = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._produce()
        except BaseException as exc:
            self.error = exc
            raise

    def finish(self) -> int:
        """Stop committing; the number of transactions committed."""
        self._finish.set()
        self.join()
        assert self.error is None
        return self.committed

    def _produce(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            for batch in range(self.transactions):
                if self._finish.is_set():
                    break
                time.sleep(0.002)  # leave the worker some CPU
                first = batch * ROWS_PER_TRANSACTION
                conn.execute(
                    "INSERT INTO items SELECT g, %s FROM generate_series(%s::int, %s::int) g",
                    [batch, first, first + ROWS_PER_TRANSACTION - 1],
                )
                emit(conn, {"batch": batch})
                conn.commit()
                self.committed += 1


def assert_stored_exactly_once(dsn: str, transactions: int) -> None:
    stored = changes(dsn)
    keys = Counter(int(c["primary_key"]) for c in stored)
    assert len(stored) == transactions * ROWS_PER_TRANSACTION, f"{len(stored)} stored"
    assert set(keys) == set(range(transactions * ROWS_PER_TRANSACTION))
    assert max(keys.values()) == 1
    assert all(c["context"] == {"batch": c["after"]["batch"]} for c in stored)


def stored_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM bemi.changes").fetchone()
        assert row is not None
        return int(row[0])


def start_cli(dsn: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BEMI_SOURCE_URL": dsn}
    return subprocess.Popen(
        [sys.executable, "-m", "bemi_asgi", "worker", "--quiet", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_rows(dsn: str, process: subprocess.Popen[bytes], producer: Producer, minimum: int = 1) -> None:
    while stored_count(dsn) < minimum:
        assert process.poll() is None, process.communicate()
        assert producer.error is None
        time.sleep(0.02)


def test_sigkill_mid_stream_loses_and_duplicates_nothing(database: str) -> None:
    """A worker killed with SIGKILL while changes stream in, then restarted, stores every change exactly once."""
    prepare_source(database, ITEMS, ["items"])
    producer = Producer(database)
    producer.start()
    try:
        for _ in range(2):  # kill it twice, each time with changes still being committed
            process = start_cli(database)
            try:
                wait_for_rows(database, process, producer, minimum=stored_count(database) + 1)
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait()
    finally:
        committed = producer.finish()
    final = subprocess.run(
        [sys.executable, "-m", "bemi_asgi", "worker", "--quiet", "--until-caught-up", "--source", database],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert final.returncode == 0, final.stderr.decode()
    assert_stored_exactly_once(database, committed)


def test_sigterm_finishes_the_batch_acknowledges_and_exits_0(database: str) -> None:
    """SIGTERM makes the CLI store what it has, acknowledge exactly that, and exit 0."""
    prepare_source(database, ITEMS, ["items"])
    producer = Producer(database)
    producer.start()
    process = start_cli(database)
    try:
        wait_for_rows(database, process, producer)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.poll() is None:
            process.kill()
        committed = producer.finish()
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT (SELECT last_commit_lsn FROM bemi.worker_state), (SELECT max(commit_lsn) FROM bemi.changes),"
            " (SELECT count(*) FROM bemi.changes), (SELECT active FROM pg_replication_slots)"
        ).fetchone()
    assert row is not None
    assert row[0] == row[1]  # the stored progress covers exactly the stored rows
    assert row[2] % ROWS_PER_TRANSACTION == 0  # whole transactions only
    assert row[3] is False
    asyncio.run(drain(database))
    assert_stored_exactly_once(database, committed)


async def test_lost_connections_and_missing_destination_are_retried(database: str, pg_server: PgServer) -> None:
    """With its walsender and destination connections terminated and the destination database renamed away for
    a while, the worker reconnects and stores every change exactly once."""
    prepare_source(database, ITEMS, ["items"])
    name = database.rsplit("/", 1)[1] + "_dest"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    destination = pg_server.dsn(name)
    try:
        with psycopg.connect(destination, autocommit=True) as conn:
            conn.execute(DESTINATION_SQL)
        worker = Worker(database, destination=destination, max_backoff=0.5)
        task = asyncio.create_task(worker.run())
        producer = Producer(database)
        producer.start()

        def sabotage() -> None:
            with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:

                def terminate(where: str, *args: Any) -> None:
                    admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}", args)

                while stored_count(destination) == 0:
                    assert producer.error is None
                    assert not task.done()
                    time.sleep(0.02)
                terminate("datname = %s AND application_name = 'bemi-asgi worker'", name)
                time.sleep(0.3)
                terminate("backend_type = 'walsender' AND datname = %s", database.rsplit("/", 1)[1])
                time.sleep(0.3)
                # Rename the destination away (retry: the worker may reconnect between terminate and rename).
                for _ in range(100):
                    terminate("datname = %s", name)
                    try:
                        admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{name}_away"')
                        break
                    except psycopg.errors.ObjectInUse:
                        time.sleep(0.01)
                else:
                    raise AssertionError("could not rename the destination away")
                time.sleep(1.5)
                admin.execute(f'ALTER DATABASE "{name}_away" RENAME TO "{name}"')

        try:
            await asyncio.to_thread(sabotage)
        finally:
            committed = await asyncio.to_thread(producer.finish)
        worker.stop()
        await task
        assert worker.stats.reconnects >= 3
        await drain(database, destination=destination)
        assert_stored_exactly_once(destination, committed)
    finally:
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}_away" WITH (FORCE)')
        drop_database(pg_server.admin_dsn, name)


async def test_a_second_worker_on_the_slot_waits_and_takes_over(database: str) -> None:
    """A second worker on a slot another worker streams keeps retrying, and stores what comes after the first
    stops, so a standby worker never duplicates nor loses a change."""
    prepare_source(database, ITEMS, ["items"])

    def commit(item: int) -> None:
        with psycopg.connect(database) as conn:
            conn.execute("INSERT INTO items VALUES (%s, %s)", [item, item])
            emit(conn, {"batch": item})

    async def wait_stored(count: int, task: asyncio.Task[None]) -> None:
        while await asyncio.to_thread(stored_count, database) < count:
            assert not task.done()
            await asyncio.sleep(0.02)

    first = Worker(database)
    first_task = asyncio.create_task(first.run())
    await asyncio.to_thread(commit, 1)
    await wait_stored(1, first_task)
    standby = Worker(database, max_backoff=0.2)
    standby_task = asyncio.create_task(standby.run())
    while standby.stats.reconnects < 2:
        assert not standby_task.done()
        await asyncio.sleep(0.02)
    assert standby.stats.changes == 0
    first.stop()
    await first_task
    await asyncio.to_thread(commit, 2)
    await wait_stored(2, standby_task)
    standby.stop()
    await standby_task
    assert standby.stats.changes == 1
    stored = changes(database)
    assert [(c["primary_key"], c["context"]) for c in stored] == [("1", {"batch": 1}), ("2", {"batch": 2})]
