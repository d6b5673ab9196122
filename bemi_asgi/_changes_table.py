"""The `bemi.changes` table, defined once: its name, its columns and their types.

The worker writes it, the query helpers read it, and both derive what they need from here: the worker the columns
it fills (`WRITTEN`) and their types (its binary COPY stream), the query helpers their select list and the fields
of `Change`. The migration's SQL (`ops/sql/destination_up.sql`, `destination_partitioned_up.sql`) creates the
table; `tests/test_changes_table.py` migrates a database both ways and checks that the table it gets has exactly
these columns, types and nullability, in this order.

Column names follow Bemi's, so Bemi users' queries carry over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["CHANGES", "COLUMNS", "SCHEMA", "STREAMS", "TYPES", "WORKER_STATE", "WRITTEN", "Column"]

#: The schema of the worker's tables; never part of a tracked publication.
SCHEMA: Final = "bemi"
CHANGES: Final = "changes"
#: The worker's progress per source stream (`stream`, `last_commit_lsn`, `updated_at`).
WORKER_STATE: Final = "worker_state"
#: The source streams (`id`, `system_identifier`, `database`, `slot_name`): one per slot of a source database.
STREAMS: Final = "streams"


@dataclass(frozen=True, slots=True)
class Column:
    """One column of `bemi.changes`."""

    name: str
    #: The type as PostgreSQL's `format_type` names it.
    type: str
    nullable: bool = False
    #: Filled by the worker; False for the columns the server fills by default (`id`, `created_at`).
    written: bool = True

    @property
    def is_json(self) -> bool:
        return self.type == "jsonb"


#: In the table's order.
COLUMNS: Final = (
    Column("id", "bigint", written=False),
    # The row's key: its text for a single-column key, a JSON array of the key columns' texts for a composite one;
    # NULL for a table without a primary key, and for TRUNCATE.
    Column("primary_key", "text", nullable=True),
    Column("before", "jsonb"),
    Column("after", "jsonb"),
    Column("context", "jsonb"),
    Column("database", "text"),
    Column("schema", "text"),
    Column("table", "text"),
    Column("operation", "text"),  # CREATE, UPDATE, DELETE, TRUNCATE
    Column("committed_at", "timestamp with time zone"),
    Column("queued_at", "timestamp with time zone"),  # when the worker received the commit
    Column("created_at", "timestamp with time zone", written=False),
    Column("transaction_id", "bigint"),
    Column("position", "bigint"),  # the change's own WAL position
    Column("commit_lsn", "bigint"),  # with ordinal: the commit order within a stream
    Column("ordinal", "integer"),
    # The source stream (`bemi.streams.id`), last in the exactly-once key (commit_lsn, ordinal, stream). Last here
    # too, so a destination upgraded from before streams has the same column order as a new one.
    Column("stream", "integer"),
)

#: Each column's type by name.
TYPES: Final = {column.name: column.type for column in COLUMNS}
#: The columns the worker fills, in the table's order.
WRITTEN: Final = tuple(column.name for column in COLUMNS if column.written)
