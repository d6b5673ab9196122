"""Shared by the benchmarks: the `Result` lines `python -m benchmarks` tabulates, a throwaway server (durable or
not), the order variants take their turns in, their ratios round by round, and an in-process HTTP client for an ASGI
app."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

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


T = TypeVar("T")

#: Settings for a throwaway server whose commits wait for their WAL to reach the disk, as in production (a throwaway
#: cluster runs without).
DURABLE = {"fsync": "on", "full_page_writes": "on"}


def throwaway_server(settings: Mapping[str, str] | None = None) -> AbstractContextManager[LocalPostgres]:
    """A local PostgreSQL (wal_level=logical) for one benchmark, stopped and removed afterwards."""
    return throwaway_cluster("bemi-asgi-bench-", settings)


def in_turn(variants: Sequence[T], round_number: int) -> list[T]:
    """The order `variants` run in during round `round_number`: each round starts with the next one, so that what
    the machine does meanwhile drifts across them all and none always comes right after the same one."""
    shift = round_number % len(variants)
    return [*variants[shift:], *variants[:shift]]


def round_ratios(values: Iterable[float], baseline: Iterable[float]) -> list[float]:
    """Each round's value over the baseline's in the same round, in ascending order."""
    return sorted(value / base for value, base in zip(values, baseline, strict=True))


def asgi_client(app: Any) -> httpx.AsyncClient:
    """An httpx client that calls `app` in-process. httpx's ASGI transport imports `sniffio` on every request to
    tell trio from asyncio; where it is not installed, that failed import searches every path of `sys.path` each
    time (0.4 ms per request on a 2-core machine, more than a page's template). It is the client's cost, not the
    app's: an import known to fail fails at once."""
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]  # None: "not installed", cached
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ui")
