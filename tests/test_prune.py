"""Retention (`bemi-asgi prune`, `maintain`) and the partitioned `bemi.changes`, against real PostgreSQL with the
real worker ingesting at the same time."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

import bemi_asgi
from bemi_asgi import Bemi, ConfigError
from bemi_asgi.cli import app
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.ops.prune import cutoff_for_age, prune
from bemi_asgi.ui import allow_all, bemi_ui
from bemi_asgi.worker.pipeline import Worker

from .worker_support import changes, drain

CUTOFF = datetime(2020, 2, 15, 12, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)


def prepare(dsn: str, *, partitioned: bool) -> None:
    """An `items` table tracked by the real migration (source and destination), and the worker's slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute(migration_sql(partition_by_month=partitioned).encode())
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")


def seed(dsn: str, times: list[datetime], *, first_lsn: int = 1) -> None:
    """Store changes committed at `times` directly (commit LSNs far below any the worker will store)."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            'INSERT INTO bemi.changes (primary_key, database, "schema", "table", operation, committed_at,'
            " queued_at, transaction_id, position, commit_lsn, ordinal, stream)"
            " VALUES (%s, 'old', 'public', 'archived', 'CREATE', %s, %s, 1, %s, %s, 1, 1)",
            [(str(n), at, at, first_lsn + n, first_lsn + n) for n, at in enumerate(times)],
        )


def committed_at(dsn: str, where: str = "true") -> list[datetime]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT committed_at FROM bemi.changes WHERE {where} ORDER BY committed_at").fetchall()
    return [row[0] for row in rows]


def test_ages_read_the_units_people_write_for_retention() -> None:
    """Days, weeks, calendar months and years (short or spelt out, any case), hours, minutes and seconds are ages;
    `m` and `M` are refused as ambiguous, a bare number or an unknown unit is refused, each naming the units."""
    now = datetime(2026, 3, 31, 12, 30, tzinfo=UTC)
    assert [now - cutoff_for_age(t, now) for t in ("90d", "90 days", "2w", "2W", "12h", "30min", "45s")] == [
        timedelta(days=90), timedelta(days=90), timedelta(weeks=2), timedelta(weeks=2), timedelta(hours=12),
        timedelta(minutes=30), timedelta(seconds=45),
    ]  # fmt: skip
    assert cutoff_for_age("1mo", now) == datetime(2026, 2, 28, 12, 30, tzinfo=UTC)
    assert cutoff_for_age("6 months", now) == datetime(2025, 9, 30, 12, 30, tzinfo=UTC)
    assert cutoff_for_age("1y", now) == cutoff_for_age("12mo", now) == datetime(2025, 3, 31, 12, 30, tzinfo=UTC)
    assert cutoff_for_age("1Y", datetime(2028, 2, 29, tzinfo=UTC)) == datetime(2027, 2, 28, tzinfo=UTC)
    for text in ("6m", "6M"):
        with pytest.raises(ConfigError, match=r"ambiguous .* write 6min or 6mo"):
            cutoff_for_age(text, now)
    for text, words in (("90", "is not an age"), ("d", "is not an age"), ("-1d", "is not an age"), ("3q", "unknown")):
        with pytest.raises(ConfigError, match=words) as raised:
            cutoff_for_age(text, now)
        assert "mo, y" in str(raised.value)


@pytest.mark.parametrize("partitioned", [False, True])
async def test_prune_deletes_exactly_what_is_older_while_the_worker_ingests(database: str, partitioned: bool) -> None:
    """With the worker storing a steady stream of new changes, prune deletes every change committed before the
    cutoff (down to the microsecond) in batches, keeps those at or after it, and every new change is stored."""
    prepare(database, partitioned=partitioned)
    old = [CUTOFF - timedelta(days=40) + timedelta(minutes=n) for n in range(1500)]
    boundary = [CUTOFF - TICK, CUTOFF, CUTOFF + TICK]
    seed(database, [*old, *boundary])
    worker = Worker(database, status_interval=0.5)
    task = asyncio.create_task(worker.run())
    stop_writing = threading.Event()
    written = 0

    def write() -> None:
        nonlocal written
        with psycopg.connect(database, autocommit=True) as conn:
            while not stop_writing.is_set() or written < 50:
                conn.execute("INSERT INTO items VALUES (%s, 'new')", [written])
                written += 1

    writer = asyncio.create_task(asyncio.to_thread(write))
    progress = io.StringIO()
    try:
        result = await asyncio.to_thread(prune, database, before=CUTOFF, batch_size=100, progress=progress)
        stop_writing.set()
        await writer
        async with Bemi(database) as bemi:
            await bemi.wait_for(await _current_lsn(database), timeout=30)
    finally:
        stop_writing.set()
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert result.deleted == len(old) + 1
    assert committed_at(database, "database = 'old'") == [CUTOFF, CUTOFF + TICK]
    assert len(changes(database, "database <> 'old'")) == written
    assert progress.getvalue().count("deleted") >= len(old) // 100  # one line per batch, then the total


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
def test_prune_deletes_older_changes_stored_after_newer_ones(database: str, partitioned: bool) -> None:
    """Prune walks the changes in commit order and stops where they reach the cutoff, yet a change committed before
    the cutoff but stored after newer ones (a clock stepped back) goes too, and every newer change stays."""
    prepare(database, partitioned=partitioned)
    # In commit order: 250 old changes, one at the cutoff, then old and new ones mixed.
    times = [CUTOFF - timedelta(days=3) + timedelta(minutes=n) for n in range(250)]
    times += [CUTOFF, CUTOFF - timedelta(days=1), CUTOFF + TICK, CUTOFF - TICK, CUTOFF + timedelta(days=1)]
    times += [CUTOFF - timedelta(days=2) + timedelta(seconds=n) for n in range(120)]
    seed(database, times)
    result = prune(database, before=CUTOFF, batch_size=100)
    assert result.deleted == len([at for at in times if at < CUTOFF])
    assert committed_at(database) == sorted(at for at in times if at >= CUTOFF)


async def _current_lsn(dsn: str) -> int:
    pool = await bemi_asgi.create_pool(dsn, min_size=1, max_size=1)
    try:
        return await bemi_asgi.current_lsn(pool)
    finally:
        await pool.close()


def test_dry_run_prints_the_count_and_deletes_nothing(database: str) -> None:
    """`prune --dry-run --before T` prints how many changes are older than T and leaves them all."""
    prepare(database, partitioned=False)
    seed(database, [CUTOFF - timedelta(days=1), CUTOFF - TICK, CUTOFF])
    result = CliRunner().invoke(app, ["prune", database, "--before", CUTOFF.isoformat(), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "2"
    assert "would delete 2 changes" in result.stderr
    assert len(committed_at(database)) == 3
    result = CliRunner().invoke(app, ["prune", database, "--older-than", "6m"])
    assert result.exit_code == 2
    assert "ambiguous" in result.stderr
    assert len(committed_at(database)) == 3


def test_prune_and_maintain_without_privileges_fail_in_one_line(database: str) -> None:
    """Run as a role that may read bemi.changes but not delete from it (nor create partitions), prune and maintain
    exit 2 with one line saying what the server refused, no traceback, and delete nothing."""
    prepare(database, partitioned=True)
    seed(database, [CUTOFF - timedelta(days=40), CUTOFF])
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA bemi TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA bemi TO {role}")
    reader = make_conninfo(database, user=role)
    try:
        for args in (
            ["prune", reader, "--before", CUTOFF.isoformat(), "--yes"],
            ["maintain", reader, "--months-ahead", "12"],
        ):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, (args[0], result.output)
            assert result.stderr.startswith(f"bemi-asgi {args[0]}: ")
            assert "permission denied" in result.stderr or "must be owner" in result.stderr, result.stderr
            assert result.stderr.count("\n") == 1, result.stderr
        assert len(committed_at(database)) == 2
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_large_delete_is_shown_and_waits_for_yes(database: str) -> None:
    """Above the confirmation threshold, prune without --yes prints what would go and deletes nothing (exit 1);
    with --yes it deletes; below the threshold it deletes without asking."""
    prepare(database, partitioned=False)
    seed(database, [CUTOFF - timedelta(days=2), CUTOFF - timedelta(days=1), CUTOFF])
    args = ["prune", database, "--before", CUTOFF.isoformat()]
    refused = CliRunner().invoke(app, [*args, "--confirm-above", "1"])
    assert refused.exit_code == 1, refused.output
    assert "would delete 2 changes" in refused.stderr
    assert "--yes" in refused.stderr
    assert len(committed_at(database)) == 3
    confirmed = CliRunner().invoke(app, [*args, "--confirm-above", "1", "--yes"])
    assert confirmed.exit_code == 0, confirmed.output
    assert committed_at(database) == [CUTOFF]
    seed(database, [CUTOFF - timedelta(days=3)])
    small = CliRunner().invoke(app, [*args, "--confirm-above", "1"])
    assert small.exit_code == 0, small.output
    assert committed_at(database) == [CUTOFF]


async def test_partitioned_table_ingests_answers_queries_and_prunes_whole_months(database: str) -> None:
    """On the partitioned table the worker stores changes, find/history/as_of and the change browser read them,
    and prune drops a month older than the cutoff whole, deletes the older rows of the month it cuts through
    and of the default partition, and creates the coming months' partitions."""
    prepare(database, partitioned=True)
    with psycopg.connect(database, autocommit=True) as conn:
        kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = 'bemi.changes'::regclass").fetchone()
        conn.execute(
            "CREATE TABLE bemi.changes_2020_01 PARTITION OF bemi.changes"
            " FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-02-01 00:00+00');"
            "CREATE TABLE bemi.changes_2020_02 PARTITION OF bemi.changes"
            " FOR VALUES FROM ('2020-02-01 00:00+00') TO ('2020-03-01 00:00+00')"
        )
    assert kind == ("p",)
    january = [datetime(2020, 1, 10, tzinfo=UTC) + timedelta(hours=n) for n in range(20)]
    in_default = [datetime(2019, 6, 1, tzinfo=UTC)]
    seed(database, [*january, CUTOFF - TICK, CUTOFF, *in_default])

    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=1)
    try:
        with bemi_asgi.bemi_context(user_id=7):
            await pool.execute("INSERT INTO items VALUES (1, 'pen')")
            await pool.execute("UPDATE items SET name = 'ink' WHERE id = 1")
    finally:
        await pool.close()
    await drain(database)
    async with Bemi(database) as bemi:
        found = await bemi.changes.find(table="items", context={"user_id": 7}, order="asc")
        history = await bemi.history("items", 1)
        state = await bemi.as_of("items", 1, at=datetime.now(UTC))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=bemi_ui(bemi, authorize=allow_all)), base_url="http://test"
        ) as client:
            timeline = await client.get("/")
            row_page = await client.get("/row", params={"table": "items", "key": "1"})
    assert [change.operation.value for change in found] == ["CREATE", "UPDATE"]
    assert [change.after["name"] for change in history] == ["pen", "ink"]
    assert state == {"id": 1, "name": "ink"}
    assert timeline.status_code == row_page.status_code == 200
    assert "ink" in row_page.text

    progress = io.StringIO()
    result = prune(database, before=CUTOFF, batch_size=7, progress=progress)
    assert result.dropped_partitions == ["changes_2020_01"]
    assert result.deleted == len(january) + 2  # the whole of January, the row just before the cutoff, 2019
    with psycopg.connect(database) as conn:
        gone = conn.execute("SELECT to_regclass('bemi.changes_2020_01') IS NULL").fetchone()
        this_month = datetime.now(UTC).strftime("changes_%Y_%m")
        present = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"bemi.{this_month}"]).fetchone()
    assert gone == (True,)
    assert present == (True,)
    assert committed_at(database, "database = 'old'") == [CUTOFF]
    assert len(changes(database, "database <> 'old'")) == 2
    assert "dropped partition bemi.changes_2020_01 (20 changes)" in progress.getvalue()


def test_maintain_creates_future_partitions_moving_rows_out_of_the_default_one(database: str) -> None:
    """`bemi-asgi maintain --months-ahead 6` creates the missing monthly partitions; a change that had landed in
    the default partition moves into its month's new partition."""
    prepare(database, partitioned=True)
    month_start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    later = month_start + timedelta(days=5 * 31 + 3)  # five months ahead: no partition yet
    seed(database, [later])
    with psycopg.connect(database) as conn:
        where = conn.execute("SELECT tableoid::regclass::text FROM bemi.changes").fetchone()
    assert where == ("bemi.changes_default",)
    result = CliRunner().invoke(app, ["maintain", database, "--months-ahead", "6"])
    assert result.exit_code == 0, result.output
    expected = f"bemi.changes_{later:%Y_%m}"
    assert expected in result.stdout.split()
    with psycopg.connect(database) as conn:
        where = conn.execute("SELECT tableoid::regclass::text FROM bemi.changes").fetchone()
    assert where == (expected,)
    assert committed_at(database) == [later]


async def test_partitioned_exactly_once_key_still_refuses_duplicates_and_restarts_store_nothing_twice(
    database: str,
) -> None:
    """On the partitioned table (stream, commit_lsn, ordinal, committed_at) is unique, so a duplicate change is
    refused; and running the worker again after everything is stored adds nothing (it skips by bemi.worker_state)."""
    prepare(database, partitioned=True)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT generate_series(1, 5), 'x'")
    await drain(database)
    await drain(database)
    stored = changes(database)
    assert len(stored) == 5
    first: dict[str, Any] = stored[0]
    with psycopg.connect(database) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            'INSERT INTO bemi.changes (database, "schema", "table", operation, committed_at, queued_at,'
            " transaction_id, position, commit_lsn, ordinal, stream) VALUES ('x', 'public', 'items', 'CREATE', %s, %s,"
            " 1, 1, %s, %s, %s)",
            [first["committed_at"], first["queued_at"], first["commit_lsn"], first["ordinal"], first["stream"]],
        )


def test_partitioned_migration_refuses_an_unpartitioned_table_and_rolls_back(database: str) -> None:
    """--partition-by-month on a database whose bemi.changes is a plain table fails with a hint; --down removes
    the partitioned table and its function."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(migration_sql(parts=["destination"]).encode())
        with pytest.raises(psycopg.errors.RaiseException, match="already exists and is not partitioned"):
            conn.execute(migration_sql(parts=["destination"], partition_by_month=True).encode())
        conn.execute(migration_sql(parts=["destination"], down=True).encode())
        conn.execute(migration_sql(parts=["destination"], partition_by_month=True).encode())
        conn.execute(migration_sql(parts=["destination"], partition_by_month=True).encode())  # idempotent
        conn.execute(migration_sql(parts=["destination"], down=True).encode())
        left = conn.execute(
            "SELECT to_regclass('bemi.changes'), to_regproc('bemi.create_changes_partitions')"
        ).fetchone()
    assert left == (None, None)
