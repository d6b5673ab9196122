"""bemi-asgi: PostgreSQL change history for ASGI apps, with the request context of every change."""

from ._context import bemi_context, configure_context, get_context
from ._exceptions import (
    BemiContextError,
    BemiError,
    DecodeError,
    DestinationNotReadyError,
    MigrationError,
    QueryError,
    SourceNotReadyError,
)
from ._middleware import BemiMiddleware
from ._worker import Worker

__all__ = [
    "BemiContextError",
    "BemiError",
    "BemiMiddleware",
    "DecodeError",
    "DestinationNotReadyError",
    "MigrationError",
    "QueryError",
    "SourceNotReadyError",
    "Worker",
    "bemi_context",
    "configure_context",
    "get_context",
]
