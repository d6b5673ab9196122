"""bemi-asgi: PostgreSQL change history for ASGI apps, with the request context of every change."""

from ._bemi import Bemi
from ._changes_api import ChangePage
from ._config import TrackingConfig
from ._config import load_config as load_tracking_config
from ._context import bemi_context, configure_context, get_context, skip_tracking
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
from ._fastapi import get_bemi
from ._filtering import hash_value
from ._middleware import BemiMiddleware
from ._models import Change, FieldChange, Operation
from ._pool import BemiConnection, connect, create_pool
from ._revert import RevertPlan, RevertStatement
from ._wait import current_lsn
from ._worker import Worker

__all__ = [
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
    "TrackingConfig",
    "Worker",
    "bemi_context",
    "configure_context",
    "connect",
    "create_pool",
    "current_lsn",
    "get_bemi",
    "get_context",
    "hash_value",
    "load_tracking_config",
    "skip_tracking",
]
