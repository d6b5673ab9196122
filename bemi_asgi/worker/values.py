"""Column values from pgoutput's text format to JSON text, by type: the rules, each written once.

Each rule (`TypeRule`) is a few lines of Python that set `out`, the value's JSON text, from `text`, the value's
text as PostgreSQL prints it. The general path calls a function compiled from the rule (`value_encoder`), the
fast path (`fastpath.RowCodec`) pastes the same lines into its generated readers, so the two cannot disagree.
Both compiled sources are registered with `linecache`: a traceback through them shows the rule's line.

    int2, int4, int8, oid             number: the text as is (already canonical JSON)
    numeric                           number when the text has no fractional part, else the exact text ('1.50',
                                      'NaN', 'Infinity'): never a float, so no digit is lost. A numeric(10,2)
                                      column therefore always gives strings, which keeps its scale.
    float4, float8                    number: the shortest exact digits PostgreSQL prints, without exponent
                                      ('1e-05' -> 0.00001, as jsonb prints it); 'NaN', 'Infinity',
                                      '-Infinity' as strings (JSON has no such numbers)
    bool                              true / false
    jsonb                             the document itself, verbatim: numbers keep every digit
    json                              the document itself as jsonb prints it (`jsonb.canonical`): numbers keep
                                      every digit; escapes jsonb cannot hold (\\u0000, unpaired surrogates)
                                      become \\ufffd
    timestamptz                       ISO 8601 in UTC: '2026-11-27T21:00:14.564968+00:00'
    timestamp                         ISO 8601 without offset: '2026-11-27T21:00:14.564968'
    timetz                            '21:00:14+05:30' (offset always with minutes)
    domains                           as their base type
    arrays (of any element type)      lists, nested for n-D, NULL -> null, each element by its type's rule;
                                      an array whose lower bounds are not all 1 ('[0:2]={7,8,9}') keeps its text
                                      instead, since a list cannot say where it starts
    everything else                   the text as a string: text, varchar, date, time, uuid, bytea ('\\x00ff'),
                                      interval, enums, composites, ranges, user-defined and unknown types

Every rule writes jsonb's canonical text (`jsonb.py`: `", "` and `": "` between items, keys in jsonb's order), so
the row the worker sends is byte for byte what the destination prints for it: the hash chain hashes it as sent.

Dates and times are read in PostgreSQL's ISO DateStyle (the worker sets it). Values ISO 8601 cannot express with a
four-digit year ('infinity', BC dates, year 10000 and later) stay text. A value its rule rejects keeps its text, so
an unexpected server setting degrades the output instead of stopping the worker.

Every stored value casts back to its column's type: `jsonb_populate_record(NULL::table, after)` rebuilds the row
(tests/test_roundtrip.py checks it for every built-in type).

Note: the stream carries the server's text for the session TimeZone; the worker sets TimeZone to UTC on its
replication connection, which keeps timestamptz on the rule's first branch (any offset is still converted).
"""

from __future__ import annotations

import codecs
import functools
import json
import linecache
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeAlias

from .._jsontext import compact_encoder
from .jsonb import canonical as _canonical
from .jsonb import json_string, key_order, numeric_text
from .pgoutput import UNCHANGED, Column, Unchanged, Value

__all__ = [
    "ARRAY_ELEMENT_OIDS",
    "KNOWN_OIDS",
    "RULES",
    "RULE_NAMES",
    "ColumnRule",
    "JSONValue",
    "TypeInfo",
    "TypeRule",
    "ValueEncoder",
    "clean_json",
    "column_rule",
    "compile_source",
    "converter_for",
    "encode_json",
    "json_string",
    "object_json",
    "parse_array",
    "row_json",
    "row_to_dict",
    "value_encoder",
]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
Converter: TypeAlias = Callable[[str], JSONValue]
#: A column's rule as a function: one non-NULL value's text -> its JSON text.
ValueEncoder: TypeAlias = Callable[[str], str]

# Built-in type OIDs (pg_type.dat); stable across PostgreSQL versions.
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, XML, FLOAT4, FLOAT8, MONEY, MACADDR, INET, CIDR = 114, 142, 700, 701, 790, 829, 869, 650
BPCHAR, VARCHAR, DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1042, 1043, 1082, 1083, 1114, 1184, 1186, 1266
BIT, VARBIT, NUMERIC, UUID, JSONB, JSONPATH = 1560, 1562, 1700, 2950, 3802, 4072

#: Array type OID -> element type OID, for the built-in arrays recognised without asking the catalog.
ARRAY_ELEMENT_OIDS: Final[dict[int, int]] = {
    1000: BOOL, 1001: BYTEA, 1002: CHAR, 1003: NAME, 1005: INT2, 1007: INT4, 1009: TEXT, 1014: BPCHAR,
    1015: VARCHAR, 1016: INT8, 1021: FLOAT4, 1022: FLOAT8, 1028: OID, 199: JSON, 143: XML, 791: MONEY,
    1040: MACADDR, 1041: INET, 651: CIDR, 1182: DATE, 1183: TIME, 1115: TIMESTAMP, 1185: TIMESTAMPTZ,
    1187: INTERVAL, 1270: TIMETZ, 1561: BIT, 1563: VARBIT, 1231: NUMERIC, 2951: UUID, 3807: JSONB, 4073: JSONPATH,
}  # fmt: skip

_string: Final = json_string


@dataclass(frozen=True, slots=True)
class TypeRule:
    """How one type's text becomes JSON text.

    `code` is the rule: Python statements setting `out` (the JSON text) from `text` (the value's text), using the
    helpers of `RULE_NAMES` and, when `takes_arg`, the column's `arg` (an array's element encoder and delimiter).
    Temporaries start with `_r` so they cannot clash with the generated readers' own names.
    """

    name: str
    code: str
    takes_arg: bool = False


#: The rules, by name. Built-in type OIDs map to them in `_BY_OID`; arrays, domains and others are resolved by
#: `column_rule`.
RULES: Final[dict[str, TypeRule]] = {
    rule.name: rule
    for rule in (
        # int2/int4/int8/oid print their canonical decimal: already JSON.
        TypeRule("integer", "out = text"),
        # numeric_out never uses exponents: digits with an optional '-' are an integer, anything else exact text.
        TypeRule("numeric", 'out = text if text.lstrip("-").isdigit() else _string(text)'),
        # float_out prints the shortest text that reads back exactly; only NaN and the infinities end in a letter.
        # jsonb reads the number as a numeric: exponents and -0 are written as jsonb prints them.
        TypeRule(
            "float",
            """\
if not text[-1:].isdigit():
    out = _string(text)
elif "e" in text or text == "-0":
    out = _numeric_text(text)
else:
    out = text""",
        ),
        # boolout prints 't'; 'true' is bool's cast to text.
        TypeRule("bool", 'out = "true" if text == "t" or text == "true" else "false"'),
        # jsonb_out already prints the canonical text.
        TypeRule("jsonb", "out = text"),
        TypeRule("json", "out = _json(text)"),
        TypeRule(
            "timestamptz",
            """\
if text[-3:] == "+00" and text[10:11] == " ":  # UTC, four-digit year, AD: the worker's session
    out = f'"{text[:10]}T{text[11:-3]}+00:00"'
else:
    out = _string(_timestamptz(text))""",
        ),
        TypeRule(
            "timestamp",
            """\
if text[10:11] == " " and text[-3:] != " BC":  # four-digit year, AD
    out = f'"{text[:10]}T{text[11:]}"'
else:
    out = _string(text)""",
        ),
        TypeRule("timetz", "out = _string(_timetz(text))"),
        TypeRule("array", "out = _array(text, arg)", takes_arg=True),
        TypeRule("text", "out = _string(text)"),
    )
}

_BY_OID: Final[dict[int, TypeRule]] = {
    oid: RULES[name]
    for name, oids in (
        ("integer", (INT2, INT4, INT8, OID)),
        ("numeric", (NUMERIC,)),
        ("float", (FLOAT4, FLOAT8)),
        ("bool", (BOOL,)),
        ("jsonb", (JSONB,)),
        ("json", (JSON,)),
        ("timestamptz", (TIMESTAMPTZ,)),
        ("timestamp", (TIMESTAMP,)),
        ("timetz", (TIMETZ,)),
    )
    for oid in oids
}
#: The type OIDs whose rule is known without asking the catalog.
KNOWN_OIDS: Final = frozenset(_BY_OID) | frozenset(ARRAY_ELEMENT_OIDS)
_TEXT_RULE: Final = RULES["text"]
_ARRAY_RULE: Final = RULES["array"]


# -- the helpers the rules call ---------------------------------------------------------------------------------

_OFFSET: Final = re.compile(r"([+-]\d\d)(?::(\d\d))?(?::(\d\d))?$")


def _timestamptz(text: str) -> str:
    """A timestamptz text with any offset as ISO 8601 in UTC; text ISO 8601 cannot hold stays as it is."""
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
    if moment.microsecond:  # print the fraction as PostgreSQL does: no trailing zeros
        head, _, tail = iso.partition(".")
        iso = f"{head}.{tail[:6].rstrip('0')}{tail[6:]}"
    return iso


def _timetz(text: str) -> str:
    match = _OFFSET.search(text)
    if match is None or match.group(2) is not None:
        return text
    return f"{text}:00"


# In JSON text: a valid surrogate pair escape, or an escape jsonb refuses (group 1: \u0000, a lone surrogate), or
# any other escape (so `\\u0000`, an escaped backslash before "u0000", is skipped whole).
_JSON_ESCAPE: Final = re.compile(
    r"\\(?:u(?:[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|(0000|[dD][89a-fA-F][0-9a-fA-F]{2}))|.)",
    re.DOTALL,
)
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def _unstorable_escape(match: re.Match[str]) -> str:
    return "\\ufffd" if match[1] is not None else match[0]


# Any escape in JSON text: a surrogate pair (groups 1, 2), another \\u escape (group 3), or another escape.
_ANY_ESCAPE: Final = re.compile(
    r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|.)", re.DOTALL
)


def clean_json(text: str, encoding: str = "utf-8") -> str:
    """Valid JSON text with what jsonb cannot store replaced by U+FFFD: the escapes \\u0000 and unpaired
    surrogates, and NUL or surrogate characters. Numbers and everything else stay as they are.

    For a destination database whose `encoding` (a Python codec) is not UTF-8, characters it cannot hold, raw or
    escaped, are replaced too: by U+FFFD where it has that character, else by '?'."""
    if "\\u" in text:
        text = _JSON_ESCAPE.sub(_unstorable_escape, text)
    text = _UNSTORABLE.sub("\ufffd", text)
    if codecs.lookup(encoding).name == "utf-8":
        return text
    replacement = "\ufffd" if _encodable("\ufffd", encoding) else "?"

    def escape(match: re.Match[str]) -> str:
        if match[1] is not None:
            char = chr(0x10000 + ((int(match[1], 16) - 0xD800) << 10) + int(match[2], 16) - 0xDC00)
        elif match[3] is not None:
            char = chr(int(match[3], 16))
        else:
            return match[0]
        return match[0] if _encodable(char, encoding) else replacement

    if "\\u" in text:
        text = _ANY_ESCAPE.sub(escape, text)
    if not _encodable(text, encoding):
        text = "".join(char if _encodable(char, encoding) else replacement for char in text)
    return text


def _encodable(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _json(text: str) -> str:
    """A json value's text (valid JSON: the server checked it on input) as jsonb's canonical text, with the
    escapes jsonb cannot hold replaced."""
    if "\\u" in text:
        text = _JSON_ESCAPE.sub(_unstorable_escape, text)
    return _canonical(text)


def _array(text: str, arg: tuple[ValueEncoder, str]) -> str:
    """An array's text as a JSON list of its elements' JSON (nested for n-D); its text as a string when a lower
    bound is not 1 (array_out then prints the bounds first: '[0:2]={7,8,9}')."""
    if text[0] == "[":
        return _string(text)
    encode, delimiter = arg
    return _list_json(parse_array(text, encode, delimiter))


def _list_json(items: list[object]) -> str:
    return "[" + ", ".join(_item_json(item) for item in items) + "]"


def _item_json(item: object) -> str:
    if item is None:
        return "null"
    if isinstance(item, list):
        return _list_json(item)
    assert isinstance(item, str)
    return item


#: The names a rule's code may use.
RULE_NAMES: Final[dict[str, Callable[..., str]]] = {
    "_string": _string,
    "_json": _json,
    "_timestamptz": _timestamptz,
    "_timetz": _timetz,
    "_array": _array,
    "_numeric_text": numeric_text,
}


def compile_source(source: str, filename: str, namespace: dict[str, object]) -> None:
    """Run generated `source` in `namespace`, registered with `linecache` under `filename` so tracebacks through it
    show its lines."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)


def _compile_rules() -> dict[str, Callable[..., str]]:
    source = "".join(
        f"def {rule.name}(text{', arg' if rule.takes_arg else ''}):\n"
        f"{textwrap.indent(rule.code, '    ')}\n    return out\n\n\n"
        for rule in RULES.values()
    )
    namespace: dict[str, object] = dict(RULE_NAMES)
    compile_source(source, "<bemi_asgi.worker.values rules>", namespace)
    return {name: namespace[name] for name in RULES}  # type: ignore[misc]


_RULE_FUNCTIONS: Final = _compile_rules()


# -- which rule a column gets ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """What the source catalog says about a type (`SourceCatalog.types`)."""

    oid: int
    kind: str  # pg_type.typtype: 'b' base, 'c' composite, 'd' domain, 'e' enum, 'r' range, 'm' multirange
    element: int  # an array type's element type, else 0
    delimiter: str  # the element type's delimiter (',' for all built-in types but box)
    base: int  # a domain's base type, else 0


#: A column's rule and its argument (an array's element encoder and delimiter; None for other rules).
ColumnRule: TypeAlias = tuple[TypeRule, object]


def column_rule(type_oid: int, types: Mapping[int, TypeInfo] | None = None) -> ColumnRule:
    """The rule for values of `type_oid`: by OID for built-in types; through `types` (the catalog) for domains
    (their base type's rule) and arrays of any element type; the text rule for everything else."""
    for _ in range(100):  # a domain over a domain over ...; the catalog has no cycles, this only bounds a bad one
        rule = _BY_OID.get(type_oid)
        if rule is not None:
            return rule, None
        info = types.get(type_oid) if types is not None else None
        if info is not None and info.kind == "d" and info.base:
            type_oid = info.base
            continue
        if info is not None and info.element:
            return _ARRAY_RULE, (value_encoder(*column_rule(info.element, types)), info.delimiter)
        if (element := ARRAY_ELEMENT_OIDS.get(type_oid)) is not None:
            return _ARRAY_RULE, (value_encoder(*column_rule(element)), ",")
        break
    return _TEXT_RULE, None


def value_encoder(rule: TypeRule, arg: object = None) -> ValueEncoder:
    """The general path's function for a column's rule: a non-NULL value's text -> its JSON text."""
    function = _RULE_FUNCTIONS[rule.name]
    return functools.partial(function, arg=arg) if rule.takes_arg else function


@functools.cache
def _encoder_for(type_oid: int) -> ValueEncoder:
    return value_encoder(*column_rule(type_oid))


@functools.cache
def _converter_for_encoder(encode: ValueEncoder) -> Converter:
    def convert(text: str) -> JSONValue:
        value: JSONValue = json.loads(encode(text))
        return value

    return convert


def converter_for(type_oid: int) -> Converter:
    """A built-in type's rule as JSON values (not JSON text): one non-NULL value's text -> its JSON value, parsed
    from the rule's JSON text (so a JSON number with a fraction becomes a float here, never in what is stored).
    For tests and inspection; types the rules do not know by OID keep their text."""
    return _converter_for_encoder(_encoder_for(type_oid))


# One token of an array literal: a brace, a delimiter, a quoted element (group 1) or an unquoted one (group 2).
@functools.cache
def _array_token(delimiter: str) -> re.Pattern[str]:
    d = re.escape(delimiter)
    return re.compile(rf'[{{}}{d}]|"((?:[^"\\]|\\.)*)"|([^{{}}{d}"]+)', re.DOTALL)


_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)


def parse_array(text: str, convert: Callable[[str], object] = str, delimiter: str = ",") -> list[object]:
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
        return [None if item == "NULL" else convert(item) for item in text[1:-1].split(delimiter)]
    stack: list[list[object]] = []  # the lists enclosing `current`
    current: list[object] | None = None
    result: list[object] | None = None
    for match in _array_token(delimiter).finditer(text):
        token = match[0]
        if token == delimiter:
            continue
        if token == "{":
            inner: list[object] = []
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


# -- rows ----------------------------------------------------------------------------------------------------------


def row_json(
    columns: Sequence[Column], values: Sequence[Value], encoders: Sequence[ValueEncoder]
) -> dict[str, str | Unchanged]:
    """One row as {column name: the value's JSON text}: NULL -> "null", UNCHANGED left for the caller to fill from
    the old row. A value its rule rejects keeps its text, as a JSON string."""
    row: dict[str, str | Unchanged] = {}
    for column, value, encode in zip(columns, values, encoders, strict=True):
        if value is None:
            row[column.name] = "null"
        elif value is UNCHANGED:
            row[column.name] = value
        else:
            try:
                row[column.name] = encode(value)
            except ValueError:
                row[column.name] = _string(value)
    return row


def object_json(row: Mapping[str, str | Unchanged]) -> str:
    """A `row_json` row as one JSON object in jsonb's canonical form (an UNCHANGED value nothing could fill is
    null)."""
    items = ", ".join(
        f"{_string(name)}: {'null' if (text := row[name]) is UNCHANGED else text}" for name in key_order(row)
    )
    return "{" + items + "}"


def row_to_dict(
    columns: Sequence[Column], values: Sequence[Value], converters: Sequence[Callable[[str], object]]
) -> dict[str, JSONValue | Unchanged]:
    """One row as {column name: JSON value} through `converter_for`'s converters: NULL -> None, UNCHANGED kept.

    A value its converter rejects keeps its text. For tests and inspection; the worker stores `row_json`.
    """
    row: dict[str, JSONValue | Unchanged] = {}
    for column, value, convert in zip(columns, values, converters, strict=True):
        if value is None or value is UNCHANGED:
            row[column.name] = value
        else:
            try:
                row[column.name] = convert(value)  # type: ignore[assignment]
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
    """A JSON value as compact JSON text, non-ASCII kept, UNCHANGED as null (keys, composite primary keys)."""
    return "".join(json_encoder(value, 0))
