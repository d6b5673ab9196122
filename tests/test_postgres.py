"""The test harness's PostgreSQL is real and ready for logical decoding."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg
import pytest

from bemi_asgi.ops.postgres import LocalPostgres, find_bin_dir


async def test_server_has_logical_wal_level(database: str) -> None:
    """The session server runs with wal_level=logical."""
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SHOW wal_level") == "logical"
    finally:
        await conn.close()


async def test_pgoutput_slot_decodes_a_logical_message(database: str) -> None:
    """A pgoutput slot can be created in a per-test database and sees a transactional logical message."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("SELECT pg_create_logical_replication_slot('smoke', 'pgoutput')")
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        await conn.execute("CREATE PUBLICATION smoke_pub FOR TABLE t")
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            await conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"user\": 1}')")
        rows = await conn.fetch(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('smoke', NULL, NULL, 'proto_version', '1', "
            "'publication_names', 'smoke_pub', 'messages', 'true')"
        )
        kinds = [bytes(row["data"][:1]) for row in rows]
        assert kinds[0] == b"B"
        assert b"I" in kinds
        assert b"M" in kinds
        assert kinds[-1] == b"C"
    finally:
        await conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback matters only when the server runs as another user")
def test_binaries_the_server_user_cannot_reach_are_copied(tmp_path: Path) -> None:
    """Under root, binaries in a directory the server's user cannot enter (a venv under /root) still start a server."""
    install = Path(find_bin_dir()).parent
    private = tmp_path / "private"  # pytest's tmp_path is 0700 under root: `nobody` cannot enter it
    shutil.copytree(install, private / install.parent.name / install.name, symlinks=True)
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    data = Path(tempfile.mkdtemp(prefix="bemi-asgi-test-"))
    data.chmod(0o755)
    try:
        server = LocalPostgres(data / "data", bin_dir=private / install.parent.name / install.name / "bin")
        assert not server.bin_dir.is_relative_to(private)
        with server:
            out = subprocess.run(
                [str(server.bin("psql")), server.dsn(), "-Atc", "SHOW wal_level"], capture_output=True, text=True
            )
            assert out.stdout.strip() == "logical"
    finally:
        shutil.rmtree(data, ignore_errors=True)
