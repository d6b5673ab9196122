"""Column values from pgoutput's text format to JSON values, chosen by type OID.

The rules (`converter_for`):

    int2, int4, int8, oid             int
    numeric                           int when the text has no fractional part, else the exact text ('1.50',
                                      'NaN', 'Infinity'): never a float, so no digit is lost. A numeric(10,2)
                                      column therefore always gives strings, which keeps its scale.
    float4, float8                    float; 'NaN', 'Infinity', '-Infinity' stay text (JSON has no such numbers)
    bool                              True / False
    json, jsonb                       the parsed value (numbers with a fraction become floats)
    timestamptz                       ISO 8601 in UTC: '2026-11-27T21:00:14.564968+00:00'
    timestamp                         ISO 8601 without offset: '2026-11-27T21:00:14.564968'
    timetz                            '21:00:14+05:30' (offset always with minutes)
    date, time                        the text ('2026-11-27', '21:00:14.5'), already ISO 8601
    arrays of the types here          lists (nested for n-D; the '[1:3]=' lower bounds are dropped), NULL -> None
    everything else                   the text as is: text, varchar, uuid, bytea ('\\x00ff'), interval, enums,
                                      domains, user-defined and unknown types

Dates and times are read in PostgreSQL's ISO DateStyle (the default). Values it cannot express in ISO 8601 with
a four-digit year ('infinity', BC dates, year 10000 and later) stay text. `row_to_dict` keeps the text of a value
its converter rejects, so an unexpected server setting degrades output instead of stopping the worker.

Note: the stream carries the server's text for the session TimeZone; the worker sets TimeZone to UTC on its
replication connection, which keeps timestamptz on the fast path (any offset is still converted correctly).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, TypeAlias

from .._jsontext import compact_encoder
from .pgoutput import UNCHANGED, Column, Unchanged, Value

__all__ = ["ARRAY_ELEMENT_OIDS", "JSONValue", "converter_for", "encode_json", "parse_array", "row_to_dict"]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
Converter: TypeAlias = Callable[[str], JSONValue]

# Built-in type OIDs (pg_type.dat); stable across PostgreSQL versions.
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, XML, FLOAT4, FLOAT8, MONEY, MACADDR, INET, CIDR = 114, 142, 700, 701, 790, 829, 869, 650
BPCHAR, VARCHAR, DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1042, 1043, 1082, 1083, 1114, 1184, 1186, 1266
BIT, VARBIT, NUMERIC, UUID, JSONB, JSONPATH = 1560, 1562, 1700, 2950, 3802, 4072

#: Array type OID -> element type OID, for the arrays converted element by element.
ARRAY_ELEMENT_OIDS: Final[dict[int, int]] = {
    1000: BOOL, 1001: BYTEA, 1002: CHAR, 1003: NAME, 1005: INT2, 1007: INT4, 1009: TEXT, 1014: BPCHAR,
    1015: VARCHAR, 1016: INT8, 1021: FLOAT4, 1022: FLOAT8, 1028: OID, 199: JSON, 143: XML, 791: MONEY,
    1040: MACADDR, 1041: INET, 651: CIDR, 1182: DATE, 1183: TIME, 1115: TIMESTAMP, 1185: TIMESTAMPTZ,
    1187: INTERVAL, 1270: TIMETZ, 1561: BIT, 1563: VARBIT, 1231: NUMERIC, 2951: UUID, 3807: JSONB, 4073: JSONPATH,
}  # fmt: skip


def _text(text: str) -> JSONValue:
    return text


def _numeric(text: str) -> JSONValue:
    # numeric_out never uses exponents: digits with an optional '-' are an integer, anything else stays exact text.
    return int(text) if text.lstrip("-").isdigit() else text


def _float(text: str) -> JSONValue:
    value = float(text)
    return value if value - value == 0 else text  # false only for NaN and the infinities


def _bool(text: str) -> JSONValue:
    return text == "t" or text == "true"  # boolout prints 't'; 'true' is bool's cast to text


_json: Final[Converter] = json.loads

_OFFSET: Final = re.compile(r"([+-]\d\d)(?::(\d\d))?(?::(\d\d))?$")


def _timestamptz(text: str) -> JSONValue:
    if text[-3:] == "+00" and text[10:11] == " ":  # UTC, four-digit year, AD: the worker's case
        return f"{text[:10]}T{text[11:-3]}+00:00"
    if text[10:11] != " " or text[-3:] == " BC":
        return text  # infinity, BC, five-digit years: not expressible as ISO 8601 with datetime
    match = _OFFSET.search(text)
    if match is None:
        raise ValueError(f"not an ISO DateStyle timestamptz: {text!r}")
    hours, minutes, seconds = match.groups()
    offset = f"{hours}:{minutes or '00'}" + (f":{seconds}" if seconds else "")
    moment = datetime.fromisoformat(f"{text[:10]}T{text[11 : match.start()]}{offset}")
    try:
        iso = moment.astimezone(UTC).isoformat()
    except OverflowError:  # 0001-01-01 with a positive offset is still year 0 in UTC
        return text
    if moment.microsecond:  # print the fraction as PostgreSQL (and so the fast path) does: no trailing zeros
        head, _, tail = iso.partition(".")
        iso = f"{head}.{tail[:6].rstrip('0')}{tail[6:]}"
    return iso


def _timestamp(text: str) -> JSONValue:
    if text[10:11] != " " or text[-3:] == " BC":
        return text
    return f"{text[:10]}T{text[11:]}"


def _timetz(text: str) -> JSONValue:
    match = _OFFSET.search(text)
    if match is None or match.group(2) is not None:
        return text
    return f"{text}:00"


_CONVERTERS: Final[dict[int, Converter]] = {
    INT2: int, INT4: int, INT8: int, OID: int, NUMERIC: _numeric, FLOAT4: _float, FLOAT8: _float, BOOL: _bool,
    JSON: _json, JSONB: _json, TIMESTAMPTZ: _timestamptz, TIMESTAMP: _timestamp, TIMETZ: _timetz,
}  # fmt: skip


@functools.cache
def converter_for(type_oid: int) -> Converter:
    """The function turning one non-NULL text value of type `type_oid` into a JSON value (cached per OID)."""
    if (element_oid := ARRAY_ELEMENT_OIDS.get(type_oid)) is not None:
        convert_element = converter_for(element_oid)
        return functools.partial(parse_array, convert=convert_element)
    return _CONVERTERS.get(type_oid, _text)


# One token of an array literal: a brace, a delimiter, a quoted element (group 1) or an unquoted one (group 2).
_ARRAY_TOKEN: Final = re.compile(r'[{},]|"((?:[^"\\]|\\.)*)"|([^{},"]+)', re.DOTALL)
_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)


def parse_array(text: str, convert: Converter = _text) -> list[JSONValue]:
    """Parse PostgreSQL's array text ('{1,NULL,"a b"}', '{{1,2},{3,4}}', '[0:1]={7,8}') into (nested) lists.

    Elements go through `convert`; NULL becomes None. Lower bounds are dropped: the list starts at the first
    element whatever the array's lower bound.
    """
    if text[0] == "[":
        text = text[text.index("=") + 1 :]
    last = len(text) - 1
    if text[0] == "{" and text.find("}") == last and text.find("{", 1) == -1 and '"' not in text and "\\" not in text:
        # one dimension, nothing quoted: the common case
        if last == 1:
            return []
        return [None if item == "NULL" else convert(item) for item in text[1:-1].split(",")]
    stack: list[list[JSONValue]] = []  # the lists enclosing `current`
    current: list[JSONValue] | None = None
    result: list[JSONValue] | None = None
    for match in _ARRAY_TOKEN.finditer(text):
        token = match[0]
        if token == ",":
            continue
        if token == "{":
            inner: list[JSONValue] = []
            if current is not None:
                current.append(inner)
                stack.append(current)
            elif result is not None:
                raise ValueError(f"array text with two outermost braces: {text!r}")
            current = inner
        elif current is None:
            raise ValueError(f"array text with an element or '}}' outside braces: {text!r}")
        elif token == "}":
            if stack:
                current = stack.pop()
            else:
                result, current = current, None
        elif match[1] is not None:  # quoted: never NULL, escapes removed
            body = match[1]
            current.append(convert(_ESCAPE.sub(r"\1", body) if "\\" in body else body))
        else:  # unquoted; array_out quotes anything with spaces, so no trimming is needed
            current.append(None if token == "NULL" else convert(token))
    if result is None or current is not None:
        raise ValueError(f"not an array text: {text!r}")
    return result


def row_to_dict(
    columns: Sequence[Column], values: Sequence[Value], converters: Sequence[Converter]
) -> dict[str, JSONValue | Unchanged]:
    """One row as {column name: JSON value}: NULL -> None, UNCHANGED left for the caller to fill from the old row.

    A value its converter rejects keeps its text (with a DateStyle other than ISO, say) rather than failing.
    """
    row: dict[str, JSONValue | Unchanged] = {}
    for column, value, convert in zip(columns, values, converters, strict=True):
        if value is None or value is UNCHANGED:
            row[column.name] = value
        else:
            try:
                row[column.name] = convert(value)
            except ValueError:
                row[column.name] = value
    return row


def _unencodable(value: object) -> object:
    if value is UNCHANGED:  # an unchanged TOAST value with no old row to take it from
        return None
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


#: `json_encoder(value, 0)`: the chunks of `encode_json(value)`.
json_encoder: Final = compact_encoder(allow_nan=True, default=_unencodable)


def encode_json(value: object) -> str:
    """A row (or any JSON value) as the worker stores it: compact JSON text, non-ASCII kept, UNCHANGED as null."""
    return "".join(json_encoder(value, 0))
