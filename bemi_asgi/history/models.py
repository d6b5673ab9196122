"""The Pydantic models the query helpers return: `Change` (one stored row change) and `Operation`."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field

__all__ = ["Change", "FieldChange", "Operation", "Stream", "change_from_json", "changed_columns"]

#: A time as the query helpers return it: aware, in UTC (whatever the session's TimeZone wrote).
UtcDatetime = Annotated[datetime, AfterValidator(lambda moment: moment.astimezone(UTC))]


class Operation(enum.StrEnum):
    """What happened to the row (TRUNCATE: to every row of the table at once; DDL: to the table's schema). SNAPSHOT
    is not a change but a baseline stored by `bemi-asgi backfill`: the row as it was at that position, which is what
    it then replays as."""

    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    TRUNCATE = "TRUNCATE"
    #: A schema change of the table: `before` and `after` are its definition (columns, indexes, constraints), and
    #: `after` names the command (`command_tag`, `object_type`, `object_identity`).
    DDL = "DDL"
    SNAPSHOT = "SNAPSHOT"


class FieldChange(BaseModel):
    """One column's value before and after a change (None for a side where the row did not exist)."""

    model_config = ConfigDict(frozen=True)

    before: Any
    after: Any


class Change(BaseModel):
    """One row change as stored in `bemi.changes`, with the application context that caused it.

    Its fields are the table's columns (`bemi_asgi._changes_table`), checked by `tests/test_changes_table.py`.

    `before` and `after` are the row's columns as JSON values (`{}` for the side where the row does not exist);
    `context` is what the application set (user, endpoint, request id, ...). The changes of one source stream are
    ordered by `(commit_lsn, ordinal)`: the order in which they were committed.
    """

    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    id: int
    primary_key: str | None
    before: dict[str, Any]
    after: dict[str, Any]
    context: dict[str, Any]
    database: str
    # `schema` would shadow the deprecated BaseModel.schema(): the attribute is `schema_`, the JSON key "schema".
    schema_: str = Field(alias="schema")
    table: str
    operation: Operation
    committed_at: UtcDatetime
    queued_at: UtcDatetime
    created_at: UtcDatetime
    transaction_id: int
    position: int
    commit_lsn: int
    ordinal: int
    #: The source stream it came from (`bemi.streams`: the source cluster, its database and the slot); commit LSNs
    #: and ordinals order changes within one stream.
    stream: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def changed_fields(self) -> list[str]:
        """Columns whose value differs between `before` and `after`, in the row's column order."""
        return list(self.diff)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def diff(self) -> dict[str, FieldChange]:
        """For each changed column, its value before and after (every column for CREATE and DELETE)."""
        return diff_rows(self.before, self.after)


class Stream(BaseModel):
    """A source stream whose changes the destination holds (`bemi.streams`): one replication slot of one database
    of one PostgreSQL cluster. `Change.stream` is its `id`."""

    model_config = ConfigDict(frozen=True)

    id: int
    #: The source cluster's `pg_control_system().system_identifier`; None for a stream carried over from a
    #: destination written before streams were recorded, until its worker runs again.
    system_identifier: int | None
    database: str | None
    slot_name: str


def changed_columns(before: Mapping[str, Any], after: Mapping[str, Any]) -> Iterator[str]:
    """The names of the columns that differ between two row images, in the row's column order (a column on one
    side only differs)."""
    for name in (*after, *(key for key in before if key not in after)):
        old, new = before.get(name), after.get(name)
        if name not in before or name not in after or old != new or type(old) is not type(new):
            yield name


def diff_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, FieldChange]:
    """The columns that differ between two row images, with both values (a missing side counts as None)."""
    return {
        name: FieldChange(before=before.get(name), after=after.get(name)) for name in changed_columns(before, after)
    }


def change_from_json(text: str | bytes) -> Change:
    """Build a Change from a `bemi.changes` row as one JSON object (`row_to_json`), parsed by pydantic-core in one
    step: a third cheaper than decoding the row's columns and its jsonb texts in Python."""
    return Change.model_validate_json(text)
