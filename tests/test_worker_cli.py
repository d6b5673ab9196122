"""`bemi-asgi worker` on the command line: options from the environment, progress line, readiness errors."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from typer.testing import CliRunner

from bemi_asgi import SourceNotReadyError, Worker
from bemi_asgi._pgtext import format_lsn
from bemi_asgi.cli import app
from bemi_asgi.ops.postgres import LocalPostgres, free_port

from .worker_support import DESTINATION_SQL, changes, current_wal_lsn, emit, prepare_source


def test_until_caught_up_stores_everything_and_prints_progress(database: str) -> None:
    """`worker --until-caught-up` (source from BEMI_SOURCE_URL) stores what is committed, prints a progress line
    on stderr and exits 0."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"], slot="cli")
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items SELECT generate_series(1, 5)")
        emit(conn, {"job": "cli"})
    result = CliRunner().invoke(
        app,
        ["worker", "--until-caught-up", "--slot", "cli", "--progress-interval", "0.05"],
        env={"BEMI_SOURCE_URL": database},
    )
    assert result.exit_code == 0, result.output
    assert "5 changes in 1 transactions" in result.stderr
    assert [c["context"] for c in changes(database)] == [{"job": "cli"}] * 5


def test_until_lsn_stores_what_committed_before_it_and_exits(database: str) -> None:
    """`worker --until-lsn` stores what committed before that position and exits 0; a position that is not one, or
    both stopping options, exit 2 naming the option."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"], slot="cli")
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT generate_series(1, 3)")
    position = format_lsn(current_wal_lsn(database))
    command = ["worker", "--source", database, "--slot", "cli", "--quiet"]
    result = CliRunner().invoke(app, [*command, "--until-lsn", position])
    assert result.exit_code == 0, result.output
    assert sorted(int(c["primary_key"]) for c in changes(database)) == [1, 2, 3]
    for wrong in (["--until-lsn", "16-B374D848"], ["--until-lsn", position, "--until-caught-up"]):
        result = CliRunner().invoke(app, [*command, *wrong])
        assert result.exit_code == 2, result.output
        assert "--until-lsn" in result.stderr
        assert "Traceback" not in result.output


def test_quiet_prints_nothing(database: str) -> None:
    """`--quiet` silences the progress line."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    result = CliRunner().invoke(app, ["worker", "--until-caught-up", "--quiet", "--source", database])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_missing_publication_exits_1_naming_the_fix(database: str) -> None:
    """A source without the publication makes the command exit 1 with a message naming `bemi-asgi sql-migration`."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
    result = CliRunner().invoke(app, ["worker", "--source", database, "--publication", "missing"])
    assert result.exit_code == 1
    assert "bemi-asgi sql-migration" in result.stderr
    assert "Traceback" not in result.output


def test_source_without_logical_wal_level_is_a_clear_error() -> None:
    """A server with wal_level=replica is refused with a message naming wal_level=logical and `bemi-asgi doctor`."""
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-replica-"))
    base.chmod(0o755)
    try:
        server = LocalPostgres(base / "data", settings={"wal_level": "replica"})
    except FileNotFoundError as exc:  # pragma: no cover - no local binaries (external test server)
        pytest.skip(str(exc))
    try:
        server.init()
        server.start()
        result = CliRunner().invoke(app, ["worker", "--source", server.dsn()])
        assert result.exit_code == 1
        assert "wal_level=logical" in result.stderr
        assert "bemi-asgi doctor" in result.stderr
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def test_start_and_stop_lines_name_the_slot_and_its_position(database: str) -> None:
    """The first start says it created the slot and where capture starts, a later start that it streams the slot
    from its position, and each run ends with a stop line; no line shows a position before one was acknowledged."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    first = CliRunner().invoke(app, ["worker", "--until-caught-up", "--slot", "fresh", "--source", database])
    assert first.exit_code == 0, first.output
    lines = first.stderr.splitlines()
    assert lines[0].startswith("bemi-asgi worker: created slot 'fresh' of database "), lines
    assert lines[-1].startswith("bemi-asgi worker: stopped: 0 changes in 0 transactions stored"), lines
    assert "flushed 0/0" not in first.stderr
    assert "lag ?" not in first.stderr
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO items VALUES (1)")
    again = CliRunner().invoke(app, ["worker", "--until-caught-up", "--slot", "fresh", "--source", database])
    assert again.exit_code == 0, again.output
    assert again.stderr.startswith("bemi-asgi worker: streaming slot 'fresh' of database "), again.stderr
    assert "stopped: 1 changes in 1 transactions stored, flushed " in again.stderr


def test_a_destination_that_refuses_leaves_no_slot_behind(database: str) -> None:
    """A worker whose destination cannot be used (a database that does not exist) exits 1 at once, in one line,
    without having created the source's slot."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    missing = database.rsplit("/", 1)[0] + "/no_such_destination"
    result = CliRunner().invoke(app, ["worker", "--source", database, "--destination", missing, "--slot", "never"])
    assert result.exit_code == 1, result.output
    assert "no_such_destination" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'never'").fetchone() == (0,)


def test_an_unknown_source_database_stops_the_worker_at_once(database: str) -> None:
    """Retrying cannot create a database: an unknown source database ends the worker (exit 1, one line) instead
    of being retried forever."""
    missing = database.rsplit("/", 1)[0] + "/no_such_source"
    result = CliRunner().invoke(app, ["worker", "--source", missing])
    assert result.exit_code == 1, result.output
    assert 'database "no_such_source" does not exist' in result.stderr
    assert "retrying" not in result.stderr


async def test_until_caught_up_gives_up_after_its_retry_window() -> None:
    """With `until_caught_up`, a source that keeps refusing connections is retried for `give_up_after` seconds
    without progress, then SourceNotReadyError says why."""
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/app?connect_timeout=2"
    worker = Worker(dead, max_backoff=0.2)
    with pytest.raises(SourceNotReadyError, match=r"gave up after .* s of retries without progress"):
        await worker.run(until_caught_up=True, give_up_after=1.0)
    assert worker.stats.reconnects >= 1


def test_a_role_without_replication_stops_the_worker_at_once(database: str) -> None:
    """A role without the REPLICATION attribute, on a source whose slot already exists (made by the migration),
    cannot start a WAL sender however often it retries: the worker exits 1 at once with one line naming the
    attribute, instead of retrying forever."""
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    role = f"no_replication_{database.rsplit('_', 1)[-1]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN NOREPLICATION")
        conn.execute(f"GRANT SELECT ON items TO {role}")
    source = urlsplit(database)._replace(netloc=f"{role}@{urlsplit(database).netloc.rsplit('@', 1)[-1]}").geturl()
    try:
        result = CliRunner().invoke(app, ["worker", "--source", source, "--destination", database])
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
    assert result.exit_code == 1, result.output
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "REPLICATION attribute" in result.stderr
    assert "retrying" not in result.stderr
