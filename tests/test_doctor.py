"""`bemi-asgi doctor`: each missing piece of a source is named in plain words, on real servers that lack it."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from typer.testing import CliRunner, Result

from bemi_asgi.cli import app
from bemi_asgi.ops.doctor import collect, diagnose
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.ops.postgres import LocalPostgres

from .conftest import PgServer
from .test_migration import apply, owner_dsn

__all__ = ["owner_dsn"]  # a fixture, used below

runner = CliRunner()


def doctor(dsn: str, *args: str) -> Result:
    return runner.invoke(app, ["doctor", dsn, *args])


def lines_with(result: Result, status: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(status)]


def test_prepared_database_is_all_good(database: str) -> None:
    """On a migrated database with tables, every check passes and the exit code is 0."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE events (payload jsonb)")
    apply(database, migration_sql())
    result = doctor(database)
    assert result.exit_code == 0, result.stdout
    assert "All good" in result.stdout
    assert lines_with(result, "MISSING") == []
    assert lines_with(result, "warning") == []
    assert "publication 'bemi' tracks 2 table(s)" in result.stdout
    assert "2 tracked table(s) have REPLICA IDENTITY FULL" in result.stdout
    assert any(line.startswith("ok       max_replication_slots is ") for line in result.stdout.splitlines())
    assert any(line.startswith("ok       max_wal_senders is ") for line in result.stdout.splitlines())


def test_inactive_worker_slot_is_not_all_good(database: str) -> None:
    """The worker's slot with nobody streaming it (the worker stopped) is a warning saying nothing is captured,
    so the verdict is not "All good"."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, migration_sql())
    apply(database, "SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
    apply(database, "INSERT INTO users SELECT generate_series(1, 100)")
    result = doctor(database)
    assert result.exit_code == 0, result.stdout
    (line,) = lines_with(result, "warning")
    assert "slot 'bemi' is inactive: no worker streams it" in line
    assert "All good" not in result.stdout


def test_slot_name_taken_by_another_database_blocks(database: str) -> None:
    """A slot of the worker's name in another database (which the worker would refuse) is MISSING, naming that
    database and --slot; another --slot is fine."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, migration_sql())
    other = database.rsplit("/", 1)[1] + "_other"
    apply(database, f'CREATE DATABASE "{other}"')
    other_dsn = database.rsplit("/", 1)[0] + "/" + other
    try:
        apply(other_dsn, "SELECT pg_create_logical_replication_slot('taken', 'pgoutput')")
        result = doctor(database, "--slot", "taken")
        assert result.exit_code == 1, result.stdout
        (line,) = lines_with(result, "MISSING")
        assert f"slot 'taken' is taken: it is a pgoutput slot of database '{other}'" in line
        assert "--slot" in line
        assert doctor(database, "--slot", "free").exit_code == 0
    finally:
        apply(database, "SELECT pg_drop_replication_slot('taken')")
        apply(database, f'DROP DATABASE "{other}"')


def test_missing_publication_blocks(database: str) -> None:
    """On a database never migrated, doctor says the publication is missing, how to create it, and exits with 1."""
    result = doctor(database)
    assert result.exit_code == 1
    (line,) = lines_with(result, "MISSING")
    assert "publication 'bemi' does not exist" in line
    assert "bemi-asgi sql-migration" in line
    assert "Not ready" in result.stdout


def test_other_publication_name(database: str) -> None:
    """--publication checks the named publication."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, migration_sql(publication="app changes"))
    assert doctor(database, "--publication", "app changes").exit_code == 0
    assert doctor(database).exit_code == 1


def test_replica_identity_problems_are_named_per_table(database: str) -> None:
    """A published table without a primary key or FULL identity blocks; one with only a primary key is a warning."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE events (payload jsonb)")
    apply(database, migration_sql())
    apply(database, "ALTER TABLE events REPLICA IDENTITY DEFAULT; ALTER TABLE users REPLICA IDENTITY DEFAULT")
    result = doctor(database)
    assert result.exit_code == 1
    (missing,) = lines_with(result, "MISSING")
    assert "table public.events has no primary key" in missing
    assert "UPDATE and DELETE on it fail" in missing
    assert "ALTER TABLE public.events REPLICA IDENTITY FULL" in missing
    (warning,) = lines_with(result, "warning")
    assert "table public.users does not have REPLICA IDENTITY FULL" in warning
    assert "only the primary key" in warning


def test_bemi_tables_in_the_publication_block(database: str) -> None:
    """A publication that contains bemi's own tables is reported, since the worker would record its own writes."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, migration_sql())
    apply(database, "ALTER PUBLICATION bemi ADD TABLE bemi.changes")
    result = doctor(database)
    assert result.exit_code == 1
    (line,) = lines_with(result, "MISSING")
    assert "bemi.changes" in line
    assert "its own writes" in line


def test_untracked_tables_without_event_trigger(database: str, owner_dsn: str) -> None:
    """Migrated without a superuser, tables created later are listed as untracked and the missing trigger explained."""
    apply(owner_dsn, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(owner_dsn, migration_sql())
    apply(owner_dsn, 'CREATE TABLE "Later Table" (id int PRIMARY KEY)')
    result = doctor(owner_dsn)
    # Not blocking: capture works for the tracked tables.
    warnings = lines_with(result, "warning")
    assert any('"Later Table"' in line and "not in publication 'bemi'" in line for line in warnings)
    assert any("not tracked automatically" in line for line in warnings)
    # The role lacks REPLICATION, which the worker needs.
    (missing,) = lines_with(result, "MISSING")
    assert "lacks the REPLICATION privilege" in missing
    assert "ALTER ROLE" in missing
    assert result.exit_code == 1


def test_slot_lag_is_reported(database: str) -> None:
    """A slot behind by more than --max-lag-mb is a warning with its lag; within the limit, a slot nobody streams
    (made by `sql-migration --create-slot`, say, for another worker) is still a warning: it keeps WAL."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, migration_sql())
    apply(database, "SELECT pg_create_logical_replication_slot('bemi_worker', 'pgoutput')")
    apply(database, "INSERT INTO users SELECT generate_series(1, 1000)")
    relaxed = doctor(database)
    assert relaxed.exit_code == 0
    (line,) = lines_with(relaxed, "warning")
    assert "slot 'bemi_worker' is inactive: no worker streams it" in line
    assert "start its worker (--slot bemi_worker)" in line
    strict = doctor(database, "--max-lag-mb", "0")
    assert strict.exit_code == 0  # a warning, not a blocker
    (line,) = lines_with(strict, "warning")
    assert "slot 'bemi_worker' (inactive) is" in line
    assert "pg_drop_replication_slot('bemi_worker')" in line


def test_old_server_version_blocks(database: str) -> None:
    """A server older than PostgreSQL 14 is reported as too old, and only that (real facts, version lowered)."""
    apply(database, migration_sql())
    with psycopg.connect(database, autocommit=True) as conn:
        facts = collect(conn, "bemi")
    assert not any(finding.blocking for finding in diagnose(facts))
    findings = diagnose(dataclasses.replace(facts, server_version_num=130012))
    (finding,) = findings
    assert finding.blocking
    assert finding.message.startswith("PostgreSQL 13.12 is too old")


def test_unreachable_server_is_an_error() -> None:
    """A DSN nobody answers gives a connection error and exit code 2, not a traceback."""
    result = runner.invoke(app, ["doctor", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"])
    assert result.exit_code == 2
    assert "cannot connect" in result.stderr


@pytest.fixture(scope="module")
def replica_level_server(pg_server: PgServer) -> Iterator[str]:
    """A second server without logical decoding: wal_level=replica and no replication slots or senders."""
    if pg_server.local is None:
        pytest.skip("needs local PostgreSQL binaries")
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-doctor-"))
    base.chmod(0o755)
    server = LocalPostgres(
        base / "data",
        bin_dir=pg_server.local.bin_dir,
        settings={"wal_level": "replica", "max_replication_slots": "0", "max_wal_senders": "0"},
    )
    try:
        server.init()
        server.start()
        yield server.dsn()
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def test_server_without_logical_decoding(replica_level_server: str) -> None:
    """On a server with wal_level=replica and no slots or senders, doctor names each setting and how to fix it."""
    result = doctor(replica_level_server)
    assert result.exit_code == 1
    missing = "\n".join(lines_with(result, "MISSING"))
    assert "wal_level is 'replica'" in missing
    assert "set wal_level = logical" in missing
    assert "max_replication_slots is 0" in missing
    assert "max_wal_senders is 0" in missing
    assert "publication 'bemi' does not exist" in missing


def test_publication_without_partition_root_is_set_by_the_migration_and_reported(database: str) -> None:
    """A publication sending partitions under their own names gets publish_via_partition_root from the migration
    (as it documents), and doctor warns about one that lacks it."""
    apply(
        database,
        "CREATE TABLE users (id int PRIMARY KEY);"
        "CREATE PUBLICATION bemi FOR TABLE users WITH (publish_via_partition_root = false)",
    )
    result = doctor(database)
    assert any("publish_via_partition_root" in line for line in lines_with(result, "warning")), result.stdout
    apply(database, migration_sql())
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = 'bemi'").fetchone() == (True,)
    result = doctor(database)
    assert lines_with(result, "warning") == [], result.stdout


def test_a_table_name_with_a_newline_cannot_forge_report_lines(database: str) -> None:
    """A table name holding a newline and a status word is printed escaped: every line of the report is one of
    doctor's own, and the name is shown as SQL that names the table."""
    forged = "t\nok       everything is fine\\"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE TABLE {} (id int)").format(psycopg.sql.Identifier(forged)))
        conn.execute(psycopg.sql.SQL("CREATE PUBLICATION bemi FOR TABLE {}").format(psycopg.sql.Identifier(forged)))
    result = doctor(database)
    assert "everything is fine" in result.stdout
    assert not any(line.startswith("ok       everything") for line in result.stdout.splitlines())
    [line] = [line for line in result.stdout.splitlines() if "everything is fine" in line]
    name = line.split("ALTER TABLE ", 1)[1].split(" REPLICA IDENTITY", 1)[0]
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {name} REPLICA IDENTITY FULL")
        assert conn.execute("SELECT relreplident FROM pg_class WHERE relname = %s", [forged]).fetchone() == ("f",)


def test_event_trigger_code_owned_by_another_role_blocks(database: str, owner_dsn: str) -> None:
    """On an installation where a role other than a superuser owns code the event trigger runs (as migrations
    before the ownership check could leave it), doctor names each object and exits with 1."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, migration_sql())
    assert lines_with(doctor(database), "MISSING") == []
    role = urlsplit(owner_dsn).username
    apply(database, f'ALTER FUNCTION bemi.track_table(name, regclass) OWNER TO "{role}"')
    result = doctor(database)
    assert result.exit_code == 1
    [line] = lines_with(result, "MISSING")
    assert f"function bemi.track_table(name,regclass) (owned by {role})" in line


def test_schema_change_recording_is_reported(database: str) -> None:
    """Doctor says whether the event triggers recording schema changes are in place, and warns once they are
    missing (a migration run without a superuser, or a trigger disabled)."""

    def schema_line() -> str:
        [line] = [line for line in doctor(database).stdout.splitlines() if "schema changes (DDL)" in line]
        return line

    apply(database, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, migration_sql())
    assert schema_line().startswith("ok")
    apply(database, "ALTER EVENT TRIGGER bemi_record_dropped_objects DISABLE")
    assert schema_line().startswith("warning")
    assert "not recorded" in schema_line()
