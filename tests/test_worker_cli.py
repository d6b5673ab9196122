"""`bemi-asgi worker` on the command line: options from the environment, progress line, readiness errors."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from bemi_asgi.cli import app
from bemi_asgi.ops.postgres import LocalPostgres

from .worker_support import DESTINATION_SQL, changes, emit, prepare_source


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
