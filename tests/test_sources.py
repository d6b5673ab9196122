"""Many sources, one history: what the query helpers and the change browser make of several source streams in one
`bemi.changes` (the capture side is proved in `tests/test_multi_source.py`).

Two streams written here share their commit LSNs and ordinals, as the two shards of one database do."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from bemi_asgi import QueryError
from bemi_asgi.ui import bemi_ui

from ._change_writer import ChangeWriter, Row, changes_env


async def write_two_sources(env: Any) -> tuple[int, int]:
    """Three transactions from each of two databases, `app` and `billing`, at the same positions; their streams."""
    app = ChangeWriter(env.conn, slot="bemi", database="app")
    billing = ChangeWriter(env.conn, slot="bemi", database="billing")
    for n in range(3):
        for writer, who in ((app, "alice"), (billing, "bob")):
            await writer.commit(
                [Row("CREATE" if n == 0 else "UPDATE", "items", 1, after={"id": 1, "n": n, "from": writer.database})],
                context={"user": who},
            )
    streams = await env.bemi.streams()
    return streams[0].id, streams[1].id


async def test_pages_cover_every_stream_once_in_both_orders(database: str) -> None:
    """Keyset pages of one change each walk every change of both streams exactly once, ascending and descending,
    although the streams store the same commit LSNs and ordinals."""
    async with changes_env(database) as env:
        await write_two_sources(env)
        everything = {change.id for change in await env.bemi.changes.find(limit=100)}
        assert len(everything) == 6
        for order in ("asc", "desc"):
            seen: list[int] = []
            cursor = None
            while True:
                page = await env.bemi.changes.find(limit=1, order=order, cursor=cursor)
                seen += [change.id for change in page]
                cursor = page.next_cursor
                if cursor is None:
                    break
            assert sorted(seen) == sorted(everything), order
            assert len(seen) == len(everything), order


async def test_database_and_stream_filters_name_one_source(database: str) -> None:
    """`database=` and `stream=` keep one source's changes; row helpers given `database=` see that source's row
    alone; `streams()` lists both sources; a stream that is not an int is refused."""
    async with changes_env(database) as env:
        app_stream, billing_stream = await write_two_sources(env)
        assert [(s.database, s.slot_name) for s in await env.bemi.streams()] == [("app", "bemi"), ("billing", "bemi")]
        by_database = await env.bemi.changes.find(limit=100, database="billing")
        by_stream = await env.bemi.changes.find(limit=100, stream=billing_stream)
        assert [c.id for c in by_database] == [c.id for c in by_stream]
        assert {(c.database, c.stream, c.context["user"]) for c in by_database} == {("billing", billing_stream, "bob")}
        assert await env.bemi.changes.count(stream=app_stream) == 3
        history = await env.bemi.history("items", 1, database="app")
        assert [change.after["from"] for change in history] == ["app"] * 3
        assert await env.bemi.as_of("items", 1, at=history[-1].commit_lsn, database="billing") == {
            "id": 1, "n": 2, "from": "billing"
        }  # fmt: skip
        with pytest.raises(QueryError, match="stream must be a stream id"):
            await env.bemi.changes.find(stream="1")  # type: ignore[typeddict-item]


async def test_the_change_browser_filters_by_database(database: str) -> None:
    """The timeline's `database` field shows exactly the changes `find(database=...)` returns."""
    async with changes_env(database) as env:
        await write_two_sources(env)
        app = bemi_ui(env.bemi, authorize=lambda request: True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            response = await client.get("/", params={"database": "app"})
        assert response.status_code == 200
        shown = [int(found) for found in re.findall(r'<tr id="c(\d+)"', response.text)]
        assert shown == [change.id for change in await env.bemi.changes.find(limit=100, database="app")]
        assert len(shown) == 3
