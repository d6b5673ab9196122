"""The worker's fast paths against the general ones, on pgoutput messages captured from the test server for tables
with every supported type: `_fastpath.RowCodec` against decode + `row_to_dict` + encode, and the binary COPY
stream (`_destination.BinaryCopy`) against asyncpg's record COPY."""

from __future__ import annotations

import json
import struct
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bemi_asgi import DecodeError
from bemi_asgi.ops.migration import load_sql
from bemi_asgi.ops.verify import verify
from bemi_asgi.worker.chain import ChainState, Link
from bemi_asgi.worker.config import load_config
from bemi_asgi.worker.destination import BinaryCopy, Destination, SourceStream
from bemi_asgi.worker.fastpath import DROPPED, RowCodec
from bemi_asgi.worker.options import Options
from bemi_asgi.worker.pgoutput import UNCHANGED, Column, Delete, Insert, Relation, Update, decode
from bemi_asgi.worker.progress import Progress, WorkerStats
from bemi_asgi.worker.reader import Reader
from bemi_asgi.worker.relations import Relations
from bemi_asgi.worker.rules import Filters
from bemi_asgi.worker.spill import PendingChange
from bemi_asgi.worker.stitching import context_json
from bemi_asgi.worker.stream import SourceCatalog
from bemi_asgi.worker.values import RULE_NAMES, column_rule
from bemi_asgi.worker.writer import CommitQueue

SCHEMA = r"""
CREATE TYPE mood AS ENUM ('ok', 'sad "x"');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (n int, s text);
CREATE TABLE everything (
    id bigint PRIMARY KEY,
    "quo""te" text,
    "back\slash" int,
    "ünï cødé %s 🙂" varchar(20),
    i2 smallint, i4 int, o oid,
    n numeric, n2 numeric(10, 2),
    f4 real, f8 double precision,
    b boolean,
    j json, jb jsonb,
    ts timestamp, tstz timestamptz, d date, t time, ttz timetz, iv interval,
    u uuid, by bytea, m mood, c "char", bp char(3),
    ai int[], at text[], ajb jsonb[], an numeric[], a2 int[][], ats timestamptz[],
    big text,
    am mood[], dom positive, bx box[], pr pair, apr pair[], jn json[]
);
ALTER TABLE everything ALTER COLUMN big SET STORAGE EXTERNAL;
ALTER TABLE everything REPLICA IDENTITY FULL;
CREATE TABLE composite (region text, n int, v jsonb, PRIMARY KEY (n, region));
ALTER TABLE composite REPLICA IDENTITY FULL;
CREATE TABLE nokey (a text, b int);
ALTER TABLE nokey REPLICA IDENTITY FULL;
CREATE TABLE defaultid (id int PRIMARY KEY, v text, big text);
ALTER TABLE defaultid ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE PUBLICATION fast FOR TABLE everything, composite, nokey, defaultid;
"""

ROWS = r"""
INSERT INTO everything VALUES
 (1, 'plain', 1, 'short', 1, 2, 3, 42, 1.50, 1.5, 2.25, true, '{"a": 1}', '{"a": 1, "b": [true, null]}',
  '2026-01-02 03:04:05.123', '2026-01-02 03:04:05.1234+00', '2026-01-02', '03:04:05', '03:04:05+05:30', '1 day',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff', 'ok', 'x', 'ab',
  '{1,NULL,3}', '{"a b","c,d","e\"f",NULL,"NULL"}', ARRAY['{"k": 1}'::jsonb], '{1.5,2}', '{{1,2},{3,4}}',
  '{"2026-01-02 03:04:05+00"}', 'small'),
 (2, E'quote " back \\ tab \t nl \n ctl \x01 del \x7f é 🙂 \u2028', -7, E'ü\\"', -32768, -2147483648, 4294967295,
  -0.5, -3, 'NaN', '-Infinity', false,
  E'  {"a" : "x", "a": "y", "u": "\\u00e9\\ud83d\\ude00", "n": 1.0, "e": 1E2, "s": "\\/"}  ',
  E'{"str": "a: b, c", "q": "say \\"hi\\"", "emoji": "🙂", "f": 1.50, "big": 123456789012345678901234567890,'
  ' "neg": -0, "nested": {"k": [1, 2.5, "x, y: z"]}, "ctl": "\\t\\u0001", "": "", "sp ace": " "}',
  'infinity', '-infinity', '0044-03-15 BC', '24:00:00', '00:00:00-08', '-1 year 2 mons 3 days 04:05:06.789',
  NULL, '\x', 'sad "x"', '"', ' a ',
  '{}', '{}', '{}', '{NaN,-1.25,1e30}', '[0:1]={7,8}', '{infinity}', NULL),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, 1e30, 0, 1e20, 0.1, NULL, 'null', '"just a string"',
  '10000-01-01 00:00:00', '0001-01-01 00:00:00+00', 'infinity', NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, '{NULL}', NULL, '{-0.0}', NULL, NULL, repeat('x', 4000)),
 (4, '', 0, '', 0, 0, 0, 0, 0.00, 'Infinity', 3.4e38, true, '[]', '[1, "two", {"3": []}, true, null]', NULL,
  '1999-12-31 23:59:59.999999+00', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (5, 'é', 5, 'x', 5, 5, 5, 5, 5, 5, 5, true, '5', '5', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 200) g));
UPDATE everything SET i4 = i4 + 1 WHERE id IN (1, 2);
UPDATE everything SET "quo""te" = 'changed "again"', jb = '{"x": "y: z"}', big = 'now small' WHERE id = 1;
UPDATE everything SET "quo""te" = NULL, n = NULL WHERE id = 2;
UPDATE everything SET i2 = 9 WHERE id IN (3, 5);
UPDATE everything SET id = 50 WHERE id = 5;
UPDATE everything SET b = b WHERE id = 4;
UPDATE everything SET am = '{ok,"sad \"x\"",NULL}', dom = 5, bx = '{(1,1),(0,0);(2,2),(1,1)}', pr = '(1,"a b")',
  apr = ARRAY['(2,x)'::pair, NULL], jn = ARRAY['{"n": 1.000000000000000000001}'::json, 'null'] WHERE id = 1;
DELETE FROM everything WHERE id IN (2, 3, 50);
INSERT INTO composite VALUES ('EU', 1, '{"a": [1, 2]}'), (E'quo"te\\', 2, NULL), ('', 3, '{}')
  ON CONFLICT DO NOTHING;
INSERT INTO composite VALUES ('US', 4, '{"b": 1.25}');
UPDATE composite SET v = '{"c": "d"}' WHERE n = 1;
UPDATE composite SET n = 5 WHERE n = 4;
DELETE FROM composite WHERE n = 2;
INSERT INTO nokey VALUES ('a', 1), (NULL, NULL);
UPDATE nokey SET b = 2 WHERE a = 'a';
DELETE FROM nokey WHERE b IS NULL;
INSERT INTO defaultid VALUES (1, 'a', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 200) g));
UPDATE defaultid SET v = 'b' WHERE id = 1;
UPDATE defaultid SET id = 2 WHERE id = 1;
DELETE FROM defaultid WHERE id = 2;
"""


def capture(dsn: str, timezone: str) -> list[bytes]:
    """The messages of ROWS as XLogData frames (a 25-byte header with the message's LSN, then the message)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET timezone = '{timezone}'")
        rows = conn.execute(
            "SELECT lsn - '0/0'::pg_lsn, data FROM pg_logical_slot_peek_binary_changes('fast', NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'fast', 'messages', 'true')"
        ).fetchall()
    return [b"w" + struct.pack(">QQq", int(lsn), int(lsn), 0) + bytes(data) for lsn, data in rows]


@pytest.fixture
def captured(database: str) -> dict[str, list[bytes]]:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("SELECT pg_create_logical_replication_slot('fast', 'pgoutput')")
        conn.execute(ROWS)
    return {timezone: capture(database, timezone) for timezone in ("UTC", "America/St_Johns")}


async def compare(dsn: str, frames: list[bytes], filters: Filters | None = None) -> dict[str, Any]:
    """Run every row change through both paths (with the tracking rules of `filters`); return what the fast path
    handled, by operation, and how many updates both dropped."""
    catalog = await SourceCatalog.connect(dsn)
    handled: dict[str, Any] = {"CREATE": 0, "UPDATE": 0, "DELETE": 0, "general": 0, "unchanged": 0, "dropped": 0}
    try:
        relations = Relations(catalog, filters)
        for frame in frames:
            message = decode(frame[25:])
            if isinstance(message, Relation):
                await relations.add(message)
                continue
            if not isinstance(message, Insert | Update | Delete):
                continue
            rel = relations[message.relation_oid]
            assert rel.codec is not None
            fast = rel.codec.change(frame)
            general = rel.change(message)
            if fast is None:
                handled["general"] += 1
                continue
            if fast is DROPPED:
                assert general is None, frame
                handled["dropped"] += 1
                continue
            assert general is not None, frame
            assert fast == general, frame
            handled[general[3]] += 1
            if isinstance(message, Update) and UNCHANGED in message.new:
                handled["unchanged"] += 1
    finally:
        await catalog.close()
    return handled


async def test_fast_path_stores_exactly_what_the_general_path_stores(
    database: str, captured: dict[str, list[bytes]]
) -> None:
    """For inserts, full-row updates (unchanged TOAST values included) and deletes of tables with every supported
    type, NULLs, unicode and odd column names, the fast path's key, before and after equal the general path's, in
    UTC and in another session time zone; what it leaves to the general path is only the key-only old rows."""
    for timezone, frames in captured.items():
        handled = await compare(database, frames)
        assert handled == {"CREATE": 12, "UPDATE": 12, "DELETE": 5, "unchanged": 3, "general": 3, "dropped": 0}, (
            timezone
        )
        # (general: defaultid has REPLICA IDENTITY DEFAULT, so its updates and delete send a key-only or no old row)


RULES = dict(
    ignore_columns=["everything.i4", "everything.ts", "composite.v"],
    mask_columns=['everything.quo"te', "everything.big", "everything.jb", "nokey.a"],
    hash_columns=["everything.n", "everything.ünï cødé %s 🙂", "composite.region", "defaultid.v"],
)


@pytest.mark.parametrize("drop_noop_updates", [True, False])
async def test_fast_path_applies_the_tracking_rules_as_the_general_path_does(
    database: str, captured: dict[str, list[bytes]], drop_noop_updates: bool
) -> None:
    """With columns ignored, masked and hashed (a hashed key column, masked unchanged TOAST values, NULLs), the
    fast path stores what the general path stores under the same rules, and drops the same updates: those that
    changed only ignored columns, and with drop_noop_updates those that changed nothing."""
    config = load_config(**RULES, drop_noop_updates=drop_noop_updates, environ={"BEMI_HASH_KEY": "k" * 32})
    for timezone, frames in captured.items():
        handled = await compare(database, frames, Filters(config))
        # `SET i4 = i4 + 1` on two rows of everything and `SET v = ...` on composite touch only ignored columns;
        # `SET b = b` changes nothing.
        dropped = 4 if drop_noop_updates else 3
        assert handled == {
            "CREATE": 12, "UPDATE": 12 - dropped, "DELETE": 5, "unchanged": 3, "general": 3, "dropped": dropped
        }, timezone  # fmt: skip


async def test_fast_path_declines_malformed_messages(database: str, captured: dict[str, list[bytes]]) -> None:
    """A truncated message or one with trailing bytes goes to the general path (which reports it) rather than being
    stored from the fast path."""
    frames = captured["UTC"]
    catalog = await SourceCatalog.connect(database)
    try:
        relations = Relations(catalog)
        checked = 0
        for frame in frames:
            message = decode(frame[25:])
            if isinstance(message, Relation):
                await relations.add(message)
            elif isinstance(message, Insert | Update | Delete):
                codec = relations[message.relation_oid].codec
                assert isinstance(codec, RowCodec)
                if codec.change(frame) is None:
                    continue
                assert codec.change(frame[:-1]) is None
                assert codec.change(frame + b"\0") is None
                assert codec.change(frame[:32]) is None
                checked += 1
        assert checked > 20
    finally:
        await catalog.close()


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3).map(lambda d: json.loads(str(d)))
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")), children)
    ),
    max_leaves=12,
)


def test_json_rule_and_contexts_write_what_jsonb_prints(database: str) -> None:
    """For any JSON document, however written, the json rule gives exactly the text the server's jsonb prints for
    it, and so does a `_bemi` message's context (the hash chain hashes rows as sent: see worker/jsonb.py)."""
    json_rule = RULE_NAMES["_json"]
    with psycopg.connect(database, autocommit=True) as conn:
        # What a generated document never has: a key twice (jsonb keeps the last), exponents, a negative zero.
        written = '{"b": 1, "a": 2, "b": 1.50e1, "ab": [1E2, -0.0, -0, 1e-3]}'
        printed = conn.execute("SELECT %s::jsonb::text", [written]).fetchone()
        assert printed == (json_rule(written),) == (context_json(written.encode()),)

        @settings(max_examples=300, deadline=None)
        @given(st.lists(JSON_VALUES, min_size=1, max_size=10), st.sampled_from([None, 1]))
        def check(documents: list[Any], indent: int | None) -> None:
            written = [json.dumps(d, indent=indent, ensure_ascii=indent is None) for d in documents]
            printed = conn.execute("SELECT d::jsonb::text FROM unnest(%s::text[]) AS d", [written]).fetchall()
            assert [json_rule(text) for text in written] == [text for (text,) in printed]
            contexts = [(w, p) for w, (p,) in zip(written, printed, strict=True) if w.startswith("{")]
            assert [context_json(w.encode()) for w, _ in contexts] == [p for _, p in contexts]

        check()


DESTINATION_SQL = load_sql("destination_up.sql")
STORED = (
    'SELECT primary_key, before::text, after::text, context::text, database, schema, "table", operation,'
    " committed_at, queued_at, transaction_id, position, commit_lsn, ordinal FROM bemi.changes"
    " ORDER BY commit_lsn, ordinal"
)


async def pending_changes(dsn: str, frames: list[bytes]) -> list[PendingChange]:
    """Every row change of `frames` as the worker holds it until its commit (by the general path)."""
    catalog = await SourceCatalog.connect(dsn)
    try:
        relations = Relations(catalog)
        pending: list[PendingChange] = []
        for frame in frames:
            message = decode(frame[25:])
            if isinstance(message, Relation):
                await relations.add(message)
            elif isinstance(message, Insert | Update | Delete):
                rel = relations[message.relation_oid]
                change = rel.change(message)
                assert change is not None
                key, before, after, operation = change
                lsn = struct.unpack_from(">Q", frame, 1)[0]
                pending.append((key, before, after, rel.schema, rel.table, operation, lsn, len(pending) + 1))
        return pending
    finally:
        await catalog.close()


async def test_binary_copy_stores_what_record_copy_stores(database: str, captured: dict[str, list[bytes]]) -> None:
    """The worker's binary COPY stream stores every column of every change exactly as asyncpg's record COPY does:
    keys (NULL ones too), JSON with unicode, contexts per segment, timestamps (one before PostgreSQL's epoch of
    2000), transaction ids and positions."""
    changes = await pending_changes(database, captured["UTC"])
    assert len(changes) > 30
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
    committed = [
        datetime(1999, 12, 31, 23, 59, 59, 999_990, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC),
    ]
    queued_at = datetime.now(UTC)
    contexts = [context_json('{"user_id": 1, "who": "é 🙂 \\"q\\""}'.encode()), "{}"]
    halves = [changes[: len(changes) // 2], changes[len(changes) // 2 :]]
    destination = await Destination.connect(database)
    try:
        stream = await destination.stream(SourceStream(7, "dbé", "s"))
        records = [
            (key, before, after, context, "dbé", schema, table, operation, committed[n], queued_at,
             4_000_000_000 + n, position, 2**40 + n, ordinal, stream)
            for n, (context, half) in enumerate(zip(contexts, halves, strict=True))
            for key, before, after, schema, table, operation, position, ordinal in half
        ]  # fmt: skip
        assert destination.binary
        await destination.write(stream, records, 1, 1, None)  # no chain: the rows alone are compared
        with psycopg.connect(database, autocommit=True) as conn:
            expected = conn.execute(STORED).fetchall()
            conn.execute("TRUNCATE bemi.changes")
        copy = BinaryCopy("dbé", stream, link=Link(ChainState(stream, "changes", None)))

        def pieces() -> Iterator[bytes]:  # produced while sent, as the writer's
            for n, (context, half) in enumerate(zip(contexts, halves, strict=True)):
                copy.transaction(committed[n], queued_at, 4_000_000_000 + n, 2**40 + n)
                copy.context(context)
                copy.add(half[:3])
                yield copy.take()
                copy.add(half[3:])
            yield copy.end()

        _, differs = await destination.write_binary(
            stream,
            copy,
            pieces(),
            2**40,
            2**40 + 1,
            copy.link.state if copy.link else None,
            unchecked=lambda: [e for s in copy.samples.values() for e in s],
        )
        with psycopg.connect(database, autocommit=True) as conn:
            assert conn.execute(STORED).fetchall() == expected
            assert conn.execute("SELECT last_commit_lsn FROM bemi.worker_state").fetchall() == [(2**40 + 1,)]
    finally:
        await destination.close()
    assert len(expected) == len(changes)
    assert any(row[0] is None for row in expected)
    # The digests computed from the rows as sent are those the destination computes from what it stored: the
    # sampled ones when the rows were written, and all of them when the chain is verified.
    assert differs is None
    report = verify(database, key=None)[0]
    assert report.intact, report.describe()
    assert report.changes == len(changes)


async def test_destination_with_other_column_types_is_written_by_records(database: str) -> None:
    """A `bemi.changes` whose column types differ from the migration's (ordinal widened to bigint) is not sent the
    binary stream, which would not fit it."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(DESTINATION_SQL)
        conn.execute("ALTER TABLE bemi.changes ALTER COLUMN ordinal TYPE bigint")
    destination = await Destination.connect(database)
    try:
        assert not destination.binary
    finally:
        await destination.close()


@pytest.mark.parametrize("payload", [b"", b"I", b"I\x00\x00", b"I\x00\x00\x40\x00N\x00\x01t\x00\x00\x00\x09ab"])
async def test_malformed_row_changes_are_reported_as_decode_errors(database: str, payload: bytes) -> None:
    """A row change frame too short for the fast path to look at, or cut inside a value, stops the worker with
    the decoder's DecodeError, as it did before the fast path existed."""
    catalog = await SourceCatalog.connect(database)
    try:
        options = Options()
        progress = Progress(None, WorkerStats())  # type: ignore[arg-type]  # no status is sent
        queue = CommitQueue(options.max_queued, options.spill_threshold)
        reader = Reader(None, Relations(catalog), queue, progress, options, stored_commit_lsn=0)  # type: ignore[arg-type]
        begin = b"B" + struct.pack(">QqI", 1, 0, 7)
        await reader.handle([memoryview(b"w" + bytes(24) + begin)])
        with pytest.raises(DecodeError):
            await reader.handle([memoryview(b"w" + bytes(24) + payload)])
        reader.close()
    finally:
        await catalog.close()


def test_a_traceback_through_a_generated_reader_shows_its_source() -> None:
    """The generated readers are registered with linecache: a traceback through one shows the rule's line."""
    codec = RowCodec([Column(True, "id", 20, -1)], [column_rule(20)], [0])
    frame = b"w" + bytes(24) + b"I" + bytes(4) + b"N\x00\x01t\x00\x00\x00\x02\xff\xfe"
    try:
        codec.read(frame)  # invalid UTF-8: the rule's decode raises
    except UnicodeDecodeError as exc:
        shown = "".join(traceback.format_exception(exc))
    else:
        raise AssertionError("the reader accepted invalid UTF-8")
    assert "fastpath reader" in shown
    assert "text = r0.decode()" in shown
    assert "text = r0.decode()" in codec.source
