"""A real PostgreSQL for the suite: one server per test session, one fresh database per test.

The server is a throwaway cluster with `wal_level=logical` (see `bemi_asgi.ops.postgres`), or an existing one named
by `BEMI_TEST_DSN` (a superuser postgresql:// URL, server with `wal_level=logical`). `BEMI_PG_BIN` picks the
binaries: `BEMI_PG_BIN=/usr/lib/postgresql/15/bin pytest` runs the suite on PostgreSQL 15.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from bemi_asgi.ops.postgres import LocalPostgres, throwaway_cluster


@dataclass
class PgServer:
    """The session's server: DSNs, version and (for a local cluster) its binaries and control."""

    admin_dsn: str
    version: int
    local: LocalPostgres | None

    def dsn(self, dbname: str) -> str:
        return urlsplit(self.admin_dsn)._replace(path=f"/{dbname}").geturl()

    def bin(self, name: str) -> Path:
        if self.local is None:
            pytest.skip(f"{name} needs the local test cluster (BEMI_TEST_DSN names an external server)")
        return self.local.bin(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if dsn := os.environ.get("BEMI_TEST_DSN"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.info.server_version // 10000
        yield PgServer(dsn, version, None)
        return
    with throwaway_cluster("bemi-asgi-tests-") as server:
        yield PgServer(server.dsn(), server.version, server)


_database_numbers = itertools.count()


@pytest.fixture
def database(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for one test; its DSN. Dropped afterwards with its replication slots."""
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    strategy = sql.SQL(" STRATEGY FILE_COPY") if pg_server.version >= 15 else sql.SQL("")
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template1").format(sql.Identifier(name)) + strategy)
    try:
        yield pg_server.dsn(name)
    finally:
        drop_database(pg_server.admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
        # A slot held by a walsender being terminated can still be active for a moment: retry until it is not.
        for _ in range(100):
            slots = conn.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", [name]
            ).fetchall()
            if not slots:
                break
            for slot_name, active_pid in slots:
                if active_pid is not None:
                    conn.execute("SELECT pg_terminate_backend(%s)", [active_pid])
                else:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", [slot_name])
            conn.execute("SELECT pg_sleep(0.05)")
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
