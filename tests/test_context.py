"""bemi_context, get_context and the validation of what a context may hold."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from bemi_asgi import BemiContextError, bemi_context, configure_context, get_context
from bemi_asgi.capture.context import DEFAULT_MAX_CONTEXT_BYTES, current, validate


def test_no_context_by_default() -> None:
    """Outside any scope the context is None."""
    assert get_context() is None


def test_with_block_sets_and_restores() -> None:
    """A with block sets the context for its body and removes it afterwards."""
    with bemi_context(user_id=1, job="import") as values:
        assert values == {"user_id": 1, "job": "import"}
        assert get_context() == {"user_id": 1, "job": "import"}
    assert get_context() is None


def test_mapping_and_keywords_merge_keywords_winning() -> None:
    """A positional mapping and keyword values combine, keywords overriding the mapping."""
    with bemi_context({"a": 1, "b": 2}, b=3):
        assert get_context() == {"a": 1, "b": 3}


def test_nesting_merges_inner_keys_win_and_restores_outer() -> None:
    """Nested scopes merge with the outer one, inner keys win, and the outer context returns on exit."""
    with bemi_context(user_id=1, endpoint="/a"):
        with bemi_context(user_id=2, job="resize"):
            assert get_context() == {"user_id": 2, "endpoint": "/a", "job": "resize"}
        assert get_context() == {"user_id": 1, "endpoint": "/a"}


def test_restored_when_the_body_raises() -> None:
    """An exception leaving the block still restores the previous context."""
    with pytest.raises(RuntimeError), bemi_context(user_id=1):
        raise RuntimeError("boom")
    assert get_context() is None


def test_changing_the_returned_mapping_does_not_change_the_context() -> None:
    """get_context returns a copy: editing it leaves the active context (and its JSON) as it was."""
    with bemi_context(user_id=1):
        ctx = get_context()
        assert ctx is not None
        ctx["user_id"] = 2
        assert get_context() == {"user_id": 1}
        data = current()
        assert data is not None
        assert data.json == '{"user_id":1}'


def test_caller_mutation_after_entry_does_not_leak_in() -> None:
    """Changing the caller's dict after entering does not change the active context."""
    values = {"user_id": 1}
    with bemi_context(values):
        values["user_id"] = 2
        assert get_context() == {"user_id": 1}


def test_json_text_kept_alongside() -> None:
    """The validated context carries its compact JSON, which parses back to the same mapping."""
    with bemi_context(user={"id": 7, "roles": ["admin", "ops"]}, note='héllo "quoted" \\ 🎉'):
        data = current()
        assert data is not None
        assert json.loads(data.json) == dict(data.values)
        assert data.json == json.dumps(dict(data.values), separators=(",", ":"), ensure_ascii=False)


def test_decorates_sync_function() -> None:
    """As a decorator of a sync function, the context holds during each call only."""

    @bemi_context(job="sync")
    def work(x: int) -> tuple[int, Any]:
        return x * 2, get_context()

    assert work(21) == (42, {"job": "sync"})
    assert get_context() is None


async def test_decorates_async_function() -> None:
    """As a decorator of a coroutine function, the context holds while the coroutine runs."""

    @bemi_context(job="async")
    async def work() -> Any:
        await asyncio.sleep(0)
        return get_context()

    assert await work() == {"job": "async"}
    assert get_context() is None


async def test_decorator_is_reentrant_across_concurrent_calls() -> None:
    """One decorated coroutine function called concurrently keeps each call's context intact."""

    @bemi_context(job="fanout")
    async def work(i: int) -> Any:
        with bemi_context(item=i):
            await asyncio.sleep(0.001 * (i % 3))
            return get_context()

    results = await asyncio.gather(*(work(i) for i in range(50)))
    assert results == [{"job": "fanout", "item": i} for i in range(50)]


def test_decorating_a_generator_is_refused() -> None:
    """Decorating a generator function raises TypeError, since its body would run outside the scope."""

    def gen() -> Any:
        yield get_context()

    with pytest.raises(TypeError, match="generator"):
        bemi_context(job="x")(gen)


async def test_tasks_inherit_the_context() -> None:
    """An asyncio task created inside a scope sees the scope's context, even after the scope ends."""
    with bemi_context(request_id="r1"):
        seen = asyncio.create_task(_later_context())
    assert await seen == {"request_id": "r1"}
    assert get_context() is None


async def _later_context() -> Any:
    await asyncio.sleep(0.01)
    return get_context()


def test_threads_do_not_share_the_context() -> None:
    """A thread started outside any scope does not see another thread's context."""
    seen: list[Any] = []
    with bemi_context(user_id=1):
        thread = threading.Thread(target=lambda: seen.append(get_context()))
        thread.start()
        thread.join()
    assert seen == [None]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"user": object()}, "at 'user' is a object"),
        ({"nested": {"when": {1, 2}}}, "at 'nested.when' is a set"),
        ({"items": [1, b"raw"]}, "at 'items[1]' is a bytes"),
        ({"ratio": float("nan")}, "at 'ratio' is nan"),
        ({"ratio": float("inf")}, "at 'ratio' is inf"),
        ({"name": "a\x00b"}, "at 'name' contains a NUL"),
        ({"deep": {"name": ["x\x00"]}}, "at 'deep.name[0]' contains a NUL"),
        ({"text": "\ud800"}, "at 'text' is not valid Unicode"),
        ({"ids": {1: "a"}}, "int key 1 at 'ids'"),
        ({"a\x00b": 1}, "key 'a\\x00b' at the top level with a NUL"),
        ({"outer": {"\x00": 1}}, "key '\\x00' at 'outer' with a NUL"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(values: dict[str, Any], fragment: str) -> None:
    """A value that cannot be stored exactly raises BemiContextError naming where it is, and sets nothing."""
    with pytest.raises(BemiContextError, match="Bemi context") as info, bemi_context(values):
        pass
    assert fragment in str(info.value)
    assert get_context() is None


def test_top_level_non_mapping_is_refused() -> None:
    """bemi_context refuses a positional argument that is not a mapping."""
    with pytest.raises(BemiContextError, match="mapping"):
        bemi_context(["user", 1])  # type: ignore[arg-type]


def test_escaped_nul_text_is_accepted() -> None:
    """A string holding a backslash and 'u0000' is ordinary text and is accepted as is."""
    with bemi_context(note="\\u0000"):
        assert get_context() == {"note": "\\u0000"}


def test_size_limit_holds_and_is_configurable() -> None:
    """A context over the size limit is refused with the limit in the message; raising the limit accepts it."""
    big = "x" * DEFAULT_MAX_CONTEXT_BYTES
    with pytest.raises(BemiContextError, match=f"over the limit of {DEFAULT_MAX_CONTEXT_BYTES}"), bemi_context(big=big):
        pass
    configure_context(max_bytes=DEFAULT_MAX_CONTEXT_BYTES * 2)
    try:
        with bemi_context(big=big):
            assert get_context() == {"big": big}
    finally:
        configure_context(max_bytes=DEFAULT_MAX_CONTEXT_BYTES)


def test_size_limit_counts_utf8_bytes() -> None:
    """The limit counts bytes of UTF-8, so multi-byte characters weigh what they cost in the WAL."""
    configure_context(max_bytes=64)
    try:
        with bemi_context(s="é" * 20):  # 40 bytes of UTF-8 + 8 of JSON: fits
            pass
        with pytest.raises(BemiContextError, match="over the limit of 64"), bemi_context(s="é" * 40):
            pass
    finally:
        configure_context(max_bytes=DEFAULT_MAX_CONTEXT_BYTES)


def test_configure_rejects_a_nonsense_limit() -> None:
    """A limit too small to hold even an empty object is refused."""
    with pytest.raises(ValueError, match="at least 2"):
        configure_context(max_bytes=1)


async def test_one_instance_in_two_overlapping_tasks() -> None:
    """One bemi_context instance entered by two tasks whose scopes overlap: each task sees and restores its own."""
    job = bemi_context(job="nightly")
    entered = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        with bemi_context(task=1), job:
            entered.set()
            await release.wait()
            assert get_context() == {"task": 1, "job": "nightly"}
        assert get_context() is None

    async def second() -> None:
        await entered.wait()
        with bemi_context(task=2), job:
            release.set()
            await asyncio.sleep(0)
            assert get_context() == {"task": 2, "job": "nightly"}
        assert get_context() is None

    await asyncio.gather(asyncio.create_task(first()), asyncio.create_task(second()))
    with job, job:  # nested in one task too
        assert get_context() == {"job": "nightly"}
    assert get_context() is None


@pytest.mark.parametrize(
    "values",
    [
        {"user_id": 1},
        {"user_id": True},
        {"user_id": 1.0},
        {"user_id": "1"},
        {"user_id": 0},
        {"user_id": False},
        {"user_id": -0.0},
        {"user_id": 0.0},
        {"user_id": None},
        {"user_id": [1]},
        {"user_id": (1,)},
        {"user_id": {"id": 1}},
    ],
)
def test_equal_contexts_of_other_types_keep_their_own_json(values: dict[str, Any]) -> None:
    """Contexts whose values compare equal across types (1, True, 1.0; 0, False, -0.0) each keep their own JSON,
    whichever of them was validated first: validated contexts are reused only when they give the same text."""
    for earlier in ({"user_id": 1}, {"user_id": 0}, {"user_id": True}, {"user_id": 0.0}, {"user_id": "1"}):
        validate(earlier)
        assert validate(values).json == json.dumps(values, separators=(",", ":"))
        assert validate(dict(values)).values == values


def test_an_equal_flat_context_is_validated_once() -> None:
    """A flat context equal to one validated before (a callback's new dict each request) is the same object."""
    first = validate({"user_id": 42, "endpoint": "/orders", "admin": False, "tenant": None})
    again = validate({"user_id": 42, "endpoint": "/orders", "admin": False, "tenant": None})
    assert again is first
    assert validate({"endpoint": "/orders", "user_id": 42, "admin": False, "tenant": None}).json != first.json


def test_a_lowered_size_limit_applies_to_contexts_validated_before() -> None:
    """Lowering the size limit refuses a context that was accepted, and validated, under the old limit."""
    values = {"note": "x" * 100}
    validate(values)
    configure_context(max_bytes=50)
    try:
        with pytest.raises(BemiContextError, match="over the limit of 50"):
            validate(dict(values))
    finally:
        configure_context(max_bytes=DEFAULT_MAX_CONTEXT_BYTES)
