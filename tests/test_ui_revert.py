"""Reverting from the change browser (`bemi_asgi.ui.revert`) through httpx: real writes through the bemi pool,
captured by the real worker, reverted through the pages, and the revert captured in its turn."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import httpx
import pytest
from starlette.requests import Request

import bemi_asgi
from bemi_asgi import Bemi, Change, bemi_context
from bemi_asgi.ui import BemiUI, allow_all, bemi_ui
from bemi_asgi.ui.csrf import COOKIE
from bemi_asgi.worker.pipeline import Worker

from .worker_support import prepare_source

ORIGIN = "http://test"
TABLES = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, tenant_id int NOT NULL);"


@dataclass
class Shop:
    pool: asyncpg.Pool
    bemi: Bemi

    async def write(self, statement: str, **context: Any) -> None:
        """One tracked write, waited for until the worker stored it."""
        with bemi_context(context):
            async with self.pool.acquire() as conn:
                await conn.execute(statement)
                lsn = await bemi_asgi.current_lsn(conn)
        await self.bemi.wait_for(lsn, timeout=60)

    async def name(self, key: int) -> str | None:
        name: str | None = await self.pool.fetchval("SELECT name FROM items WHERE id = $1", key)
        return name

    async def last(self, key: int) -> Change:
        return (await self.bemi.history("items", key))[-1]


@pytest.fixture
async def shop(database: str) -> AsyncIterator[Shop]:
    prepare_source(database, TABLES, ["items"])
    worker = Worker(database, status_interval=1.0)
    task = asyncio.create_task(worker.run())
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=3)
    shop = Shop(pool, Bemi(pool))
    try:
        await shop.write("INSERT INTO items VALUES (1, 'pen', 1)", user="alice", tenant_id=1)
        await shop.write("INSERT INTO items VALUES (2, 'cup', 2)", user="bob", tenant_id=2)
        await shop.write("DELETE FROM items WHERE id = 1", user="mallory", tenant_id=1, request_id="r-bad")
        yield shop
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await pool.close()


def reverter(request: Request) -> dict[str, str] | bool:
    """x-user ann may revert (and is named in the revert's context); anyone else may not."""
    return {"reverted_by": "ann"} if request.headers.get("x-user") == "ann" else False


def tenant_scope(request: Request) -> dict[str, int]:
    return {"tenant_id": int(request.headers.get("x-tenant", "1"))}


def ui_for(shop: Shop, **options: Any) -> BemiUI:
    options.setdefault("authorize", allow_all)
    return bemi_ui(shop.bemi, **options)


def client_for(app: BemiUI, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN, headers=headers)


def revert_link(page: str) -> str:
    found = re.search(r'<a class="undo"[^>]* href="([^"]+)"', page)
    assert found is not None, "no revert link on the page"
    return html.unescape(found.group(1))


def form_fields(page: str) -> dict[str, str]:
    form = re.search(r'<form method="post"[^>]*id="apply">(.*?)</form>', page, re.DOTALL)
    assert form is not None, "no apply form on the page"
    return {
        html.unescape(name): html.unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(1))
    }


async def open_plan(client: httpx.AsyncClient, shop: Shop, key: int) -> tuple[httpx.Response, dict[str, str]]:
    """Open the row page, follow the newest change's revert link; the plan page and its form's fields."""
    row = await client.get("/row", params={"table": "items", "key": str(key)})
    assert row.status_code == 200
    plan = await client.get(revert_link(row.text))
    return plan, form_fields(plan.text) if plan.status_code == 200 else {}


async def test_a_permitted_user_sees_the_plan_then_applies_it_and_the_revert_is_tracked(shop: Shop) -> None:
    """The plan shows the INSERT that brings the deleted row back and writes nothing; applying it restores the row,
    and the worker stores the revert with its own context: the scope, who reverted, and what was reverted."""
    app = ui_for(shop, scope=tenant_scope, authorize_revert=reverter, secret="the revert tests' secret, no. 1")
    async with client_for(app, **{"x-user": "ann", "x-tenant": "1"}) as client:
        plan, fields = await open_plan(client, shop, 1)
        assert plan.status_code == 200
        assert 'data-outcome="plan"' in plan.text
        assert 'INSERT INTO "public"."items"' in html.unescape(plan.text)
        assert "SameSite=Strict" in plan.headers["set-cookie"]
        assert "HttpOnly" in plan.headers["set-cookie"]
        assert await shop.name(1) is None  # a plan writes nothing
        applied = await client.post("/revert", data=fields, headers={"origin": ORIGIN})
    assert applied.status_code == 200, applied.text
    assert 'data-outcome="applied"' in applied.text
    assert await shop.name(1) == "pen"
    revert = await shop.last(1)  # the applied page waits for the worker to store it
    assert revert.operation == "CREATE"
    assert revert.context["tenant_id"] == 1
    assert revert.context["reverted_by"] == "ann"
    assert revert.context["bemi_revert"]["via"] == "change browser"
    assert revert.context["bemi_revert"]["changes"] == 1
    deleted = (await shop.bemi.history("items", 1))[1]
    # Under a scope, the references the visitor used: no stored change or transaction id.
    assert set(revert.context["bemi_revert"]) == {"via", "change", "transaction", "schema", "table", "key", "changes"}
    assert revert.context["bemi_revert"]["change"] == app.refs.change(deleted) != str(deleted.id)


async def test_without_authorize_revert_nobody_sees_a_revert_button_or_may_post(shop: Shop) -> None:
    """authorize_revert defaults to nobody: no revert link on any page, and both the plan and a POST are refused."""
    deleted = await shop.last(1)
    target = {
        "change": str(deleted.id),
        "transaction": str(deleted.transaction_id),
        "table": "items",
        "schema": "public",
        "key": "1",
    }
    for app in (ui_for(shop), ui_for(shop, authorize_revert=reverter)):
        async with client_for(app, **{"x-user": "mallory"}) as client:
            row = await client.get("/row", params={"table": "items", "key": "1"})
            request = await client.get("/request", params={"id": "r-bad"})
            plan = await client.get("/revert", params=target)
            posted = await client.post("/revert", data={**target, "token": "x"}, headers={"origin": ORIGIN})
        assert 'class="undo"' not in row.text
        assert 'class="undo"' not in request.text
        assert plan.status_code == 403
        assert posted.status_code == 403
        assert "You may not revert changes." in posted.text
    assert await shop.name(1) is None


async def test_cross_site_and_forged_posts_are_refused(shop: Shop) -> None:
    """A POST from another origin, with no origin at all, without the session cookie, with another session's
    token or with a token for another revert is refused (403) and changes nothing."""
    app = ui_for(shop, authorize_revert=reverter)
    async with client_for(app, **{"x-user": "ann"}) as client:
        plan, fields = await open_plan(client, shop, 1)
        cookie = client.cookies[COOKIE]
        other_target = {**fields, "key": "2"}
        attempts = [
            ({"origin": "https://evil.example"}, fields, "another site"),
            ({"origin": ORIGIN, "sec-fetch-site": "cross-site"}, fields, "cross-site"),
            ({}, fields, "does not say which site"),
            ({"origin": ORIGIN}, {**fields, "token": fields["token"][:-2] + "AA"}, "token does not match"),
            ({"origin": ORIGIN}, other_target, "token does not match"),
        ]
        answers = [
            (await client.post("/revert", data=data, headers=headers), words) for headers, data, words in attempts
        ]
        client.cookies.clear()
        answers.append((await client.post("/revert", data=fields, headers={"origin": ORIGIN}), "cookie is missing"))
        client.cookies.set(COOKIE, "A" * 43)  # another session: the token was not made for it
        answers.append((await client.post("/revert", data=fields, headers={"origin": ORIGIN}), "token does not match"))
        client.cookies.set(COOKIE, cookie)
        referer = await client.post("/revert", data=fields, headers={"referer": ORIGIN + "/row?table=items"})
    for answer, words in answers:
        assert answer.status_code == 403, words
        assert words in html.unescape(answer.text), words
        assert 'data-outcome="refused"' in answer.text
    assert plan.status_code == 200
    assert referer.status_code == 200  # a same-origin Referer stands in for a missing Origin
    assert await shop.name(1) == "pen"


async def test_a_row_changed_since_is_a_conflict_until_the_user_says_undo_it_too(shop: Shop) -> None:
    """Reverting a change that a later change followed shows the conflict in the plan; without `force` the POST
    answers 409 and writes nothing; with it the row goes back to before the reverted change."""
    await shop.write("UPDATE items SET name = 'mug' WHERE id = 2", user="bob", tenant_id=2)
    await shop.write("UPDATE items SET name = 'jar' WHERE id = 2", user="carol", tenant_id=2)
    app = ui_for(shop, authorize_revert=reverter)
    async with client_for(app, **{"x-user": "ann"}) as client:
        row = await client.get("/row", params={"table": "items", "key": "2"})
        links = [html.unescape(href) for href in re.findall(r'<a class="undo"[^>]* href="([^"]+)"', row.text)]
        plan = await client.get(links[1])  # newest first: the rename to mug
        fields = form_fields(plan.text)
        refused = await client.post("/revert", data=fields, headers={"origin": ORIGIN})
        assert await shop.name(2) == "jar"
        forced = await client.post(
            "/revert", data={**form_fields(refused.text), "force": "yes"}, headers={"origin": ORIGIN}
        )
    assert 'id="conflicts"' in plan.text
    assert 'name="force"' in plan.text
    assert refused.status_code == 409
    assert 'data-outcome="conflict"' in refused.text
    assert "changed again" in refused.text
    assert forced.status_code == 200
    assert await shop.name(2) == "cup"


async def test_under_a_scope_only_in_scope_changes_can_be_reverted(shop: Shop) -> None:
    """A tenant cannot open or apply a revert of another tenant's change, even by its exact references, and
    reverting a request undoes only what is in the tenant's scope."""
    other = await shop.last(2)
    app = ui_for(shop, scope=tenant_scope, authorize_revert=reverter)
    async with client_for(app, **{"x-user": "bob", "x-tenant": "2"}) as client:  # bob may read tenant 2 only
        bob_row = await client.get("/row", params={"table": "items", "key": "2"})
    async with client_for(app, **{"x-user": "ann", "x-tenant": "1"}) as client:
        own = revert_link((await client.get("/row", params={"table": "items", "key": "1"})).text)
        foreign = dict(parse_qsl(urlsplit(own).query))
        foreign.update(key="2")  # tenant 1's references, another tenant's row
        refused = await client.get("/revert", params=foreign)
        by_plain_ids = await client.get(
            "/revert", params={"transaction": str(other.transaction_id)}
        )  # stored ids are no references under a scope
        request = await client.get("/request", params={"id": "r-bad"})
        plan = await client.get(revert_link(request.text))
    assert bob_row.status_code == 200
    assert refused.status_code == 404
    assert by_plain_ids.status_code == 404
    assert plan.status_code == 200
    assert html.unescape(plan.text).count('INSERT INTO "public"."items"') == 1
    assert await shop.name(2) == "cup"
