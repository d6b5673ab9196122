"""The worker's hot path: an Insert, Update or Delete frame straight to its `primary_key`, `before` and `after`.

The general path decodes a message into a dataclass of text values (`pgoutput`), turns each value into JSON text
with its column's rule (`values.row_json`) and joins the row. `RowCodec` does the same in one pass over the
frame's bytes, with a TupleData reader generated per relation: one unrolled block per column (a loop with a type
dispatch per value cost as much as the conversions) holding the column's rule, pasted from the same
`values.TypeRule` the general path compiles. The row is one `%`-format of a per-relation template whose column
names are already JSON-escaped. An update's new row reuses the old row's JSON for every value whose bytes did not
change. The generated source is registered with `linecache`, so a traceback shows its lines.

The output is byte for byte what the general path stores (tests/test_fastpath.py compares the two on real
streams). Anything out of the ordinary (a key-only or missing old row, a malformed message, a value its rule
rejects) returns None, and the worker takes the general path, which also reports malformed messages.
"""

from __future__ import annotations

import hashlib
import struct
import textwrap
from collections.abc import Callable, Sequence
from typing import Final, TypeAlias

from .pgoutput import (
    DELETE,
    INSERT,
    NEW_TUPLE,
    NULL_VALUE,
    OLD_TUPLE,
    ROW_TUPLE_OFFSET,
    TEXT_VALUE,
    UNCHANGED,
    UNCHANGED_VALUE,
    UPDATE,
    Column,
    Unchanged,
)
from .stream import XLOG_HEADER_SIZE
from .values import RULE_NAMES, ColumnRule, compile_source, encode_json, json_string

__all__ = ["FastChange", "RowCodec"]

#: (primary_key, before JSON, after JSON, operation)
FastChange: TypeAlias = tuple[str | None, str, str, str]
_Raw: TypeAlias = "bytes | Unchanged | None"

_i16: Final = struct.Struct("!h").unpack_from
_u32: Final = struct.Struct("!I").unpack_from
_escape: Final = json_string

# Where things are in a row change frame: the message type, its first tuple marker, and its first tuple.
_KIND_AT: Final = XLOG_HEADER_SIZE
_MARKER_AT: Final = XLOG_HEADER_SIZE + ROW_TUPLE_OFFSET
_TUPLE_AT: Final = _MARKER_AT + 1


class _Fallback(Exception):
    """The frame needs the general path."""


class RowCodec:
    """One relation's fast path: built from its columns and their rules (no column rules of the tracking
    configuration), used per change."""

    __slots__ = ("_key", "_row", "_single_key", "_template", "_updated", "source")

    def __init__(
        self, columns: Sequence[Column], rules: Sequence[ColumnRule], key: Sequence[int], single_key: int
    ) -> None:
        #: The generated readers' source (also in `linecache`).
        self.source = _source(rules)
        self._row, self._updated = _compile(self.source, rules)
        names = [_escape(column.name).replace("%", "%%") for column in columns]
        self._template = "{" + ",".join(f"{name}:%s" for name in names) + "}"
        self._key = tuple(key)
        self._single_key = single_key

    def change(self, data: bytes) -> FastChange | None:
        """`data` is a whole XLogData frame (its header, then the pgoutput message); None: use the general path."""
        try:
            kind = data[_KIND_AT]
            if kind == INSERT:
                if data[_MARKER_AT] != NEW_TUPLE:
                    return None
                pieces, raws, pos = self._row(data, _TUPLE_AT)
                if pos != len(data):
                    return None
                return self._key_of(raws, None), "{}", self._template % pieces, "CREATE"
            if kind == UPDATE:
                if data[_MARKER_AT] != OLD_TUPLE:  # only with the whole old row (REPLICA IDENTITY FULL)
                    return None
                old_pieces, old_raws, pos = self._row(data, _TUPLE_AT)
                if data[pos] != NEW_TUPLE:
                    return None
                pieces, raws, pos = self._updated(data, pos + 1, old_pieces, old_raws)
                if pos != len(data):
                    return None
                template = self._template
                key = self._key_of(raws, old_raws)
                return key, template % old_pieces, template % pieces, "UPDATE"
            if kind == DELETE:
                if data[_MARKER_AT] != OLD_TUPLE:
                    return None
                pieces, raws, pos = self._row(data, _TUPLE_AT)
                if pos != len(data):
                    return None
                return self._key_of(raws, None), self._template % pieces, "{}", "DELETE"
        except (_Fallback, IndexError, ValueError, struct.error, RecursionError):
            # UnicodeDecodeError and a rule's rejection are ValueErrors.
            return None
        return None

    def _key_of(self, raws: Sequence[_Raw], old: Sequence[_Raw] | None) -> str | None:
        """The `primary_key` column: one key column's text, or a JSON array of texts for a composite key."""
        single = self._single_key
        if single >= 0:
            raw = raws[single]
            if raw is UNCHANGED and old is not None:
                raw = old[single]
            return raw.decode() if raw.__class__ is bytes else None
        if not self._key:
            return None
        texts: list[str | None] = []
        for i in self._key:
            raw = raws[i]
            if raw is UNCHANGED and old is not None:
                raw = old[i]
            texts.append(raw.decode() if raw.__class__ is bytes else None)
        return encode_json(texts)


# TupleData readers, generated per relation: one block per column, unrolled, with the column's rule pasted in.
# Only positions, protocol bytes and the rules' code enter the generated code, never names.
_Reader: TypeAlias = Callable[[bytes, int], tuple[tuple[str, ...], tuple[_Raw, ...], int]]
_UpdateReader: TypeAlias = Callable[
    [bytes, int, tuple[str, ...], tuple[_Raw, ...]], tuple[tuple[str, ...], tuple[_Raw, ...], int]
]

_READ_VALUE: Final = f"""\
    tag = data[pos]
    if tag == {TEXT_VALUE}:  # 't': Int32 length, then the text
        end = pos + 5 + _u32(data, pos + 1)[0]
        r{{i}} = data[pos + 5 : end]
        pos = end
{{convert}}
    elif tag == {NULL_VALUE}:  # 'n'
        pos += 1
        r{{i}} = None
        p{{i}} = "null"
    elif tag == {UNCHANGED_VALUE}:  # 'u'
        pos += 1
        r{{i}} = UNCHANGED
        p{{i}} = {{unchanged}}
    else:
        raise _Fallback
"""

_CONVERT: Final = """\
        text = r{i}.decode()
{arg}{rule}
        p{i} = out"""

_REUSE: Final = """\
        if r{i} == old_raws[{i}]:
            p{i} = old[{i}]
        else:
            text = r{i}.decode()
{arg}{rule}
            p{i} = out"""


def _source(rules: Sequence[ColumnRule]) -> str:
    """The relation's TupleData reader `row` (each value's JSON, its bytes (None for NULL, UNCHANGED for an
    unchanged TOAST value), and the position after the tuple), and its update reader `updated` (the new row,
    reusing the old row's JSON wherever the bytes did not change and for every unchanged TOAST value)."""
    count = len(rules)
    head = f"    if _i16(data, pos)[0] != {count}:\n        raise _Fallback\n    pos += 2\n"
    row = [f"def row(data, pos):\n{head}"]
    updated = [f"def updated(data, pos, old, old_raws):\n{head}"]
    for i, (rule, arg) in enumerate(rules):
        code = textwrap.indent(rule.code, " " * 8)
        set_arg = f"        arg = a{i}\n" if arg is not None else ""
        convert = _CONVERT.format(i=i, arg=set_arg, rule=code)
        row.append(_READ_VALUE.format(i=i, convert=convert, unchanged='"null"'))
        reuse = _REUSE.format(i=i, arg=textwrap.indent(set_arg, "    "), rule=textwrap.indent(code, "    "))
        updated.append(_READ_VALUE.format(i=i, convert=reuse, unchanged=f"old[{i}]"))
    pieces = "".join(f"p{i}, " for i in range(count))
    raws = "".join(f"r{i}, " for i in range(count))
    row.append(f"    return ({pieces}), ({raws}), pos\n\n\n")
    updated.append(f"    return ({pieces}), ({raws}), pos\n")
    return "".join(row) + "".join(updated)


def _compile(source: str, rules: Sequence[ColumnRule]) -> tuple[_Reader, _UpdateReader]:
    namespace: dict[str, object] = {
        **RULE_NAMES,
        "_i16": _i16,
        "_u32": _u32,
        "_Fallback": _Fallback,
        "UNCHANGED": UNCHANGED,
    }
    namespace.update((f"a{i}", arg) for i, (_rule, arg) in enumerate(rules) if arg is not None)
    # Named by its source: relations with the same column types share one linecache entry.
    digest = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()[:16]
    compile_source(source, f"<bemi_asgi.worker.fastpath reader {digest}>", namespace)
    return namespace["row"], namespace["updated"]  # type: ignore[return-value]
