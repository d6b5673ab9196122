"""Schema changes: the source's event triggers describe each DDL on a tracked table in a logical message, and the
worker stores it as a change with operation DDL, in its place among the transaction's row changes.

The migration's event triggers (`ops/sql/source_up.sql`, `bemi.record_schema_change`) emit, in the DDL's own
transaction, a transactional message with the prefix `SCHEMA_CHANGE_PREFIX` holding

    {"schema": ..., "table": ..., "before": <definition or {}>,
     "after": <definition or {}> + {"command_tag": ..., "object_type": ..., "object_identity": ...}}

where a table's definition is `{"schema", "table", "columns": {name: {"type", "not_null", "number", "default"}},
"indexes": {name: definition}, "constraints": {name: definition}}`; `before` is `{}` for a CREATE TABLE and
`after` has no `columns` after a DROP TABLE. Since it is a change of its transaction like any other, the stitching
rule gives it the context of the `_bemi` message after it (a migration run through the bemi pool carries its
context; one from psql has `{}`), and a rolled-back DDL leaves nothing.
"""

from __future__ import annotations

import logging
from typing import Final

from . import jsonb
from .spill import PendingChange

__all__ = ["DDL", "SCHEMA_CHANGE_PREFIX", "schema_change"]

logger = logging.getLogger("bemi_asgi.worker")

#: The prefix of the event triggers' logical messages (spliced into the migration's SQL from here).
SCHEMA_CHANGE_PREFIX: Final = "_bemi_ddl"
#: The `operation` of a stored schema change.
DDL: Final = "DDL"


def schema_change(content: bytes, encoding: str, position: int, ordinal: int) -> PendingChange | None:
    """The change to store for one schema change message, or None (logged) for a payload of another shape: a
    message written by hand with this prefix never stops the worker."""
    try:
        payload = jsonb.loads(content.decode(encoding))
        schema, table, before, after = payload["schema"], payload["table"], payload["before"], payload["after"]
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("ignored a %s message that is not a schema change (%s)", SCHEMA_CHANGE_PREFIX, exc)
        return None
    if not (
        isinstance(schema, str) and isinstance(table, str) and isinstance(before, dict) and isinstance(after, dict)
    ):
        logger.warning("ignored a %s message that is not a schema change", SCHEMA_CHANGE_PREFIX)
        return None
    return (None, jsonb.dump(before), jsonb.dump(after), schema, table, DDL, position, ordinal)
