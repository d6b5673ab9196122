"""Shared by the benchmarks: the `Result` lines `python -m benchmarks` tabulates, a throwaway server, and an
in-process HTTP client for an ASGI app."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import httpx

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


def asgi_client(app: Any) -> httpx.AsyncClient:
    """An httpx client that calls `app` in-process. httpx's ASGI transport imports `sniffio` on every request to
    tell trio from asyncio; where it is not installed, that failed import searches every path of `sys.path` each
    time (0.4 ms per request on a 2-core machine, more than a page's template). It is the client's cost, not the
    app's: an import known to fail fails at once."""
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]  # None: "not installed", cached
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ui")
