"""bemi-asgi: PostgreSQL change history for ASGI apps, with the request context of every change."""

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

# Exported names report where users import them from (`bemi_asgi.Bemi`, not the module that defines it), as httpx does.
for _name in __all__:
    _exported = globals()[_name]
    if getattr(_exported, "__module__", "").startswith(__name__ + "."):
        _exported.__module__ = __name__
del _name, _exported
