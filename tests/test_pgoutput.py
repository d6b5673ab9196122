"""The pgoutput decoder, on messages captured from a real server.

Two sources, one set of checks: the messages committed under tests/data/pgoutput (regenerate them with
`python -m tests.data.pgoutput.capture`), which need no server, and the same scenario captured live from the test
server. `check_scenario` walks the scenario transaction by transaction and compares every decoded field with what
was written.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from bemi_asgi import DecodeError
from bemi_asgi._pgtext import parse_lsn
from bemi_asgi.worker.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    Type,
    Update,
    decode,
)
from tests.data.pgoutput import capture as scenario


def relations(facts: dict[str, Any]) -> dict[int, Relation]:
    """The Relation message each captured table must produce."""
    oids = facts["oids"]

    def columns(*spec: tuple[bool, str, int, int]) -> tuple[Column, ...]:
        return tuple(Column(*column) for column in spec)

    return {
        oids["items"]: Relation(
            oids["items"],
            "public",
            "items",
            "d",
            columns(
                (True, "id", 23, -1),
                (False, "name", 25, -1),
                (False, "price", 1700, -1),
                (False, "code", 1043, 20 + 4),
                (False, "mood", facts["mood_oid"], -1),
                (False, "big", 25, -1),
                (False, "tags", 1009, -1),
            ),
        ),
        # REPLICA IDENTITY FULL: pgoutput flags every column as key.
        oids["accounts"]: Relation(
            oids["accounts"],
            "public",
            "accounts",
            "f",
            columns(
                (True, "id", 20, -1),
                (True, "email", 25, -1),
                (True, "big", 25, -1),
            ),
        ),
        oids["parents"]: Relation(
            oids["parents"], "public", "parents", "d", columns((True, "id", 23, -1), (False, "label", 25, -1))
        ),
        oids["children"]: Relation(
            oids["children"], "public", "children", "d", columns((True, "id", 23, -1), (False, "parent_id", 23, -1))
        ),
    }


def expected_changes(facts: dict[str, Any]) -> list[list[PgOutputMessage] | Message]:
    """Per transaction, its messages other than Begin/Commit/Relation/Type; a bare Message outside transactions."""
    oids = facts["oids"]
    items, accounts = oids["items"], oids["accounts"]
    item = tuple(facts["item_text"])  # the server's own text of the inserted row
    renamed = (item[0], "renamed", *item[2:5], UNCHANGED, item[6])
    big = scenario.BIG
    return [
        [Insert(items, item), Message(True, -1, "_bemi", scenario.CONTEXT.encode())],
        [Update(items, None, renamed, old_is_key_only=False)],
        [Update(items, ("1", *[None] * 6), ("2", *renamed[1:]), old_is_key_only=True)],
        [Delete(items, ("2", *[None] * 6), old_is_key_only=True)],
        [Insert(accounts, ("7", scenario.EMAIL_BEFORE, big))],
        [Update(accounts, ("7", scenario.EMAIL_BEFORE, big), ("7", scenario.EMAIL_AFTER, UNCHANGED), False)],
        [Delete(accounts, ("7", scenario.EMAIL_AFTER, big), old_is_key_only=False)],
        Message(False, -1, "other", scenario.MESSAGE_CONTENT),
        [
            Origin(parse_lsn(scenario.ORIGIN_LSN), scenario.ORIGIN_NAME),
            Insert(oids["parents"], ("1", "p")),
            Insert(oids["children"], ("1", "1")),
        ],
        [Truncate(True, True, (oids["parents"], oids["children"]))],
        [Truncate(False, False, (items,))],
    ]


def check_scenario(capture: scenario.Capture) -> None:
    """Assert that `capture` decodes to exactly the scenario of tests/data/pgoutput/capture.py."""
    facts = capture.facts
    started_at = datetime.fromisoformat(facts["started_at"])
    finished_at = datetime.fromisoformat(facts["finished_at"])
    want_relations = relations(facts)
    decoded = [decode(data) for _, _, data in capture.rows]

    units: list[list[PgOutputMessage] | Message] = []
    seen_relations: set[int] = set()
    seen_mood_type = False
    open_begin: Begin | None = None
    last_commit_lsn = 0
    for (lsn, xid, _), message in zip(capture.rows, decoded, strict=True):
        if isinstance(message, Begin):
            assert open_begin is None, "Begin inside a transaction"
            assert message.xid == xid, "Begin.xid is the transaction's xid"
            assert started_at <= message.commit_time <= finished_at
            assert message.final_lsn > last_commit_lsn
            open_begin = message
            units.append([])
        elif isinstance(message, Commit):
            assert open_begin is not None
            assert message.flags == 0
            assert message.commit_lsn == open_begin.final_lsn
            assert message.commit_time == open_begin.commit_time
            assert message.end_lsn > message.commit_lsn
            last_commit_lsn = message.commit_lsn
            open_begin = None
        elif isinstance(message, Type):
            assert message == Type(facts["mood_oid"], "public", "mood")
            seen_mood_type = True
        elif isinstance(message, Relation):
            assert message == want_relations[message.oid]
            if message.oid == facts["oids"]["items"]:
                assert seen_mood_type, "the enum's Type message precedes the first Relation using it"
            seen_relations.add(message.oid)
        else:
            relation_oids = getattr(message, "relation_oids", None) or [getattr(message, "relation_oid", None)]
            for oid in relation_oids:
                assert oid is None or oid in seen_relations, "a Relation message precedes the first change"
            if isinstance(message, Message):
                assert message.lsn > 0
                assert message.lsn <= (open_begin.final_lsn if open_begin else parse_lsn(lsn))
                message = Message(message.transactional, -1, message.prefix, message.content)
            if open_begin is None:
                assert isinstance(message, Message)
                units.append(message)
            else:
                unit = units[-1]
                assert isinstance(unit, list)
                unit.append(message)
    assert open_begin is None, "the capture ends with a Commit"
    assert units == expected_changes(facts)


def test_committed_capture_decodes_to_the_scenario() -> None:
    """The committed capture decodes, field by field, to the scenario that produced it."""
    check_scenario(scenario.load())


def test_committed_capture_covers_every_message_kind() -> None:
    """The committed capture holds every pgoutput v1 message kind, 'K' and 'O' old tuples and unchanged TOAST."""
    decoded = [decode(data) for _, _, data in scenario.load().rows]
    kinds = {type(message) for message in decoded}
    assert kinds == {Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, Message}
    olds = {(type(m).__name__, m.old_is_key_only) for m in decoded if isinstance(m, Update | Delete) and m.old}
    assert olds == {("Update", True), ("Update", False), ("Delete", True), ("Delete", False)}
    assert any(isinstance(m, Update) and UNCHANGED in m.new for m in decoded)
    assert {m.transactional for m in decoded if isinstance(m, Message)} == {True, False}


def test_live_capture_decodes_to_what_was_written(database: str) -> None:
    """Messages captured now from the test server decode to the values the scenario wrote."""
    capture = scenario.run_scenario(database)
    assert capture.facts["item_text"][1:3] == [scenario.NAME, scenario.PRICE]  # the server kept them exactly
    check_scenario(capture)


def test_decode_accepts_bytes_bytearray_and_memoryview() -> None:
    """decode gives the same result for bytes, bytearray and memoryview (a slice of a larger buffer) input."""
    for _, _, data in scenario.load().rows:
        framed = memoryview(b"w" + bytes(24) + data)[25:]  # as the payload of an XLogData frame
        assert decode(bytearray(data)) == decode(framed) == decode(data)


def test_every_truncation_raises_decode_error() -> None:
    """Every strict prefix of every captured message raises DecodeError (never another exception)."""
    for _, _, data in scenario.load().rows:
        for cut in range(len(data)):
            with pytest.raises(DecodeError, match=r"malformed|empty"):
                decode(data[:cut])


def test_trailing_bytes_raise_decode_error() -> None:
    """A message with bytes after its last field raises DecodeError naming the message type and the offset."""
    for _, _, data in scenario.load().rows:
        name = type(decode(data)).__name__
        with pytest.raises(DecodeError, match=rf"{name} message .*trailing bytes at offset {len(data)}"):
            decode(data + b"\0")


def test_unknown_message_type_raises_decode_error() -> None:
    """A type byte outside protocol version 1 (here a streaming Stream Start 'S') raises DecodeError naming it."""
    with pytest.raises(DecodeError, match=r"unknown pgoutput message type b'S' at offset 0"):
        decode(b"S\x00\x00\x00\x01\x01")
    with pytest.raises(DecodeError, match="empty"):
        decode(b"")


def test_bad_tuple_column_kinds_raise_decode_error() -> None:
    """An unknown TupleData kind, a binary value or invalid UTF-8 raises DecodeError with the offset."""
    insert = next(data for _, _, data in scenario.load().rows if data[:1] == b"I")
    first = 8  # 'I', relation OID, 'N', column count
    assert insert[first : first + 1] == b"t"
    with pytest.raises(DecodeError, match=r"Insert message .*unknown TupleData column kind b'x' at offset 8"):
        decode(insert[:first] + b"x" + insert[first + 1 :])
    with pytest.raises(DecodeError, match=r"binary-format column value at offset 8"):
        decode(insert[:first] + b"b" + insert[first + 1 :])
    value_start = first + 5  # after 't' and the Int32 length
    with pytest.raises(DecodeError, match="invalid UTF-8"):
        decode(insert[:value_start] + b"\xff" + insert[value_start + 1 :])
    with pytest.raises(DecodeError, match=r"expected 'N' \(new tuple\) at offset 5"):
        decode(insert[:5] + b"Q" + insert[6:])
