"""The JSON API's response models: what `bemi_asgi.api` answers, as the app's OpenAPI schema shows it.

A change here names itself and its transaction by references (`ref`, `transaction`): the stored numbers without a
scope, sealed tokens under one (`bemi_asgi.history.refs`), so a tenant reading its own changes learns no global
counter. Everything else is the stored change as `bemi_asgi.Change` has it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..history.models import Change, Operation
from ..history.refs import Refs

__all__ = ["BlameView", "ChangePageView", "ChangeView", "CountView", "ErrorView", "RowStateView"]


class ChangeView(BaseModel):
    """One stored row change with the application context that caused it."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, serialize_by_alias=True)

    ref: str = Field(description="The change's reference: its id, or a sealed token under a scope.")
    transaction: str = Field(description="Its transaction's reference, for /transactions/{ref}.")
    primary_key: str | None = Field(description="The row's key text (a JSON array of texts for a composite key).")
    before: dict[str, Any]
    after: dict[str, Any]
    context: dict[str, Any]
    database: str
    schema_: str = Field(alias="schema")
    table: str
    operation: Operation
    committed_at: datetime
    changed_fields: list[str]

    @classmethod
    def of(cls, change: Change, refs: Refs) -> ChangeView:
        return cls.model_validate(
            {
                "ref": refs.change(change),
                "transaction": refs.transaction(change),
                "primary_key": change.primary_key,
                "before": change.before,
                "after": change.after,
                "context": change.context,
                "database": change.database,
                "schema": change.schema_,
                "table": change.table,
                "operation": change.operation,
                "committed_at": change.committed_at,
                "changed_fields": change.changed_fields,
            }
        )


class ChangePageView(BaseModel):
    """A page of changes in commit order, and the cursor of the next page (null on the last)."""

    changes: list[ChangeView]
    next_cursor: str | None = Field(description="Pass as cursor= with the same filters for the next page.")


class CountView(BaseModel):
    """How many changes match."""

    count: int


class RowStateView(BaseModel):
    """A row as it was at a moment: null when it did not exist then; the change that made it so."""

    state: dict[str, Any] | None
    change: ChangeView | None


class BlameView(BaseModel):
    """For each column of the row (now, or at the moment asked), the change that last set its value."""

    columns: dict[str, ChangeView]


class ErrorView(BaseModel):
    """Why a request was refused (400 bad input, 401 not signed in, 403 forbidden, 404 nothing visible)."""

    detail: str
