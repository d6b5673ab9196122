"""One change as a row of the worker's binary COPY stream into `bemi.changes`, and the SQL that prints a stored row
the same way.

`BinaryCopy` (`destination.py`) writes the rows; the hash chain (`chain.py`, format 3) covers each change's row as
sent, followed by its `created_at` as one more field (`ROW_CONTENT_SQL`), so the worker hashes the bytes it already
built and `bemi-asgi verify` gets the same bytes from what is stored. A field is its length (int4; -1 for NULL) and
its value in the type's binary format: jsonb is version 1 and its text, text is UTF-8, integers and timestamps are
big-endian (timestamps in microseconds since 2000-01-01 UTC).
"""

from __future__ import annotations

from typing import Final

from .._changes_table import TYPES

__all__ = ["BINARY_COLUMNS", "ROW_CONTENT_SQL"]

#: The columns of `BinaryCopy`'s stream with their types: each change's own values first, then those it shares
#: with the other changes of its relation (and operation), its transaction's segment and its transaction.
BINARY_COLUMNS: Final = tuple(
    (name, TYPES[name])
    for name in (
        "primary_key",
        "before",
        "after",
        "position",
        "ordinal",
        "schema",
        "table",
        "operation",
        "database",
        "context",
        "committed_at",
        "queued_at",
        "transaction_id",
        "commit_lsn",
        "stream",
    )
)

#: A stored value as its COPY field's value, by type.
_VALUE_SQL: Final = {
    "text": "convert_to({}, 'UTF8')",
    "jsonb": "'\\x01'::bytea || convert_to({}::text, 'UTF8')",
    "bigint": "int8send({})",
    "integer": "int4send({})",
    "timestamp with time zone": "timestamptz_send({})",
}


def _field_sql(name: str, kind: str) -> str:
    # Cast to the migration's type: a destination whose column is another type (written by records, not by the
    # binary stream) prints the value as the binary stream would have sent it.
    value = _VALUE_SQL[kind].format(f'"{name}"::{kind}')
    return f"coalesce(int4send(length({value})) || {value}, '\\xffffffff'::bytea)"


#: A stored change's row as `BinaryCopy` sent it (the field count, then `BINARY_COLUMNS`), then its `created_at`
#: (which the destination sets) as one more field: what a format 3 link covers of a change.
ROW_CONTENT_SQL: Final = " || ".join(
    (
        f"int2send({len(BINARY_COLUMNS)}::smallint)",
        *(_field_sql(name, kind) for name, kind in BINARY_COLUMNS),
        _field_sql("created_at", TYPES["created_at"]),
    )
)
