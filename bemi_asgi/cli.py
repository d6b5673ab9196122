"""The `bemi-asgi` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="bemi-asgi",
    help="PostgreSQL change history for ASGI apps: prepare a database, run the capture worker, try the demo.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """PostgreSQL change history for ASGI apps."""


@app.command("sql-migration")
def sql_migration(
    publication: Annotated[
        str, typer.Option(envvar="BEMI_PUBLICATION", help="Name of the publication listing the tracked tables.")
    ] = "bemi",
    schema: Annotated[
        list[str] | None,
        typer.Option(
            help="Track every table of this schema, now and later (repeat it or separate with commas). "
            "Default: public, unless --table is given.",
        ),
    ] = None,
    table: Annotated[
        list[str] | None,
        typer.Option(
            help='Track this table, as schema.table (repeat it or separate with commas; "Quote" names with '
            "capitals, spaces or dots).",
        ),
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(
            help="Only the 'source' part (publication, replica identity, event trigger) or only the "
            "'destination' part (schema bemi with bemi.changes)."
        ),
    ] = None,
    down: Annotated[
        bool, typer.Option("--down", help="Print the rollback instead (drops the stored changes).")
    ] = False,
    alembic: Annotated[
        Path | None,
        typer.Option(help="Write an Alembic revision file (upgrade and downgrade) into this versions directory."),
    ] = None,
    down_revision: Annotated[
        str | None,
        typer.Option(help="With --alembic: the revision it follows (default: the directory's single head)."),
    ] = None,
) -> None:
    """Print the SQL that prepares a database for change capture: bemi-asgi sql-migration | psql "$DATABASE_URL"

    Source: a publication of the tracked tables, REPLICA IDENTITY FULL on them, an event trigger tracking new tables.
    Destination: the schema bemi with the table bemi.changes. Running it again changes nothing.
    """
    from ._exceptions import MigrationError
    from ._migration import PARTS, Part, migration_sql, write_alembic_revision

    try:
        if only is not None and only not in PARTS:
            raise MigrationError(f"--only must be 'source' or 'destination', not {only!r}")
        parts: tuple[Part, ...] = PARTS if only is None else (only,)
        if alembic is not None:
            if down:
                raise MigrationError("--down and --alembic do not mix: the Alembic revision holds both directions")
            path = write_alembic_revision(
                alembic, down_revision=down_revision, publication=publication, schemas=schema, tables=table,
                parts=parts, options_text=_options_text(publication, schema, table, only),
            )  # fmt: skip
            typer.echo(f"Wrote {path}")
            return
        typer.echo(
            migration_sql(publication=publication, schemas=schema, tables=table, down=down, parts=parts), nl=False
        )
    except MigrationError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None


def _options_text(publication: str, schemas: list[str] | None, tables: list[str] | None, only: str | None) -> str:
    import shlex

    args = [] if publication == "bemi" else ["--publication", publication]
    for option, values in (("--schema", schemas), ("--table", tables)):
        for value in values or ():
            args += [option, value]
    if only is not None:
        args += ["--only", only]
    return shlex.join(args)


@app.command()
def doctor(
    dsn: Annotated[str, typer.Argument(envvar="BEMI_SOURCE_URL", help="The source database, as a postgresql:// URL.")],
    publication: Annotated[str, typer.Option(envvar="BEMI_PUBLICATION", help="The publication to check.")] = "bemi",
    max_lag_mb: Annotated[
        float, typer.Option(help="Warn about a replication slot further behind than this many MiB.")
    ] = 1024,
) -> None:
    """Check that a source database is ready for change capture and say in plain words what is missing.

    Checks the PostgreSQL version, wal_level, the replication privilege, the publication, each tracked table's
    replica identity and the replication slots' lag. Exits with 1 when something blocking is missing.
    """
    import psycopg

    from ._doctor import check_source, format_report

    try:
        findings = check_source(dsn, publication=publication, max_lag_bytes=int(max_lag_mb * 1024 * 1024))
    except psycopg.OperationalError as exc:
        typer.echo(f"Error: cannot connect to the source database: {str(exc).strip()}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_report(findings))
    if any(finding.blocking for finding in findings):
        raise typer.Exit(1)


@app.command()
def worker(
    source: Annotated[str, typer.Option(envvar="BEMI_SOURCE_URL", help="The database to capture (postgresql:// URL).")],
    destination: Annotated[
        str | None,
        typer.Option(envvar="BEMI_DESTINATION_URL", help="Where bemi.changes lives (default: the source)."),
    ] = None,
    slot: Annotated[str, typer.Option(envvar="BEMI_SLOT", help="Replication slot (created when missing).")] = "bemi",
    publication: Annotated[
        str, typer.Option(envvar="BEMI_PUBLICATION", help="Publication naming the tracked tables.")
    ] = "bemi",
    until_caught_up: Annotated[
        bool, typer.Option("--until-caught-up", help="Store what is committed now, then exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress line.")] = False,
    progress_interval: Annotated[float, typer.Option(help="Seconds between progress lines.")] = 10.0,
    config: Annotated[
        Path | None,
        typer.Option(envvar="BEMI_CONFIG", help="Tracking configuration (TOML): tables, column rules, no-op updates."),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Store only tables matching this schema.table pattern (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Store nothing of tables matching this pattern, e.g. 'audit.*'.")
    ] = None,
    ignore_column: Annotated[
        list[str] | None, typer.Option(help="Never store this column, as schema.table.column (repeatable).")
    ] = None,
    mask_column: Annotated[
        list[str] | None, typer.Option(help="Store this column's values as [masked] (schema.table.column).")
    ] = None,
    hash_column: Annotated[
        list[str] | None,
        typer.Option(
            help="Store this column's values as HMAC-SHA256 hex, keyed by BEMI_HASH_KEY (schema.table.column)."
        ),
    ] = None,
    drop_noop_updates: Annotated[
        bool, typer.Option("--drop-noop-updates", help="Store nothing for an UPDATE that changed no value.")
    ] = False,
) -> None:
    """Stream the source's changes into bemi.changes, with their context, exactly once.

    Runs until SIGINT/SIGTERM (finishes the batch in flight, acknowledges it, exits 0). Lost connections are
    retried with backoff. Progress goes to stderr.
    """
    import asyncio
    import logging
    import signal
    import sys

    from ._config import load_config
    from ._exceptions import BemiError
    from ._worker import Worker

    logging.basicConfig(level=logging.WARNING, format="bemi-asgi worker: %(message)s", stream=sys.stderr)
    try:
        tracking = load_config(
            config, include=include or (), exclude=exclude or (), ignore_columns=ignore_column or (),
            mask_columns=mask_column or (), hash_columns=hash_column or (), drop_noop_updates=drop_noop_updates,
        )  # fmt: skip
    except BemiError as exc:
        typer.echo(f"bemi-asgi worker: {exc}", err=True)
        raise typer.Exit(2) from None
    capture = Worker(
        source,
        destination=destination,
        slot=slot,
        publication=publication,
        progress=None if quiet else sys.stderr,
        progress_interval=progress_interval,
        tracking=tracking,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, capture.stop)
        await capture.run(until_caught_up=until_caught_up)

    try:
        asyncio.run(run())
    except BemiError as exc:
        typer.echo(f"bemi-asgi worker: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="HTTP port of the example app.")] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the throwaway PostgreSQL cluster lives; replaced on every run "
            "(default: <system temp dir>/bemi-asgi-demo-<uid>)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address the example app listens on.")] = "127.0.0.1",
) -> None:
    """Try bemi-asgi: a todo API with its change history, on a throwaway PostgreSQL, all in this process.

    Starts PostgreSQL (wal_level=logical), applies the migration, runs the worker and serves the example app.
    Seeds a few changes by two users and a job, then prints what to open and what to curl.
    Ctrl-C stops everything. Needs the demo extra: pip install 'bemi-asgi\\[demo]'.
    """
    from ._demo import run_demo
    from ._exceptions import DemoError

    try:
        run_demo(port=port, data_dir=data_dir, host=host)
    except DemoError as exc:
        typer.echo(f"bemi-asgi demo: error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:
    app()
