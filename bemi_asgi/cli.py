"""The `bemi-asgi` command line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="bemi-asgi",
    help="PostgreSQL change history for ASGI apps: prepare a database, run the capture worker, try the demo.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback with locals would print the DSNs (and their passwords) the commands were given; some Typer
    # versions show locals by default.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """PostgreSQL change history for ASGI apps."""


@contextmanager
def _reported(command: str, *errors: type[BaseException], code: int, urls: Sequence[str | None] = ()) -> Iterator[None]:
    """Report `errors` raised inside as one line, `bemi-asgi COMMAND: what went wrong`, and exit with `code`: a
    traceback would bury the message that says the fix (and its locals could hold the URLs). The passwords of
    `urls` never appear in the line."""
    from ._dsn import redact
    from ._exceptions import BemiError

    try:
        yield
    except errors as exc:
        words = " ".join(str(exc).split())
        if not isinstance(exc, BemiError):  # a driver's error: its type says which side failed
            words = f"error: {type(exc).__name__}: {words}" if words else f"error: {type(exc).__name__}"
        typer.echo(f"bemi-asgi {command}: {redact(words, *urls)}", err=True)
        raise typer.Exit(code) from None


def _lsn_option(value: str | None, option: str) -> int | None:
    """A WAL position given to `option` (None when not given); a usage error naming it when it is not one."""
    if value is None:
        return None
    from ._pgtext import parse_lsn

    try:
        return parse_lsn(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _check_urls(command: str, **urls: str | None) -> None:
    """Refuse a URL that cannot be read safely (a password with an unencoded @ breaks a URL apart), in one line
    naming no part of it; exit 2."""
    from ._dsn import check_dsn
    from ._exceptions import ConfigError

    with _reported(command, ConfigError, code=2):
        for what, url in urls.items():
            if url is not None:
                check_dsn(url, what=f"the {what} URL")


def _database_errors() -> tuple[type[BaseException], ...]:
    """What the database drivers raise; imported on use, so that `--help` stays quick."""
    import asyncpg
    import psycopg

    return psycopg.Error, asyncpg.PostgresError, asyncpg.InterfaceError


def _flag(*names: str, help: str) -> Any:
    """An on/off option, shown in --help without a value placeholder (Typer would print `<bool>`)."""
    return typer.Option(*names, help=help, metavar="")


class MigrationPart(StrEnum):
    source = "source"
    destination = "destination"


@app.command("sql-migration")
def sql_migration(
    publication: Annotated[
        str, typer.Option(envvar="BEMI_PUBLICATION", help="Name of the publication listing the tracked tables.")
    ] = "bemi",
    schema: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEMA",
            help="Track every table of this schema, now and later (repeat it or separate with commas). "
            "Default: public, unless --table is given.",
        ),
    ] = None,
    table: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEMA.TABLE",
            help='Track this table, as schema.table (repeat it or separate with commas; "Quote" names with '
            "capitals, spaces or dots).",
        ),
    ] = None,
    exclude_table: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEMA.TABLE",
            help="Never track this table, even in a tracked schema or created later (schema.table).",
        ),
    ] = None,
    exclude_schema: Annotated[
        list[str] | None, typer.Option(metavar="SCHEMA", help="Stop tracking this schema's tables (repeatable).")
    ] = None,
    partition_by_month: Annotated[
        bool,
        _flag("--partition-by-month", help="Create bemi.changes partitioned by month (prune drops months)."),
    ] = False,
    only: Annotated[
        MigrationPart | None,
        typer.Option(
            help="Only the 'source' part (publication, replica identity, event trigger) or only the "
            "'destination' part (schema bemi with bemi.changes)."
        ),
    ] = None,
    down: Annotated[bool, _flag("--down", help="Print the rollback instead (drops the stored changes).")] = False,
    alembic: Annotated[
        Path | None,
        typer.Option(help="Write an Alembic revision file (upgrade and downgrade) into this versions directory."),
    ] = None,
    down_revision: Annotated[
        str | None,
        typer.Option(help="With --alembic: the revision it follows (default: the directory's single head)."),
    ] = None,
    create_slot: Annotated[
        bool,
        _flag(
            "--create-slot",
            help="Also create the worker's replication slot (after the migration commits), so capture starts now "
            "rather than when the worker first runs. The slot keeps WAL until a worker streams it.",
        ),
    ] = False,
    slot: Annotated[
        str, typer.Option(envvar="BEMI_SLOT", help="With --create-slot: the worker's replication slot.")
    ] = "bemi",
    upgrade: Annotated[
        bool,
        _flag(
            "--upgrade",
            help="With --alembic: a revision bringing a database migrated by an earlier version up to date, keeping "
            "every stored row; its downgrade changes nothing.",
        ),
    ] = False,
) -> None:
    """Print the SQL that prepares a database for change capture:
    bemi-asgi sql-migration | psql -v ON_ERROR_STOP=1 "$DATABASE_URL"

    Source: a publication of the tracked tables, REPLICA IDENTITY FULL on them, an event trigger tracking new tables.
    Destination: the schema bemi with the table bemi.changes. Running it again changes nothing.
    """
    from ._exceptions import MigrationError
    from .ops.migration import PARTS, Part, migration_sql, migration_transaction, slot_sql, write_alembic_revision

    if alembic is not None and down:
        raise typer.BadParameter("the Alembic revision holds both directions: leave out --down", param_hint="--alembic")
    if create_slot and (alembic is not None or down or only == MigrationPart.destination):
        raise typer.BadParameter(
            "the slot is made on the source, after the migration's transaction (PostgreSQL creates no logical slot "
            "in a transaction that wrote): use it when printing the source's SQL for psql; under Alembic, run "
            f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput') after the upgrade",
            param_hint="--create-slot",
        )
    if upgrade and alembic is None:
        raise typer.BadParameter(
            "the printed SQL upgrades an earlier version's tables as it is: --upgrade is for --alembic",
            param_hint="--upgrade",
        )
    parts: tuple[Part, ...] = PARTS if only is None else (only.value,)
    extra: dict[str, Any] = {
        "exclude_tables": exclude_table, "exclude_schemas": exclude_schema, "partition_by_month": partition_by_month
    }  # fmt: skip
    with _reported("sql-migration", MigrationError, code=2):
        if alembic is not None:
            options_text = _options_text(publication, schema, table, None if only is None else only.value, extra)
            path = write_alembic_revision(
                alembic, down_revision=down_revision, publication=publication, schemas=schema, tables=table,
                parts=parts, options_text=options_text, upgrade_only=upgrade, **extra,
            )  # fmt: skip
            typer.echo(f"Wrote {path}")
            return
        sql = migration_sql(publication=publication, schemas=schema, tables=table, down=down, parts=parts, **extra)
        after = slot_sql(slot) if create_slot else ""
    typer.echo(migration_transaction(sql) + after, nl=False)


def _options_text(
    publication: str,
    schemas: list[str] | None,
    tables: list[str] | None,
    only: str | None,
    extra: dict[str, Any] | None = None,
) -> str:
    import shlex

    extra = extra or {}
    args = [] if publication == "bemi" else ["--publication", publication]
    for option, values in (
        ("--schema", schemas),
        ("--table", tables),
        ("--exclude-table", extra.get("exclude_tables")),
        ("--exclude-schema", extra.get("exclude_schemas")),
    ):
        for value in values or ():
            args += [option, value]
    if extra.get("partition_by_month"):
        args.append("--partition-by-month")
    if only is not None:
        args += ["--only", only]
    return shlex.join(args)


@app.command()
def doctor(
    dsn: Annotated[str, typer.Argument(envvar="BEMI_SOURCE_URL", help="The source database, as a postgresql:// URL.")],
    publication: Annotated[str, typer.Option(envvar="BEMI_PUBLICATION", help="The publication to check.")] = "bemi",
    slot: Annotated[str, typer.Option(envvar="BEMI_SLOT", help="The worker's replication slot.")] = "bemi",
    max_lag_mb: Annotated[
        float, typer.Option(help="Warn about a replication slot further behind than this many MiB.")
    ] = 1024,
) -> None:
    """Check that a source database is ready for change capture and say in plain words what is missing.

    Checks the PostgreSQL version, wal_level, the replication privilege, the publication, each tracked table's
    replica identity and the replication slots' lag. Exits with 1 when something blocking is missing.
    """
    import psycopg

    from ._exceptions import SourceNotReadyError
    from .ops.doctor import check_source, format_report

    _check_urls("doctor", source=dsn)
    with _reported("doctor", SourceNotReadyError, psycopg.Error, code=2, urls=[dsn]):
        findings = check_source(dsn, publication=publication, slot=slot, max_lag_bytes=int(max_lag_mb * 1024 * 1024))
    typer.echo(format_report(findings))
    if any(finding.blocking for finding in findings):
        raise typer.Exit(1)


@app.command()
def worker(
    source: Annotated[
        str, typer.Option(metavar="URL", envvar="BEMI_SOURCE_URL", help="The database to capture (postgresql:// URL).")
    ],
    destination: Annotated[
        str | None,
        typer.Option(
            metavar="URL", envvar="BEMI_DESTINATION_URL", help="Where bemi.changes lives (default: the source)."
        ),
    ] = None,
    slot: Annotated[str, typer.Option(envvar="BEMI_SLOT", help="Replication slot (created when missing).")] = "bemi",
    publication: Annotated[
        str, typer.Option(envvar="BEMI_PUBLICATION", help="Publication naming the tracked tables.")
    ] = "bemi",
    until_caught_up: Annotated[
        bool, _flag("--until-caught-up", help="Store what is committed now, then exit.")
    ] = False,
    until_lsn: Annotated[
        str | None,
        typer.Option(
            metavar="LSN",
            help="Store what committed before this WAL position (as pg_current_wal_lsn() prints it), then exit.",
        ),
    ] = None,
    quiet: Annotated[bool, _flag("--quiet", "-q", help="No progress line.")] = False,
    progress_interval: Annotated[float, typer.Option(help="Seconds between progress lines.")] = 10.0,
    config: Annotated[
        Path | None,
        typer.Option(envvar="BEMI_CONFIG", help="Tracking configuration (TOML): tables, column rules, no-op updates."),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(metavar="PATTERN", help="Store only tables matching this schema.table pattern (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(metavar="PATTERN", help="Store nothing of tables matching this pattern, e.g. 'audit.*'."),
    ] = None,
    ignore_column: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEMA.TABLE.COLUMN", help="Never store this column, as schema.table.column (repeatable)."
        ),
    ] = None,
    mask_column: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEMA.TABLE.COLUMN",
            help="Store this column's values as the marker \\[masked] (schema.table.column).",
        ),
    ] = None,
    hash_column: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEMA.TABLE.COLUMN",
            help="Store this column's values as HMAC-SHA256 hex, keyed by BEMI_HASH_KEY (schema.table.column).",
        ),
    ] = None,
    drop_noop_updates: Annotated[
        bool, _flag("--drop-noop-updates", help="Store nothing for an UPDATE that changed no value.")
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

    from ._exceptions import BemiError
    from .worker.chain import chain_key
    from .worker.config import load_config
    from .worker.pipeline import Worker

    _check_urls("worker", source=source, destination=destination)
    if until_lsn is not None and until_caught_up:
        raise typer.BadParameter("give --until-caught-up or --until-lsn, not both", param_hint="--until-lsn")
    end = _lsn_option(until_lsn, "--until-lsn")
    logging.basicConfig(level=logging.WARNING, format="bemi-asgi worker: %(message)s", stream=sys.stderr)
    with _reported("worker", BemiError, code=2):
        key = chain_key()
        tracking = load_config(
            config, include=include or (), exclude=exclude or (), ignore_columns=ignore_column or (),
            mask_columns=mask_column or (), hash_columns=hash_column or (), drop_noop_updates=drop_noop_updates,
        )  # fmt: skip
    capture = Worker(
        source,
        destination=destination,
        slot=slot,
        publication=publication,
        progress=None if quiet else sys.stderr,
        progress_interval=progress_interval,
        tracking=tracking,
        chain_key=key,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, capture.stop)
        await capture.run(until_caught_up=until_caught_up, until_lsn=end)

    # What retrying cannot fix (a missing privilege, a refused password on the destination, a DSN that is not a
    # postgresql:// URL) ends the worker with what the server said.
    with _reported("worker", BemiError, *_database_errors(), code=1, urls=[source, destination]):
        asyncio.run(run())


@app.command()
def backfill(
    source: Annotated[
        str, typer.Option(metavar="URL", envvar="BEMI_SOURCE_URL", help="The tracked database (postgresql:// URL).")
    ],
    destination: Annotated[
        str | None,
        typer.Option(
            metavar="URL", envvar="BEMI_DESTINATION_URL", help="Where bemi.changes lives (default: the source)."
        ),
    ] = None,
    slot: Annotated[
        str, typer.Option(envvar="BEMI_SLOT", help="The worker's replication slot (created when missing).")
    ] = "bemi",
    publication: Annotated[
        str, typer.Option(envvar="BEMI_PUBLICATION", help="Publication naming the tracked tables.")
    ] = "bemi",
    table: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEMA.TABLE",
            help="Backfill only this tracked table (repeat it or separate with commas). Default: every one.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(envvar="BEMI_CONFIG", help="The worker's tracking configuration (TOML): its rules apply."),
    ] = None,
    ignore_column: Annotated[
        list[str] | None, typer.Option(metavar="SCHEMA.TABLE.COLUMN", help="As the worker's option (repeatable).")
    ] = None,
    mask_column: Annotated[
        list[str] | None, typer.Option(metavar="SCHEMA.TABLE.COLUMN", help="As the worker's option (repeatable).")
    ] = None,
    hash_column: Annotated[
        list[str] | None, typer.Option(metavar="SCHEMA.TABLE.COLUMN", help="As the worker's option (repeatable).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(metavar="PATTERN", help="As the worker's option (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(metavar="PATTERN", help="As the worker's option (repeatable).")
    ] = None,
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows per destination transaction.")] = 5000,
    rows_per_second: Annotated[
        float | None, typer.Option(min=1, help="Read at most this many rows per second (spares the source).")
    ] = None,
    quiet: Annotated[bool, _flag("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Store the current state of every tracked row as a baseline change (operation SNAPSHOT), consistent with
    the worker's stream: each row's state at one exact WAL position, nothing missed or counted twice.

    Safe while the app writes and the worker runs. Stopped or killed, it continues where it stopped when run
    again. Give it the worker's slot, publication and column rules. Progress goes to stderr.
    """
    import asyncio
    import signal
    import sys

    from ._exceptions import BemiError
    from .ops.migration import parse_tables
    from .worker.backfill import Backfill
    from .worker.chain import chain_key
    from .worker.config import load_config

    with _reported("backfill", BemiError, code=2):
        key = chain_key()
        tables = [(name.schema, name.name) for name in parse_tables(table)] if table else None
        tracking = load_config(
            config, include=include or (), exclude=exclude or (), ignore_columns=ignore_column or (),
            mask_columns=mask_column or (), hash_columns=hash_column or (),
        )  # fmt: skip
    job = Backfill(
        source,
        destination=destination,
        slot=slot,
        publication=publication,
        tables=tables,
        tracking=tracking,
        batch_rows=batch_rows,
        rows_per_second=rows_per_second,
        progress=None if quiet else sys.stderr,
        chain_key=key,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, job.stop)
        await job.run()

    with _reported("backfill", BemiError, *_database_errors(), code=1):
        asyncio.run(run())
    stats = job.stats
    for line in stats.skipped:
        typer.echo(f"bemi-asgi backfill: skipped {line}", err=True)
    if job.stopped:
        typer.echo("bemi-asgi backfill: stopped; run it again to continue where it stopped", err=True)
        raise typer.Exit(1)


@app.command()
def prune(
    dsn: Annotated[
        str,
        typer.Argument(envvar=["BEMI_DESTINATION_URL", "BEMI_SOURCE_URL"], help="The database holding bemi.changes."),
    ],
    older_than: Annotated[
        str | None,
        typer.Option(
            metavar="AGE",
            help="Delete changes committed longer ago than this: 90d, 2w, 6mo, 1y (calendar months), 12h.",
        ),
    ] = None,
    before: Annotated[
        datetime | None,
        typer.Option(
            metavar="TIME",
            help="Or: delete changes committed before this time (ISO 8601, UTC unless it has an offset).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows deleted per transaction.")] = 1000,
    months_ahead: Annotated[
        int, typer.Option(help="Partitioned table: create the partitions of this many months ahead.")
    ] = 3,
    dry_run: Annotated[bool, _flag("--dry-run", help="Print how many changes would go; change nothing.")] = False,
    yes: Annotated[bool, _flag("--yes", "-y", help="Delete without asking, however many changes would go.")] = False,
    confirm_above: Annotated[
        int, typer.Option(help="Without --yes, ask first (or refuse when not at a terminal) above this many.")
    ] = 10_000,
) -> None:
    """Delete old changes: batched deletes, or whole monthly partitions (sql-migration --partition-by-month).

    Safe while the worker runs. Progress goes to stderr. On a partitioned table it also creates the coming months'
    partitions: run it daily from cron.
    """
    import sys
    from datetime import UTC

    from ._exceptions import BemiError
    from .ops.prune import cutoff_for_age
    from .ops.prune import prune as run_prune

    if older_than is not None and before is None:
        try:
            cutoff = cutoff_for_age(older_than, datetime.now(UTC))
        except BemiError as exc:
            raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    elif before is not None and older_than is None:
        cutoff = before if before.tzinfo is not None else before.replace(tzinfo=UTC)
    else:
        raise typer.BadParameter("give the cutoff as --older-than AGE (e.g. 90d) or --before TIME, one of the two")
    _check_urls("prune", database=dsn)
    with _reported("prune", BemiError, *_database_errors(), code=2, urls=[dsn]):
        if not (dry_run or yes):
            # A retention typo must never delete history unseen: count first, and ask before a large delete.
            going = run_prune(dsn, before=cutoff, dry_run=True).deleted
            if going > confirm_above and not _confirmed(f"Delete {going:,} changes committed before {cutoff}?"):
                typer.echo(
                    f"bemi-asgi prune: would delete {going:,} changes committed before {cutoff.isoformat()}; "
                    "nothing deleted: run again with --yes to delete them",
                    err=True,
                )
                raise typer.Exit(1)
        result = run_prune(
            dsn, before=cutoff, batch_size=batch_size, dry_run=dry_run, months_ahead=months_ahead,
            progress=sys.stderr,
        )  # fmt: skip
    typer.echo(result.deleted)


@app.command()
def verify(
    dsn: Annotated[
        str,
        typer.Argument(envvar=["BEMI_DESTINATION_URL", "BEMI_SOURCE_URL"], help="The database holding bemi.changes."),
    ],
    stream: Annotated[
        list[int] | None,
        typer.Option(help="The source stream to verify (an id of bemi.streams; repeatable). Default: every one."),
    ] = None,
    up_to: Annotated[
        str | None,
        typer.Option(
            metavar="LSN",
            help="Stop after the changes committed at or below this LSN (e.g. 0/16B3748) "
            "and print the chain's hash there, to compare with a head published then.",
        ),
    ] = None,
    expect: Annotated[
        str | None,
        typer.Option(
            metavar="HASH",
            help="The head (hex) published earlier: exit 1 unless the chain's head at the "
            "same position (--up-to) is this.",
        ),
    ] = None,
    quiet: Annotated[bool, _flag("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Check that the stored history is the one the worker stored: walk the hash chain over bemi.changes.

    Reports the first edited, deleted, inserted or reordered change (exit 1), or that each chain is intact up to its
    head, whose hash and position it prints: keep them elsewhere (a log, a ticket) to compare later. With the key
    the worker used (BEMI_CHAIN_KEY in the environment), an edit cannot be hidden by recomputing the chain.
    """
    import sys

    from ._exceptions import BemiError
    from .ops.verify import verify as run_verify
    from .worker.chain import chain_key

    position = _lsn_option(up_to, "--up-to")
    if expect is not None and (not stream or len(stream) > 1):
        # Heads and positions are per stream: one published head names one stream.
        raise typer.BadParameter("a head belongs to one stream: name it with --stream ID", param_hint="--expect")
    _check_urls("verify", database=dsn)
    with _reported("verify", BemiError, code=2):
        key = chain_key()
    with _reported("verify", BemiError, *_database_errors(), code=2, urls=[dsn]):
        reports = run_verify(dsn, streams=stream, key=key, up_to=position, progress=None if quiet else sys.stderr)
    if not reports:
        typer.echo("no stream has a hash chain yet: the worker has stored nothing since the migration")
    for report in reports:
        typer.echo(report.describe())
    if any(not report.intact for report in reports):
        raise typer.Exit(1)
    if expect is not None and reports[0].head.hex() != expect.strip().lower():
        typer.echo(f"the head is {reports[0].head.hex()}, not the expected {expect.strip()}", err=True)
        raise typer.Exit(1)


def _confirmed(question: str) -> bool:
    """Ask at a terminal; elsewhere (cron, a pipe) the answer is no."""
    import sys

    return sys.stdin.isatty() and typer.confirm(question, default=False, err=True)


@app.command()
def maintain(
    dsn: Annotated[
        str,
        typer.Argument(envvar=["BEMI_DESTINATION_URL", "BEMI_SOURCE_URL"], help="The database holding bemi.changes."),
    ],
    months_ahead: Annotated[int, typer.Option(help="Create the partitions of this many months ahead.")] = 3,
) -> None:
    """Create the coming months' partitions of a partitioned bemi.changes (prune does it too); prints their names."""
    from ._exceptions import BemiError
    from .ops.prune import maintain as create_coming_partitions

    _check_urls("maintain", database=dsn)
    with _reported("maintain", BemiError, *_database_errors(), code=2, urls=[dsn]):
        names = create_coming_partitions(dsn, months_ahead)
    for name in names:
        typer.echo(f"bemi.{name}")


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
    from ._exceptions import DemoError
    from .ops.demo import run_demo

    try:
        with _reported("demo", DemoError, code=1):
            run_demo(port=port, data_dir=data_dir, host=host)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:
    app()
