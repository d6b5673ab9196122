"""Every error bemi-asgi raises on purpose.

    BemiError
    ├── BemiContextError      a context that cannot be stored (not JSON, too large, NUL characters)
    ├── SourceNotReadyError   the source database lacks what capture needs (wal_level, publication, ...)
    ├── DestinationNotReadyError  the destination database lacks the `bemi` tables the worker writes
    ├── MigrationError        bad options for `bemi-asgi sql-migration`
    ├── ConfigError           an invalid tracking configuration (bemi.toml, worker options), or one the tables refuse
    ├── QueryError            a query helper was asked something it cannot answer (unknown table, bad filter)
    │   ├── UnknownTableError     a table with no stored changes that does not exist in the database
    │   └── RevertConflictError   a revert would overwrite later changes, or the row is not as the history says
    ├── DecodeError           a replication message that is not valid pgoutput protocol version 1
    └── DemoError             `bemi-asgi demo` cannot start (port in use, unusable data directory, ...)

Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class BemiError(Exception):
    """Base class of all bemi-asgi errors."""


class BemiContextError(BemiError, ValueError):
    """A context mapping that cannot be carried into the WAL."""


class SourceNotReadyError(BemiError):
    """The source database is not prepared for change capture."""


class DestinationNotReadyError(BemiError):
    """The destination database lacks the tables the worker writes."""


class MigrationError(BemiError, ValueError):
    """Invalid options for the SQL migration."""


class ConfigError(BemiError, ValueError):
    """An invalid tracking, privacy or retention configuration."""


class QueryError(BemiError, ValueError):
    """A query helper received a request it cannot answer."""


class DecodeError(BemiError, ValueError):
    """A pgoutput message that cannot be decoded (truncated, unknown type, unsupported protocol feature)."""


class UnknownTableError(QueryError):
    """A table filter names a table with no stored changes that does not exist in the database either."""


class RevertConflictError(QueryError):
    """A revert was refused: a row it touches changed again after the changes being reverted."""


class DemoError(BemiError):
    """`bemi-asgi demo` cannot start or stopped on a failure; nothing it started is left running."""
