"""Security: passwords stay out of output, the context size limit holds through the pool, and capture works with
least-privilege roles (the grants the README documents), on a dedicated server that checks passwords.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import asyncpg
import httpx
import psycopg
import pytest
from fastapi import FastAPI, Request

import bemi_asgi
from bemi_asgi import BemiContextError, BemiMiddleware, QueryError, bemi_context
from bemi_asgi.capture.context import DEFAULT_MAX_CONTEXT_BYTES
from bemi_asgi.ops.migration import migration_sql
from bemi_asgi.ops.postgres import LocalPostgres, free_port

from .worker_support import changes, drain, prepare_source

ROOT = Path(__file__).parent.parent
PASSWORD = "Pw-7f3c9e1a;s3cr3t@x"  # characters that need quoting in a URL, to catch a leak in any form
WRONG_PASSWORD = "Wrong-4b8d2c6e-pa55"
APP_SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE TABLE secrets (id int PRIMARY KEY, value text);
"""
# The grants the README's "Least-privilege roles" section documents.
GRANTS = """
CREATE ROLE bemi_worker LOGIN REPLICATION PASSWORD '{password}';
GRANT SELECT ON items TO bemi_worker;
GRANT USAGE ON SCHEMA bemi TO bemi_worker;
GRANT SELECT, INSERT ON bemi.changes TO bemi_worker;
GRANT SELECT, INSERT, UPDATE ON bemi.worker_state TO bemi_worker;
GRANT SELECT, INSERT, UPDATE ON bemi.streams TO bemi_worker;
GRANT SELECT, INSERT ON bemi.tracking_rules TO bemi_worker;
GRANT SELECT, INSERT ON bemi.chain TO bemi_worker;
GRANT SELECT ON bemi.chain_anchors TO bemi_worker;
GRANT SELECT ON bemi.source_publications TO bemi_worker;  -- for bemi-asgi doctor

CREATE ROLE bemi_reader LOGIN PASSWORD '{password}';
GRANT USAGE ON SCHEMA bemi TO bemi_reader;
GRANT SELECT ON bemi.changes, bemi.worker_state, bemi.streams, bemi.tracking_rules TO bemi_reader;
GRANT SELECT ON bemi.chain, bemi.chain_anchors TO bemi_reader;  -- for bemi-asgi verify

CREATE ROLE app LOGIN PASSWORD '{password}';
GRANT SELECT, INSERT, UPDATE, DELETE ON items, secrets TO app;
"""

pytestmark = pytest.mark.timeout(180)


@dataclass
class Secured:
    server: LocalPostgres

    def dsn(self, role: str, password: str = PASSWORD, *, port: int | None = None, host: str = "127.0.0.1") -> str:
        return f"postgresql://{role}:{quote(password, safe='')}@{host}:{port or self.server.port}/app"

    @property
    def admin(self) -> str:
        return self.server.dsn("app")


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    """A dedicated server where every role but the bootstrap superuser must give its password (SCRAM), with the
    database `app` prepared by the migration (tracking `items` only) and the three roles of GRANTS."""
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-security-"))
    base.chmod(0o755)
    server = LocalPostgres(base / "data")
    try:
        server.init()
        hba = server.data_dir / "pg_hba.conf"
        owner = hba.stat()
        hba.write_text(
            "host all postgres 127.0.0.1/32 trust\n"
            "host replication postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
        )
        shutil.chown(hba, owner.st_uid, owner.st_gid)
        server.start()
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        with psycopg.connect(server.dsn("app"), autocommit=True) as conn:
            conn.execute(APP_SCHEMA)
            conn.execute(migration_sql(tables=["public.items"]))
            conn.execute(GRANTS.format(password=PASSWORD))
        yield Secured(server)
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


# -- least privilege --------------------------------------------------------------------------------------------


async def test_least_privilege_roles_capture_and_read(secured: Secured) -> None:
    """With only the documented grants: the app role writes through the bemi pool with context, the worker role
    (REPLICATION, SELECT on the tracked tables, writes to bemi.*) creates its slot and stores the changes, and the
    reader role reads them with the query helpers but cannot change them."""
    pool = await bemi_asgi.create_pool(secured.dsn("app"), min_size=1, max_size=1)
    reader = bemi_asgi.Bemi(secured.dsn("bemi_reader"))
    try:
        await drain(secured.dsn("bemi_worker"), slot="least_privilege")  # creates the slot
        with bemi_context(user_id=42):
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("INSERT INTO items VALUES (1, 'quill')")
                    await conn.execute("INSERT INTO secrets VALUES (1, 'untracked')")
                lsn = await bemi_asgi.current_lsn(conn)
        await drain(secured.dsn("bemi_worker"), slot="least_privilege")
        await reader.wait_for(lsn, timeout=30)
        history = await reader.history("items", 1)
        assert [(c.operation, c.context, c.after) for c in history] == [
            ("CREATE", {"user_id": 42}, {"id": 1, "name": "quill"})
        ]
        readonly = await asyncpg.connect(secured.dsn("bemi_reader"))
        try:
            for statement in (
                "DELETE FROM bemi.changes",
                "UPDATE bemi.changes SET context = '{}'",
                "INSERT INTO bemi.changes (primary_key) SELECT primary_key FROM bemi.changes",
                "SELECT * FROM secrets",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await readonly.execute(statement)
        finally:
            await readonly.close()
    finally:
        await reader.close()
        await pool.close()
        with psycopg.connect(secured.admin, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('least_privilege')")


async def test_the_app_reads_history_through_its_own_pool_once_granted_the_reader_role(secured: Secured) -> None:
    """`Bemi(pool)` on the app's own pool: without grants on bemi every read is a QueryError naming the grants (not
    a raw InsufficientPrivilegeError); after `GRANT bemi_reader TO app` the same calls read the history."""
    pool = await bemi_asgi.create_pool(secured.dsn("app"), min_size=1, max_size=1)
    bemi = bemi_asgi.Bemi(pool)
    try:
        for read in (lambda: bemi.wait_for(0, timeout=5), lambda: bemi.changes.find(table="items")):
            with pytest.raises(QueryError, match=r"GRANT USAGE ON SCHEMA bemi; GRANT SELECT ON .*bemi_reader"):
                await read()
        with psycopg.connect(secured.admin, autocommit=True) as conn:
            conn.execute("GRANT bemi_reader TO app")
        try:
            await pool.expire_connections()
            assert await bemi.wait_for(0, timeout=5) >= 0
            assert isinstance(await bemi.changes.find(table="items"), list)
        finally:
            with psycopg.connect(secured.admin, autocommit=True) as conn:
                conn.execute("REVOKE bemi_reader FROM app")
    finally:
        await pool.close()


async def test_the_readmes_production_set_up_end_to_end(secured: Secured) -> None:
    """As the README's Production set-up and Security sections say: the worker runs as its own process with the
    REPLICATION role's URL in the environment, the app writes as its own role through the bemi pool and reads the
    history through the same pool once granted bemi_reader; every change carries its context, and SIGTERM stops
    the worker cleanly with a start and a stop line."""
    env = {**os.environ, "BEMI_SOURCE_URL": secured.dsn("bemi_worker"), "BEMI_SLOT": "production"}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bemi_asgi", "worker", "--progress-interval", "60", cwd=ROOT, env=env,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    pool = await bemi_asgi.create_pool(secured.dsn("app"), min_size=1, max_size=2)
    bemi = bemi_asgi.Bemi(pool)
    with psycopg.connect(secured.admin, autocommit=True) as conn:
        conn.execute("GRANT bemi_reader TO app")
    try:
        # Capture starts once the worker has created its slot.
        deadline = time.monotonic() + 60
        while not slot_exists(secured.admin, "production"):
            assert worker.returncode is None, "the worker exited"
            assert time.monotonic() < deadline, "the worker did not create its slot"
            await asyncio.sleep(0.05)
        for user, statement in (
            (6, "INSERT INTO items VALUES (100, $1)"),
            (7, "UPDATE items SET name = $1 WHERE id = 100"),
        ):
            with bemi_context(user_id=user, endpoint="POST /items"):
                async with pool.acquire() as conn:
                    await conn.execute(statement, f"written by {user}")
                    lsn = await bemi_asgi.current_lsn(conn)
        await bemi.wait_for(lsn, timeout=60)
        history = await bemi.history("items", 100)
        assert [(c.operation, c.context, c.after["name"]) for c in history] == [
            ("CREATE", {"user_id": 6, "endpoint": "POST /items"}, "written by 6"),
            ("UPDATE", {"user_id": 7, "endpoint": "POST /items"}, "written by 7"),
        ]
    finally:
        worker.terminate()
        _, output = await asyncio.wait_for(worker.communicate(), 60)
        stderr = output.decode()
        await pool.close()
        with psycopg.connect(secured.admin, autocommit=True) as conn:
            conn.execute("REVOKE bemi_reader FROM app")
            conn.execute("SELECT pg_drop_replication_slot('production')")
    assert worker.returncode == 0, stderr
    lines = stderr.splitlines()
    assert lines[0].startswith("bemi-asgi worker: created slot 'production' of database 'app' at "), lines
    assert lines[-1].startswith("bemi-asgi worker: stopped: 2 changes in 2 transactions stored, flushed "), lines
    assert not leaked(stderr, PASSWORD)


def slot_exists(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", [name]).fetchone() == (1,)


def test_doctor_passes_as_the_worker_role(secured: Secured) -> None:
    """`bemi-asgi doctor` run as the least-privilege worker role finds nothing blocking."""
    result = run_cli("doctor", secured.dsn("bemi_worker"))
    assert result.returncode == 0, result.stdout + result.stderr


# -- passwords in output ----------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bemi_asgi", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def run_all(commands: dict[str, list[str]], tmp_path: Path) -> dict[str, tuple[int, str]]:
    """Run CLI commands side by side and return each one's exit code and output (stdout and stderr). A worker
    retries lost connections forever: once it has printed two lines (a retry or a progress line after its
    first), it gets SIGTERM."""
    processes = {}
    for number, (name, args) in enumerate(commands.items()):
        log = tmp_path / f"{number}.log"
        with log.open("w") as out:
            process = subprocess.Popen([sys.executable, "-m", "bemi_asgi", *args], cwd=ROOT, stdout=out,
                                       stderr=subprocess.STDOUT)  # fmt: skip
        processes[name] = (process, log)
    deadline = time.monotonic() + 120
    for process, log in processes.values():
        while process.poll() is None and log.read_text().count("\n") < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)
    return {name: (process.returncode, log.read_text()) for name, (process, log) in processes.items()}


def leaked(output: str, *passwords: str) -> list[str]:
    """The passwords found in `output`, as typed or as they appear quoted in a URL."""
    return [p for password in passwords for p in {password, quote(password, safe="")} if p in output]


def test_passwords_never_appear_in_output(secured: Secured, tmp_path: Path) -> None:
    """The worker and doctor, given DSNs with passwords (wrong host, wrong port, wrong password, a role lacking
    privileges, and valid ones; URL and key=value forms), never print a password, whatever fails."""
    dead_port = free_port()
    dsn = secured.dsn
    keyword_form = f"host=127.0.0.1 port={secured.server.port} dbname=app user=bemi_worker password='{PASSWORD}'"
    sources = {
        "wrong host": dsn("bemi_worker", host="no-such-host.invalid"),
        "wrong port": dsn("bemi_worker", port=dead_port),
        "wrong password": dsn("bemi_worker", WRONG_PASSWORD),
        "no REPLICATION": dsn("app"),
        "valid": dsn("bemi_worker"),
        "valid, keyword form": keyword_form,
        "password in the query": f"postgresql://bemi_worker@127.0.0.1:{secured.server.port}/app?password="
        + quote(PASSWORD, safe=""),
    }
    commands = {f"doctor, {name}": ["doctor", source] for name, source in sources.items()}
    # Destinations the worker may not write to, or that refuse the password.
    destinations = {
        "read-only destination": dsn("bemi_reader"),
        "wrong destination password": dsn("bemi_reader", WRONG_PASSWORD),
    }
    workers = [(name, source, None) for name, source in sources.items()]
    workers += [(name, dsn("bemi_worker"), destination) for name, destination in destinations.items()]
    for number, (name, source, destination) in enumerate(workers):
        command = ["worker", "--progress-interval", "0.5", "--source", source, "--slot", f"leak_check_{number}"]
        commands[f"worker, {name}"] = command + (["--destination", destination] if destination else [])
    commands["sql-migration"] = ["sql-migration"]
    results = run_all(commands, tmp_path)
    with psycopg.connect(secured.admin, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    outputs = {name: output for name, (_, output) in results.items()}
    leaks = {name: leaked(text, PASSWORD, WRONG_PASSWORD) for name, text in outputs.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    # The failures were real and said what went wrong, in one line rather than a traceback.
    assert "password authentication failed" in outputs["doctor, wrong password"]
    assert "password authentication failed" in outputs["worker, wrong password"]
    assert "no-such-host.invalid" in outputs["worker, wrong host"]
    for name, expected in (
        ("worker, no REPLICATION", "replication"),  # PostgreSQL 16+: "REPLICATION attribute", 15: "replication role"
        ("worker, wrong destination password", "password authentication failed"),
        ("worker, valid, keyword form", '"postgresql"'),  # the worker takes URLs; retrying will not change that
    ):
        returncode, output = results[name]
        assert returncode == 1, (name, output)
        assert expected in output, (name, output)
        assert "Traceback" not in output, (name, output)


def fragments(password: str, size: int = 4) -> set[str]:
    """Every piece of `password` `size` characters long: what a parser quoting part of a URL could print."""
    return {password[i : i + size] for i in range(len(password) - size + 1)}


def test_passwords_never_appear_whatever_the_dsn_shape(tmp_path: Path) -> None:
    """A password with an unencoded %, @, / or space, an unterminated quote in the keyword form or a broken
    host breaks the URL apart; doctor, worker, prune and maintain then print one line saying what to encode, and
    no piece of the password, whether the parser's message quoted it or it spilled into the host name."""
    port = free_port()
    shapes = {
        "raw %": "Kx7%zzA1b2C3d4",
        "raw @": "Kx7@A1b2C3d4",
        "raw /": "Kx7/A1b2C3d4@",
        "raw space": "Kx7 A1b2C3d4",
    }
    dsns = {name: f"postgresql://bemi_worker:{pw}@127.0.0.1:{port}/app" for name, pw in shapes.items()}
    dsns["unterminated quote"] = f"host=127.0.0.1 port={port} user=bemi_worker password='Kx7A1b2C3d4"
    dsns["broken IPv6 host"] = f"postgresql://bemi_worker:Kx7A1b2C3d4@[::1:{port}/app"
    passwords = {**shapes, "unterminated quote": "Kx7A1b2C3d4", "broken IPv6 host": "Kx7A1b2C3d4"}
    commands: dict[str, list[str]] = {}
    for name, dsn in dsns.items():
        commands[f"doctor, {name}"] = ["doctor", dsn]
        commands[f"worker, {name}"] = ["worker", "--source", dsn, "--slot", "leak"]
        commands[f"prune, {name}"] = ["prune", dsn, "--older-than", "1d"]
        commands[f"maintain, {name}"] = ["maintain", dsn]
    results = run_all(commands, tmp_path)
    for command, (returncode, output) in results.items():
        password = passwords[command.split(", ", 1)[1]]
        assert not [piece for piece in fragments(password) if piece in output], (command, output)
        assert returncode == 2, (command, output)
        assert output.count("\n") == 1, (command, output)
        assert "percent-encoded" in output, (command, output)


def test_doctor_without_read_access_is_a_one_line_error(secured: Secured) -> None:
    """`bemi-asgi doctor` as a role that may not read the migration's bookkeeping says so in one line, exit 2."""
    result = run_cli("doctor", secured.dsn("bemi_reader"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "permission denied for table source_publications" in result.stderr
    assert "Traceback" not in result.stderr


# -- context size limit through the pool ------------------------------------------------------------------------


@pytest.fixture
async def items_pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=1)
    try:
        yield pool
    finally:
        await pool.close()


def padded(size: int) -> dict[str, object]:
    """A context whose compact JSON is exactly `size` bytes."""
    return {"pad": "x" * (size - len('{"pad":""}'))}


async def test_context_size_limit_holds_through_the_pool(database: str, items_pool: asyncpg.Pool) -> None:
    """A context of exactly the limit is stored; one byte more is refused before any write, also when it is only
    reached by nesting scopes or returned by the middleware's callback (whose request fails before the endpoint
    runs); a lowered limit applies to contexts set afterwards."""
    limit = DEFAULT_MAX_CONTEXT_BYTES
    with bemi_context(padded(limit)):
        await items_pool.execute("INSERT INTO items VALUES (1)")
    with pytest.raises(BemiContextError, match="over the limit"), bemi_context(padded(limit + 1)):
        await items_pool.execute("INSERT INTO items VALUES (2)")
    with bemi_context(a="x" * (limit // 2)):  # noqa: SIM117 (the outer scope must be active when the inner one enters)
        with pytest.raises(BemiContextError, match="over the limit"), bemi_context(b="y" * (limit // 2)):
            await items_pool.execute("INSERT INTO items VALUES (3)")

    app = FastAPI()

    @app.post("/items/{item_id}")
    async def create(item_id: int) -> None:
        await items_pool.execute("INSERT INTO items VALUES ($1)", item_id)

    def oversized(request: Request) -> dict[str, object]:
        return padded(limit + int(request.headers["x-extra"]))

    app.add_middleware(BemiMiddleware, context=oversized)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/items/4", headers={"x-extra": "1"})).status_code == 500
        assert (await client.post("/items/5", headers={"x-extra": "0"})).status_code == 200

    bemi_asgi.configure_context(max_bytes=100)
    try:
        with pytest.raises(BemiContextError, match="over the limit"), bemi_context(padded(101)):
            await items_pool.execute("INSERT INTO items VALUES (6)")
    finally:
        bemi_asgi.configure_context(max_bytes=limit)

    await drain(database)
    assert [(c["primary_key"], len(c["context"]["pad"])) for c in changes(database)] == [
        ("1", limit - len('{"pad":""}')),
        ("5", limit - len('{"pad":""}')),
    ]
    assert await items_pool.fetchval("SELECT array_agg(id ORDER BY id) FROM items") == [1, 5]


# -- who may write the context ----------------------------------------------------------------------------------

_context_roles = itertools.count()


async def test_only_roles_allowed_to_emit_messages_can_write_a_context(database: str) -> None:
    """Any role that may call pg_logical_emit_message can attach any context to its own transaction (the WAL does
    not say which role emitted it): another role's write shows up under tenant 1. Revoking EXECUTE from PUBLIC and
    granting it to the application's role, as the README says, leaves that role able to write contexts through the
    pool and refuses every other role."""
    suffix = f"{os.getpid()}_{next(_context_roles)}"
    app_role, other_role = f"ctx_app_{suffix}", f"ctx_other_{suffix}"
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY)", ["items"])
    with psycopg.connect(database, autocommit=True) as conn:
        for role in (app_role, other_role):
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
            conn.execute(f'GRANT SELECT, INSERT ON items TO "{role}"')
    parts = urlsplit(database)
    app_dsn, other_dsn = (
        parts._replace(netloc=f"{r}@{parts.hostname}:{parts.port}").geturl() for r in (app_role, other_role)
    )
    try:
        with psycopg.connect(other_dsn) as conn:
            conn.execute("INSERT INTO items VALUES (1)")
            conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"tenant_id\": 1}')")
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(RESTRICT_EMIT.format(role=app_role))
        with psycopg.connect(other_dsn) as conn:
            conn.execute("INSERT INTO items VALUES (2)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"tenant_id\": 1}')")
        pool = await bemi_asgi.create_pool(app_dsn, min_size=1, max_size=1)
        try:
            with bemi_context(tenant_id=1):
                await pool.execute("INSERT INTO items VALUES (3)")
        finally:
            await pool.close()
        await drain(database)
        assert [(c["primary_key"], c["context"]) for c in changes(database)] == [
            ("1", {"tenant_id": 1}),  # the limit: a role allowed to emit claims any context for its own writes
            ("3", {"tenant_id": 1}),
        ]
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            for role in (app_role, other_role):
                conn.execute(f'DROP OWNED BY "{role}"')
                conn.execute(f'DROP ROLE "{role}"')


# The README's "Who can write the context": every overload (PostgreSQL 17 added one with a flush argument).
RESTRICT_EMIT = """
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname = 'pg_logical_emit_message'
             AND pronamespace = 'pg_catalog'::regnamespace LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO "{role}"', f);
    END LOOP;
END $$
"""
