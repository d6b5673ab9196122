"""bemi-asgi: PostgreSQL change history for ASGI apps, with the request context of every change."""

from ._context import bemi_context, configure_context, get_context
from ._exceptions import BemiContextError, BemiError, DecodeError, MigrationError, QueryError, SourceNotReadyError
from ._middleware import BemiMiddleware

__all__ = [
    "BemiContextError",
    "BemiError",
    "BemiMiddleware",
    "DecodeError",
    "MigrationError",
    "QueryError",
    "SourceNotReadyError",
    "bemi_context",
    "configure_context",
    "get_context",
]
