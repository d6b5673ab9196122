"""The `bemi-asgi` command line."""

from __future__ import annotations

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
