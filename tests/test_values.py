"""Text values to JSON values: every rule, on the text a real server produces for each value."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bemi_asgi.worker.pgoutput import UNCHANGED, Column, Insert, Relation, decode
from bemi_asgi.worker.values import (
    JSONValue,
    clean_json,
    column_rule,
    converter_for,
    parse_array,
    row_to_dict,
    value_encoder,
)
from tests.conftest import PgServer

JSON_DOC = (
    '{"name": "zoë ✓ \\u00e9 \\"q\\"", "nested": {"list": [1, 2.5, null, true, "\\\\"]}, '
    '"big": 123456789012345678901234567890}'
)
JSON_VALUE = {
    "name": 'zoë ✓ é "q"',
    "nested": {"list": [1, 2.5, None, True, "\\"]},
    "big": 123456789012345678901234567890,
}

# (SQL expression, the JSON value its text must convert to)
CASES: list[tuple[str, JSONValue]] = [
    ("(-32768)::int2", -32768),
    ("2147483647::int4", 2147483647),
    ("(-9223372036854775808)::int8", -9223372036854775808),
    ("4294967295::oid", 4294967295),
    ("12345678901234567890.000000001::numeric", "12345678901234567890.000000001"),
    ("(-12345678901234567890123456789)::numeric", -12345678901234567890123456789),
    ("1e30::numeric", 10**30),
    ("0.000001::numeric", "0.000001"),
    ("1.50::numeric(10,2)", "1.50"),
    ("'NaN'::numeric", "NaN"),
    ("'Infinity'::numeric", "Infinity"),
    ("'-Infinity'::numeric", "-Infinity"),
    ("0.1::float8", 0.1),
    # Written as jsonb prints the numeric it reads: no exponent, every digit float8out printed.
    ("1.7976931348623157e308::float8", 17976931348623157 * 10**292),
    ("1.5e-7::float8", 1.5e-7),
    ("(-0.0)::float8", 0),  # float8out prints "-0", a JSON number; jsonb has no negative zero
    ("1.1::float4", 1.1),
    ("'NaN'::float8", "NaN"),
    ("'Infinity'::float4", "Infinity"),
    ("'-Infinity'::float8", "-Infinity"),
    ("true", True),
    ("false", False),
    (f"'{JSON_DOC}'::json", JSON_VALUE),
    (f"'{JSON_DOC}'::jsonb", JSON_VALUE),
    ("'\"just a string\"'::jsonb", "just a string"),
    ("'null'::json", None),
    ("'2026-11-27 21:00:14.564968+00'::timestamptz", "2026-11-27T21:00:14.564968+00:00"),
    ("'2026-01-01 00:00:00+00'::timestamptz", "2026-01-01T00:00:00+00:00"),
    ("'infinity'::timestamptz", "infinity"),
    ("'-infinity'::timestamptz", "-infinity"),
    ("'0044-03-15 12:00:00+00 BC'::timestamptz", "0044-03-15 12:00:00+00 BC"),
    ("'2026-11-27 21:00:14.5'::timestamp", "2026-11-27T21:00:14.5"),
    ("'infinity'::timestamp", "infinity"),
    ("'2026-11-27'::date", "2026-11-27"),
    ("'21:00:14.564968'::time", "21:00:14.564968"),
    ("'21:00:14+00'::timetz", "21:00:14+00:00"),
    ("'21:00:14.25-03:30'::timetz", "21:00:14.25-03:30"),
    ("'1 day 02:03:04.5'::interval", "1 day 02:03:04.5"),
    ("'\\x00ff10'::bytea", "\\x00ff10"),
    ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("'  spaced ü  '::text", "  spaced ü  "),
    ("'ab'::char(4)", "ab  "),
    ("'10.0.0.1/8'::inet", "10.0.0.1/8"),
    ("'{1,2,NULL}'::int4[]", [1, 2, None]),
    ("'{{1,2},{3,4}}'::int8[]", [[1, 2], [3, 4]]),
    # A list cannot say where it starts: arrays with other lower bounds than 1 keep their text.
    ("'[0:2]={7,8,9}'::int2[]", "[0:2]={7,8,9}"),
    ("'[1:2][0:1]={{a,b},{c,d}}'::text[]", "[1:2][0:1]={{a,b},{c,d}}"),
    ("'{}'::int4[]", []),
    (
        "ARRAY['a,b', 'quo\"te', 'back\\slash', 'NULL', '', ' sp ', '{x}', NULL, 'ü']::text[]",
        ["a,b", 'quo"te', "back\\slash", "NULL", "", " sp ", "{x}", None, "ü"],
    ),
    ("ARRAY[['x y', NULL], ['}', '\"']]::varchar[]", [["x y", None], ["}", '"']]),
    (
        "ARRAY[12345678901234567890.000000001, 2, NULL, 'NaN']::numeric[]",
        ["12345678901234567890.000000001", 2, None, "NaN"],
    ),
    ("ARRAY[true, false, NULL]", [True, False, None]),
    ("ARRAY[0.5, 'NaN', '-Infinity']::float8[]", [0.5, "NaN", "-Infinity"]),
    ('ARRAY[\'{"a": [1, "x,y"]}\', \'"s"\', NULL]::jsonb[]', [{"a": [1, "x,y"]}, "s", None]),
    (r"""ARRAY['{"k": "v\"", "\\": 1}']::json[]""", [{"k": 'v"', "\\": 1}]),
    ("ARRAY['2026-11-27 21:00:14+00', NULL]::timestamptz[]", ["2026-11-27T21:00:14+00:00", None]),
    ("ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']::uuid[]", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ("ARRAY['\\x00ff'::bytea, NULL]", ["\\x00ff", None]),
    ("ARRAY['2026-11-27'::date]", ["2026-11-27"]),
]


@pytest.fixture(scope="module")
def server(pg_server: PgServer) -> Iterator[psycopg.Connection[Any]]:
    """A read-only session on the test server, in UTC (as the worker's replication connection is)."""
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        yield conn


def output_text(conn: psycopg.Connection[Any], query: str, params: list[Any] | None = None) -> list[str]:
    """The first row of `query` as its types' output functions print it (the text pgoutput sends)."""
    cursor = conn.execute(query, params, binary=False)  # type: ignore[arg-type]
    assert cursor.pgresult is not None
    values = [cursor.pgresult.get_value(0, column) for column in range(cursor.pgresult.nfields)]
    return [bytes(value).decode() for value in values if value is not None]


def server_text(conn: psycopg.Connection[Any], expression: str) -> tuple[str, int]:
    """The text the type's output function gives for `expression`, and its type OID."""
    text, oid = output_text(conn, f"SELECT {expression}, pg_typeof({expression})::oid")
    return text, int(oid)


@pytest.mark.parametrize(("expression", "expected"), CASES)
def test_converter_for_server_text(server: psycopg.Connection[Any], expression: str, expected: JSONValue) -> None:
    """converter_for(type OID) turns the server's text for a value into the expected JSON value, exactly."""
    text, type_oid = server_text(server, expression)
    value = converter_for(type_oid)(text)
    assert value == expected
    assert type(value) is type(expected)  # 1 and 1.0 and True compare equal: the type matters too
    json.dumps(value, allow_nan=False)  # always storable as JSON


def test_timestamptz_in_other_time_zones_is_normalised_to_utc(server: psycopg.Connection[Any]) -> None:
    """timestamptz text with any offset (half hours, historical offsets with seconds) converts to the UTC instant."""
    convert = converter_for(1184)
    for zone, expression, expected in [
        ("Asia/Kolkata", "'2026-11-27 21:00:14.564968+00'", "2026-11-27T21:00:14.564968+00:00"),
        ("America/St_Johns", "'2026-07-01 00:00:00+00'", "2026-07-01T00:00:00+00:00"),
        ("Europe/Amsterdam", "'1850-01-01 12:00:00.5+00'", "1850-01-01T12:00:00.5+00:00"),
        ("Pacific/Kiritimati", "'0001-01-01 12:00:00+00'", "0001-01-01T12:00:00+00:00"),
    ]:
        server.execute(f"SET TimeZone = '{zone}'")  # type: ignore[arg-type]
        try:
            text, _ = server_text(server, f"{expression}::timestamptz")
        finally:
            server.execute("SET TimeZone = 'UTC'")
        assert not text.endswith("+00"), f"{zone} should give a non-UTC offset: {text}"
        assert convert(text) == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.datetimes(datetime(1800, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC)),
    st.sampled_from(["UTC", "Asia/Kolkata", "America/St_Johns", "Europe/Amsterdam", "Pacific/Chatham", "Etc/GMT+12"]),
)
def test_timestamptz_round_trips_in_any_time_zone(server: psycopg.Connection[Any], moment: datetime, zone: str) -> None:
    """Any instant printed by the server in any session time zone converts to that instant in UTC ISO 8601."""
    server.execute(f"SET TimeZone = '{zone}'")  # type: ignore[arg-type]
    try:
        [zone_text] = output_text(server, "SELECT %s::timestamptz", [moment])
    finally:
        server.execute("SET TimeZone = 'UTC'")
    [utc_text] = output_text(server, "SELECT %s::timestamptz", [moment])
    converted = converter_for(1184)(zone_text)
    assert converted == converter_for(1184)(utc_text)  # the same text whatever the session time zone
    assert isinstance(converted, str)
    assert datetime.fromisoformat(converted) == moment


def test_unknown_types_keep_their_text(server: psycopg.Connection[Any]) -> None:
    """Without the catalog's word (converter_for knows built-in OIDs only), enums, domains and other types, and
    their arrays, keep the server's text as is."""
    server.execute("CREATE TYPE pg_temp.mood AS ENUM ('happy', 'so sad')")
    server.execute("CREATE DOMAIN pg_temp.positive AS int CHECK (VALUE > 0)")
    for expression in ["'so sad'::pg_temp.mood", "5::pg_temp.positive", "ARRAY['happy']::pg_temp.mood[]",
                       "'(1,2)'::point", "'[1,5)'::int4range"]:  # fmt: skip
        text, type_oid = server_text(server, expression)
        assert converter_for(type_oid)(text) == text


def test_bool_accepts_both_spellings(server: psycopg.Connection[Any]) -> None:
    """bool converts the output function's 't'/'f' and the text cast's 'true'/'false' alike."""
    convert = converter_for(16)
    for row in server.execute("SELECT b::text, b FROM (VALUES (true), (false)) AS v(b)").fetchall():
        assert convert(row[0]) is row[1]
    assert (convert("t"), convert("f")) == (True, False)


def test_converters_are_cached_per_oid() -> None:
    """converter_for returns the same function for the same OID, so a relation's converters are built once."""
    assert converter_for(1007) is converter_for(1007)
    assert converter_for(25) is converter_for(987654)  # text and unknown: both identity


# Any text PostgreSQL can store: no NUL, no lone surrogates (not UTF-8); with the characters arrays must quote.
_element = st.one_of(
    st.none(),
    st.sampled_from(["NULL", "null", "", " ", '"', "\\", "{", "}", ",", "a b", "{a,b}", "ü"]),
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.lists(_element, max_size=6),
        st.integers(1, 3).flatmap(
            lambda width: st.lists(st.lists(_element, min_size=width, max_size=width), min_size=1, max_size=3)
        ),
    )
)
def test_text_arrays_round_trip_through_the_server(server: psycopg.Connection[Any], elements: list[Any]) -> None:
    """Any text[] (1-D or 2-D, NULLs, quotes, backslashes, braces, 'NULL' strings) parses back from its array text."""
    [text] = output_text(server, "SELECT %s::text[]", [elements])
    assert converter_for(1009)(text) == elements


@pytest.mark.parametrize("text", ["{1,2", "1,2}", "{1}{2}", "{{1},2}}", "{{1}", '{"a",b'])
def test_malformed_array_text_raises_value_error(text: str) -> None:
    """Array text with unbalanced or repeated outer braces raises ValueError instead of giving a wrong list."""
    with pytest.raises(ValueError, match="array text"):
        parse_array(text)


def test_row_to_dict_handles_null_unchanged_and_rejected_values() -> None:
    """row_to_dict maps names to converted values, keeps None and UNCHANGED, and keeps text a converter rejects."""
    columns = [Column(True, "id", 23, -1), Column(False, "big", 25, -1), Column(False, "n", 1700, -1),
               Column(False, "at", 1184, -1), Column(False, "doc", 3802, -1)]  # fmt: skip
    converters = [converter_for(c.type_oid) for c in columns]
    row = row_to_dict(columns, ("7", UNCHANGED, None, "27/11/2026 21:00:14 UTC", "{bad json"), converters)
    assert row == {"id": 7, "big": UNCHANGED, "n": None, "at": "27/11/2026 21:00:14 UTC", "doc": "{bad json"}
    with pytest.raises(ValueError, match="zip"):
        row_to_dict(columns, ("7",), converters)


def test_values_through_pgoutput_convert_to_what_was_written(database: str) -> None:
    """A row of many types, streamed through pgoutput and converted, equals its values written in SQL."""
    # char(4) would lose its length in the column type; everything else keeps its text through a table.
    cases = [(expression, value) for expression, value in CASES if "::char(4)" not in expression]
    expressions = [expression for expression, _ in cases]
    columns_sql = ", ".join(f"c{i} {server_type}" for i, server_type in enumerate(_types(database, expressions)))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(f"CREATE TABLE wide (id int PRIMARY KEY, {columns_sql})")  # type: ignore[arg-type]
        conn.execute("CREATE PUBLICATION wide_pub FOR TABLE wide")
        conn.execute("SELECT pg_create_logical_replication_slot('wide', 'pgoutput')")
        conn.execute(f"INSERT INTO wide VALUES (1, {', '.join(expressions)})")  # type: ignore[arg-type]
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('wide', NULL, NULL, 'proto_version', '1', "
            "'publication_names', 'wide_pub')"
        ).fetchall()
    messages = [decode(data) for (data,) in rows]
    relation = next(m for m in messages if isinstance(m, Relation))
    insert = next(m for m in messages if isinstance(m, Insert))
    row = row_to_dict(relation.columns, insert.new, [converter_for(c.type_oid) for c in relation.columns])
    expected = {"id": 1} | {f"c{i}": value for i, (_, value) in enumerate(cases)}
    assert row == expected


def _types(dsn: str, expressions: list[str]) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            row[0]
            for expression in expressions
            if (row := conn.execute(f"SELECT format_type(pg_typeof({expression}), NULL)").fetchone())  # type: ignore[arg-type]
            is not None
        ]


EXACT_JSON = '{"pi": 3.14159265358979323846264338327950288, "tiny": 1e-400, "big": 1.5E+400, "n": [-0.10, 2]}'


@pytest.mark.parametrize("type_name", ["json", "jsonb"])
def test_json_numbers_keep_every_digit(server: psycopg.Connection[Any], type_name: str) -> None:
    """json and jsonb documents are stored as jsonb prints them: no number goes through a float, so the server
    reads back exactly the number that was written."""
    text, type_oid = server_text(server, f"'{EXACT_JSON}'::{type_name}")
    stored = value_encoder(*column_rule(type_oid))(text)
    assert "3.14159265358979323846264338327950288" in stored
    row = server.execute("SELECT %s::jsonb = %s::jsonb", [stored, EXACT_JSON]).fetchone()
    assert row == (True,), stored


def test_clean_json_replaces_only_what_jsonb_refuses() -> None:
    """clean_json turns \\u0000 and unpaired surrogate escapes (and NUL or surrogate characters) into U+FFFD, and
    leaves escaped backslashes, valid surrogate pairs and numbers alone."""
    text = (
        r'{"a": "x\u0000y", "b": "\\u0000", "c": "\ud83d\ude00", "d": "\ud800", "e": "\udc00z", '
        r'"n": 1.000000000000000000001}'
    )
    assert clean_json(text) == (
        r'{"a": "x\ufffdy", "b": "\\u0000", "c": "\ud83d\ude00", "d": "\ufffd", "e": "\ufffdz", '
        r'"n": 1.000000000000000000001}'
    )
    assert clean_json('["\x00", "\ud800"]') == '["\ufffd", "\ufffd"]'


def test_clean_json_for_a_destination_in_another_encoding() -> None:
    """For a LATIN1 destination, characters it lacks become '?' (it lacks U+FFFD too), raw or escaped; those it
    has, and every number, stay."""
    text = r'{"a": "é \u00e9 🙂 \ud83d\ude42 \u2603", "n": 1.000000000000000000001}'
    assert clean_json(text, "iso8859-1") == r'{"a": "é \u00e9 ? ? ?", "n": 1.000000000000000000001}'
    assert clean_json(text, "cp1252") == r'{"a": "é \u00e9 ? ? ?", "n": 1.000000000000000000001}'
