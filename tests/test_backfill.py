"""`bemi-asgi backfill`: baselines consistent with the stream, while the app writes and the worker runs.

The normal suite uses a few thousand rows; `BEMI_LONG_TESTS=1 pytest tests/test_backfill.py` runs the proof on
100,000 existing rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import psycopg
import pytest
from typer.testing import CliRunner

import bemi_asgi
from bemi_asgi import Bemi, Operation, QueryError, bemi_context
from bemi_asgi._pgtext import format_lsn
from bemi_asgi.cli import app
from bemi_asgi.ops.migration import load_sql, migration_sql
from bemi_asgi.ui import allow_all, bemi_ui
from bemi_asgi.worker.backfill import FIRST_ORDINAL, Backfill
from bemi_asgi.worker.config import load_config
from bemi_asgi.worker.pipeline import Worker

from .worker_support import prepare_source

LONG = os.environ.get("BEMI_LONG_TESTS", "") not in ("", "0")
ROWS = 100_000 if LONG else 4_000
ROOT = Path(__file__).resolve().parent.parent
BACKFILL_SQL = load_sql("destination_backfill_up.sql")

pytestmark = pytest.mark.timeout(900 if LONG else 180)

SCHEMA = """
CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL, qty integer, flag boolean, meta jsonb);
CREATE TABLE stock (region text, sku integer, qty integer NOT NULL, PRIMARY KEY (region, sku));
CREATE TABLE notes (body text);
"""


def seed(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO items SELECT g, 'item ' || g, g %% 100, g %% 2 = 0, jsonb_build_object('n', g)"
            " FROM generate_series(1, %s) g",
            [rows],
        )
        conn.execute("INSERT INTO stock SELECT 'EU', g, g FROM generate_series(1, 50) g")
        conn.execute("INSERT INTO notes VALUES ('no key')")


def prepare(dsn: str, *, rows: int = ROWS, slot: bool = True) -> None:
    """The tables with `rows` items written before capture began, the destination with the backfill's SQL, and
    (with `slot`) the worker's slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    seed(dsn, rows)
    prepare_source(dsn, "", ["items", "stock", "notes"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BACKFILL_SQL)
        if not slot:
            conn.execute("SELECT pg_drop_replication_slot('bemi')")


def table_rows(dsn: str, table: str = "items") -> dict[Any, dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT to_jsonb(t)::text FROM {table} t").fetchall()
    parsed = [json.loads(row[0]) for row in rows]
    return {row["id"]: row for row in parsed}


@dataclass
class App:
    """The application: random inserts, updates and deletes through the bemi pool, each with a context, one
    transaction at a time; every few transactions, a copy of the table and the WAL position it is the state at
    (the last eight are kept)."""

    dsn: str
    pool: asyncpg.Pool
    next_id: int = ROWS + 1
    transactions: int = 0
    samples: deque[tuple[int, dict[Any, dict[str, Any]]]] = field(default_factory=lambda: deque(maxlen=8))
    rng: random.Random = field(default_factory=lambda: random.Random(21))
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, sample_every: int = 100 if LONG else 20) -> None:
        while not self.stop.is_set():
            await self.transaction()
            if self.transactions % sample_every == 0:
                await self.sample()

    async def transaction(self) -> None:
        rng = self.rng
        self.transactions += 1
        with bemi_context(user=f"u{rng.randrange(5)}", request=self.transactions):
            async with self.pool.acquire() as conn, conn.transaction():
                for _ in range(rng.randrange(1, 4)):
                    kind = rng.random()
                    target = rng.randrange(1, self.next_id)
                    if kind < 0.3:
                        await conn.execute(
                            "INSERT INTO items VALUES ($1, $2, $3, true, '{\"new\": true}')",
                            self.next_id,
                            f"new {self.next_id}",
                            rng.randrange(100),
                        )
                        self.next_id += 1
                    elif kind < 0.8:
                        await conn.execute("UPDATE items SET qty = qty + 1, name = name || '+' WHERE id = $1", target)
                    else:
                        await conn.execute("DELETE FROM items WHERE id = $1", target)

    async def sampled_after(self, lsn: int | None, count: int = 2) -> None:
        """Wait until `count` copies were taken after `lsn` (moments after a backfill's snapshot)."""
        assert lsn is not None
        deadline = time.monotonic() + 120
        while sum(sample_lsn >= lsn for sample_lsn, _ in self.samples) < count:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    async def sample(self) -> None:
        """The table now, and the WAL position it is the state at (nothing else writes to it in between)."""
        async with self.pool.acquire() as conn:
            records = await conn.fetch("SELECT to_jsonb(t)::text AS row FROM items t")
            lsn = await bemi_asgi.current_lsn(conn)
        rows = [json.loads(record["row"]) for record in records]
        self.samples.append((lsn, {row["id"]: row for row in rows}))


@asynccontextmanager
async def running(dsn: str, *, worker: bool = True) -> AsyncIterator[App]:
    """The worker streaming (when `worker`) and the app writing, for the duration of the block; on exit every
    write is stored."""
    capture = Worker(dsn, status_interval=1.0) if worker else None
    worker_task = asyncio.create_task(capture.run()) if capture is not None else None
    pool = await bemi_asgi.create_pool(dsn, min_size=1, max_size=2)
    application = App(dsn, pool)
    app_task = asyncio.create_task(application.run())
    try:
        yield application
        await asyncio.sleep(0.3)  # writes after the backfill, too
    finally:
        application.stop.set()
        await app_task
        await pool.close()
        if capture is not None and worker_task is not None:
            capture.stop()
            await asyncio.wait_for(worker_task, 60)


async def catch_up(dsn: str) -> None:
    """Store everything committed so far (a worker run until caught up)."""
    await Worker(dsn).run(until_caught_up=True)


async def verify(dsn: str, application: App | None = None) -> None:
    """For every row, the stored history ends in the table's actual row; no row has two baselines; at each moment
    sampled after the baselines' snapshot, the table rebuilt from the history equals the copy taken then."""
    actual = table_rows(dsn)
    now = await _now_lsn(dsn)
    async with Bemi(dsn) as bemi:
        rebuilt = {row["id"]: row async for row in bemi.table_as_of("items", at=now)}
        assert rebuilt == actual
        rng = random.Random(7)
        for key in rng.sample(sorted(actual), min(300, len(actual))):
            assert await bemi.as_of("items", key, at=now) == actual[key]
        pool = await bemi.pool()
        duplicates = await pool.fetchval(
            "SELECT count(*) FROM (SELECT primary_key FROM bemi.changes WHERE operation = 'SNAPSHOT'"
            ' AND "table" = $1 GROUP BY 1 HAVING count(*) > 1) d',
            "items",
        )
        assert duplicates == 0
        newest_snapshot = await pool.fetchval("SELECT max(snapshot_lsn) FROM bemi.backfill_state")
        if application is not None:
            later = [(lsn, copy) for lsn, copy in application.samples if lsn >= newest_snapshot]  # the last few
            assert len(later) >= 2, (len(application.samples), application.transactions)
            for lsn, copy in later[-4:]:
                assert {row["id"]: row async for row in bemi.table_as_of("items", at=lsn)} == copy


async def _now_lsn(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await bemi_asgi.current_lsn(conn)
    finally:
        await conn.close()


async def test_backfill_while_the_app_writes_and_the_worker_streams(database: str) -> None:
    """With the worker's slot in use and the app writing, a backfill gives every existing row its state at one
    WAL position: afterwards as_of(now) is each row of the table, table_as_of at moments after the snapshot equals
    the table then, and untouched rows have a history that starts with their baseline."""
    prepare(database)
    async with running(database) as application:
        await asyncio.sleep(0.3)  # changes before the snapshot, streamed by the worker
        stats = await Backfill(database, batch_rows=500, rows_per_second=None if LONG else ROWS / 2).run()
        assert stats.skipped == ["public.notes: no primary key (its rows could not be found by key)"]
        assert stats.tables_done == ["public.items", "public.stock"]
        assert not stats.created_slot
        await application.sampled_after(stats.snapshot_lsn)
    await catch_up(database)
    await verify(database, application)
    async with Bemi(database) as bemi:
        pool = await bemi.pool()
        untouched = await pool.fetchval(
            "SELECT min(primary_key::int) FROM (SELECT primary_key FROM bemi.changes WHERE \"table\" = 'items'"
            " GROUP BY 1 HAVING bool_and(operation = 'SNAPSHOT')) AS untouched"
        )
        history = await bemi.history("items", untouched)
        assert [change.operation for change in history] == [Operation.SNAPSHOT]
        assert history[0].context == {"bemi_backfill": {"snapshot_lsn": format_lsn(stats.snapshot_lsn or 0)}}
        assert history[0].ordinal >= FIRST_ORDINAL
        assert history[0].ordinal < 0
        assert await bemi.as_of("stock", ("EU", 3), at=await _now_lsn(database)) == {"region": "EU", "sku": 3, "qty": 3}
        # A moment before the snapshot: only rows with stored changes are known.
        assert await bemi.as_of("items", untouched, at=(stats.snapshot_lsn or 0) - 1) is None
    # No temporary slot is left behind.
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT array_agg(slot_name::text) FROM pg_replication_slots").fetchone() == (["bemi"],)


async def test_a_killed_backfill_continues_without_duplicates(database: str) -> None:
    """SIGKILL half-way, then a second run: it continues after the last stored page (in a new snapshot), and the
    result is the same as one uninterrupted run, without a row stored twice."""
    prepare(database)
    async with running(database) as application:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bemi_asgi", "backfill", "--quiet", "--batch-rows", "250",
            "--rows-per-second", str(ROWS // 4),
            cwd=ROOT, env={**os.environ, "BEMI_SOURCE_URL": database}, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while _stored(database) < ROWS // 3:
                assert process.returncode is None, await process.communicate()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        with psycopg.connect(database) as conn:
            state = conn.execute("SELECT rows_stored, done, snapshot_lsn FROM bemi.backfill_state").fetchall()
        assert len(state) == 1
        assert not state[0][1]
        assert state[0][0] < ROWS
        first_snapshot = state[0][2]
        stats = await Backfill(database, batch_rows=1000).run()
        assert stats.tables_done == ["public.items", "public.stock"]
        assert stats.snapshot_lsn is not None
        assert stats.snapshot_lsn > first_snapshot
        await application.sampled_after(stats.snapshot_lsn)
    await catch_up(database)
    await verify(database, application)
    with psycopg.connect(database) as conn:
        parts = conn.execute(
            "SELECT count(DISTINCT commit_lsn) FROM bemi.changes WHERE operation = 'SNAPSHOT' AND \"table\" = 'items'"
        ).fetchone()
        assert parts == (2,)
        for _ in range(100):  # the killed run's temporary slot goes with its connection
            slots = conn.execute("SELECT array_agg(slot_name::text) FROM pg_replication_slots").fetchone()
            if slots == (["bemi"],):
                break
            await asyncio.sleep(0.05)
        assert slots == (["bemi"],)


def _stored(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(sum(rows_stored), 0) FROM bemi.backfill_state").fetchone()
    return int(row[0]) if row else 0


async def test_without_a_slot_the_backfill_creates_it_and_the_worker_continues_from_there(database: str) -> None:
    """No slot yet: the backfill creates the worker's slot with its snapshot, so the history of every row is its
    baseline followed by exactly the changes committed after it; revert never undoes a baseline."""
    prepare(database, rows=200, slot=False)
    stats = await Backfill(database).run()
    assert stats.created_slot
    assert stats.rows == 250
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=3)
    try:
        with bemi_context(user="alice"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("UPDATE items SET name = 'renamed' WHERE id = 1")
                await conn.execute("DELETE FROM items WHERE id = 2")
        await catch_up(database)
        await verify(database)
        async with Bemi(pool) as bemi:
            history = await bemi.history("items", 1)
            assert [c.operation for c in history] == [Operation.SNAPSHOT, Operation.UPDATE]
            assert history[0].after["name"] == "item 1"
            assert history[1].before == history[0].after
            assert [c.operation for c in await bemi.history("items", 2)] == [Operation.SNAPSHOT, Operation.DELETE]
            with pytest.raises(QueryError, match="only baselines"):
                await bemi.revert(change=history[0], dry_run=True)
            with pytest.raises(QueryError, match="only baselines"):
                await bemi.revert(context={"bemi_backfill": {}}, dry_run=True)
            async with pool.acquire() as conn:
                plan = await bemi.revert(conn, change=history[1])
            assert [s.sql.split()[0] for s in plan.statements] == ["UPDATE"]
            assert await pool.fetchval("SELECT name FROM items WHERE id = 1") == "item 1"
            # A row known from its baseline: reverting its one change is an UPDATE back, never a DELETE.
            with bemi_context(user="bob"):
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("UPDATE items SET qty = -1 WHERE id = 3")
            await catch_up(database)
            third = await bemi.history("items", 3)
            async with pool.acquire() as conn:
                plan = await bemi.revert(conn, context={"user": "bob"}, dry_run=True)
            assert [s.sql.split()[0] for s in plan.statements] == ["UPDATE"]
            assert third[0].operation is Operation.SNAPSHOT
    finally:
        await pool.close()


async def test_tracking_rules_apply_to_baselines_as_to_changes(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ignored, masked and hashed columns: a baseline stores exactly what the worker stores for a CREATE of the
    same values (a hashed key too)."""
    monkeypatch.setenv("BEMI_HASH_KEY", "k" * 32)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE users (id integer PRIMARY KEY, email text, password text, seen timestamptz, name text);"
            "CREATE TABLE tokens (token text PRIMARY KEY, owner integer);"
            "INSERT INTO users VALUES (1, 'a@example.com', 'secret', now(), 'Ann');"
            "INSERT INTO tokens VALUES ('t-1', 1);"
        )
    prepare_source(database, "", ["users", "tokens"])
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(BACKFILL_SQL)
    tracking = load_config(
        ignore_columns=["public.users.seen"], mask_columns=["public.users.password"],
        hash_columns=["public.users.email", "public.tokens.token"],
    )  # fmt: skip
    await Backfill(database, tracking=tracking).run()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO users VALUES (2, 'a@example.com', 'secret', now(), 'Ann')")
        conn.execute("INSERT INTO tokens VALUES ('t-2', 1)")
    await Worker(database, tracking=tracking).run(until_caught_up=True)
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            'SELECT "table", operation, primary_key, after FROM bemi.changes ORDER BY commit_lsn, ordinal'
        ).fetchall()
        state = conn.execute('SELECT "table", last_key FROM bemi.backfill_state ORDER BY 1').fetchall()
    baseline, created = rows[1][3], rows[2][3]
    assert [row[1] for row in rows] == ["SNAPSHOT", "SNAPSHOT", "CREATE", "CREATE"]
    assert baseline == {**created, "id": 1}
    assert baseline["password"] == "[masked]"
    assert "seen" not in baseline
    assert baseline["email"] == bemi_asgi.hash_value("a@example.com")
    assert rows[0][2] == bemi_asgi.hash_value("t-1")
    assert rows[0][3]["token"] == rows[0][2]
    assert state == [("tokens", None), ("users", ["1"])]  # a hashed key's clear text is never stored


def test_cli_backfills_chosen_tables_and_skips_finished_ones(database: str) -> None:
    """`--table` limits the run to tracked tables; a second run skips what is done; an untracked table is an
    error that says what to do; the destination SQL comes with `sql-migration`."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("CREATE TABLE untracked (id integer PRIMARY KEY)")
    seed(database, 30)
    with psycopg.connect(database, autocommit=True) as conn:
        for table in ("items", "stock", "notes"):
            conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
        conn.execute("CREATE PUBLICATION bemi FOR TABLE items, stock, notes")
    runner = CliRunner()
    result = runner.invoke(app, ["backfill", "--source", database, "--table", "public.items"])
    assert result.exit_code == 1, result.output
    assert "sql-migration" in result.output
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(migration_sql(parts=["destination"]))
        conn.execute(migration_sql(parts=["destination"]))  # idempotent
    result = runner.invoke(app, ["backfill", "--source", database, "--table", "public.items"])
    assert result.exit_code == 0, result.output
    assert "created replication slot 'bemi'" in result.output
    assert "30 rows" in result.output
    result = runner.invoke(app, ["backfill", "--source", database])
    assert result.exit_code == 0, result.output
    assert "public.items: already backfilled" in result.output
    assert "50 rows" in result.output
    assert "skipped public.notes: no primary key" in result.output
    result = runner.invoke(app, ["backfill", "--source", database, "--table", "public.untracked"])
    assert result.exit_code == 1, result.output
    assert "not in the publication" in result.output
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM bemi.changes WHERE operation = 'SNAPSHOT'").fetchone() == (80,)


def test_partitioned_destination_takes_baselines(database: str) -> None:
    """The migration widens the operation check on a partitioned bemi.changes too (without scanning it)."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(migration_sql(parts=["destination"], partition_by_month=True))
        conn.execute(migration_sql(parts=["destination"], partition_by_month=True))
        insert = (
            'INSERT INTO bemi.changes (database, schema, "table", operation, committed_at, queued_at,'
            " transaction_id, position, commit_lsn, ordinal, stream)"
            " VALUES ('d', 's', 't', %s, now(), now(), 0, 1, 1, %s, 1)"
        )
        conn.execute(insert, ["SNAPSHOT", FIRST_ORDINAL])
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(insert, ["OOPS", 1])


async def test_sigterm_finishes_the_page_and_a_rerun_completes(database: str) -> None:
    """SIGTERM: the page in flight is stored with its progress, the command says how to continue and exits 1;
    the next run completes the table."""
    prepare(database, rows=3000)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bemi_asgi", "backfill", "--batch-rows", "100", "--rows-per-second", "1000",
        cwd=ROOT, env={**os.environ, "BEMI_SOURCE_URL": database}, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while _stored(database) < 300:
        assert process.returncode is None, await process.communicate()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = await process.communicate()
    assert process.returncode == 1, stderr
    assert b"stopped; run it again to continue" in stderr
    with psycopg.connect(database) as conn:
        stored = conn.execute("SELECT count(*) FROM bemi.changes").fetchone()
        state = conn.execute("SELECT rows_stored, done, last_key FROM bemi.backfill_state").fetchone()
    assert state is not None
    assert stored == (state[0],)
    assert not state[1]
    assert state[2] == [str(state[0])]
    await Backfill(database).run()
    await verify(database)


KINDS = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE kinds (
    id integer PRIMARY KEY, i2 smallint, i8 bigint, num numeric, money numeric(10, 2), r real, d double precision,
    b boolean, t text, vc varchar(10), ch char(3), j json, jb jsonb, ts timestamp, tstz timestamptz, dt date,
    tm time, tmtz timetz, iv interval, u uuid, by bytea, ia integer[], ta text[], ja jsonb[], m mood, ip inet,
    big text, twice integer GENERATED ALWAYS AS (id * 2) STORED
);
INSERT INTO kinds VALUES
    (1, -3, 9007199254740993, 12345678901234567890.5, 19.90, 1.5, 'NaN', true, E'tab\\there "quoted" \\\\ é',
     'short', 'ab', '{"a": [1, 2.5, null]}', '{"z": 1, "a": {"b": "\\u00e9"}}', '2026-01-02 03:04:05.123',
     '2026-01-02 03:04:05.5+05:30', '2026-01-02', '03:04:05', '03:04:05+02', '1 day 02:00:00',
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff', '{1,NULL,3}', '{"a b","c,d",NULL,"e\\"f"}',
     ARRAY['{"k": 1}'::jsonb], 'happy', '10.0.0.1/8', repeat('x', 5000)),
    (2, NULL, NULL, 'Infinity', NULL, '-Infinity', 1e300, false, '', NULL, NULL, 'null', '[]', 'infinity',
     '-infinity', '0044-03-15 BC', '24:00:00', NULL, '-1 mon', NULL, '\\x', '{}', '{{"a","b"},{"c","d"}}', NULL,
     NULL, NULL, NULL),
    (3, 0, 0, 0, 0, 0, 0, NULL, E'line\\nbreak\\r\\x01', 'x', 'x', '"s"', '"s"', '10000-01-01 00:00:00',
     '1999-12-31 23:59:59.999999-08', 'infinity', '00:00:00.000001', '23:59:59.999999-14', '0', NULL, NULL,
     '[0:1]={7,8}', '{}', '{}', 'sad', '::1', '');
"""


@pytest.mark.parametrize("general_path", [False, True], ids=["fast path", "general path"])
async def test_a_baseline_stores_what_the_worker_stores_for_a_create(database: str, general_path: bool) -> None:
    """For every column type, a row's baseline stores the `after` the worker stores when the same values are
    inserted (through the worker's fast path, and through its general path, which any rule selects)."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(KINDS)
    prepare_source(database, "", ["kinds"])
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(BACKFILL_SQL)
    tracking = load_config(drop_noop_updates=True) if general_path else None
    await Backfill(database, tracking=tracking).run()
    with psycopg.connect(database, autocommit=True) as conn:
        columns = (
            "i2, i8, num, money, r, d, b, t, vc, ch, j, jb, ts, tstz, dt, tm, tmtz, iv, u, by, ia, ta, ja, m, ip, big"
        )
        conn.execute(f"INSERT INTO kinds SELECT id + 1000, {columns} FROM kinds")
    await Worker(database, tracking=tracking).run(until_caught_up=True)
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT operation, primary_key::int, after::text FROM bemi.changes ORDER BY commit_lsn, ordinal"
        ).fetchall()
    baselines = {key: after for operation, key, after in rows if operation == "SNAPSHOT"}
    created = {key - 1000: after for operation, key, after in rows if operation == "CREATE"}
    assert sorted(baselines) == [1, 2, 3]
    assert "twice" not in json.loads(baselines[1])  # a generated column is not sent by the stream either
    for key, after in baselines.items():
        assert after == created[key].replace(f'"id": {key + 1000}', f'"id": {key}')


async def test_the_change_browser_shows_baselines(database: str) -> None:
    """The timeline shows a baseline with its badge and its row image; on the row page (newest first) it is the
    oldest entry, and the row's state at its moment is the baseline."""
    prepare(database, rows=5, slot=False)
    await Backfill(database).run()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE items SET qty = 42 WHERE id = 1")
    await catch_up(database)
    async with Bemi(database) as bemi:
        history = await bemi.history("items", 1)
        app_ui = bemi_ui(bemi, authorize=allow_all)
        transport = httpx.ASGITransport(app=app_ui)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            timeline = await client.get("/", params={"op": "SNAPSHOT", "table": "items"})
            row = await client.get("/row", params={"table": "items", "key": "1"})
            then = await client.get(
                "/row", params={"table": "items", "key": "1", "at": history[0].committed_at.isoformat()}
            )
    assert timeline.status_code == 200
    assert timeline.text.count('class="op op-SNAPSHOT"') == 5
    assert "5 fields:" in timeline.text
    assert row.status_code == 200
    assert row.text.index("op-UPDATE") < row.text.index("op-SNAPSHOT")  # newest first: the baseline ends the page
    assert then.status_code == 200
    assert "Set by the snapshot" in then.text


async def test_a_least_privileged_role_can_backfill(database: str) -> None:
    """The grants the README lists for the worker's role, plus bemi.backfill_state, are all a backfill needs."""
    prepare(database, rows=100)
    role = f"bemi_backfill_{abs(hash(database)) % 10**8}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
        conn.execute(f"GRANT SELECT ON items, stock, notes TO {role}")
        conn.execute(f"GRANT USAGE ON SCHEMA bemi TO {role}")
        conn.execute(f"GRANT SELECT, INSERT ON bemi.changes TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON bemi.backfill_state TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON bemi.streams TO {role}")
        conn.execute(f"GRANT SELECT, INSERT ON bemi.chain TO {role}")
        conn.execute(f"GRANT SELECT ON bemi.chain_anchors TO {role}")
    try:
        stats = await Backfill(
            urlsplit(database)._replace(netloc=f"{role}@{urlsplit(database).netloc.split('@')[-1]}").geturl()
        ).run()
        assert stats.rows == 150
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


async def test_a_table_with_a_hashed_key_starts_over_and_replaces_its_partial_baselines(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped half-way, a table whose key is hashed kept no last key (its clear text): the next run starts it
    over and replaces the partial baselines, so each row still has exactly one."""
    monkeypatch.setenv("BEMI_HASH_KEY", "k" * 32)
    prepare(database, rows=2000)
    tracking = load_config(hash_columns=["public.items.id"])
    first = Backfill(database, tracking=tracking, batch_rows=100, rows_per_second=2000, tables=[("public", "items")])
    task = asyncio.create_task(first.run())
    deadline = time.monotonic() + 60
    while _stored(database) < 300:
        assert not task.done()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    first.stop()
    await task
    assert first.stopped
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT last_key, done FROM bemi.backfill_state").fetchall() == [(None, False)]
    second = await Backfill(database, tracking=tracking, tables=[("public", "items")]).run()
    assert second.rows == 2000
    with psycopg.connect(database) as conn:
        keys = conn.execute("SELECT primary_key FROM bemi.changes WHERE operation = 'SNAPSHOT'").fetchall()
        lsns = conn.execute("SELECT count(DISTINCT commit_lsn) FROM bemi.changes").fetchone()
    assert len(keys) == len(set(keys)) == 2000
    assert (keys[0][0] or "").isalnum()
    assert len(keys[0][0] or "") == 64
    assert lsns == (1,)
