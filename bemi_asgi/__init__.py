"""bemi-asgi: PostgreSQL change history for ASGI apps, with the request context of every change."""

from ._context import bemi_context, configure_context, get_context
from ._exceptions import BemiContextError, BemiError, MigrationError, QueryError, SourceNotReadyError
from ._middleware import BemiMiddleware
from ._pool import BemiConnection, connect, create_pool

__all__ = [
    "BemiConnection",
    "BemiContextError",
    "BemiError",
    "BemiMiddleware",
    "MigrationError",
    "QueryError",
    "SourceNotReadyError",
    "bemi_context",
    "configure_context",
    "connect",
    "create_pool",
    "get_context",
]
