"""The `bemi-asgi` command line."""

from __future__ import annotations

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


def main() -> None:
    app()


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
    from ._worker import Worker

    logging.basicConfig(level=logging.WARNING, format="bemi-asgi worker: %(message)s", stream=sys.stderr)
    capture = Worker(
        source,
        destination=destination,
        slot=slot,
        publication=publication,
        progress=None if quiet else sys.stderr,
        progress_interval=progress_interval,
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
