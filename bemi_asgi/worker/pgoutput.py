"""A pure decoder of pgoutput (protocol version 1) messages: bytes in, frozen dataclasses out, no I/O.

One call decodes one message, the payload of one XLogData ('w') frame of the replication stream, or one `data`
value of `pg_logical_slot_peek_binary_changes(..., 'proto_version', '1', ...)`. The format is PostgreSQL's
"Logical Replication Message Formats" (protocol chapter). Column values stay text, as the server sent them (the
stream is requested in text format): `bemi_asgi.worker.values` turns them into JSON values once the column types
are known.

This is the worker's hot path, so the code avoids per-byte loops and per-field calls: precompiled `struct.Struct`
unpackers read straight from the buffer, and each text value costs one slice and one UTF-8 decode.

Note: streamed (`streaming 'on'`) and two-phase messages belong to protocol versions 2 and up and are rejected, as
are binary-format values ('b', requested with `binary 'true'`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TypeAlias

from .._exceptions import DecodeError

__all__ = [
    "BEGIN",
    "COMMIT",
    "DELETE",
    "INSERT",
    "KEY_TUPLE",
    "MESSAGE",
    "NEW_TUPLE",
    "NULL_VALUE",
    "OLD_TUPLE",
    "PG_EPOCH",
    "RELATION",
    "ROW_RELATION_OFFSET",
    "ROW_TUPLE_OFFSET",
    "TEXT_VALUE",
    "TRUNCATE",
    "UNCHANGED",
    "UNCHANGED_VALUE",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "Truncate",
    "Type",
    "Unchanged",
    "Update",
    "Value",
    "decode",
]


# The protocol's bytes, named once (the decoder, the fast path and the pipeline read them).
#: Message types: a message's first byte.
BEGIN, COMMIT, ORIGIN, RELATION, TYPE, INSERT, UPDATE, DELETE, TRUNCATE, MESSAGE = b"BCORYIUDTM"
#: TupleData markers before a row: the new row, the whole old row (REPLICA IDENTITY FULL), the old key only.
NEW_TUPLE, OLD_TUPLE, KEY_TUPLE = b"NOK"
#: TupleData column kinds: text value (Int32 length, then the text), NULL, unchanged TOAST value, binary value.
TEXT_VALUE, NULL_VALUE, UNCHANGED_VALUE, BINARY_VALUE = b"tnub"
#: In an Insert, Update or Delete message: where the relation OID (Int32) is, and the first tuple marker.
ROW_RELATION_OFFSET, ROW_TUPLE_OFFSET = 1, 5


class Unchanged(enum.Enum):
    """Type of `UNCHANGED`: an enum member, so `value is UNCHANGED` narrows types and survives pickling."""

    UNCHANGED = "u"

    def __repr__(self) -> str:
        return "UNCHANGED"


#: An unchanged TOASTed value ('u' in TupleData): the server did not resend it; take it from the old row.
UNCHANGED: Final = Unchanged.UNCHANGED

Value: TypeAlias = str | Unchanged | None


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    is_key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str  # pgoutput sends '' for pg_catalog
    name: str
    replica_identity: str  # pg_class.relreplident: 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    old: tuple[Value, ...] | None  # None: the key did not change and the replica identity is not FULL
    new: tuple[Value, ...]
    old_is_key_only: bool  # 'K': only the replica identity columns are set, the others are None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old: tuple[Value, ...]
    old_is_key_only: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    cascade: bool
    restart_identity: bool
    relation_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage: TypeAlias = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message

#: PostgreSQL's epoch: its timestamps count microseconds from it.
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)

_u8: Final = struct.Struct("!B").unpack_from
_i16: Final = struct.Struct("!h").unpack_from
_u32: Final = struct.Struct("!I").unpack_from
_u64: Final = struct.Struct("!Q").unpack_from
_begin: Final = struct.Struct("!QqI").unpack_from
_commit: Final = struct.Struct("!BQQq").unpack_from
_relation_column_tail: Final = struct.Struct("!Ii").unpack_from
_truncate_head: Final = struct.Struct("!IB").unpack_from
_message_head: Final = struct.Struct("!BQ").unpack_from

_NAMES: Final = {
    BEGIN: "Begin", COMMIT: "Commit", ORIGIN: "Origin", RELATION: "Relation", TYPE: "Type",
    INSERT: "Insert", UPDATE: "Update", DELETE: "Delete", TRUNCATE: "Truncate", MESSAGE: "Message",
}  # fmt: skip


def _timestamp(microseconds: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=microseconds)


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated string at `pos`, and the position after its terminator."""
    end = data.index(b"\0", pos)  # ValueError when missing: reported as truncated by decode()
    return data[pos:end].decode(), end + 1


def _tuple(data: bytes, pos: int) -> tuple[tuple[Value, ...], int]:
    """TupleData at `pos`: the values and the position after them. Truncation shows as a position past the end."""
    (count,) = _i16(data, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    for _ in range(count):
        kind = data[pos]
        if kind == TEXT_VALUE:
            (length,) = _u32(data, pos + 1)
            start = pos + 5
            pos = start + length
            append(data[start:pos].decode())
        elif kind == NULL_VALUE:
            append(None)
            pos += 1
        elif kind == UNCHANGED_VALUE:
            append(UNCHANGED)
            pos += 1
        elif kind == BINARY_VALUE:
            raise DecodeError(
                f"binary-format column value at offset {pos}: request the stream in text format "
                "(do not pass binary 'true')"
            )
        else:
            raise DecodeError(f"unknown TupleData column kind {bytes([kind])!r} at offset {pos}")
    return tuple(values), pos


def _decode_begin(data: bytes) -> Begin:
    final_lsn, micros, xid = _begin(data, 1)
    _end(data, 21)
    return Begin(final_lsn, PG_EPOCH + timedelta(microseconds=micros), xid)


def _decode_commit(data: bytes) -> Commit:
    flags, commit_lsn, end_lsn, micros = _commit(data, 1)
    _end(data, 26)
    return Commit(flags, commit_lsn, end_lsn, PG_EPOCH + timedelta(microseconds=micros))


def _decode_origin(data: bytes) -> Origin:
    (commit_lsn,) = _u64(data, 1)
    name, pos = _string(data, 9)
    _end(data, pos)
    return Origin(commit_lsn, name)


def _decode_relation(data: bytes) -> Relation:
    (oid,) = _u32(data, 1)
    namespace, pos = _string(data, 5)
    name, pos = _string(data, pos)
    replica_identity = chr(data[pos])
    (count,) = _i16(data, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = data[pos]
        column_name, pos = _string(data, pos + 1)
        type_oid, type_modifier = _relation_column_tail(data, pos)
        pos += 8
        columns.append(Column(bool(flags & 1), column_name, type_oid, type_modifier))
    _end(data, pos)
    return Relation(oid, namespace, name, replica_identity, tuple(columns))


def _decode_type(data: bytes) -> Type:
    (oid,) = _u32(data, 1)
    namespace, pos = _string(data, 5)
    name, pos = _string(data, pos)
    _end(data, pos)
    return Type(oid, namespace, name)


def _decode_insert(data: bytes) -> Insert:
    (relation_oid,) = _u32(data, ROW_RELATION_OFFSET)
    if data[ROW_TUPLE_OFFSET] != NEW_TUPLE:
        raise DecodeError(f"expected 'N' (new tuple) at offset 5, got {data[5:6]!r}")
    new, pos = _tuple(data, ROW_TUPLE_OFFSET + 1)
    if pos != len(data):
        _end(data, pos)
    # The hottest constructor: setting the slots directly skips the frozen __init__'s object.__setattr__ calls.
    insert = _new(Insert)
    _set_insert_relation_oid(insert, relation_oid)
    _set_insert_new(insert, new)
    return insert


_new: Final = object.__new__
_set_insert_relation_oid: Final[Callable[[Insert, int], None]] = vars(Insert)["relation_oid"].__set__
_set_insert_new: Final[Callable[[Insert, tuple[Value, ...]], None]] = vars(Insert)["new"].__set__


def _decode_update(data: bytes) -> Update:
    (relation_oid,) = _u32(data, ROW_RELATION_OFFSET)
    kind = data[ROW_TUPLE_OFFSET]
    old: tuple[Value, ...] | None = None
    pos = ROW_TUPLE_OFFSET
    if kind in (KEY_TUPLE, OLD_TUPLE):
        old, pos = _tuple(data, ROW_TUPLE_OFFSET + 1)
        kind = data[pos]
    if kind != NEW_TUPLE:
        raise DecodeError(f"expected 'K', 'O' or 'N' tuple marker at offset {pos}, got {data[pos : pos + 1]!r}")
    new, pos = _tuple(data, pos + 1)
    if pos != len(data):
        _end(data, pos)
    return Update(relation_oid, old, new, data[ROW_TUPLE_OFFSET] == KEY_TUPLE)


def _decode_delete(data: bytes) -> Delete:
    (relation_oid,) = _u32(data, ROW_RELATION_OFFSET)
    kind = data[ROW_TUPLE_OFFSET]
    if kind not in (KEY_TUPLE, OLD_TUPLE):
        raise DecodeError(f"expected 'K' or 'O' tuple marker at offset 5, got {data[5:6]!r}")
    old, pos = _tuple(data, ROW_TUPLE_OFFSET + 1)
    _end(data, pos)
    return Delete(relation_oid, old, kind == KEY_TUPLE)


def _decode_truncate(data: bytes) -> Truncate:
    count, options = _truncate_head(data, 1)
    end = 6 + 4 * count
    _end(data, end)
    oids = struct.unpack_from(f"!{count}I", data, 6)
    return Truncate(bool(options & 1), bool(options & 2), oids)


def _decode_message(data: bytes) -> Message:
    flags, lsn = _message_head(data, 1)
    prefix, pos = _string(data, 10)
    (length,) = _u32(data, pos)
    pos += 4
    content = data[pos : pos + length]
    _end(data, pos + length)
    return Message(bool(flags & 1), lsn, prefix, content)


def _end(data: bytes, pos: int) -> None:
    """Check that a message ends exactly at `pos`."""
    if pos > len(data):
        raise DecodeError(f"truncated: {len(data)} bytes, the fields need {pos}")
    if pos < len(data):
        raise DecodeError(f"{len(data) - pos} unexpected trailing bytes at offset {pos}")


_DECODERS: Final[dict[int, Callable[[bytes], PgOutputMessage]]] = {
    BEGIN: _decode_begin,
    COMMIT: _decode_commit,
    ORIGIN: _decode_origin,
    RELATION: _decode_relation,
    TYPE: _decode_type,
    INSERT: _decode_insert,
    UPDATE: _decode_update,
    DELETE: _decode_delete,
    TRUNCATE: _decode_truncate,
    MESSAGE: _decode_message,
}


def decode(data: bytes | bytearray | memoryview) -> PgOutputMessage:
    """Decode one pgoutput message; DecodeError names the message type and what is wrong, with its offset."""
    if type(data) is not bytes:
        data = bytes(data)  # one copy; bytes slice, find and decode faster than a memoryview
    try:
        decoder = _DECODERS[data[0]]
    except IndexError:
        raise DecodeError("empty pgoutput message: expected at least a message type byte") from None
    except KeyError:
        raise DecodeError(
            f"unknown pgoutput message type {data[:1]!r} at offset 0: only protocol version 1 messages are "
            "supported (start replication with proto_version '1' and without streaming or two_phase)"
        ) from None
    try:
        return decoder(data)
    except DecodeError as exc:
        problem = str(exc)
    except UnicodeDecodeError as exc:
        problem = f"invalid UTF-8 at offset {exc.start} of a text field ({exc.reason})"
    except ValueError:  # bytes.index found no terminator
        problem = "a string field has no NUL terminator"
    except struct.error as exc:
        problem = f"truncated: {exc}"
    except IndexError:
        problem = f"truncated: the message ends at offset {len(data)} inside a field"
    raise DecodeError(f"malformed pgoutput {_NAMES[data[0]]} message ({len(data)} bytes): {problem}")
