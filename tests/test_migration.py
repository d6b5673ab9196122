"""`bemi-asgi sql-migration`: the source and destination SQL, run against a real server, and its Alembic revision."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bemi_asgi import MigrationError
from bemi_asgi._pgtext import quote_literal
from bemi_asgi.cli import app
from bemi_asgi.ops.migration import (
    alembic_head,
    load_sql,
    migration_sql,
    parse_identifiers,
    parse_tables,
    split_statements,
)
from bemi_asgi.ops.postgres import find_bin_dir

from .conftest import PgServer

runner = CliRunner()

# Schema and table names that break naive quoting: capitals, spaces, quotes, dots, dollars, backslashes.
WEIRD_SCHEMA = 'Sales $$ "Data".v1\\'
WEIRD_TABLE = 'Order\'s "Items" $x$'


def cli(*args: str) -> str:
    """Run `bemi-asgi sql-migration ARGS` and return its stdout (failing on a non-zero exit)."""
    result = runner.invoke(app, ["sql-migration", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def apply(dsn: str, script: str) -> list[str]:
    """Run a SQL script in one round trip and return the notices it raised."""
    notices: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute(script.encode())
    return notices


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def published(dsn: str, publication: str = "bemi") -> set[tuple[str, str]]:
    rows = query(dsn, "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", [publication])
    return {(schema, table) for schema, table in rows}


def identity(dsn: str, table: str) -> str:
    (row,) = query(dsn, "SELECT relreplident FROM pg_class WHERE oid = %s::regclass", [table])
    return str(row[0])


_USER_SCHEMAS = "nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"


def snapshot(dsn: str, *, with_xmin: bool = False) -> set[str]:
    """The catalog objects the migration may touch, by name (with row versions when `with_xmin`)."""
    xmin = "|| ' ' || {}.xmin::text" if with_xmin else ""
    sql = f"""
        SELECT 'schema ' || nspname FROM pg_namespace WHERE {_USER_SCHEMAS}
        UNION ALL
        SELECT format('relation %I.%I kind %s identity %s', n.nspname, c.relname, c.relkind, c.relreplident)
               {xmin.format("c")}
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_SCHEMAS}
        UNION ALL
        SELECT format('function %s', p.oid::regprocedure)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {_USER_SCHEMAS}
        UNION ALL
        SELECT format('type %I.%I', n.nspname, t.typname)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {_USER_SCHEMAS}
        UNION ALL
        SELECT 'publication ' || pubname || ' ' || pubviaroot {xmin.format("p")} FROM pg_publication p
        UNION ALL
        SELECT format('published %s %s', p.pubname, r.prrelid::regclass) {xmin.format("r")}
        FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
        UNION ALL
        SELECT 'event trigger ' || evtname {xmin.format("e")} FROM pg_event_trigger e
    """
    rows = {str(row[0]) for row in query(dsn, sql)}
    if with_xmin and query(dsn, "SELECT to_regclass('bemi.source_publications') IS NOT NULL")[0][0]:
        for table in ("bemi.source_publications", "bemi.source_replica_identities"):
            rows |= {f"{table} row {row[0]} {row[1]}" for row in query(dsn, f"SELECT t::text, xmin FROM {table} t")}
    return rows


APP_TABLES = """
    CREATE TABLE users (id bigint PRIMARY KEY, name text);
    CREATE TABLE events (at timestamptz, payload jsonb);  -- no primary key
    CREATE TABLE already_full (id int PRIMARY KEY);
    ALTER TABLE already_full REPLICA IDENTITY FULL;
    CREATE TABLE by_index (code text NOT NULL);
    CREATE UNIQUE INDEX by_index_code ON by_index (code);
    ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_code;
    CREATE TABLE nothing (id int PRIMARY KEY);
    ALTER TABLE nothing REPLICA IDENTITY NOTHING;
    CREATE TABLE measurements (id int, day date) PARTITION BY RANGE (day);
    CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
    CREATE UNLOGGED TABLE scratch (x int);
    CREATE VIEW user_names AS SELECT name FROM users;
"""


def test_migration_tracks_public_tables_and_creates_the_destination(database: str) -> None:
    """The default migration publishes each logged table of public with FULL identity and creates bemi.changes."""
    apply(database, APP_TABLES)
    apply(database, cli())
    assert published(database) == {
        ("public", name) for name in ("users", "events", "already_full", "by_index", "nothing", "measurements")
    }
    for table in ("users", "events", "by_index", "nothing", "measurements", "measurements_2024"):
        assert identity(database, table) == "f", table
    assert identity(database, "scratch") == "d"
    assert query(database, "SELECT pubviaroot FROM pg_publication WHERE pubname = 'bemi'") == [(True,)]
    columns = {
        row[0] for row in query(database, "SELECT attname FROM pg_attribute WHERE attrelid = 'bemi.changes'::regclass")
    }
    assert {"primary_key", "before", "after", "context", "operation", "committed_at", "commit_lsn"} <= columns
    # The application's UPDATE and DELETE keep working on the published table without a primary key.
    apply(database, "INSERT INTO events VALUES (now(), '{}'); UPDATE events SET payload = '[]'; DELETE FROM events;")


def test_migration_applied_twice_is_a_no_op(database: str) -> None:
    """Running the migration a second time changes no catalog row and no bookkeeping row."""
    apply(database, APP_TABLES)
    script = cli()
    apply(database, script)
    first = snapshot(database, with_xmin=True)
    apply(database, script)
    assert snapshot(database, with_xmin=True) == first


def psql(dsn: str, script: str) -> subprocess.CompletedProcess[str]:
    """Pipe `script` into psql as the README says: `sql-migration | psql -v ON_ERROR_STOP=1 URL`."""
    command = [str(find_bin_dir() / "psql"), "-X", "-v", "ON_ERROR_STOP=1", dsn]
    return subprocess.run(command, input=script, capture_output=True, text=True, timeout=60)


def test_printed_migration_stops_at_the_first_error_and_reruns_quietly(database: str) -> None:
    """Piped into psql, a migration that fails exits non-zero and leaves the database exactly as it was (the
    destination part it ran first is rolled back with the rest); one that succeeds prints no notice when run again."""
    apply(database, APP_TABLES)
    before = snapshot(database)
    failed = psql(database, cli("--table", "public.users, public.missing"))
    assert failed.returncode == 3, failed.stderr
    assert "public.missing" in failed.stderr
    assert snapshot(database) == before
    first = psql(database, cli())
    assert first.returncode == 0, first.stderr
    assert snapshot(database) != before
    again = psql(database, cli())
    assert (again.returncode, again.stderr) == (0, "")


def test_down_leaves_nothing_behind(database: str) -> None:
    """The rollback restores every table's replica identity and removes all the migration created, twice over."""
    apply(database, APP_TABLES)
    before = snapshot(database)
    apply(database, cli())
    apply(database, cli())
    assert snapshot(database) != before
    down = cli("--down")
    apply(database, down)
    assert snapshot(database) == before
    apply(database, down)
    assert snapshot(database) == before


def test_down_keeps_tables_of_another_publication_full(database: str) -> None:
    """Rolling back one publication leaves REPLICA IDENTITY FULL on tables another bemi publication still tracks."""
    apply(database, "CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY);")
    apply(database, cli("--publication", "first"))
    apply(database, cli("--publication", "second", "--table", "public.orders", "--only", "source"))
    apply(database, cli("--publication", "first", "--down", "--only", "source"))
    assert identity(database, "users") == "d"
    assert identity(database, "orders") == "f"
    assert published(database, "second") == {("public", "orders")}
    apply(database, cli("--publication", "second", "--down"))
    assert identity(database, "orders") == "d"
    assert query(database, "SELECT count(*) FROM pg_namespace WHERE nspname = 'bemi'") == [(0,)]


def test_tables_created_later_are_tracked(database: str, pg_server: PgServer) -> None:
    """Tables created after the migration in a tracked schema, by any means, join the publication with FULL identity."""
    apply(database, "CREATE TABLE measurements (id int, day date) PARTITION BY RANGE (day); CREATE SCHEMA staging;")
    apply(database, cli())
    apply(
        database,
        """
        CREATE TABLE later (id int PRIMARY KEY);
        CREATE TABLE later_as AS SELECT 1 AS x;
        SELECT 2 AS y INTO later_into;
        CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        CREATE TABLE staging.moved (id int);
        ALTER TABLE staging.moved SET SCHEMA public;
        CREATE TABLE staging.elsewhere (id int);
        CREATE TEMP TABLE temporary (id int);
        """,
    )
    assert published(database) == {
        ("public", name) for name in ("measurements", "later", "later_as", "later_into", "moved")
    }
    for table in ("later", "later_as", "later_into", "measurements_2025", "moved"):
        assert identity(database, table) == "f", table
    assert identity(database, "staging.elsewhere") == "d"
    # A tracked table's owner may still choose another replica identity: the trigger does not fight it.
    apply(database, "ALTER TABLE later REPLICA IDENTITY DEFAULT")
    assert identity(database, "later") == "d"


def test_bemi_schema_is_never_tracked(database: str) -> None:
    """Neither the migration nor the event trigger ever publishes a table of the schema bemi."""
    apply(database, cli())
    apply(database, "CREATE TABLE bemi.extra (id int); CREATE TABLE public.other (id int);")
    assert ("bemi", "extra") not in published(database)
    assert ("public", "other") in published(database)
    assert not any(schema == "bemi" for schema, _ in published(database))
    assert identity(database, "bemi.extra") == "d"
    for args in (["--schema", "bemi"], ["--table", "bemi.changes"], ["--schema", "public,BEMI"]):
        result = runner.invoke(app, ["sql-migration", *args])
        assert result.exit_code == 2, args
        assert "never tracked" in result.stderr


def test_schema_and_table_options_quote_names(database: str) -> None:
    """--schema and --table track exactly the named schemas and tables, whatever characters their names hold."""
    quoted_schema = '"' + WEIRD_SCHEMA.replace('"', '""') + '"'
    quoted_table = '"' + WEIRD_TABLE.replace('"', '""') + '"'
    apply(
        database,
        f"""
        CREATE TABLE public.users (id int PRIMARY KEY);
        CREATE SCHEMA {quoted_schema};
        CREATE TABLE {quoted_schema}.{quoted_table} (id int);
        CREATE TABLE {quoted_schema}."Second" (id int);
        CREATE SCHEMA app;
        CREATE TABLE app.invoices (id int PRIMARY KEY);
        CREATE TABLE app.ignored (id int PRIMARY KEY);
        """,
    )
    apply(database, cli("--schema", quoted_schema, "--table", "App.Invoices", "--publication", 'My "Pub" $$'))
    assert published(database, 'My "Pub" $$') == {
        (WEIRD_SCHEMA, WEIRD_TABLE),
        (WEIRD_SCHEMA, "Second"),
        ("app", "invoices"),
    }
    assert identity(database, "public.users") == "d"
    assert identity(database, "app.ignored") == "d"
    # New tables join only for the tracked schema, not for the schema of a single tracked table.
    apply(database, f"CREATE TABLE {quoted_schema}.later (id int); CREATE TABLE app.later (id int);")
    assert (WEIRD_SCHEMA, "later") in published(database, 'My "Pub" $$')
    assert ("app", "later") not in published(database, 'My "Pub" $$')
    # A comma-separated list is the same as repeated options.
    assert cli("--table", "app.invoices, app.ignored") == cli("--table", "app.invoices", "--table", "app.ignored")
    apply(database, cli("--down", "--publication", 'My "Pub" $$'))
    assert identity(database, f"{quoted_schema}.{quoted_table}") == "d"


def test_missing_table_or_schema_fails_with_its_name(database: str) -> None:
    """Tracking a table or schema that does not exist fails, naming it."""
    with pytest.raises(psycopg.errors.UndefinedTable, match=r"public\.missing"):
        apply(database, cli("--table", "public.missing"))
    with pytest.raises(psycopg.errors.RaiseException, match='schema "nowhere" does not exist'):
        apply(database, cli("--schema", "nowhere"))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--table", "users"], "schema.table"),
        (["--table", "a.b.c"], "schema.table"),
        (["--table", ""], "empty table name"),
        (["--table", "public.a,,public.b"], "empty table name"),
        (["--table", 'public."open'], "unterminated double quote"),
        (["--table", "public.has space"], "double quotes"),
        (["--schema", ""], "empty schema name"),
        (["--schema", "a.b"], "not a schema name"),
        (["--schema", "pg_catalog"], "system schema"),
        (["--schema", "x" * 64], "longer than 63 bytes"),
        (["--publication", ""], "publication name is empty"),
        (["--only", "both"], "is not one of"),
        (["--down", "--alembic", "."], "holds both directions"),
    ],
)
def test_bad_options_say_what_to_do(args: list[str], words: str) -> None:
    """Bad options exit with status 2 and a message saying what was wrong, printing no SQL."""
    result = runner.invoke(app, ["sql-migration", *args])
    assert result.exit_code == 2
    assert words in result.stderr
    assert result.stdout == ""


def test_empty_lists_are_refused() -> None:
    """Empty schema or table lists given to the Python API raise MigrationError instead of tracking nothing."""
    with pytest.raises(MigrationError, match="schema list is empty"):
        migration_sql(schemas=[])
    with pytest.raises(MigrationError, match="table list is empty"):
        migration_sql(tables=[])
    with pytest.raises(MigrationError, match="nothing to migrate"):
        migration_sql(parts=[])


def test_identifiers_follow_sql_rules() -> None:
    """Unquoted names fold to lower case, quoted ones keep case, spaces, dots and doubled quotes."""
    assert parse_identifiers("Public.Users") == ["public", "users"]
    assert parse_identifiers('"Sales Data"."Order ""x"".v2"') == ["Sales Data", 'Order "x".v2']
    assert parse_identifiers("café.Ünits") == ["café", "Ünits"]
    assert [str(table) for table in parse_tables(['"A B".c, d."E"'])] == ['"A B"."c"', '"d"."E"']


@pytest.fixture
def conn(database: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database, autocommit=True) as connection:
        yield connection


# The connection is only read from, so sharing it between examples is safe.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])))
def test_quoted_literals_round_trip(conn: psycopg.Connection[Any], text: str) -> None:
    """Any text quoted by quote_literal reads back unchanged, also inside a $$ body and without standard strings."""
    literal = quote_literal(text)
    assert conn.execute(f"SELECT {literal}".encode()).fetchone() == (text,)
    conn.execute(f"DO $$ BEGIN IF {literal} IS DISTINCT FROM current_setting('bemi.t', true) THEN NULL; END IF; END $$")
    conn.execute("SET standard_conforming_strings = off")
    try:
        assert conn.execute(f"SELECT {literal}".encode()).fetchone() == (text,)
    finally:
        conn.execute("SET standard_conforming_strings = on")


def test_without_event_trigger_privilege(database: str, owner_dsn: str) -> None:
    """Run by a non-superuser, the migration tracks existing tables and explains, in a warning, how to track new
    ones."""
    apply(owner_dsn, "CREATE TABLE users (id int PRIMARY KEY)")
    notices = apply(owner_dsn, cli())
    assert any("may not create event triggers" in notice for notice in notices)
    assert published(database) == {("public", "users")}
    apply(owner_dsn, "CREATE TABLE later (id int)")
    assert ("public", "later") not in published(database)
    apply(owner_dsn, cli())  # the remedy the notice names
    assert published(database) == {("public", "users"), ("public", "later")}
    assert identity(database, "later") == "f"
    apply(owner_dsn, cli("--down"))
    assert identity(database, "later") == "d"
    assert published(database) == set()


_roles = itertools.count()


@pytest.fixture
def owner_dsn(database: str) -> Iterator[str]:
    """The DSN of a fresh non-superuser role that may create schemas, tables and publications in `database`."""
    role = f"bemi_owner_{os.getpid()}_{next(_roles)}"
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT CREATE ON DATABASE "{urlsplit(database).path[1:]}" TO "{role}"')
        admin.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
    parts = urlsplit(database)
    try:
        yield parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
    finally:
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


def test_sql_ships_beside_the_package() -> None:
    """The migration SQL is found (packaged or from the repository) and the destination keeps its agreed table."""
    assert "CREATE TABLE IF NOT EXISTS bemi.changes" in load_sql("destination_up.sql")
    assert "{{publication}}" in load_sql("source_down.sql")


def test_sql_is_read_from_inside_an_installed_package(tmp_path: Path) -> None:
    """Installed from a wheel (SQL under bemi_asgi/ops/sql, no repository around), the SQL is still found."""
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "bemi_asgi", tmp_path / "bemi_asgi", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from bemi_asgi.ops.migration import migration_sql; print(migration_sql(down=True))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out == migration_sql(down=True) + "\n"
    (tmp_path / "bemi_asgi" / "ops" / "sql" / "source_down.sql").write_text("-- packaged copy\n")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("-- packaged copy\n")


def test_split_statements_respects_quotes_and_bodies() -> None:
    """Semicolons inside strings, quoted names, comments and dollar bodies do not split a statement."""
    script = "SELECT ';'; -- a; comment\nSELECT \"a;b\"; DO $x$ BEGIN NULL; END $x$; SELECT $$;$$; SELECT 1 /* ; */"
    assert split_statements(script) == [
        "SELECT ';'",
        'SELECT "a;b"',
        "DO $x$ BEGIN NULL; END $x$",
        "SELECT $$;$$",
        "SELECT 1 /* ; */",
    ]


# --- Alembic ---------------------------------------------------------------------------------------------------

PREVIOUS_REVISION = '''"""create users"""
revision = "0001_users"
down_revision = None
'''


def load_revision(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"revision_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_revision(connection: Any, module: ModuleType, direction: str) -> None:
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    context = MigrationContext.configure(connection)
    with Operations.context(context):
        getattr(module, direction)()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_alembic_revision_upgrades_and_downgrades(database: str, tmp_path: Path, driver: str) -> None:
    """The written Alembic revision follows the current head, and its upgrade and downgrade run through SQLAlchemy."""
    import sqlalchemy
    from sqlalchemy.ext.asyncio import create_async_engine

    (tmp_path / "0001_users.py").write_text(PREVIOUS_REVISION)
    apply(database, APP_TABLES)
    quoted_table = '"' + WEIRD_TABLE.replace('"', '""') + '"'
    apply(database, f"CREATE TABLE {quoted_table} (id int)")
    before = snapshot(database)
    output = cli("--alembic", str(tmp_path), "--table", f"public.users, public.events, public.{quoted_table}")
    path = Path(output.removeprefix("Wrote ").strip())
    assert path.parent == tmp_path
    module = load_revision(path)
    assert module.down_revision == "0001_users"
    assert alembic_head(tmp_path) == module.revision
    url = urlsplit(database)._replace(scheme=f"postgresql+{driver}").geturl()

    def migrate(direction: str) -> None:
        if driver == "psycopg":
            engine = sqlalchemy.create_engine(url)
            with engine.begin() as connection:
                run_revision(connection, module, direction)
            engine.dispose()
            return

        async def run() -> None:
            engine = create_async_engine(url)
            async with engine.begin() as connection:
                await connection.run_sync(run_revision, module, direction)
            await engine.dispose()

        asyncio.run(run())

    migrate("upgrade")
    assert published(database) == {("public", "users"), ("public", "events"), ("public", WEIRD_TABLE)}
    assert identity(database, "events") == "f"
    assert query(database, "SELECT to_regclass('bemi.changes') IS NOT NULL") == [(True,)]
    migrate("downgrade")
    assert snapshot(database) == before


def test_alembic_refuses_several_heads(tmp_path: Path) -> None:
    """With two head revisions in the directory, --alembic asks which one to follow."""
    (tmp_path / "a.py").write_text('revision = "a"\ndown_revision = None\n')
    (tmp_path / "b.py").write_text('revision = "b"\ndown_revision = None\n')
    result = runner.invoke(app, ["sql-migration", "--alembic", str(tmp_path)])
    assert result.exit_code == 2
    assert "--down-revision" in result.stderr
    assert cli("--alembic", str(tmp_path), "--down-revision", "b").startswith("Wrote ")


# -- no path from the application's role to superuser ----------------------------------------------------------


def role_of(dsn: str) -> str:
    return urlsplit(dsn).username or ""


def is_superuser(dsn: str, role: str) -> bool:
    return bool(query(dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", [role])[0][0])


def apply_like_psql(dsn: str, script: str) -> list[str]:
    """Run a script statement by statement, going on after errors as psql does without ON_ERROR_STOP; the errors."""
    errors: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in split_statements(script):
            try:
                conn.execute(statement.encode())
            except psycopg.Error as error:
                errors.append(str(error))
    return errors


ESCALATE = """
CREATE FUNCTION public.escalate() RETURNS {returns} LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER ROLE %I SUPERUSER', '{role}');
    {end}
END $$;
"""


def test_superuser_migration_refuses_objects_the_app_role_owns(database: str, owner_dsn: str) -> None:
    """An application role that ran the migration first owns the schema bemi and its functions, and plants a
    trigger on bookkeeping the migration writes; a superuser's migration then refuses, naming the objects, in every
    statement that would run code or install the event trigger (also when the script goes on after an error, as
    psql does): the role never becomes a superuser, and no event trigger runs code it can change."""
    role = role_of(owner_dsn)
    apply(owner_dsn, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(owner_dsn, cli())  # no event trigger: not a superuser
    apply(owner_dsn, ESCALATE.format(returns="trigger", role=role, end="RETURN NEW;"))
    apply(
        owner_dsn,
        "CREATE TRIGGER escalate BEFORE INSERT ON bemi.source_replica_identities "
        "FOR EACH ROW EXECUTE FUNCTION public.escalate()",
    )
    apply(owner_dsn, "CREATE TABLE orders (id int PRIMARY KEY)")  # the superuser's run would record its identity

    with pytest.raises(psycopg.Error, match="refus") as refused:
        apply(database, cli())
    message = str(refused.value)
    assert f'schema bemi is owned by role "{role}"' in message
    assert "bemi.track_new_tables()" in message
    assert "trigger escalate on bemi.source_replica_identities" in message
    # The printed script is one transaction: its first refusal aborts it, and psql reports the rest as ignored.
    first, *rest = apply_like_psql(database, cli())
    assert "refuses" in first
    assert rest
    assert all("current transaction is aborted" in error for error in rest), rest
    # The bare SQL (an Alembic revision runs it statement by statement): every guarded step refuses on its own.
    errors = apply_like_psql(database, migration_sql())
    assert errors
    assert all("refuses" in error for error in errors), errors
    assert not is_superuser(database, role)
    assert query(database, "SELECT count(*) FROM pg_event_trigger")[0][0] == 0

    # Once a superuser owns everything the trigger path uses (the statements the refusal's hint gives), the
    # migration goes through, and the role can change none of it.
    hint = refused.value.diag.message_hint or ""
    assert "DROP TRIGGER escalate ON bemi.source_replica_identities" in hint
    apply(database, hint.split(": ", 1)[1].split(". ", 1)[0])
    apply(database, cli())
    # Tracking new tables, recording schema changes, recording drops.
    assert query(database, "SELECT count(*) FROM pg_event_trigger")[0][0] == 3
    assert published(database) == {("public", "users"), ("public", "orders")}
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        apply(
            owner_dsn,
            ESCALATE.format(returns="event_trigger", role=role, end="")
            .replace("public.escalate()", "bemi.track_new_tables()")
            .replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        apply(owner_dsn, "CREATE FUNCTION bemi.track_table(pub name, rel oid) RETURNS void LANGUAGE sql AS ''")
    apply(database, "CREATE TABLE later (id int PRIMARY KEY)")
    assert not is_superuser(database, role)
    assert ("public", "later") in published(database)


def test_event_trigger_function_cannot_be_replaced_by_the_app_role(database: str, owner_dsn: str) -> None:
    """Run by a superuser, the migration leaves every object the event trigger runs owned by that superuser: the
    application's role can neither replace the trigger's function nor add an overload it would call, so a
    superuser's CREATE TABLE runs only the migration's code."""
    role = role_of(owner_dsn)
    apply(database, cli())
    apply(database, f'GRANT USAGE, CREATE ON SCHEMA bemi TO "{role}"')  # as a partitioned destination's owner needs
    owners = query(
        database,
        "SELECT DISTINCT r.rolsuper FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'bemi'",
    )
    assert owners == [(True,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        apply(
            owner_dsn,
            "CREATE OR REPLACE FUNCTION bemi.track_new_tables() RETURNS event_trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NULL; END $$",
        )
    # An overload with an exact type match would win over the migration's function: calls cast their arguments.
    apply(
        owner_dsn,
        ESCALATE.format(returns="void", role=role, end="").replace(
            "public.escalate()", "bemi.track_table(pub name, rel oid)"
        ),
    )
    apply(
        owner_dsn,
        ESCALATE.format(returns="void", role=role, end="").replace(
            "public.escalate()", "bemi.create_publication(pub text, tracked_schemas name[])"
        ),
    )
    apply(database, "CREATE TABLE later (id int PRIMARY KEY)")
    assert not is_superuser(database, role)
    assert ("public", "later") in published(database)
    # Run again, the migration refuses to call functions beside overloads another role owns.
    with pytest.raises(psycopg.Error, match=r"function bemi\.track_table\(name,oid\) is owned by role"):
        apply(database, cli())
    assert not is_superuser(database, role)


def test_rollback_runs_only_postgresql_functions(database: str, owner_dsn: str) -> None:
    """A role that may create functions in a schema the superuser's session searches plants a `format` that
    matches the rollback's call better than PostgreSQL's own (and does its job, unnoticed); a superuser's rollback
    does not run it."""
    role = role_of(owner_dsn)
    apply(owner_dsn, "CREATE TABLE users (id int PRIMARY KEY)")
    apply(database, cli())
    planted = ESCALATE.format(returns="text", role=role, end="RETURN pg_catalog.format(a, b, c, d);")
    apply(owner_dsn, planted.replace("public.escalate()", "public.format(a text, b name, c name, d text)"))
    apply(database, cli("--down"))
    assert not is_superuser(database, role)
    assert published(database) == set()


def test_create_slot_starts_capture_when_the_migration_runs(database: str) -> None:
    """`sql-migration --create-slot`, piped into psql, creates the worker's slot after the migration commits, so a
    change made before any worker runs is captured; run again, it changes nothing. Without the option no slot is
    made (a slot nobody streams keeps WAL), and the option is refused where it cannot work."""
    apply(database, APP_TABLES)
    assert psql(database, cli()).returncode == 0
    assert query(database, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    script = cli("--create-slot", "--slot", "early")
    for _ in range(2):
        result = psql(database, script)
        assert result.returncode == 0, result.stderr
    assert query(database, "SELECT slot_name::text, plugin::text FROM pg_replication_slots") == [("early", "pgoutput")]
    apply(database, "INSERT INTO users (id, name) VALUES (1, 'before any worker')")
    changes = query(
        database,
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('early', NULL, NULL, 'proto_version', '1',"
        " 'publication_names', 'bemi') WHERE get_byte(data, 0) = ascii('I')",
    )
    assert changes == [(1,)]
    # Slot names are the server's: one that is not this database's pgoutput slot is refused, never taken for it.
    apply(database, "SELECT pg_create_physical_replication_slot('physical')")
    try:
        taken = psql(database, cli("--create-slot", "--slot", "physical"))
    finally:
        apply(database, "SELECT pg_drop_replication_slot('physical')")
    assert taken.returncode != 0
    assert "is not a pgoutput slot of this database" in taken.stderr
    for refused in (["--only", "destination"], ["--down"], ["--alembic", "."]):
        result = runner.invoke(app, ["sql-migration", "--create-slot", *refused])
        assert result.exit_code == 2, (refused, result.output)
