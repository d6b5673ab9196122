"""The stitching rule, `_bemi` payload reading and the spilling transaction buffer (pure, no database)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bemi_asgi.worker.spill import PendingChange, TransactionBuffer
from bemi_asgi.worker.stitching import EMPTY_CONTEXT, INVALID_CONTEXT_KEY, context_json, segment_contexts


def change(ordinal: int) -> PendingChange:
    return (str(ordinal), "{}", json.dumps({"id": ordinal}), "public", "t", "CREATE", ordinal * 8, ordinal)


def test_segments_take_the_next_message_and_the_trailing_one_the_last() -> None:
    """Segment i gets message i; the segment after the last message gets the last message."""
    assert segment_contexts(['{"a":1}', '{"b":2}']) == ['{"a":1}', '{"b":2}', '{"b":2}']


def test_a_transaction_without_messages_has_the_empty_context() -> None:
    """With no `_bemi` message at all, every change gets the empty context."""
    assert segment_contexts([]) == [EMPTY_CONTEXT]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"user_id": 1}', {"user_id": 1}),
        (b"not json", {INVALID_CONTEXT_KEY: "not json"}),
        (b"[1]", {INVALID_CONTEXT_KEY: "[1]"}),
        (b'{"x": NaN}', {INVALID_CONTEXT_KEY: '{"x": NaN}'}),
        (b'{"x": "a\\u0000b"}', {INVALID_CONTEXT_KEY: '{"x": "a\\u0000b"}'}),
        (b'{"x": "\\ud800"}', {INVALID_CONTEXT_KEY: '{"x": "\\ud800"}'}),
        (b"\xff\x00", {INVALID_CONTEXT_KEY: "\ufffd\ufffd"}),
        (b"[" * 100_000, {INVALID_CONTEXT_KEY: "[" * 100_000}),
    ],
)
def test_payloads_become_a_json_object(payload: bytes, expected: dict[str, object]) -> None:
    """A valid object is kept as is; anything else is kept visibly under `_bemi_invalid_context`."""
    assert json.loads(context_json(payload)) == expected


@given(st.binary(max_size=200))
def test_any_payload_gives_storable_json_object(payload: bytes) -> None:
    """Whatever the payload, the result is a JSON object without NUL characters (storable as jsonb)."""
    value = json.loads(context_json(payload))
    assert isinstance(value, dict)
    assert not any("\x00" in str(item) for item in [*value, *value.values()])


@pytest.mark.parametrize("threshold", [1, 3, 1000])
def test_buffer_keeps_order_and_segments_whether_it_spills_or_not(threshold: int) -> None:
    """Changes come back in WAL order, each segment with its stitched context, spilled to disk or not."""
    buffer = TransactionBuffer(spill_threshold=threshold)
    for ordinal in range(1, 6):
        buffer.append(change(ordinal))
    buffer.add_context('{"first":true}')
    for ordinal in range(6, 8):
        buffer.append(change(ordinal))
    buffer.add_context('{"second":true}')
    buffer.add_context('{"third":true}')
    buffer.append(change(8))
    got = [(context, [c[-1] for c in chunk]) for context, chunks in buffer.segments() for chunk in chunks if chunk]
    flattened = [(context, ordinal) for context, ordinals in got for ordinal in ordinals]
    assert flattened == [
        *[('{"first":true}', n) for n in range(1, 6)],
        *[('{"second":true}', n) for n in (6, 7)],
        ('{"third":true}', 8),
    ]
    assert buffer.spilled is (threshold < 8)
    assert buffer.count == 8
    buffer.close()
