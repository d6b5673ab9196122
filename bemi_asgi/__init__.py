"""bemi-asgi: PostgreSQL change history for ASGI apps, with the request context of every change.

The names below are imported on first use (PEP 562), so a command-line tool or a worker process loads only the
parts it runs: `bemi-asgi worker` never imports the web framework or the query models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._exceptions import (
        BemiContextError,
        BemiError,
        ConfigError,
        DecodeError,
        DestinationNotReadyError,
        MigrationError,
        QueryError,
        RevertConflictError,
        SourceNotReadyError,
    )
    from .capture.context import bemi_context, configure_context, get_context, skip_tracking
    from .capture.middleware import BemiMiddleware
    from .capture.pool import BemiConnection, connect, create_pool
    from .capture.tracing import configure_tracing
    from .history.changes import ChangePage
    from .history.client import Bemi
    from .history.fastapi import get_bemi
    from .history.models import Change, FieldChange, Operation, Stream
    from .history.revert import RevertPlan, RevertStatement
    from .history.wait import current_lsn
    from .worker.backfill import Backfill
    from .worker.config import TrackingConfig
    from .worker.config import load_config as load_tracking_config
    from .worker.pipeline import Worker
    from .worker.rules import hash_value

__all__ = [
    "Backfill",
    "Bemi",
    "BemiConnection",
    "BemiContextError",
    "BemiError",
    "BemiMiddleware",
    "Change",
    "ChangePage",
    "ConfigError",
    "DecodeError",
    "DestinationNotReadyError",
    "FieldChange",
    "MigrationError",
    "Operation",
    "QueryError",
    "RevertConflictError",
    "RevertPlan",
    "RevertStatement",
    "SourceNotReadyError",
    "Stream",
    "TrackingConfig",
    "Worker",
    "bemi_context",
    "configure_context",
    "configure_tracing",
    "connect",
    "create_pool",
    "current_lsn",
    "get_bemi",
    "get_context",
    "hash_value",
    "load_tracking_config",
    "skip_tracking",
]

#: Where each exported name is defined.
_MODULES: dict[str, str] = {
    **dict.fromkeys(
        (
            "BemiContextError", "BemiError", "ConfigError", "DecodeError", "DestinationNotReadyError",
            "MigrationError", "QueryError", "RevertConflictError", "SourceNotReadyError",
        ),
        "._exceptions",
    ),
    **dict.fromkeys(("bemi_context", "configure_context", "get_context", "skip_tracking"), ".capture.context"),
    "BemiMiddleware": ".capture.middleware",
    **dict.fromkeys(("BemiConnection", "connect", "create_pool"), ".capture.pool"),
    "configure_tracing": ".capture.tracing",
    "ChangePage": ".history.changes",
    "Bemi": ".history.client",
    "get_bemi": ".history.fastapi",
    **dict.fromkeys(("Change", "FieldChange", "Operation", "Stream"), ".history.models"),
    **dict.fromkeys(("RevertPlan", "RevertStatement"), ".history.revert"),
    "current_lsn": ".history.wait",
    "Backfill": ".worker.backfill",
    "TrackingConfig": ".worker.config",
    "load_tracking_config": ".worker.config",
    "Worker": ".worker.pipeline",
    "hash_value": ".worker.rules",
}  # fmt: skip
_DEFINED_AS: dict[str, str] = {"load_tracking_config": "load_config"}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), _DEFINED_AS.get(name, name))
    # Exported names report where users import them from (`bemi_asgi.Bemi`, not the module that defines it), as
    # httpx does.
    if getattr(value, "__module__", "").startswith(__name__ + "."):
        value.__module__ = __name__
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
