"""Selective tracking and privacy end to end: real PostgreSQL, the real worker, configured tracking rules."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

import bemi_asgi
from bemi_asgi import Bemi, ConfigError, hash_value, skip_tracking
from bemi_asgi._pgtext import format_lsn
from bemi_asgi.cli import app
from bemi_asgi.ops.doctor import check_source, format_report
from bemi_asgi.worker.config import TrackingConfig, load_config
from bemi_asgi.worker.pipeline import Worker

from .worker_support import changes, drain, emit, prepare_source

KEY = "k" * 32
USERS = """
CREATE TABLE users (
    id int PRIMARY KEY,
    email text,
    password text,
    ssn text,
    age int,
    updated_at timestamptz DEFAULT now(),
    note text
)
"""
SECRETS = ("hunter2-PASSWORD", "078-05-1120-SSN")


def run_sql(dsn: str, *statements: str, context: dict[str, Any] | None = None) -> None:
    """Run `statements` in one transaction, emitting `context` at COMMIT like the pool does."""
    with psycopg.connect(dsn) as conn:
        for statement in statements:
            conn.execute(statement)
        if context is not None:
            emit(conn, context)


def privacy_config(**extra: Any) -> TrackingConfig:
    return load_config(
        ignore_columns=["public.users.ssn", "public.users.updated_at"],
        mask_columns=["public.users.password"],
        hash_columns=["public.users.email", "public.users.age"],
        environ={"BEMI_HASH_KEY": KEY},
        **extra,
    )


def stored_text(dsn: str) -> str:
    """Every stored change row, all columns, as text."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT c::text FROM bemi.changes c").fetchall()
    return "\n".join(row[0] for row in rows)


async def test_masked_and_ignored_values_never_reach_the_destination_spill_files_or_logs(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ignored and masked values appear nowhere: not in any stored row (before, after, key, context) nor in the
    spill files of a transaction larger than the spill threshold, nor in a log line."""
    from bemi_asgi.worker import spill as _spill

    spill_files: list[Path] = []

    def kept_temporary_file(**options: Any) -> Any:
        # A real file that outlives the buffer, so its bytes can be searched afterwards.
        file = tempfile.NamedTemporaryFile(dir=tmp_path, delete=False, prefix="spill-")  # noqa: SIM115
        spill_files.append(Path(file.name))
        return file

    monkeypatch.setattr(_spill.tempfile, "TemporaryFile", kept_temporary_file)
    caplog.set_level(logging.DEBUG, logger="bemi_asgi")
    prepare_source(database, USERS, ["users"])
    password, ssn = SECRETS
    run_sql(
        database,
        f"INSERT INTO users (id, email, password, ssn, age) SELECT g, 'u' || g || '@example.com', '{password}' || g,"
        f" '{ssn}' || g, 30 FROM generate_series(1, 40) g",
        context={"user_id": 1},
    )
    run_sql(database, f"UPDATE users SET password = '{password}-new', note = 'x' WHERE id = 1")
    run_sql(database, "UPDATE users SET password = 'other' WHERE id = 2")
    run_sql(database, "DELETE FROM users WHERE id = 3")
    await drain(database, tracking=privacy_config(), spill_threshold=5)

    stored = changes(database)
    assert [c["operation"] for c in stored] == ["CREATE"] * 40 + ["UPDATE", "UPDATE", "DELETE"]
    text = stored_text(database)
    assert "PASSWORD" not in text
    assert "SSN" not in text
    assert "hunter2" not in text
    assert "078-05" not in text
    assert "updated_at" not in text
    assert '"ssn"' not in text
    first = stored[0]
    assert first["after"]["password"] == "[masked]"
    assert first["after"]["email"] == hash_value("u1@example.com", key=KEY)
    assert first["after"]["age"] == hash_value(30, key=KEY)  # a hashed int is stored as its hash text
    assert first["primary_key"] == "1"
    assert first["context"] == {"user_id": 1}
    update = stored[40]
    assert update["before"]["password"] == update["after"]["password"] == "[masked]"
    assert (update["before"]["note"], update["after"]["note"]) == (None, "x")
    assert stored[41]["after"]["password"] == "[masked]"  # a change to a masked column alone is still stored
    assert stored[42]["before"]["password"] == "[masked]"
    assert "ssn" not in stored[42]["before"]

    assert spill_files, "the 40-row transaction should have spilled with a threshold of 5"
    spilled = b"".join(path.read_bytes() for path in spill_files)
    assert b"[masked]" in spilled  # the spill file holds the filtered rows
    assert b"PASSWORD" not in spilled
    assert b"SSN" not in spilled
    assert b"hunter2" not in spilled
    assert not any(secret in caplog.text for secret in SECRETS)


async def test_update_touching_only_ignored_columns_stores_nothing(database: str) -> None:
    """An UPDATE that changed only ignored columns (updated_at) produces no change; one that also changed a
    tracked column produces one without the ignored columns."""
    prepare_source(database, USERS, ["users"])
    run_sql(database, "INSERT INTO users (id, note) VALUES (1, 'a')")
    run_sql(database, "UPDATE users SET updated_at = now() + interval '1 hour', ssn = 'x' WHERE id = 1")
    run_sql(database, "UPDATE users SET updated_at = now() + interval '2 hours', note = 'b' WHERE id = 1")
    await drain(database, tracking=privacy_config())
    stored = changes(database)
    assert [c["operation"] for c in stored] == ["CREATE", "UPDATE"]
    assert (stored[1]["before"]["note"], stored[1]["after"]["note"]) == ("a", "b")
    assert "updated_at" not in stored[1]["after"]
    assert "updated_at" not in stored[1]["before"]


@pytest.mark.parametrize("drop", [True, False])
async def test_noop_update_is_dropped_only_when_asked(database: str, drop: bool) -> None:
    """`UPDATE ... SET name = name` is stored by default and dropped with drop_noop_updates; real updates stay."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY, name text)", ["items"])
    run_sql(database, "INSERT INTO items VALUES (1, 'a')")
    run_sql(database, "UPDATE items SET name = name")
    run_sql(database, "UPDATE items SET name = 'b'")
    await drain(database, tracking=load_config(drop_noop_updates=drop))
    operations = [(c["operation"], c["after"].get("name")) for c in changes(database)]
    noop = [] if drop else [("UPDATE", "a")]
    assert operations == [("CREATE", "a"), *noop, ("UPDATE", "b")]


async def test_hashed_values_are_searchable_with_the_documented_hash(database: str) -> None:
    """A hashed column's stored value is hash_value(text, key): find(after=...) finds it, a hashed primary key
    column makes primary_key the hash, and pgcrypto's hmac computes the same value in SQL."""
    prepare_source(database, USERS + "; CREATE TABLE tokens (token text PRIMARY KEY, owner int)", ["users", "tokens"])
    run_sql(database, "INSERT INTO users (id, email) VALUES (1, 'alice@example.com'), (2, 'bob@example.com')")
    run_sql(database, "INSERT INTO tokens VALUES ('tok-secret-1', 1)")
    config = load_config(hash_columns=["public.users.email", "tokens.token"], environ={"BEMI_HASH_KEY": KEY})
    await drain(database, tracking=config)
    async with Bemi(database) as bemi:
        found = await bemi.changes.find(table="users", after={"email": hash_value("alice@example.com", key=KEY)})
        history = await bemi.history("tokens", hash_value("tok-secret-1", key=KEY))
    assert [change.primary_key for change in found] == ["1"]
    assert [change.after for change in history] == [{"token": hash_value("tok-secret-1", key=KEY), "owner": 1}]
    assert "tok-secret" not in stored_text(database)


async def test_pgcrypto_hmac_computes_the_stored_hash_in_sql(database: str) -> None:
    """encode(hmac(text, key, 'sha256'), 'hex') in SQL equals the stored value of a hashed column."""
    with psycopg.connect(database, autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        except (psycopg.errors.FeatureNotSupported, psycopg.errors.UndefinedFile):
            pytest.skip("this PostgreSQL build ships without pgcrypto")
    prepare_source(database, USERS, ["users"])
    run_sql(database, "INSERT INTO users (id, email) VALUES (1, 'alice@example.com'), (2, 'bob@example.com')")
    await drain(database, tracking=load_config(hash_columns=["users.email"], environ={"BEMI_HASH_KEY": KEY}))
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT primary_key FROM bemi.changes WHERE after->>'email' = encode(hmac(%s::text, %s, 'sha256'), 'hex')",
            ["bob@example.com", KEY],
        ).fetchall()
    assert row == [("2",)]


async def test_excluded_and_not_included_tables_produce_nothing(database: str) -> None:
    """Tables matching an exclude pattern, or no include pattern, store nothing; the others are stored."""
    prepare_source(
        database,
        "CREATE SCHEMA audit; CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE sessions (id int PRIMARY KEY);"
        "CREATE TABLE audit.logs (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY)",
        ["items", "sessions", "audit.logs", "other"],
    )
    run_sql(
        database,
        "INSERT INTO items VALUES (1)",
        "INSERT INTO sessions VALUES (1)",
        "INSERT INTO audit.logs VALUES (1)",
        "INSERT INTO other VALUES (1)",
        "TRUNCATE sessions",
    )
    config = load_config(include=["public.*", "audit.*"], exclude=["public.sessions", "public.oth?r"])
    await drain(database, tracking=config)
    assert [(c["schema"], c["table"]) for c in changes(database)] == [("public", "items"), ("audit", "logs")]


async def test_skipped_transaction_stores_nothing_and_progress_moves_past_it(database: str) -> None:
    """A transaction written under skip_tracking() through the bemi pool stores nothing, the slot's confirmed
    position moves past it, and the transactions around it are stored."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY, name text)", ["items"])
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=1)
    try:
        with bemi_asgi.bemi_context(user_id=1):
            await pool.execute("INSERT INTO items VALUES (1, 'before')")
            with skip_tracking():
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("INSERT INTO items SELECT g, 'backfill' FROM generate_series(2, 50) g")
                    await conn.execute("UPDATE items SET name = 'backfilled' WHERE id = 1")
                skipped_end = await bemi_asgi.current_lsn(pool)
        worker = await drain(database, spill_threshold=10)
        assert [c["after"]["name"] for c in changes(database)] == ["before"]
        assert worker.stats.flushed_lsn >= skipped_end
        with psycopg.connect(database) as conn:
            row = conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'bemi'",
                [format_lsn(skipped_end)],
            ).fetchone()
        assert row == (True,)
        with bemi_asgi.bemi_context(user_id=2):
            await pool.execute("INSERT INTO items VALUES (100, 'after')")
        await drain(database)
        assert [c["after"]["name"] for c in changes(database)] == ["before", "after"]
    finally:
        await pool.close()


async def test_skip_is_stored_when_the_configuration_does_not_honor_it(database: str, tmp_path: Path) -> None:
    """With honor_skip = false, a transaction carrying `_bemi_skip` is stored like any other, context included."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    run_sql(database, "INSERT INTO items VALUES (1)", context={"_bemi_skip": True, "job": "backfill"})
    path = tmp_path / "bemi.toml"
    path.write_text("honor_skip = false\n")
    await drain(database, tracking=load_config(path))
    assert [c["context"] for c in changes(database)] == [{"_bemi_skip": True, "job": "backfill"}]


async def test_ignored_primary_key_column_is_refused_at_start(database: str) -> None:
    """Ignoring or masking a primary key column stops the worker at start with a ConfigError naming it; so does
    a rule naming a column the table lacks."""
    prepare_source(database, USERS, ["users"])
    with pytest.raises(ConfigError, match=r"public\.users\.id is ignored, but it is part of the primary key"):
        await Worker(database, tracking=load_config(ignore_columns=["users.id"])).run(until_caught_up=True)
    with pytest.raises(ConfigError, match=r"public\.users has no column pasword"):
        await Worker(database, tracking=load_config(mask_columns=["users.pasword"])).run(until_caught_up=True)


def test_worker_cli_reads_the_config_file(database: str, tmp_path: Path) -> None:
    """`bemi-asgi worker --config bemi.toml` (or BEMI_CONFIG) applies the file's rules; a bad file exits 2."""
    prepare_source(database, USERS + "; CREATE TABLE sessions (id int PRIMARY KEY)", ["users", "sessions"])
    run_sql(database, "INSERT INTO users (id, password, email) VALUES (1, 'pw-secret', 'a@b.c')")
    run_sql(database, "INSERT INTO sessions VALUES (1)")
    path = tmp_path / "bemi.toml"
    path.write_text(
        'exclude = ["public.sessions"]\n[tables."public.users"]\nmask = ["password"]\nhash = ["email"]\n'
        'ignore = ["updated_at"]\n'
    )
    result = CliRunner().invoke(
        app, ["worker", "--until-caught-up", "--quiet", "--source", database],
        env={"BEMI_CONFIG": str(path), "BEMI_HASH_KEY": KEY},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    stored = changes(database)
    assert [c["table"] for c in stored] == ["users"]
    assert stored[0]["after"]["password"] == "[masked]"
    assert stored[0]["after"]["email"] == hash_value("a@b.c", key=KEY)
    path.write_text('[tables."public.users"]\nmask = ["password"]\nmasks = ["x"]\n')
    result = CliRunner().invoke(app, ["worker", "--source", database, "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown key(s) masks" in result.stderr


def published(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'bemi' ORDER BY 1"
        ).fetchall()
    return [row[0] for row in rows]


def migrate(dsn: str, *args: str) -> None:
    result = CliRunner().invoke(app, ["sql-migration", *args])
    assert result.exit_code == 0, result.output
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(result.stdout.encode())


async def test_migration_exclusions_are_remembered_and_changed_with_one_command(database: str) -> None:
    """`sql-migration --exclude-table` leaves the table out of the publication (replica identity untouched), the
    event trigger does not add it back when it is created again, its changes are not captured; running the
    migration with --table takes it back, and --exclude-schema stops tracking a schema and its new tables."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA app; CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE sessions (id int PRIMARY KEY);"
            "CREATE TABLE app.jobs (id int PRIMARY KEY)"
        )
    migrate(database, "--schema", "public,app", "--exclude-table", "public.sessions")
    assert published(database) == ["app.jobs", "public.items"]
    with psycopg.connect(database, autocommit=True) as conn:
        identity = conn.execute("SELECT relreplident FROM pg_class WHERE oid = 'sessions'::regclass").fetchone()
        conn.execute("DROP TABLE sessions; CREATE TABLE sessions (id int PRIMARY KEY); CREATE TABLE notes (id int)")
        conn.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
        conn.execute("INSERT INTO sessions VALUES (1); INSERT INTO items VALUES (1)")
    assert identity == ("d",)
    assert published(database) == ["app.jobs", "public.items", "public.notes"]
    await drain(database)
    assert [c["table"] for c in changes(database)] == ["items"]

    migrate(database, "--schema", "public,app", "--exclude-table", "public.items")  # exclusions add up
    assert published(database) == ["app.jobs", "public.notes"]
    with psycopg.connect(database) as conn:
        identity = conn.execute("SELECT relreplident FROM pg_class WHERE oid = 'items'::regclass").fetchone()
    assert identity == ("d",)  # given back once no publication has it
    migrate(database, "--schema", "public", "--table", "public.sessions", "--exclude-schema", "app")
    assert published(database) == ["public.notes", "public.sessions"]
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE app.more (id int PRIMARY KEY)")
        excluded = conn.execute(
            "SELECT schemas::text[], excluded_tables FROM bemi.source_publications WHERE publication = 'bemi'"
        ).fetchone()
    assert published(database) == ["public.notes", "public.sessions"]
    assert excluded == (["public"], ['"public"."items"'])
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.later (id int PRIMARY KEY); ALTER PUBLICATION bemi DROP TABLE later")
    report = format_report(check_source(database, publication="bemi", max_lag_bytes=2**40))
    assert "later" in report  # doctor names tables missing from a tracked schema...
    assert "items" not in report  # ...but not excluded ones
    result = CliRunner().invoke(app, ["sql-migration", "--table", "public.items", "--exclude-table", "public.items"])
    assert result.exit_code == 2
    assert "both tracked and excluded" in result.stderr


async def test_table_added_while_running_with_an_ignored_key_column_stops_the_worker(database: str) -> None:
    """A table joining the publication after the worker started, whose primary key a wildcard rule ignores,
    stops the worker with a ConfigError when its first change arrives; nothing of it is stored."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    worker = Worker(database, tracking=load_config(ignore_columns=["*.*.code"]), status_interval=0.5)
    task = asyncio.create_task(worker.run())
    try:
        # Wait until it streams (its start-up check of the tables is behind it): no event to wait on here.
        while worker.stats.flushed_lsn == 0 and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        run_sql(
            database,
            "CREATE TABLE codes (code text PRIMARY KEY)",
            "ALTER PUBLICATION bemi ADD TABLE codes",
            "ALTER TABLE codes REPLICA IDENTITY FULL",
        )
        run_sql(database, "INSERT INTO codes VALUES ('secret-code')")
        with pytest.raises(ConfigError, match=r"public\.codes\.code is ignored, but it is part of the primary key"):
            await asyncio.wait_for(task, 30)
    finally:
        worker.stop()
        if not task.done():
            await asyncio.wait_for(task, 30)
    assert changes(database) == []


# -- revert never writes back what the worker did not store -----------------------------------------------------


async def test_revert_refuses_values_that_were_masked_hashed_or_ignored(database: str) -> None:
    """Reverting a DELETE would re-insert the mask marker (a known value that then authenticates), the HMAC as an
    email and defaults for ignored columns: the plan is refused, naming each column and why, even as a dry run.
    Reverting an UPDATE that changed a hashed column is refused too; one that changed only clear columns goes
    through (masked columns it did not change are left as they are)."""
    prepare_source(database, USERS, ["users"])
    password, ssn = SECRETS
    run_sql(database, f"INSERT INTO users (id, email, password, ssn, age) VALUES (1, 'a@example.com', '{password}',"
            f" '{ssn}', 30), (2, 'b@example.com', 'x', 'y', 40)", context={})  # fmt: skip
    run_sql(database, "UPDATE users SET email = 'c@example.com' WHERE id = 2", context={})
    run_sql(database, "UPDATE users SET note = 'n' WHERE id = 2", context={})
    run_sql(database, "DELETE FROM users WHERE id = 1", context={})
    await drain(database, tracking=privacy_config())
    async with Bemi(database) as bemi:
        delete, *_ = await bemi.changes.find(table="users", operation="DELETE")
        for dry_run in (True, False):
            with pytest.raises(bemi_asgi.QueryError) as refused:
                await bemi.revert(change=delete, dry_run=dry_run)
            message = str(refused.value)
            assert f"change {delete.id}" in message
            for words in ("password (masked)", "email (hashed)", "age (hashed)", "ssn (ignored)"):
                assert words in message, message
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT count(*) FROM users WHERE id = 1").fetchone() == (0,)
        email, note = sorted(await bemi.changes.find(table="users", operation="UPDATE"), key=lambda c: c.id)
        with pytest.raises(bemi_asgi.QueryError, match=r"email \(hashed\)"):
            await bemi.revert(change=email, dry_run=True, force=True)
        plan = await bemi.revert(transaction=note, dry_run=True)
        [statement] = plan.statements
        assert statement.sql.startswith('UPDATE "public"."users" SET "note" = ')
        assert "password" not in statement.sql


# -- partitions -------------------------------------------------------------------------------------------------


async def test_rules_apply_to_partitions_published_under_their_own_names(database: str) -> None:
    """With a publication that sends partitions under their own names (publish_via_partition_root off), a mask
    rule for the partitioned table masks the partition's values, and its other rules (hash, ignore) apply too;
    revert knows them for the partition's changes."""
    prepare_source(
        database,
        "CREATE TABLE accounts (id int PRIMARY KEY, token text, email text, seen int) PARTITION BY RANGE (id);"
        "CREATE TABLE accounts_p1 PARTITION OF accounts FOR VALUES FROM (0) TO (100);"
        "ALTER TABLE accounts_p1 REPLICA IDENTITY FULL",
        ["accounts"],
    )
    run_sql(database, "INSERT INTO accounts VALUES (1, 'tok-SECRET-1', 'a@example.com', 5)", context={})
    config = load_config(
        mask_columns=["public.accounts.token"], hash_columns=["public.accounts.email"],
        ignore_columns=["public.accounts.seen"], environ={"BEMI_HASH_KEY": KEY},
    )  # fmt: skip
    await drain(database, tracking=config)
    [change] = changes(database)
    assert (change["table"], change["after"]) == (
        "accounts_p1",
        {"id": 1, "token": "[masked]", "email": hash_value("a@example.com", key=KEY)},
    )
    assert "tok-SECRET-1" not in stored_text(database)
    # Revert reads the same rules for the partition: re-creating the row would write the marker and the hash.
    run_sql(database, "DELETE FROM accounts WHERE id = 1", context={})
    await drain(database, tracking=config)
    async with Bemi(database) as bemi:
        [delete] = await bemi.changes.find(table="accounts_p1", operation="DELETE")
        with pytest.raises(bemi_asgi.QueryError, match=r"token \(masked\), email \(hashed\), seen \(ignored\)"):
            await bemi.revert(change=delete, dry_run=True)


async def test_a_rule_matching_no_published_table_is_refused_at_start(database: str) -> None:
    """A rule naming a table the publication does not send (a typo, or a partition when changes arrive under the
    partitioned table's name) would never apply: the worker refuses to start, naming it."""
    prepare_source(database, USERS, ["users"])
    with pytest.raises(ConfigError, match=r"public\.userz.*matches no published table"):
        await drain(database, tracking=load_config(mask_columns=["public.userz.password"]))
