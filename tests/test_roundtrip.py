"""Every stored value casts back to what was written, with PostgreSQL's own input functions as the oracle.

A table holds a column of every built-in type the server can take as input, an array of each, enums, domains,
composites and their arrays. Rows of awkward values are written, updated and deleted; the worker stores the
changes; then, on the server, `jsonb_populate_record(NULL::the_table, before/after)` rebuilds each stored row
through the columns' input functions, and every column must print as the original did (json columns compare as
jsonb: the stored document is written as jsonb prints it). The worker chains what it stores: every change's digest,
computed from the row as sent, is the one the destination computes from what it holds.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest
from psycopg import sql

from bemi_asgi.ops.verify import verify
from bemi_asgi.worker.config import TrackingConfig

from .worker_support import drain, emit, prepare_source

KEY = b"the round trip's chain key"

# (column type, values as SQL literals); each column gets one of its values per row, cycling, and NULL in the last row.
TYPES: list[tuple[str, list[str]]] = [
    ("smallint", ["-32768", "32767", "0"]),
    ("integer", ["-2147483648", "2147483647"]),
    ("bigint", ["-9223372036854775808", "9223372036854775807"]),
    ("numeric", ["'3.14159265358979323846264338327950288'", "1e30", "'-0.000000000000000000001'", "'NaN'",
                 "'Infinity'", "'-Infinity'", "0"]),
    ("numeric(10,2)", ["1.50", "-99999999.99"]),
    ("real", ["'3.4028235e38'", "'1.4e-45'", "0.1", "'NaN'", "'-Infinity'"]),
    ("double precision", ["'1.7976931348623157e308'", "'5e-324'", "0.1", "'Infinity'", "'NaN'", "1e22"]),
    ("money", ["'-92233720368547758.08'", "'12.34'"]),
    ("oid", ["4294967295", "0"]),
    ("boolean", ["true", "false"]),
    ("text", [r"E'quote \" back \\ tab \t nl \n ctl \x01 é 🙂 \u2028 NULL {a,b}'", "''", "'NULL'", "' sp '"]),
    ('"char"', ["'x'", "'\"'", "'\\'"]),
    ("character(5)", ["'ab'", "'é  '"]),
    ("character varying(12)", ["'short é'", "''"]),
    ("name", ["'a name with spaces'"]),
    ("bytea", [r"'\x00ff10'", "''"]),
    ("date", ["'2026-11-27'", "'infinity'", "'-infinity'", "'0044-03-15 BC'", "'10000-01-01'"]),
    ("time", ["'21:00:14.564968'", "'24:00:00'", "'00:00:00'"]),
    ("time(3) with time zone", ["'21:00:14.123+05:30'", "'00:00:00-08'", "'12:00:00+05:43:07'"]),
    ("timestamp", ["'2026-11-27 21:00:14.5'", "'infinity'", "'0044-03-15 12:00:00 BC'", "'10000-01-01 00:00'"]),
    ("timestamp with time zone", ["'2026-11-27 21:00:14.564968+00'", "'2026-07-01 00:00:00+05:30'",
                                  "'1850-01-01 12:00:00.5+00:19:32'", "'-infinity'", "'0044-03-15 12:00:00+00 BC'",
                                  "'0001-01-01 00:00:00+00'", "'10000-01-01 00:00:00+00'"]),
    ("interval", ["'-1 year 2 mons 3 days 04:05:06.789'", "'0'", "'1 day -00:00:01'"]),
    ("json", [r"""'{"pi": 3.14159265358979323846264338327950288, "a": [1, 2.50, {"b": null}], "e": 1E400}'""",
              """'  "just a string"  '""", "'null'", r"""'{"u": "\u00e9\ud83d\ude00", "q": "\"", "s": "\\/"}'"""]),
    ("jsonb", [r"""'{"pi": 3.14159265358979323846264338327950288, "big": 123456789012345678901234567890}'""",
               """'[1, "two", {"3": []}, true, null, -0.10, 1e-400]'""", "'\"x\"'", "'{}'", "'null'"]),
    ("jsonpath", ["'$.a[*] ? (@ > 2)'", "'strict $.\"key with space\"'"]),
    ("xml", ["'<a b=\"1\">text &amp; é</a>'", "'plain'"]),
    ("uuid", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"]),
    ("inet", ["'10.0.0.1/8'", "'::1'"]),
    ("cidr", ["'10.0.0.0/8'", "'2001:db8::/32'"]),
    ("macaddr", ["'08:00:2b:01:02:03'"]),
    ("macaddr8", ["'08:00:2b:01:02:03:04:05'"]),
    ("bit(4)", ["B'1010'"]),
    ("bit varying", ["B'101'", "B''"]),
    ("point", ["'(1.5,-2)'"]),
    ("line", ["'{1,-1,0}'"]),
    ("lseg", ["'[(0,0),(1,1)]'"]),
    ("box", ["'(1,1),(0,0)'"]),
    ("path", ["'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'"]),
    ("polygon", ["'((0,0),(1,1),(1,0))'"]),
    ("circle", ["'<(0,0),2.5>'"]),
    ("tsvector", ["'a fat:1A cat:2B ''quoted'''"]),
    ("tsquery", ["'fat & (rat | cat)'"]),
    ("int4range", ["'[1,5)'", "'empty'"]),
    ("int8range", ["'(,10]'"]),
    ("numrange", ["'[1.5,2.25]'"]),
    ("daterange", ["'[2026-01-01,infinity)'"]),
    ("tsrange", ["'[2026-01-01 00:00,2026-01-02 00:00)'"]),
    ("tstzrange", ["'[2026-01-01 00:00+00,)'"]),
    ("int4multirange", ["'{[1,3), [5,7)}'"]),
    ("nummultirange", ["'{}'"]),
    ("datemultirange", ["'{[2026-01-01,2026-02-01)}'"]),
    ("int8multirange", ["'{(,0]}'"]),
    ("tsmultirange", ["'{[2026-01-01 00:00,)}'"]),
    ("tstzmultirange", ["'{[2026-01-01 00:00+00,)}'"]),
    ("pg_lsn", ["'16/B374D848'"]),
    ("pg_snapshot", ["'10:20:10,14,15'"]),
    ("txid_snapshot", ["'10:20:10,14,15'"]),
    ("xid", ["'4294967295'"]),
    ("xid8", ["'18446744073709551615'"]),
    ("cid", ["'7'"]),
    ("tid", ["'(4294967295,65535)'"]),
    ("int2vector", ["'1 2 3'"]),
    ("oidvector", ["'1 2 4294967295'"]),
    ("regclass", ["'pg_class'"]),
    ("regtype", ["'integer[]'"]),
    ("regproc", ["'now'"]),
    ("regprocedure", ["'abs(integer)'"]),
    ("regoper", ["'||/'"]),
    ("regoperator", ["'+(integer,integer)'"]),
    ("regconfig", ["'english'"]),
    ("regdictionary", ["'simple'"]),
    ("regnamespace", ["'pg_catalog'"]),
    ("regrole", ["'pg_monitor'"]),
    ("regcollation", ["'\"C\"'"]),
    ("aclitem", ["'postgres=arwdDxt/postgres'"]),
    ("refcursor", ["'a cursor'"]),
    ("mood", ["'ok'", "'sad \"x\", {y}'"]),
    ("positive", ["5"]),
    ("doc", [r"""'{"n": 1.000000000000000000001}'"""]),
    ("int_list", ["'{1,2,NULL}'"]),
    ("pair", ["ROW(1, 'a \"b\", (c)')", "ROW(NULL, NULL)", "ROW(-2, '')"]),
    ("nested", ["ROW(ROW(3, 'x'), '{1.5,NULL}', '{\"k\": 1.10}')"]),
]  # fmt: skip

# Types the server has but a table column cannot hold, or that have no input (their value cannot be written).
NOT_COLUMNS = {
    "pg_node_tree", "pg_ndistinct", "pg_dependencies", "pg_mcv_list", "pg_brin_bloom_summary",
    "pg_brin_minmax_multi_summary", "gtsvector", "unknown",
}  # fmt: skip

USER_TYPES = r"""
CREATE TYPE mood AS ENUM ('ok', 'sad "x", {y}');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE DOMAIN doc AS jsonb;
CREATE DOMAIN int_list AS integer[];
CREATE TYPE pair AS (n integer, s text);
CREATE TYPE nested AS (p pair, a numeric[], j jsonb);
"""

# Array values by element: 1-D with NULL, 2-D, and a lower bound other than 1.
ARRAY_SHAPES = ["ARRAY[{v}, NULL]", "ARRAY[[{v}, {v}], [{v}, {v}]]", "'[0:1]=' || ARRAY[NULL, {v}]::text", "'{{}}'"]
NO_ARRAY = {"int_list"}  # a domain over an array: its array would be an array of arrays


def _columns(types: list[tuple[str, list[str]]]) -> list[tuple[str, str, list[str]]]:
    """(column name, type, values): every type, and an array of each."""
    columns = []
    for n, (type_name, values) in enumerate(types):
        columns.append((f"c{n}", type_name, values))
        if type_name not in NO_ARRAY:
            element = type_name
            arrays = [shape.format(v=f"({v})::{element}") for shape in ARRAY_SHAPES for v in values[:1]]
            columns.append((f"a{n}", f"{type_name}[]", arrays))
    return columns


ROWS = 7  # the last one all NULL
Columns = list[tuple[str, str, list[str]]]


def supported_columns(dsn: str) -> Columns:
    """The columns of every type this server supports (xml needs a server built with libxml)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("SELECT '<a/>'::xml")
            types = TYPES
        except psycopg.errors.FeatureNotSupported:
            types = [(name, values) for name, values in TYPES if name != "xml"]
    return _columns(types)


def _schema(columns: Columns) -> str:
    defs = ", ".join(f"{name} {type_name}" for name, type_name, _ in columns)
    return f"{USER_TYPES}\nCREATE TABLE everything (id int PRIMARY KEY, touched int, {defs});"


def _inserts(columns: Columns) -> list[str]:
    statements = []
    for row in range(ROWS):
        values = []
        for _name, type_name, samples in columns:
            if row == ROWS - 1:
                values.append("NULL")
            else:
                values.append(f"({samples[row % len(samples)]})::{type_name}")
        statements.append(f"INSERT INTO everything VALUES ({row}, 0, {', '.join(values)})")
    return statements


def _compared(column: str, type_name: str) -> tuple[sql.Composable, sql.Composable]:
    """How a column of the rebuilt row (r) and of the original (o) are compared: as printed, json as jsonb.

    A json or jsonb document that is JSON's `null` is stored as `null`, as SQL NULL is (a row is one JSON
    object): that one conflation is accepted, documented in the README."""
    ident = sql.Identifier(column)
    if type_name in ("json", "jsonb", "doc"):
        compared = sql.SQL("coalesce({}.{}::jsonb, 'null')::text")
        return compared.format(sql.Identifier("r"), ident), compared.format(sql.Identifier("o"), ident)
    if type_name == "json[]":
        return sql.SQL("r.{}::jsonb[]::text").format(ident), sql.SQL("o.{}::jsonb[]::text").format(ident)
    return sql.SQL("r.{}::text").format(ident), sql.SQL("o.{}::text").format(ident)


@pytest.mark.parametrize("general", [False, True], ids=["fast path", "general path"])
async def test_every_type_round_trips_through_the_stored_json(
    database: str, general: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """For a column of every built-in type (and an array of each, enums, domains, composites and their arrays),
    inserted, updated and deleted rows stored by the worker rebuild, through the server's input functions, into
    exactly the rows that were written; each one's digest, computed from the row as sent, is the destination's
    (the worker compares them for each table's first batch and warns on a difference), and the chain verifies."""
    columns = supported_columns(database)
    prepare_source(database, _schema(columns), ["everything"])
    with psycopg.connect(database) as conn:
        for statement in _inserts(columns):
            conn.execute(statement)  # type: ignore[arg-type]
        emit(conn, {"step": "insert"})
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE original AS SELECT * FROM everything")
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE everything SET touched = touched + 1")
        emit(conn, {"step": "update"})
    with psycopg.connect(database) as conn:
        conn.execute("DELETE FROM everything")
        emit(conn, {"step": "delete"})
    # A tracking configuration with any row rule sends every change through the general path.
    tracking = TrackingConfig(drop_noop_updates=True) if general else None
    with caplog.at_level(logging.WARNING, logger="bemi_asgi.worker"):
        await drain(database, tracking=tracking, chain_key=KEY)
    assert [r.message for r in caplog.records if "digest" in r.message] == []
    report = verify(database, key=KEY)[0]
    assert report.intact, report.describe()
    with psycopg.connect(database, autocommit=True) as conn:
        stored = conn.execute("SELECT operation, count(*) FROM bemi.changes GROUP BY 1 ORDER BY 1").fetchall()
        assert stored == [("CREATE", ROWS), ("DELETE", ROWS), ("UPDATE", ROWS)]
        conn.execute("UPDATE original SET touched = 1")
        problems = check(conn, columns, "after", "UPDATE") + check(conn, columns, "before", "DELETE")
        conn.execute("UPDATE original SET touched = 0")
        problems += check(conn, columns, "after", "CREATE") + check(conn, columns, "before", "UPDATE")
    assert problems == [], "\n".join(map(repr, problems))


def check(conn: psycopg.Connection[Any], columns: Columns, side: str, operation: str) -> list[tuple[Any, ...]]:
    """(operation, side, column, rebuilt, original, stored JSON) for every column that does not round-trip."""
    found: list[tuple[Any, ...]] = []
    for name, type_name, _ in [("touched", "int", []), *columns]:
        restored, original = _compared(name, type_name)
        query = sql.SQL(
            "SELECT {restored}, {original}, c.{side} -> {name} FROM bemi.changes c"
            " CROSS JOIN LATERAL jsonb_populate_record(NULL::everything, c.{side}) r"
            " JOIN original o ON o.id = r.id"
            " WHERE c.operation = {operation} AND {restored} IS DISTINCT FROM {original}"
        ).format(
            restored=restored,
            original=original,
            side=sql.Identifier(side),
            name=sql.Literal(name),
            operation=sql.Literal(operation),
        )
        try:
            rows = conn.execute(query).fetchall()
        except psycopg.Error as exc:
            found.append((operation, side, name, type_name, f"error: {exc}".strip()))
            continue
        found += [(operation, side, name, type_name, *row) for row in rows]
    return found


async def test_built_in_types_are_all_covered(database: str) -> None:
    """The round trip covers every base type of pg_catalog that a column can hold (a new server version's new
    type fails here until it is added)."""
    with psycopg.connect(database) as conn:
        names = {
            row[0]
            for row in conn.execute(
                "SELECT format_type(oid, NULL) FROM pg_type WHERE typnamespace = 'pg_catalog'::regnamespace"
                " AND typtype IN ('b', 'r', 'm') AND typisdefined AND typarray <> 0 AND typname NOT LIKE '\\_%'"
            ).fetchall()
        }
    user_types = {"mood", "positive", "doc", "int_list", "pair", "nested"}
    with psycopg.connect(database) as conn:
        covered = {
            conn.execute("SELECT format_type(%s::regtype, NULL)", [type_name]).fetchone()[0]  # type: ignore[index]
            for type_name, _ in TYPES
            if type_name not in user_types
        }
    assert names - covered - NOT_COLUMNS == set()
