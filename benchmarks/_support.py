"""Shared by the benchmarks: the `Result` lines `python -m benchmarks` tabulates, and a throwaway server."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bemi_asgi.ops.postgres import LocalPostgres


@dataclass(frozen=True)
class Result:
    """One measured figure, and its ratio to the baseline measured in the same run (None for the baseline
    itself, or for a figure with no baseline)."""

    benchmark: str
    case: str
    figure: str
    ratio: float | None = None
    against: str = ""


@contextmanager
def throwaway_server(settings: Mapping[str, str] | None = None) -> Iterator[LocalPostgres]:
    """A local PostgreSQL (wal_level=logical) for one benchmark, stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="bemi-asgi-bench-"))
    base.chmod(0o755)  # the server may run as another user
    server = LocalPostgres(base / "data", settings=settings)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)
