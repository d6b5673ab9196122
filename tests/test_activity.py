"""The overview: `history.activity` counts on real stored changes, and the change browser's /overview page."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from bemi_asgi.history.activity import MAX_BUCKETS, activity, bucket_for
from bemi_asgi.history.filters import FilterArgs
from bemi_asgi.ui import allow_all, bemi_ui

from ._change_writer import ChangesEnv as Env
from ._change_writer import changes_env
from .test_ui import HOSTILE, T0, client_for, tenant_ui, write_story

PERIOD = {
    "since": T0.replace(tzinfo=None).isoformat(),
    "until": (T0 + timedelta(minutes=10)).replace(tzinfo=None).isoformat(),
}


@pytest.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with changes_env(database, pool_size=3) as env:
        await write_story(env.writer)
        yield env


@pytest.mark.parametrize(
    ("span", "width"),
    [
        (timedelta(hours=1), timedelta(minutes=1)),
        (timedelta(days=1), timedelta(minutes=15)),
        (timedelta(days=7), timedelta(hours=3)),
        (timedelta(days=30), timedelta(days=1)),
        (timedelta(days=5000), timedelta(days=30)),
    ],
)
def test_bucket_is_the_narrowest_that_fits(span: timedelta, width: timedelta) -> None:
    """A period is cut into the narrowest buckets that keep the chart within MAX_BUCKETS bars."""
    assert bucket_for(T0, T0 + span) == width
    assert span / width <= MAX_BUCKETS or width == timedelta(days=30)


async def test_counts_match_count_per_table_and_operation(env: Env) -> None:
    """Per table and operation, the overview's counts are what bemi.changes.count says for the same period, and
    the top users are counted from the changes' contexts."""
    until = T0 + timedelta(minutes=10)
    counted = await activity(env.bemi.store, FilterArgs(), since=T0, until=until, keys=["user", "endpoint"])
    per_table: dict[tuple[str, str], int] = {}
    for (start, _schema, table, operation), changes in counted.counts.items():
        assert T0 <= start < until
        per_table[(table, operation)] = per_table.get((table, operation), 0) + changes
    expected = {}
    for table in ("items", "notes"):
        for operation in ("CREATE", "UPDATE", "DELETE"):
            total = await env.bemi.changes.count(table=table, operation=operation, since=T0, until=until)
            if total:
                expected[(table, operation)] = total
    assert per_table == expected
    assert counted.total == await env.bemi.changes.count(since=T0, until=until)
    users = {item.value: item.changes for item in counted.top["user"]}
    assert users == {
        '"bob"': await env.bemi.changes.count(context={"user": "bob"}),
        '"alice"': await env.bemi.changes.count(context={"user": "alice"}),
        f'"{HOSTILE}"': 1,
    }
    assert [item.value for item in counted.top["endpoint"]] == ['"PATCH /items/1"', '"POST /items"']
    assert counted.counted_since is None


async def test_a_period_with_more_changes_than_counted_says_so(env: Env) -> None:
    """Past `limit` changes, the latest are counted and counted_since says from when."""
    until = T0 + timedelta(minutes=10)
    counted = await activity(env.bemi.store, FilterArgs(), since=T0, until=until, keys=["user"], limit=3)
    latest = await env.bemi.changes.find(limit=3)
    assert counted.total == 3
    assert counted.counted_since == min(change.committed_at for change in latest)


async def test_overview_page_draws_the_chart_table_and_top_users(env: Env) -> None:
    """The page's SVG bars add up to the period's changes per operation, the per-table rows hold the counts, and
    the top users link to the timeline filtered by them."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        response = await client.get("/overview", params=PERIOD)
    assert response.status_code == 200
    page = response.text
    bars = re.findall(r'<rect class="bar op-(\w+)"[^>]*data-changes="(\d+)"', page)
    per_operation: dict[str, int] = {}
    for operation, changes in bars:
        per_operation[operation] = per_operation.get(operation, 0) + int(changes)
    assert per_operation == {"CREATE": 3, "UPDATE": 3, "DELETE": 1}
    assert "<script" not in page.split("<main>")[1].split("</main>")[0].replace("&lt;script", "")
    assert "&lt;script&gt;alert" in page  # the hostile user name is shown as text
    totals = dict(re.findall(r">(items|notes)</a></td>.*?<b>([\d,]+)</b>", page, re.DOTALL))
    assert totals == {"items": "6", "notes": "1"}
    assert re.search(r'href="/\?since=[^"]*&amp;c\.user=bob"', page)  # the timeline, same period, that user
    assert 'id="capped"' not in page


async def test_overview_under_a_scope_counts_only_that_tenant(env: Env) -> None:
    """A tenant's overview counts its own changes only, and another tenant's users never appear."""
    app = tenant_ui(env)
    async with client_for(app) as client:
        response = await client.get("/overview", params=PERIOD, headers={"x-user": "ann", "x-tenant": "1"})
        contradicting = await client.get(
            "/overview", params={**PERIOD, "c.tenant_id": "2"}, headers={"x-user": "ann", "x-tenant": "1"}
        )
    bars = [int(n) for n in re.findall(r'<rect class="bar op-\w+"[^>]*data-changes="(\d+)"', response.text)]
    assert sum(bars) == await env.bemi.changes.count(context={"tenant_id": 1})
    assert "alert" not in response.text
    assert "mug" not in response.text
    assert "notes" not in response.text
    assert re.findall(r'<rect class="bar op-\w+"', contradicting.text) == []
    assert 'id="empty"' in contradicting.text


async def test_overview_refuses_an_empty_or_backwards_period(env: Env) -> None:
    """since= at or after until= is a 400 with the reason."""
    params: dict[str, Any] = {"since": PERIOD["until"], "until": PERIOD["since"]}
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        response = await client.get("/overview", params=params)
    assert response.status_code == 400
    assert "since= must be before until=" in response.text
