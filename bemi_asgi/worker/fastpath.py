"""The worker's hot path: an Insert, Update or Delete frame straight to its `primary_key`, `before` and `after`.

The general path decodes a message into a dataclass of text values (`_pgoutput`), converts them into a dict of
JSON values (`_values.row_to_dict`) and encodes that dict. `RowCodec` does the same in one pass over the frame's
bytes, with a TupleData reader generated per relation (one unrolled block per column: a loop with a type
dispatch per value cost as much as the conversions): each value's JSON text comes from its bytes by a per-type
rule (an int's text is already its JSON, a text value needs only string escaping, jsonb's canonical text is
compacted), and the row is one `%`-format of a per-relation template whose column names are already JSON-escaped.
An update's new row reuses the old row's JSON for every value whose bytes did not change.

The output is byte for byte what the general path stores (tests/test_fastpath.py compares the two on real
streams). Anything out of the ordinary (a key-only or missing old row, a malformed message, a value a rule cannot
take) returns None, and the worker takes the general path, which also reports malformed messages.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from typing import Final, TypeAlias

from .pgoutput import UNCHANGED, Column, Unchanged
from .values import (
    Converter,
    _bool,
    _float,
    _json,
    _numeric,
    _text,
    _timestamptz,
    encode_json,
    json_encoder,
)

__all__ = ["FastChange", "RowCodec"]

#: (primary_key, before JSON, after JSON, operation)
FastChange: TypeAlias = tuple[str | None, str, str, str]
_Raw: TypeAlias = "bytes | Unchanged | None"

_i16: Final = struct.Struct("!h").unpack_from
_u32: Final = struct.Struct("!I").unpack_from
_escape: Final[Callable[[str], str]] = json.encoder.encode_basestring
_scan: Final[Callable[[str, int], tuple[object, int]]] = json._default_decoder.scan_once  # type: ignore[attr-defined]
_float_repr: Final = float.__repr__
_encoder: Final = json_encoder
_join: Final = "".join

# How one column's text becomes JSON text, by its converter.
_INT, _TEXT, _NUMERIC, _BOOL, _TIMESTAMPTZ, _JSON, _JSONB, _FLOAT, _OTHER = range(9)
_JSONB_OID: Final = 3802
_KINDS: Final[dict[Converter, int]] = {
    int: _INT,
    _text: _TEXT,
    _numeric: _NUMERIC,
    _bool: _BOOL,
    _timestamptz: _TIMESTAMPTZ,
    _json: _JSON,
    _float: _FLOAT,
}


class _Fallback(Exception):
    """The frame needs the general path."""


class RowCodec:
    """One relation's fast path: built from its columns and converters (no column rules), used per change."""

    __slots__ = ("_converters", "_key", "_kinds", "_row", "_single_key", "_template", "_updated")

    def __init__(
        self, columns: Sequence[Column], converters: Sequence[Converter], key: Sequence[int], single_key: int
    ) -> None:
        self._kinds = tuple(
            _JSONB if convert is _json and column.type_oid == _JSONB_OID else _KINDS.get(convert, _OTHER)
            for column, convert in zip(columns, converters, strict=True)
        )
        self._converters = tuple(converters)
        self._row, self._updated = _compile(self._kinds, self._value)
        names = [_escape(column.name).replace("%", "%%") for column in columns]
        self._template = "{" + ",".join(f"{name}:%s" for name in names) + "}"
        self._key = tuple(key)
        self._single_key = single_key

    def change(self, data: bytes) -> FastChange | None:
        """`data` is a whole XLogData frame (25 header bytes, then the pgoutput message); None: use the general
        path."""
        try:
            kind = data[25]
            if kind == 73:  # 'I'
                if data[30] != 78:  # 'N'
                    return None
                pieces, raws, pos = self._row(data, 31)
                if pos != len(data):
                    return None
                return self._key_of(raws, None), "{}", self._template % pieces, "CREATE"
            if kind == 85:  # 'U'
                if data[30] != 79:  # 'O': the whole old row (REPLICA IDENTITY FULL)
                    return None
                old_pieces, old_raws, pos = self._row(data, 31)
                if data[pos] != 78:
                    return None
                pieces, raws, pos = self._updated(data, pos + 1, old_pieces, old_raws)
                if pos != len(data):
                    return None
                template = self._template
                key = self._key_of(raws, old_raws)
                return key, template % old_pieces, template % pieces, "UPDATE"
            if kind == 68:  # 'D'
                if data[30] != 79:
                    return None
                pieces, raws, pos = self._row(data, 31)
                if pos != len(data):
                    return None
                return self._key_of(raws, None), self._template % pieces, "{}", "DELETE"
        except (_Fallback, IndexError, ValueError, struct.error, StopIteration, RecursionError):
            # UnicodeDecodeError and json's errors are ValueErrors.
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

    def _value(self, kind: int, raw: bytes, index: int) -> str:
        """The JSON text of one non-NULL value (`_values.converter_for`'s conversion, then `encode_json`)."""
        text = raw.decode()
        if kind == _INT:
            return text
        if kind == _TEXT:
            return _escape(text)
        if kind == _NUMERIC:
            return str(int(text)) if text.lstrip("-").isdigit() else _escape(text)
        if kind == _BOOL:
            return "true" if text == "t" or text == "true" else "false"
        if kind == _TIMESTAMPTZ and text[-3:] == "+00" and text[10:11] == " ":
            return f'"{text[:10]}T{text[11:-3]}+00:00"'
        if kind == _JSONB:
            return _jsonb(text)
        if kind == _JSON:
            return _json_text(text)
        if kind == _FLOAT:
            number = float(text)
            return _float_repr(number) if number - number == 0 else _escape(text)
        try:
            converted = self._converters[index](text)
        except ValueError:
            converted = text
        return encode_json(converted)


# TupleData readers, generated per relation: one block per column, unrolled, with the column's type rule inline.
# Only positions and type codes enter the generated code, never names.
_Reader: TypeAlias = Callable[[bytes, int], tuple[tuple[str, ...], tuple[_Raw, ...], int]]
_UpdateReader: TypeAlias = Callable[
    [bytes, int, tuple[str, ...], tuple[_Raw, ...]], tuple[tuple[str, ...], tuple[_Raw, ...], int]
]

_READ_VALUE = """\
    tag = data[pos]
    if tag == 116:  # 't': Int32 length, then the text
        end = pos + 5 + _u32(data, pos + 1)[0]
        r{i} = data[pos + 5 : end]
        pos = end
{convert}
    elif tag == 110:  # 'n'
        pos += 1
        r{i} = None
        p{i} = {null}
    elif tag == 117:  # 'u'
        pos += 1
        r{i} = UNCHANGED
        p{i} = {unchanged}
    else:
        raise _Fallback
"""

_CONVERT = {
    # int2/int4/int8/oid print their canonical decimal: already JSON
    _INT: "        p{i} = r{i}.decode()",
    _TEXT: "        p{i} = _escape(r{i}.decode())",
    _JSONB: "        p{i} = _jsonb(r{i}.decode())",
    _NUMERIC: """\
        text = r{i}.decode()
        p{i} = str(int(text)) if text.lstrip("-").isdigit() else _escape(text)""",
    _TIMESTAMPTZ: """\
        if r{i}[-3:] == b"+00" and r{i}[10:11] == b" ":  # UTC, four-digit year, AD
            text = r{i}.decode()
            p{i} = f'"{{text[:10]}}T{{text[11:-3]}}+00:00"'
        else:
            p{i} = value({kind}, r{i}, {i})""",
}


def _compile(kinds: Sequence[int], value: Callable[[int, bytes, int], str]) -> tuple[_Reader, _UpdateReader]:
    """The relation's TupleData reader (each value's JSON, its bytes (None for NULL, UNCHANGED for an unchanged
    TOAST value), and the position after the tuple), and its update reader (the new row, reusing the old row's
    JSON wherever the bytes did not change and for every unchanged TOAST value)."""
    count = len(kinds)
    row = [f"def row(data, pos):\n    if _i16(data, pos)[0] != {count}:\n        raise _Fallback\n    pos += 2\n"]
    updated = [
        f"def updated(data, pos, old, old_raws):\n    if _i16(data, pos)[0] != {count}:\n        raise _Fallback\n"
        "    pos += 2\n"
    ]
    for i, kind in enumerate(kinds):
        convert = _CONVERT.get(kind, "        p{i} = value({kind}, r{i}, {i})").format(i=i, kind=kind)
        row.append(_READ_VALUE.format(i=i, convert=convert, null='"null"', unchanged='"null"'))
        changed = f"        p{i} = old[{i}] if r{i} == old_raws[{i}] else value({kind}, r{i}, {i})"
        updated.append(_READ_VALUE.format(i=i, convert=changed, null='"null"', unchanged=f"old[{i}]"))
    pieces = "".join(f"p{i}, " for i in range(count))
    raws = "".join(f"r{i}, " for i in range(count))
    row.append(f"    return ({pieces}), ({raws}), pos\n")
    updated.append(f"    return ({pieces}), ({raws}), pos\n")
    namespace: dict[str, object] = {
        "_i16": _i16,
        "_u32": _u32,
        "_escape": _escape,
        "_jsonb": _jsonb,
        "_Fallback": _Fallback,
        "UNCHANGED": UNCHANGED,
        "value": value,
    }
    exec(compile("".join(row) + "".join(updated), "<bemi_asgi._fastpath>", "exec"), namespace)
    return namespace["row"], namespace["updated"]  # type: ignore[return-value]


def _json_text(text: str) -> str:
    """A json or jsonb value's JSON as `_values` converts it (parsed: fractions become floats) and `encode_json`
    encodes it (compact)."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # leading whitespace (json keeps its input text), or not JSON
        end = -1
    if end != len(text):
        try:
            value = json.loads(text)
        except ValueError:
            value = text
    return _join(_encoder(value, 0))


def _jsonb(text: str) -> str:
    """A jsonb value's JSON, as `_json_text` gives it, in one pass of string methods when possible.

    jsonb prints itself canonically: `", "` and `": "` between items and no other whitespace outside strings,
    numbers as numeric prints them (integers exactly as Python prints them; never an exponent), strings escaped
    like JSON text with every other character kept. Without a backslash every `"` delimits a string, so the
    spaces outside strings are the parts of the text between an even and an odd quote; without a `.` there is no
    fraction to turn into a float. Anything else is parsed."""
    if "\\" in text or "." in text:
        return _json_text(text)
    if '"' not in text:
        return text.replace(" ", "")
    parts = text.split('"')
    parts[::2] = [part.replace(" ", "") for part in parts[::2]]
    return '"'.join(parts)
