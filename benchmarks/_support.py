"""Shared by the benchmarks: the `Result` lines `python -m benchmarks` tabulates, and a throwaway server."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

from bemi_asgi.ops.postgres import LocalPostgres, throwaway_cluster


@dataclass(frozen=True)
class Result:
    """One measured figure, and its ratio to the baseline measured in the same run (None for the baseline
    itself, or for a figure with no baseline)."""

    benchmark: str
    case: str
    figure: str
    ratio: float | None = None
    against: str = ""


def throwaway_server(settings: Mapping[str, str] | None = None) -> AbstractContextManager[LocalPostgres]:
    """A local PostgreSQL (wal_level=logical) for one benchmark, stopped and removed afterwards."""
    return throwaway_cluster("bemi-asgi-bench-", settings)
