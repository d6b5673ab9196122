"""From a pgoutput row change and its relation to the stored change: `primary_key`, `before`, `after`, `operation`.

`Relations` keeps what the worker knows of each relation of a session: its columns and their rules (built from the
Relation message, the source catalog's primary key and types, and the tracking configuration), and the fast path
generated for it (tracking rules included). `Relations.row_change` is the one call the reader makes per Insert,
Update or Delete frame: the fast path (`fastpath.RowCodec`) when it applies, else the general path here (decode,
tracking rules, type rules per value, join).

Note: the primary key is read from the source catalog when a Relation message arrives (pgoutput marks every column
as key under REPLICA IDENTITY FULL), so a key changed after the change was made but before the worker read it is
reported with the current definition.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from .._changes_table import SCHEMA
from .fastpath import DROPPED, FastChange, RowCodec
from .pgoutput import (
    ROW_RELATION_OFFSET,
    UNCHANGED,
    Column,
    Delete,
    Insert,
    Relation,
    Truncate,
    Unchanged,
    Update,
    Value,
    decode,
)
from .rules import Filters, RowPolicy, filter_relation
from .stream import XLOG_HEADER_SIZE
from .values import (
    KNOWN_OIDS,
    ColumnRule,
    TypeInfo,
    ValueEncoder,
    column_rule,
    encode_json,
    json_string,
    object_json,
    row_json,
    value_encoder,
)

__all__ = ["RelationInfo", "Relations", "StoredChange"]

#: A row change as stored: (primary_key, before JSON, after JSON, operation).
StoredChange: TypeAlias = FastChange
_Row: TypeAlias = "dict[str, str | Unchanged]"

_relation_oid: Final = struct.Struct("!I").unpack_from
_RELATION_OID_AT: Final = XLOG_HEADER_SIZE + ROW_RELATION_OFFSET
_EMPTY: Final = "{}"


class Catalog(Protocol):
    """What `Relations` asks the source (`stream.SourceCatalog`)."""

    async def primary_key(self, relation_oid: int) -> list[str] | None: ...

    async def types(self, oids: list[int]) -> dict[int, TypeInfo]: ...

    async def partition_ancestors(self, relation_oid: int) -> list[str]: ...


@dataclass(slots=True)
class RelationInfo:
    """What the worker needs about one relation, from its latest Relation message and the catalog."""

    schema: str
    table: str
    columns: tuple[Column, ...]
    converters: tuple[ValueEncoder, ...]  # each column's rule (text -> JSON text), for the general path
    key: tuple[int, ...]  # positions of the primary key columns, in key order; () without a primary key
    replica_key: tuple[int, ...]  # positions the replica identity sends in a key-only old row
    ignored: bool = False  # the worker's own tables, or left out by the tracking configuration
    policy: RowPolicy | None = None  # column rules or no-op dropping (tracking configuration); None: store as is
    codec: RowCodec | None = None  # the fast path (tracking rules included); None for a left-out table

    def primary_key(self, values: tuple[Value, ...], old: tuple[Value, ...] | None) -> str | None:
        """The change's `primary_key`: one key column's text, a JSON array of texts for a composite key."""
        key = self.key
        if not key:
            return None
        texts = [values[i] for i in key]
        if old is not None:
            texts = [old[i] if text is UNCHANGED else text for i, text in zip(key, texts, strict=True)]
        if len(texts) == 1:
            text = texts[0]
            return text if isinstance(text, str) else None
        return encode_json([text if isinstance(text, str) else None for text in texts])

    def frame_change(self, frame: bytes) -> StoredChange | None:
        """The stored change of this relation's Insert, Update or Delete XLogData frame: the fast path when it takes
        the frame, else the general one; None when the tracking configuration drops it. Raises DecodeError for a
        malformed message."""
        if self.codec is not None and (fast := self.codec.change(frame)) is not None:
            return None if fast is DROPPED else fast
        message = decode(frame[XLOG_HEADER_SIZE:])
        assert type(message) is Insert or type(message) is Update or type(message) is Delete
        return self.change(message)

    def change(self, message: Insert | Update | Delete) -> StoredChange | None:
        """The general path: the stored change of a decoded message; None when the tracking configuration drops it
        (an update of ignored columns only, or a no-op update)."""
        policy = self.policy
        if type(message) is Insert:
            new = message.new if policy is None else policy.row(message.new)
            return self.primary_key(new, None), _EMPTY, object_json(self._row(new)), "CREATE"
        if type(message) is Update:
            old, new = message.old, message.new
            key_only = message.old_is_key_only
            if policy is not None:
                if old is not None and not key_only and policy.drops_update(old, new):
                    return None
                new = policy.row(new)
                old = None if old is None else policy.row(old)
            if old is not None and not key_only:
                before = self._row(old)
                after = self._updated(before, old, new)
            else:
                after = self._row(new)
                before = self._old_row(old, True) if old is not None else {}
                if UNCHANGED in new:
                    _fill_unchanged(after, before)
            before_json = object_json(before) if before else _EMPTY
            return self.primary_key(new, old), before_json, object_json(after), "UPDATE"
        assert type(message) is Delete
        old = message.old if policy is None else policy.row(message.old)
        return self.primary_key(old, None), object_json(self._old_row(old, message.old_is_key_only)), _EMPTY, "DELETE"

    def _row(self, values: tuple[Value, ...]) -> _Row:
        return row_json(self.columns, values, self.converters)

    def _old_row(self, old: tuple[Value, ...], key_only: bool) -> _Row:
        row = self._row(old)
        if key_only:
            # A 'K' old row sends the replica identity columns; the others are NULL placeholders, not values.
            keep = {self.columns[i].name for i in self.replica_key}
            row = {name: value for name, value in row.items() if name in keep}
        return row

    def _updated(self, before: _Row, old: tuple[Value, ...], new: tuple[Value, ...]) -> _Row:
        """The new row of an update whose full old row is known: the old row's JSON where the text did not change
        (most columns, usually; and every unchanged TOAST value), the new JSON where it did."""
        changed = [i for i, value in enumerate(new) if value is not UNCHANGED and value != old[i]]
        after = dict(before)
        if changed:
            columns, encoders = self.columns, self.converters
            after.update(
                row_json([columns[i] for i in changed], [new[i] for i in changed], [encoders[i] for i in changed])
            )
        return after


def _fill_unchanged(after: _Row, before: _Row) -> None:
    """Unchanged TOASTed values are not resent: take them from the old row, or leave them out when it lacks them."""
    for name, value in list(after.items()):
        if value is UNCHANGED:
            if name in before and before[name] is not UNCHANGED:
                after[name] = before[name]
            else:
                del after[name]


class Relations:
    """The relations of one session, by OID, from their Relation messages."""

    def __init__(self, catalog: Catalog, filters: Filters | None = None) -> None:
        self._catalog = catalog
        self._filters = filters
        self._by_oid: dict[int, RelationInfo] = {}
        self._types: dict[int, TypeInfo] = {}  # what the catalog said about types the rules do not know by OID

    def __getitem__(self, oid: int) -> RelationInfo:
        return self._by_oid[oid]

    def tracks(self, schema: str, table: str) -> bool:
        """Whether the worker's `include` / `exclude` filters keep changes of this table."""
        return self._filters is None or self._filters.tracks(schema, table)

    async def add(self, message: Relation) -> RelationInfo:
        """Read a Relation message (a relation's first change in the session, or its first after a schema
        change): its primary key and column types from the catalog, its tracking rules, its fast path."""
        names = [column.name for column in message.columns]
        key_names = await self._catalog.primary_key(message.oid)
        replica_key = tuple(i for i, column in enumerate(message.columns) if column.is_key)
        if key_names is None:
            # Dropped since: trust the message's key flags, which are the primary key unless REPLICA IDENTITY FULL.
            key = replica_key if message.replica_identity != "f" else ()
        elif all(name in names for name in key_names):
            key = tuple(names.index(name) for name in key_names)
        else:
            key = ()
        rules = await self._rules(message.columns)
        info = self._by_oid[message.oid] = RelationInfo(
            message.namespace or "pg_catalog",
            message.name,
            message.columns,
            tuple(value_encoder(*rule) for rule in rules),
            key,
            replica_key,
            # Storing changes of bemi.changes (or the worker's state, rules, backfill progress) would feed the
            # worker its own writes, forever: nothing of the schema bemi is history.
            ignored=message.namespace == SCHEMA,
        )
        if self._filters is not None and not info.ignored:
            # Tracking configuration: leave the table out, or filter its rows (ignored, masked, hashed columns).
            ancestors = await self._catalog.partition_ancestors(message.oid)
            filter_relation(self._filters, info, ancestors)
            if info.policy is not None:
                # A masked or hashed value (the marker, the HMAC) is stored as a string, whatever the column type.
                converters = list(info.converters)
                for position, _transform in info.policy.transforms:
                    converters[position] = json_string
                info.converters = tuple(converters)
        if not info.ignored:
            # Built on the message's own columns and key positions: the policy cuts, masks and hashes as it reads.
            info.codec = RowCodec(message.columns, rules, key, info.policy)
        return info

    async def _rules(self, columns: tuple[Column, ...]) -> list[ColumnRule]:
        unknown = sorted({c.type_oid for c in columns if c.type_oid not in self._types} - KNOWN_OIDS)
        if unknown:
            self._types.update(await self._catalog.types(unknown))
        return [column_rule(column.type_oid, self._types) for column in columns]

    def row_change(self, frame: bytes) -> tuple[RelationInfo, StoredChange] | None:
        """The stored change of an Insert, Update or Delete XLogData frame, and its relation; None when nothing is
        stored (an ignored table, an update the tracking configuration drops). Raises DecodeError for a malformed
        message."""
        if len(frame) > _RELATION_OID_AT + 4:
            rel = self._by_oid.get(_relation_oid(frame, _RELATION_OID_AT)[0])
            if rel is not None:
                if rel.ignored:
                    return None
                # `frame_change` inline (one call less per change); what the fast path declines is decoded below.
                if rel.codec is not None and (fast := rel.codec.change(frame)) is not None:
                    return None if fast is DROPPED else (rel, fast)
        message = decode(frame[XLOG_HEADER_SIZE:])
        assert type(message) is Insert or type(message) is Update or type(message) is Delete
        rel = self._by_oid[message.relation_oid]
        if rel.ignored:
            return None
        change = rel.change(message)
        return None if change is None else (rel, change)

    def truncated(self, message: Truncate) -> Iterator[RelationInfo]:
        """The relations a Truncate message empties whose changes are stored."""
        for oid in message.relation_oids:
            rel = self._by_oid[oid]
            if not rel.ignored:
                yield rel
