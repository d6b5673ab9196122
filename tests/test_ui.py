"""The change browser (`bemi_asgi.ui`) through httpx against real changes stored in a real database."""

from __future__ import annotations

import asyncio
import html
import json
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import markupsafe
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import Mount

import bemi_asgi
from bemi_asgi import Bemi, bemi_context
from bemi_asgi.history.access import merge_scope
from bemi_asgi.history.filters import Cursor, encode_cursor
from bemi_asgi.ui import BemiUI, allow_all, bemi_ui
from bemi_asgi.ui import app as app_module
from bemi_asgi.ui.rows import escape_text
from bemi_asgi.ui.view import (
    context_value_text,
    format_time,
    json_text,
    moment_input,
    parse_context_value,
    parse_filters,
    parse_moment,
    query_string,
    time_texts,
)
from bemi_asgi.worker.pipeline import Worker

from ._change_writer import ChangesEnv as Env
from ._change_writer import ChangeWriter, Row, changes_env
from .worker_support import prepare_source

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOSTILE = "<script>alert('x')</script>"


@pytest.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with changes_env(database, pool_size=3) as env:
        await write_story(env.writer)
        yield env


async def write_story(w: ChangeWriter, xid_base: int = 500) -> None:
    """Two tenants' items: tenant 1 owns item 1 (alice, bob), tenant 2 item 2 and a note with hostile text. The
    transactions' ids are xid_base + 1, + 2, ..."""
    pen = {"id": 1, "name": "pen", "price": 3}
    await w.commit(
        [Row("CREATE", "items", 1, after=pen)],
        context={"user": "alice", "tenant_id": 1, "endpoint": "POST /items", "request_id": "r1"},
        committed_at=T0,
        transaction_id=xid_base + 1,
    )
    await w.commit(
        [Row("CREATE", "items", 2, after={"id": 2, "name": "cup", "price": 5})],
        context={"user": "bob", "tenant_id": 2, "request_id": "r2"},
        committed_at=T0 + timedelta(minutes=1),
        transaction_id=xid_base + 2,
    )
    await w.commit(
        [Row("UPDATE", "items", 1, before=pen, after={**pen, "name": "ink pen"})],
        context={"user": "bob", "tenant_id": 1, "request_id": "r3"},
        committed_at=T0 + timedelta(minutes=2),
        transaction_id=xid_base + 3,
    )
    await w.commit(
        [Row("UPDATE", "items", 1, before={**pen, "name": "ink pen"}, after={**pen, "name": "ink pen", "price": 4})],
        context={"user": "alice", "tenant_id": 1, "endpoint": "PATCH /items/1", "request_id": "r3"},
        committed_at=T0 + timedelta(minutes=3),
        transaction_id=xid_base + 4,
    )
    await w.commit(
        [
            Row(
                "UPDATE",
                "items",
                2,
                before={"id": 2, "name": "cup", "price": 5},
                after={"id": 2, "name": "mug", "price": 5},
            ),
            Row("CREATE", "notes", 1, after={"id": 1, "body": HOSTILE}),
        ],
        context={"user": "bob", "tenant_id": 2, "request_id": "r5"},
        committed_at=T0 + timedelta(minutes=4),
        transaction_id=xid_base + 5,
    )
    await w.commit(
        [Row("DELETE", "items", 2, before={"id": 2, "name": "mug", "price": 5})],
        context={"user": HOSTILE, "tenant_id": 2},
        committed_at=T0 + timedelta(minutes=5),
        transaction_id=xid_base + 6,
    )


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def row_ids(page: str, app: BemiUI | None = None) -> list[int | None]:
    """The change ids of the timeline rows, in page order (read back through `app`'s references when given)."""
    return [read_change(found, app) for found in re.findall(r'<tr id="c([^"]+)"', page)]


def section_ids(page: str, app: BemiUI | None = None) -> list[int | None]:
    """The change ids of the sections of a row, transaction or request page, in page order."""
    return [read_change(found, app) for found in re.findall(r'<section class="step[^"]*" id="c([^"]+)"', page)]


def read_change(ref: str, app: BemiUI | None) -> int | None:
    return int(ref) if app is None else app.refs.change_id(ref)


def without_nonces(page: str) -> str:
    """The page without its random CSP nonces, which may contain any short text ("r2", "cup", ...)."""
    return re.sub(r'nonce="[^"]*"', 'nonce=""', page)


def older_link(page: str) -> str | None:
    found = re.search(r'<a id="older" href="([^"]+)"', page)
    return html.unescape(found.group(1)) if found else None


async def ids_of(env: Env, limit: int = 1000, **filters: Any) -> list[int]:
    return [change.id for change in await env.bemi.changes.find(limit=limit, **filters)]


def tenant_ui(env: Env, **options: Any) -> BemiUI:
    """The UI as a multi-tenant app mounts it: x-user signs in, x-tenant picks the tenant's scope."""

    async def authorize(request: Request) -> bool | None:
        user = request.headers.get("x-user")
        return None if user is None else user != "mallory"

    def scope(request: Request) -> dict[str, Any]:
        return {"tenant_id": int(request.headers["x-tenant"])}

    # A fixed secret: the sealed references on the pages are then the same on every run, so a check that a word
    # is absent from a page cannot fail now and then on a token that happens to contain it.
    options.setdefault("secret", "the tests' fixed secret, number 1")
    return bemi_ui(env.bemi, authorize=authorize, scope=scope, **options)


# Pages.


async def test_timeline_lists_every_change_newest_first(env: Env) -> None:
    """The timeline shows every change in newest-first commit order, the same order find() returns."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert row_ids(response.text) == await ids_of(env)
    assert "ink pen" in response.text
    assert 'href="/transaction/505"' in response.text


@pytest.mark.parametrize("page_size", [2, 50])
@pytest.mark.parametrize("tenant", [None, 1])
async def test_filter_form_suggests_the_tables_and_context_keys_in_scope(
    env: Env, page_size: int, tenant: int | None
) -> None:
    """The filter form offers the tables and context keys (but the scope's) of the latest in-scope changes, whether
    the first page holds them all (50 a page) or not (2 a page)."""
    scope = {} if tenant is None else {"tenant_id": tenant}
    if tenant is None:
        app = bemi_ui(env.bemi, authorize=allow_all, page_size=page_size)
    else:
        app = tenant_ui(env, page_size=page_size)
    async with client_for(app) as client:
        response = await client.get("/", headers={"x-user": "ann", "x-tenant": str(tenant)})
    in_scope = await env.bemi.changes.find(context=scope or None, limit=1000)
    datalist = re.search(r'<datalist id="bemi-tables">(.*?)</datalist>', response.text, re.S)
    assert datalist is not None
    assert re.findall(r'<option value="([^"]*)">', datalist.group(1)) == sorted({c.table for c in in_scope})
    keys = sorted({key for change in in_scope for key in change.context if key not in scope})
    assert re.findall(r'<input type="text" name="c\.([^"]*)"', response.text) == keys[:6]


async def test_timeline_filters_match_find(env: Env) -> None:
    """Table, operation, time range and context filters (named or the free key/value pair) narrow the timeline
    exactly as the same find() filters do."""
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"table": "notes"}, {"table": "notes"}),
        ({"op": ["DELETE", "CREATE"]}, {"operation": ["DELETE", "CREATE"]}),
        ({"c.user": "alice"}, {"context": {"user": "alice"}}),
        ({"ck": "endpoint", "cv": "PATCH /items/1"}, {"context": {"endpoint": "PATCH /items/1"}}),
        ({"c.tenant_id": "2", "table": "items"}, {"context": {"tenant_id": 2}, "table": "items"}),
        (
            {"since": "2025-03-01T12:01", "until": "2025-03-01T12:03:00.000"},
            {"since": T0 + timedelta(minutes=1), "until": T0 + timedelta(minutes=3)},
        ),
    ]
    everything = await ids_of(env)
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        for params, filters in cases:
            response = await client.get("/", params=params)
            assert response.status_code == 200, params
            expected = await ids_of(env, **filters)
            assert 0 < len(expected) < len(everything), filters
            assert row_ids(response.text) == expected, params


async def test_context_chips_link_to_their_filter(env: Env) -> None:
    """Each context value links to the timeline filtered by it, and following the link shows only its changes."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        page = (await client.get("/")).text
        href = html.unescape(re.search(r'<a class="chip" href="([^"]*c\.user=alice[^"]*)"', page).group(1))  # type: ignore[union-attr]
        filtered = await client.get(href)
    assert row_ids(filtered.text) == await ids_of(env, context={"user": "alice"})


async def test_keyset_pages_cover_the_timeline_once(env: Env) -> None:
    """Following the "older" links with two changes per page visits every change once, in order."""
    seen: list[int] = []
    pages = 0
    async with client_for(bemi_ui(env.bemi, authorize=allow_all, page_size=2)) as client:
        url: str | None = "/"
        while url is not None:
            response = await client.get(url)
            assert response.status_code == 200
            ids = row_ids(response.text)
            assert len(ids) <= 2
            seen.extend(ids)
            pages += 1
            url = older_link(response.text)
    assert seen == await ids_of(env)
    assert pages == 4  # 7 changes


async def test_row_page_shows_history_with_highlighted_differences(env: Env) -> None:
    """A row's page lists its changes newest first, marks the changed field with before and after values, and
    shows who made each change."""
    history = await env.bemi.history("items", 1)
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        response = await client.get("/row", params={"schema": "public", "table": "items", "key": "1"})
    assert response.status_code == 200
    page = response.text
    assert section_ids(page) == [change.id for change in reversed(history)]
    rename = page[page.index(f'id="c{history[1].id}"') : page.index(f'id="c{history[0].id}"')]
    assert re.search(
        r'<tr class="changed">\s*<td class="mark"[^>]*>~</td>\s*<td class="field">name</td>\s*'
        r'<td class="value before">&#34;pen&#34;</td>\s*<td class="value after">&#34;ink pen&#34;</td>',
        rename,
    )
    assert "user=</span>bob" in rename
    assert "1 unchanged field" not in rename
    assert "2 unchanged fields" in rename
    assert "in effect" in page[page.index(f'id="c{history[-1].id}"') :]


@pytest.mark.parametrize("history_limit", [app_module.HISTORY_LIMIT, 2])
async def test_row_state_as_of_a_moment_matches_bemi_as_of(
    env: Env, monkeypatch: pytest.MonkeyPatch, history_limit: int
) -> None:
    """The row page's state at a chosen moment is the state `Bemi.as_of` returns, including before creation and
    after deletion; taken from the history the page shows, or read apart when that history (cut to its latest
    changes) starts after the moment."""
    monkeypatch.setattr(app_module, "HISTORY_LIMIT", history_limit)
    moments = [T0 + timedelta(seconds=seconds) for seconds in (-60, 150, 240, 360)]
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        for key in (1, 2):
            for moment in moments:
                at = moment.replace(tzinfo=None).isoformat()
                response = await client.get("/row", params={"table": "items", "key": str(key), "at": at})
                assert response.status_code == 200
                expected = await env.bemi.as_of("items", key, moment)
                state = re.search(r'<table class="state" id="state">(.*?)</table>', response.text, re.S)
                if expected is None:
                    assert state is None
                    assert 'id="state-none"' in response.text
                else:
                    assert state is not None
                    shown = re.findall(r'<td class="field">([^<]*)</td><td class="value">([^<]*)</td>', state.group(1))
                    assert {name: json.loads(html.unescape(value)) for name, value in shown} == expected


async def test_transaction_and_request_pages_show_all_their_changes(env: Env) -> None:
    """The transaction page shows every change of that transaction; the request page every change whose context
    has that request id, across transactions."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        transaction = await client.get("/transaction/505")
        request = await client.get("/request", params={"id": "r3"})
        missing = await client.get("/transaction/999")
    assert transaction.status_code == request.status_code == 200
    assert section_ids(transaction.text) == await ids_of(env, transaction_id=505, order="asc")
    assert len(section_ids(transaction.text)) == 2
    assert section_ids(request.text) == await ids_of(env, context={"request_id": "r3"}, order="asc")
    assert len(section_ids(request.text)) == 2
    assert missing.status_code == 404


async def test_bad_input_is_a_400_that_says_what_was_wrong(env: Env) -> None:
    """A malformed time, an unknown operation, a forged cursor or an unknown table answer 400 with the reason."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        since = await client.get("/", params={"since": "yesterday"})
        operation = await client.get("/", params={"op": "MERGE"})
        cursor = await client.get("/", params={"cursor": "not-a-cursor"})
        table = await client.get("/", params={"table": "nosuch"})
        row = await client.get("/row", params={"table": "items"})
        at = await client.get("/row", params={"table": "items", "key": "1", "at": "soon"})
    assert [r.status_code for r in (since, operation, cursor, table, row, at)] == [400] * 6
    assert "since=&#39;yesterday&#39; is not a time" in since.text
    assert "MERGE" in operation.text
    assert "not a cursor returned by find()" in cursor.text
    assert "unknown table public.nosuch" in table.text
    assert "needs table=... and key=..." in row.text


async def test_values_postgresql_refuses_are_a_400_not_a_crash(env: Env) -> None:
    """A NUL character, a JSON \\u0000, an out-of-range transaction id or time answer 400 on every page."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        responses = [
            await client.get("/row", params={"table": "items", "key": "1\x00"}),
            await client.get("/", params={"c.user": '"\\u0000"'}),
            await client.get("/", params={"table": "items\x00"}),
            await client.get("/transaction/99999999999999999999"),
            await client.get("/request", params={"id": "\x00"}),
            await client.get("/row", params={"table": "items", "key": "1", "at": "9999-12-31T23:59:59.999999"}),
            await client.get("/stream", params={"c.user": "\x00"}),
        ]
    assert [r.status_code for r in responses] == [400] * len(responses)


async def test_pages_on_changes_stored_by_the_real_pipeline(database: str) -> None:
    """Writes through the bemi pool, captured by the worker, show on the timeline with their context; the row
    links work for a composite key, and a TRUNCATE ends the row on its page."""
    prepare_source(
        database,
        "CREATE TABLE items (id int PRIMARY KEY, name text);"
        "CREATE TABLE stock (region text, sku int, qty int, PRIMARY KEY (region, sku));",
        ["items", "stock"],
    )
    worker = Worker(database, status_interval=1.0)
    task = asyncio.create_task(worker.run())
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=2)
    bemi = Bemi(pool)

    async def write(statement: str, **context: Any) -> None:
        with bemi_context(context):
            async with pool.acquire() as conn:
                await conn.execute(statement)
                lsn = await bemi_asgi.current_lsn(conn)
        await bemi.wait_for(lsn, timeout=30)

    try:
        await write("INSERT INTO stock VALUES ('EU', 7, 3)", user="ann", request_id="q1")
        await write("UPDATE stock SET qty = 2 WHERE region = 'EU'", user="ben", request_id="q2")
        await write("INSERT INTO items VALUES (1, 'pen')", user="ann", request_id="q3")
        await write("TRUNCATE items", job="reset")
        async with client_for(bemi_ui(bemi, authorize=allow_all)) as client:
            timeline = await client.get("/")
            stock_href = html.unescape(re.search(r'href="(/row\?[^"]*table=stock[^"#]*)', timeline.text).group(1))  # type: ignore[union-attr]
            stock = await client.get(stock_href)
            item = await client.get("/row", params={"table": "items", "key": "1"})
            request = await client.get("/request", params={"id": "q2"})
        stored = [change.id for change in await bemi.changes.find()]
    finally:
        await pool.close()
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert len(stored) == 4
    assert row_ids(timeline.text) == stored
    assert "user=</span>ben" in timeline.text
    assert dict(parse_qsl(urlsplit(stock_href).query))["key"] == '["EU","7"]'
    assert stock.status_code == 200
    assert len(section_ids(stock.text)) == 2
    assert re.search(
        r'<td class="field">qty</td>\s*<td class="value before">3</td>\s*<td class="value after">2</td>', stock.text
    )
    assert item.status_code == 200
    assert "its table was truncated" in item.text
    assert "job=</span>reset" in item.text
    assert len(section_ids(request.text)) == 1


# Permissions.


async def test_authorize_decides_401_403_or_its_own_response(env: Env) -> None:
    """authorize returning None answers 401, False 403, a Response is sent as is, True shows the page; sync and
    async callbacks both work."""

    def sync_authorize(request: Request) -> Any:
        who = request.headers.get("x-user")
        if who == "anon":
            return None
        if who == "login":
            return RedirectResponse("/login", status_code=303)
        return who == "admin"

    async def async_authorize(request: Request) -> Any:
        await asyncio.sleep(0)
        return sync_authorize(request)

    for authorize in (sync_authorize, async_authorize):
        async with client_for(bemi_ui(env.bemi, authorize=authorize)) as client:
            statuses = {
                user: (await client.get("/", headers={"x-user": user})).status_code
                for user in ("anon", "mallory", "login", "admin")
            }
            unauthorized = await client.get("/row", params={"table": "items", "key": "1"}, headers={"x-user": "anon"})
            forbidden = await client.get("/transaction/501", headers={"x-user": "mallory"})
        assert statuses == {"anon": 401, "mallory": 403, "login": 303, "admin": 200}
        assert "ink pen" not in unauthorized.text
        assert unauthorized.status_code == 401
        assert "pen" not in forbidden.text
        assert forbidden.status_code == 403


async def test_authorize_with_another_answer_is_a_programming_error(env: Env) -> None:
    """An authorize callback that returns something other than True/False/None/Response raises TypeError."""
    app = bemi_ui(env.bemi, authorize=lambda request: "yes")  # type: ignore[arg-type,return-value]
    async with client_for(app) as client:
        with pytest.raises(TypeError, match="return True"):
            await client.get("/")


def test_mounting_without_authorize_says_how_to_opt_out(env: Env) -> None:
    """bemi_ui() without authorize raises TypeError naming the explicit escape hatch allow_all."""
    with pytest.raises(TypeError, match=r"authorize=bemi_asgi\.ui\.allow_all"):
        bemi_ui(env.bemi)
    with pytest.raises(TypeError, match="must be callable"):
        bemi_ui(env.bemi, authorize=True)  # type: ignore[arg-type]


def test_missing_jinja2_says_which_extra_to_install(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Jinja2 installed, bemi_ui() raises ImportError naming the `ui` extra."""
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ImportError, match=r"pip install 'bemi-asgi\[ui\]'"):
        bemi_ui(env.bemi, authorize=allow_all)


async def test_only_get_is_served(env: Env) -> None:
    """POST, PUT, PATCH and DELETE are refused with 405 and an Allow header, before authorization runs."""
    calls: list[str] = []

    def authorize(request: Request) -> bool:
        calls.append(request.method)
        return True

    async with client_for(bemi_ui(env.bemi, authorize=authorize)) as client:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            response = await client.request(method, "/row", params={"table": "items", "key": "1"})
            assert response.status_code == 405, method
            assert response.headers["allow"] == "GET, HEAD"
        head = await client.head("/")
    assert calls == ["HEAD"]
    assert head.status_code == 200


async def test_scope_narrows_every_page(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user scoped to tenant 1 never sees tenant 2's changes: not on the timeline (even filtering for tenant
    2), not on its row, transaction or request pages, not in an as-of state; tenant 2 sees only its own."""
    # A nonce made of the very words the test looks for: the check must not depend on what the random one holds.
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes=None: "r2-cup-mug-r5")
    tenant1 = {"x-user": "ann", "x-tenant": "1"}
    tenant2 = {"x-user": "ben", "x-tenant": "2"}
    app = tenant_ui(env)
    [other_tenants] = await env.bemi.changes.find(transaction_id=505, table="items")
    async with client_for(app) as client:
        timeline = await client.get("/", headers=tenant1)
        forced = await client.get("/", params={"c.tenant_id": "2"}, headers=tenant1)
        row2 = await client.get("/row", params={"table": "items", "key": "2"}, headers=tenant1)
        row2_at = await client.get(
            "/row", params={"table": "items", "key": "2", "at": "2025-03-01T12:04:30"}, headers=tenant1
        )
        transaction = await client.get(f"/transaction/{app.refs.transaction(other_tenants)}", headers=tenant1)
        request = await client.get("/request", params={"id": "r2"}, headers=tenant1)
        notes = await client.get("/", params={"table": "notes"}, headers=tenant1)
        own_row = await client.get("/row", params={"table": "items", "key": "1"}, headers=tenant1)
        other = await client.get("/", headers=tenant2)
    assert row_ids(timeline.text, app) == await ids_of(env, context={"tenant_id": 1})
    assert row_ids(other.text, app) == await ids_of(env, context={"tenant_id": 2})
    assert set(row_ids(timeline.text, app)).isdisjoint(row_ids(other.text, app))
    for response in (timeline, forced, row2, row2_at, transaction, request, notes, own_row):
        text = without_nonces(response.text)
        for leak in ("cup", "mug", "r5", "&lt;script&gt;", "tenant_id=</span>2</a>"):
            assert leak not in text, leak
        assert "r2" not in re.sub(r"<p class=\"notice\">.*?</p>", "", text, flags=re.S)
    assert 'value="notes"' not in timeline.text  # not even among the suggested tables
    assert row_ids(forced.text) == []
    assert row_ids(notes.text) == []
    assert [r.status_code for r in (row2, row2_at, transaction, request)] == [404] * 4
    assert own_row.status_code == 200
    assert "Scope: <code>tenant_id=1</code>" in timeline.text


async def test_row_page_under_a_scope_ignores_changes_outside_it(env: Env) -> None:
    """When another tenant changed a row, the scoped row page neither lists that change nor shows its effect in
    the as-of state."""
    await env.writer.commit(
        [
            Row(
                "UPDATE",
                "items",
                1,
                before={"id": 1, "name": "ink pen", "price": 4},
                after={"id": 1, "name": "SECRET", "price": 4},
            )
        ],
        context={"user": "eve", "tenant_id": 2},
        committed_at=T0 + timedelta(minutes=7),
    )
    headers = {"x-user": "ann", "x-tenant": "1"}
    app = tenant_ui(env)
    async with client_for(app) as client:
        latest = await client.get("/row", params={"table": "items", "key": "1"}, headers=headers)
        later = await client.get(
            "/row", params={"table": "items", "key": "1", "at": "2025-03-01T12:08:00"}, headers=headers
        )
    for response in (latest, later):
        assert response.status_code == 200
        assert "SECRET" not in response.text
        assert "eve" not in response.text
        assert len(section_ids(response.text, app)) == 3
        assert "&#34;ink pen&#34;" in response.text


async def test_scope_callback_answers(env: Env) -> None:
    """A scope of None refuses the request with 403; a non-mapping or non-JSON scope is a programming error."""
    answers: dict[str, Any] = {"none": None, "list": [("tenant_id", 1)], "object": {"tenant_id": object()}}

    def scope(request: Request) -> Any:
        return answers[request.headers["x-answer"]]

    async with client_for(bemi_ui(env.bemi, authorize=allow_all, scope=scope)) as client:
        refused = await client.get("/", headers={"x-answer": "none"})
        assert refused.status_code == 403
        assert "pen" not in refused.text
        with pytest.raises(TypeError, match="return a mapping"):
            await client.get("/", headers={"x-answer": "list"})
        with pytest.raises(TypeError, match="not JSON"):
            await client.get("/", headers={"x-answer": "object"})


# Escaping and headers.


async def test_hostile_values_are_escaped_everywhere(env: Env) -> None:
    """A `<script>` in a context value and in a row value is shown escaped on every page, never as markup."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        pages = [
            await client.get("/"),
            await client.get("/", params={"c.user": HOSTILE}),
            await client.get("/row", params={"table": "items", "key": "2"}),
            await client.get("/row", params={"table": "notes", "key": "1"}),
            await client.get("/transaction/506"),
            await client.get("/transaction/505"),
        ]
    for response in pages:
        assert response.status_code == 200
        assert "<script>alert" not in response.text
        assert "&lt;script&gt;alert(" in response.text
    assert row_ids(pages[1].text) == await ids_of(env, context={"user": HOSTILE})


async def test_pages_carry_a_nonce_content_security_policy(env: Env) -> None:
    """Every page forbids inline code except its own nonce'd style and script, and is not cached."""
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        response = await client.get("/")
    policy = response.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy).group(1)  # type: ignore[union-attr]
    assert f'<script nonce="{nonce}">' in response.text
    assert f'<style nonce="{nonce}">' in response.text
    assert "default-src 'none'" in policy
    assert response.headers["cache-control"] == "no-store"


async def test_links_work_when_mounted_under_a_prefix(env: Env) -> None:
    """Mounted at /bemi in a Starlette app, every link points below /bemi and following them works."""
    app = Starlette(routes=[Mount("/bemi", bemi_ui(env.bemi, authorize=allow_all))])
    async with client_for(app) as client:
        timeline = await client.get("/bemi/")
        links = {html.unescape(href) for href in re.findall(r'href="([^"#]+)', timeline.text)}
        assert links
        assert all(link.startswith("/bemi/") for link in links), links
        statuses = {link: (await client.get(link)).status_code for link in sorted(links)}
    assert set(statuses.values()) == {200}, statuses


# Live updates.


@dataclass
class RawStream:
    """A raw ASGI conversation with /stream: what the app sent, and a way to hang up."""

    task: asyncio.Task[None]
    sent: asyncio.Queue[dict[str, Any]]
    hang_up: Callable[[], Awaitable[None]]

    async def next_event(self) -> dict[str, Any]:
        """The next event's id and data (skipping comments and the retry hint)."""
        while True:
            message = await asyncio.wait_for(self.sent.get(), 30)
            body = message.get("body", b"").decode()
            if body.startswith("id: "):
                event_id, data = body.split("\n")[:2]
                return {"id": event_id[4:], **json.loads(data.removeprefix("data: "))}


_open_streams: list[RawStream] = []


@pytest.fixture(autouse=True)
async def _close_streams() -> AsyncIterator[None]:
    """Cancel a stream a failed test left open, before its database goes away."""
    yield
    while _open_streams:
        task = _open_streams.pop().task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def open_stream(app: BemiUI, query: str, headers: dict[str, str], spec_version: str = "2.4") -> RawStream:
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "http.request", "body": b"", "more_body": False})
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        return await incoming.get()

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.encode(), v.encode()) for k, v in {"host": "test", **headers}.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }

    async def hang_up() -> None:
        await incoming.put({"type": "http.disconnect"})

    stream = RawStream(asyncio.create_task(app(scope, receive, send)), sent, hang_up)
    _open_streams.append(stream)
    return stream


def stream_query(page: str) -> str:
    """The stream URL's query string from the timeline page."""
    src = html.unescape(re.search(r'data-src="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    return urlsplit(src).query


async def test_stream_sends_new_in_scope_changes_and_stops_on_disconnect(env: Env) -> None:
    """The timeline's live stream sends changes stored after the page was rendered, only those in the viewer's
    scope and filters, and ends when the client disconnects."""
    app = tenant_ui(env, poll_interval=0.05)
    headers = {"x-user": "ann", "x-tenant": "1"}
    async with client_for(app) as client:
        page = (await client.get("/", params={"table": "items"}, headers=headers)).text
    query = stream_query(page)
    assert dict(parse_qsl(query))["table"] == "items"
    stream = open_stream(app, query, headers)
    start = await asyncio.wait_for(stream.sent.get(), 30)
    assert start["status"] == 200
    assert dict(start["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert b"content-length" not in dict(start["headers"])
    await env.writer.commit(
        [Row("CREATE", "items", 3, after={"id": 3, "name": "OTHER-TENANT"})], context={"tenant_id": 2}
    )
    await env.writer.commit([Row("CREATE", "notes", 9, after={"id": 9, "body": "x"})], context={"tenant_id": 1})
    await env.writer.commit(
        [Row("CREATE", "items", 4, after={"id": 4, "name": "brush"})], context={"tenant_id": 1, "user": "ann"}
    )
    event = await stream.next_event()
    expected = await ids_of(env, context={"tenant_id": 1}, table="items", limit=1)
    assert row_ids(event["html"], app) == expected
    assert "brush" in event["html"]
    assert "OTHER-TENANT" not in event["html"]
    assert 'class="new"' in event["html"]
    await stream.hang_up()
    await asyncio.wait_for(stream.task, 30)
    assert stream.task.done()
    assert stream.task.exception() is None


async def test_an_idle_stream_ends_as_soon_as_the_client_disconnects(env: Env) -> None:
    """Between polls (here a minute apart) a stream still notices the client leaving, and ends at once."""
    app = tenant_ui(env, poll_interval=60)
    stream = open_stream(app, "", {"x-user": "ann", "x-tenant": "1"}, spec_version="2.3")
    await stream.next_event()
    await stream.hang_up()
    await asyncio.wait_for(stream.task, 10)
    assert stream.task.exception() is None


async def test_stream_resumes_from_last_event_id_and_checks_permissions(env: Env) -> None:
    """A reconnecting stream continues after its Last-Event-ID; an unauthenticated one gets 401, a bad cursor
    400, and HEAD only the headers."""
    app = tenant_ui(env, poll_interval=0.05)
    headers = {"x-user": "ann", "x-tenant": "1"}
    stream = open_stream(app, "", headers)
    first = await stream.next_event()  # no cursor: everything in scope
    assert row_ids(first["html"], app) == await ids_of(env, context={"tenant_id": 1})
    await stream.hang_up()
    await asyncio.wait_for(stream.task, 30)
    await env.writer.commit(
        [Row("UPDATE", "items", 1, before={"id": 1}, after={"id": 1, "name": "quill"})], context={"tenant_id": 1}
    )
    resumed = open_stream(app, "", {**headers, "last-event-id": first["id"]})
    event = await resumed.next_event()
    assert row_ids(event["html"], app) == await ids_of(env, context={"tenant_id": 1}, limit=1)
    await resumed.hang_up()
    await asyncio.wait_for(resumed.task, 30)
    async with client_for(app) as client:
        assert (await client.get("/stream")).status_code == 401
        assert (await client.get("/stream", params={"after": "bogus"}, headers=headers)).status_code == 400
        head = await asyncio.wait_for(client.head("/stream", headers=headers), 30)  # answered, not streamed
        assert head.headers["content-type"].startswith("text/event-stream")


# Pure helpers.


@given(st.one_of(st.text(), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False)))
def test_context_values_round_trip_through_filter_text(value: Any) -> None:
    """The text written into a filter link reads back as exactly the stored value, with its type."""
    parsed = parse_context_value(context_value_text(value))
    assert parsed == value
    assert type(parsed) is type(value)


def test_filter_parsing_and_scope_merging() -> None:
    """Filters read typed context values and UTC times; a filter contradicting the scope matches nothing."""
    filters = parse_filters([("c.user_id", "42"), ("c.name", "ann"), ("op", "update"), ("since", "2025-03-01T12:00")])
    assert filters.context == {"user_id": 42, "name": "ann"}
    assert filters.operations == ("UPDATE",)
    assert filters.since == T0
    assert merge_scope({"tenant_id": 2}, {"tenant_id": 1}) is None
    assert merge_scope({"tenant_id": "1"}, {"tenant_id": 1}) is None
    assert merge_scope({"user": "ann"}, {"tenant_id": 1}) == {"user": "ann", "tenant_id": 1}
    assert parse_moment("2025-03-01T13:00+01:00", "at") == T0


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))])))
def test_time_texts_are_isoformat_and_format_time(moment: datetime) -> None:
    """A time cell's texts, cut from one isoformat for a time in UTC, are its isoformat and format_time's text,
    whole seconds and other offsets included."""
    assert time_texts(moment) == (moment.isoformat(), format_time(moment))
    whole = moment.replace(microsecond=0, tzinfo=UTC)
    assert time_texts(whole) == (whole.isoformat(), format_time(whole))


@given(st.text())
def test_timeline_rows_escape_as_markupsafe_does(text: str) -> None:
    """The timeline rows' own escaping gives markupsafe's text for any value."""
    assert escape_text(text) == str(markupsafe.escape(text))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )
)
def test_values_show_as_json_dumps_writes_them(value: Any) -> None:
    """A stored value's text on the pages is `json.dumps(value, ensure_ascii=False)`'s, for any JSON value (NaN and
    infinities included, as Python's JSON writes them)."""
    assert json_text(value) == json.dumps(value, ensure_ascii=False)


@given(st.lists(st.tuples(st.text(), st.text())))
def test_links_quote_their_parameters_as_urlencode_does(params: list[tuple[str, str]]) -> None:
    """The pages' links carry exactly the query string `urllib.parse.urlencode` writes."""
    assert query_string(params) == urlencode(params)


def test_moment_input_rounds_up_to_keep_the_moment() -> None:
    """A moment with microseconds becomes a datetime-local value rounded up to the next millisecond."""
    assert moment_input(T0.replace(microsecond=123_456)) == "2025-03-01T12:00:00.124"
    assert moment_input(T0.replace(microsecond=123_000)) == "2025-03-01T12:00:00.123"
    assert parse_moment(moment_input(T0.replace(microsecond=1)), "at") >= T0.replace(microsecond=1)  # type: ignore[operator]


async def test_deeply_nested_json_is_a_400_and_the_streams_400_is_not_sniffed_or_stored(env: Env) -> None:
    """JSON nested deeper than the parser's recursion in a context filter or a cursor answers 400 (not a 500 from
    RecursionError), on the timeline and the stream; the stream's plain-text 400, which repeats the input, is sent
    with nosniff and no-store."""
    import base64

    deep = "[" * 3_000 + "]" * 3_000
    nested = "[" * 60 + "1" + "]" * 60  # parses, but deeper than a filter needs
    cursor = base64.urlsafe_b64encode(("[1," + deep + ',0,"asc"]').encode()).decode()
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        responses = [
            await client.get("/", params={"c.user": deep}),
            await client.get("/", params={"c.user": nested}),
            await client.get("/", params={"cursor": cursor}),
            await client.get("/stream", params={"c.user": deep}),
            await client.get("/stream", params={"after": cursor}),
        ]
    assert [r.status_code for r in responses] == [400] * len(responses)
    for stream in responses[3:]:
        assert stream.headers["x-content-type-options"] == "nosniff"
        assert stream.headers["cache-control"] == "no-store"


async def test_work_per_request_is_bounded(env: Env) -> None:
    """A context filter with no value to look up (`c.x={}`, `[]`), which the index cannot answer and the live
    stream would rescan every second, is refused; a transaction's or request's page shows a bounded number of
    changes with a link to the next ones, and cuts long values with a link to the full value (plain text, in
    scope only)."""
    big = "x" * 50_000
    rows = [Row("CREATE", "items", 100 + i, after={"id": 100 + i, "name": big if i == 0 else "n"}) for i in range(150)]
    await env.writer.commit(rows, context={"tenant_id": 1, "request_id": "bulk"}, transaction_id=777)
    app = tenant_ui(env)
    bulk = (await env.bemi.changes.find(transaction_id=777, limit=1))[0]
    headers = {"x-user": "ann", "x-tenant": "1"}
    async with client_for(app) as client:
        for value in ("{}", "[]", '{"a": []}'):
            for path in ("/", "/stream"):
                response = await client.get(path, params={"c.user": value}, headers=headers)
                assert response.status_code == 400, (path, value)
        for first in (
            await client.get(f"/transaction/{app.refs.transaction(bulk)}", headers=headers),
            await client.get("/request", params={"id": "bulk"}, headers=headers),
        ):
            assert first.status_code == 200
            assert len(section_ids(first.text, app)) == 100
            assert len(first.text) < 200_000
            assert big not in first.text
            [next_href] = re.findall(r'<a class="next" href="([^"]+)"', first.text)
            rest = await client.get(html.unescape(next_href), headers=headers)
            assert len(section_ids(rest.text, app)) == 50
            assert not set(section_ids(rest.text, app)) & set(section_ids(first.text, app))
        [value_href] = re.findall(r'<a class="full" href="([^"]+)"', first.text)
        full = await client.get(html.unescape(value_href), headers=headers)
        assert full.status_code == 200
        assert full.text == json.dumps(big)
        assert full.headers["content-type"].startswith("text/plain")
        assert full.headers["x-content-type-options"] == "nosniff"
        other_tenant = await client.get(html.unescape(value_href), headers={"x-user": "bo", "x-tenant": "2"})
        assert other_tenant.status_code == 404
        assert big not in other_tenant.text


async def test_a_scoped_visitor_cannot_tell_unknown_tables_from_tables_outside_its_scope(env: Env) -> None:
    """Under a scope, a table nobody wrote (or a catalog table), a table only other tenants wrote and a table the
    visitor's tenant never wrote answer alike: the timeline is empty (200), a row page 404, the stream 200. Without
    a scope, an unknown table is still a 400 that says so."""
    app = tenant_ui(env)
    headers = {"x-user": "ann", "x-tenant": "1"}
    tables = ("nosuch", "pg_catalog.pg_class", "notes")  # notes: only tenant 2 wrote it
    async with client_for(app) as client:
        timelines = [await client.get("/", params={"table": name}, headers=headers) for name in tables]
        rows = [await client.get("/row", params={"table": name, "key": "1"}, headers=headers) for name in tables]
        streams = [
            await asyncio.wait_for(client.head("/stream", params={"table": name}, headers=headers), 30)
            for name in tables
        ]
    assert [r.status_code for r in timelines] == [200] * 3
    assert [row_ids(r.text) for r in timelines] == [[]] * 3
    assert [r.status_code for r in rows] == [404] * 3
    assert [r.status_code for r in streams] == [200] * 3
    assert not [r for r in (*timelines, *rows) if "unknown table" in r.text]
    async with client_for(bemi_ui(env.bemi, authorize=allow_all)) as client:
        unscoped = await client.get("/", params={"table": "nosuch"})
    assert unscoped.status_code == 400
    assert "unknown table" in unscoped.text


# What a scoped visitor can learn.

TENANT1 = {"x-user": "ann", "x-tenant": "1"}
#: Global counters long enough that none appears on a page by chance: the change ids and transaction ids start
#: there (the LSNs ChangeWriter writes are 10 digits long already).
FIRST_ID, XID_BASE = 7_300_000_001, 8_100_000_000


@pytest.fixture
async def counted_env(database: str) -> AsyncIterator[Env]:
    """The story with long change ids and transaction ids, and a long value of tenant 1 (cut on pages)."""
    restart = f"ALTER TABLE bemi.changes ALTER COLUMN id RESTART WITH {FIRST_ID}"
    async with changes_env(database, setup_sql=restart, pool_size=3) as env:
        await write_story(env.writer, xid_base=XID_BASE)
        item = {"id": 1, "name": "ink pen", "price": 4}
        await env.writer.commit(
            [Row("UPDATE", "items", 1, before=item, after={**item, "name": "y" * 5000})],
            context={"user": "alice", "tenant_id": 1, "request_id": "r9"},
            transaction_id=XID_BASE + 9,
        )
        yield env


def global_counters(changes: list[Any]) -> set[str]:
    """Every stored change's id, transaction id, commit LSN and position, and its cursors as find() writes them."""
    counters = {str(n) for c in changes for n in (c.id, c.transaction_id, c.commit_lsn, c.position)}
    counters |= {encode_cursor(Cursor(c.commit_lsn, c.ordinal, order)) for c in changes for order in ("asc", "desc")}
    assert all(len(counter) >= 10 for counter in counters)
    return counters


def local_links(text: str) -> list[str]:
    return [html.unescape(href) for href in re.findall(r'(?:href|data-src)="(/[^"#]*)', text)]


async def crawl(client: httpx.AsyncClient, start: str, headers: dict[str, str]) -> dict[str, httpx.Response]:
    """Every page a visitor reaches from `start` by following links (but no filter links: they only combine)."""
    seen: dict[str, httpx.Response] = {}
    pending = [start]
    while pending:
        url = pending.pop()
        if url in seen or "c." in urlsplit(url).query or url.startswith("/stream"):
            continue
        seen[url] = await client.get(url, headers=headers)
        pending.extend(local_links(seen[url].text))
    return seen


def same_answer(first: httpx.Response, second: httpx.Response) -> bool:
    return (first.status_code, without_nonces(first.text)) == (second.status_code, without_nonces(second.text))


async def test_a_scoped_visitor_sees_no_global_counter(counted_env: Env) -> None:
    """Under a scope, no page, link, cursor or live stream event carries a stored change's id, transaction id,
    commit LSN or position, nor find()'s cursor (checked against every stored change's real values), and every
    link still works: the older pages cover the visitor's changes once, and transaction, request, row and
    full-value pages open."""
    env = counted_env
    app = tenant_ui(env, page_size=2, poll_interval=0.05)
    async with client_for(app) as client:
        pages = await crawl(client, "/", TENANT1)
        older: list[int | None] = []
        url: str | None = "/"
        while url is not None:
            timeline = pages[url].text
            older.extend(row_ids(timeline, app))
            url = older_link(timeline)
    assert {url: r.status_code for url, r in pages.items() if r.status_code != 200} == {}
    assert older == await ids_of(env, context={"tenant_id": 1})
    paths = {urlsplit(url).path for url in pages}
    assert {"/", "/row", "/request", "/value"} <= paths
    transactions = [url for url in pages if url.startswith("/transaction/")]
    assert len(transactions) == 4  # tenant 1's
    assert "y" * 5000 in "".join(r.text for r in pages.values())  # the full value, a link away

    stream = open_stream(app, stream_query(pages["/"].text), TENANT1)
    await env.writer.commit(
        [Row("CREATE", "items", 5, after={"id": 5, "name": "brush"})],
        context={"tenant_id": 1, "request_id": "r10"},
        transaction_id=XID_BASE + 10,
    )
    event = await stream.next_event()
    await stream.hang_up()
    resumed = open_stream(app, "", {**TENANT1, "last-event-id": event["id"]})
    await env.writer.commit(
        [Row("CREATE", "items", 6, after={"id": 6})], context={"tenant_id": 1}, transaction_id=XID_BASE + 11
    )
    resumed_event = await resumed.next_event()
    await resumed.hang_up()
    assert row_ids(resumed_event["html"], app) == await ids_of(env, context={"tenant_id": 1}, limit=1)
    async with client_for(app) as client:
        for link in local_links(event["html"]):
            assert (await client.get(link, headers=TENANT1)).status_code == 200, link

    seen = [*pages, *(without_nonces(r.text) for r in pages.values()), event["id"], event["html"], resumed_event["id"]]
    counters = global_counters(list(await env.bemi.changes.find(limit=1000)))
    leaks = {counter for counter in counters for text in seen if counter in text}
    assert leaks == set()


async def test_a_changed_or_foreign_reference_reads_as_an_unknown_one(counted_env: Env) -> None:
    """A transaction, value, cursor or event id reference that was changed, cut, made by a browser with another
    secret, or is a plain stored number, gets the very answer a reference to something outside the scope gets:
    the same 404 page, or the same 400. A browser with the same secret reads its links."""
    env = counted_env
    app = tenant_ui(env, page_size=2)
    stranger = tenant_ui(env, secret="another deployment's secret")
    [mine] = await env.bemi.changes.find(transaction_id=XID_BASE + 9)
    [theirs, _] = await env.bemi.changes.find(transaction_id=XID_BASE + 5)

    def forgeries(ref: str, stored: int) -> list[str]:
        flipped = ref[:10] + ("A" if ref[10] != "A" else "B") + ref[11:]
        return [flipped, ref[:-1], ref + "A", ref.upper(), str(stored), "", "0"]

    async with client_for(app) as client:

        async def get(path: str, **params: str) -> httpx.Response:
            return await client.get(path, params=params, headers=TENANT1)

        assert (await get(f"/transaction/{app.refs.transaction(mine)}")).status_code == 200
        twin = tenant_ui(env)  # another process with the same secret reads the same links
        assert (await get(f"/transaction/{twin.refs.transaction(mine)}")).status_code == 200
        unknown = await get(f"/transaction/{app.refs.transaction(theirs)}")
        assert unknown.status_code == 404
        for forged in [*forgeries(app.refs.transaction(mine), mine.transaction_id), stranger.refs.transaction(mine)]:
            if forged:
                assert same_answer(await get(f"/transaction/{forged}"), unknown), forged

        def value(change: Any, transaction: str, change_ref: str) -> dict[str, str]:
            key = change.primary_key
            return {"table": "items", "key": key, "transaction": transaction, "id": change_ref, "field": "name"}

        params = value(mine, app.refs.transaction(mine), app.refs.change(mine))
        assert (await get("/value", **params, side="after")).status_code == 200
        unknown = await get(
            "/value", **value(theirs, app.refs.transaction(theirs), app.refs.change(theirs)), side="after"
        )
        assert unknown.status_code == 404
        for forged in [*forgeries(params["id"], mine.id), stranger.refs.change(mine)]:
            assert same_answer(await get("/value", **{**params, "id": forged}, side="after"), unknown), forged
        for forged in [*forgeries(params["transaction"], mine.transaction_id), stranger.refs.transaction(mine)]:
            forged_value = await get("/value", **{**params, "transaction": forged}, side="after")
            assert same_answer(forged_value, unknown), forged

        timeline = (await get("/")).text
        older = dict(parse_qsl(urlsplit(older_link(timeline) or "").query))["cursor"]
        assert (await get("/", cursor=older)).status_code == 200
        bogus = await get("/", cursor="bogus")
        assert bogus.status_code == 400
        real = encode_cursor(Cursor(mine.commit_lsn, mine.ordinal, "desc"))
        for forged in [*forgeries(older, mine.commit_lsn), real, stranger.refs.cursor(real)]:
            if forged:
                assert same_answer(await get("/", cursor=forged), bogus), forged
        after = dict(parse_qsl(stream_query(timeline)))["after"]
        bogus = await get("/stream", after="bogus")
        assert bogus.status_code == 400
        for forged in [*forgeries(after, mine.commit_lsn), stranger.refs.cursor(real.replace("desc", "asc"))]:
            if forged:
                answer = await client.get(
                    "/stream", params={"after": "x"}, headers={**TENANT1, "last-event-id": forged}
                )
                assert same_answer(answer, bogus), forged


def test_sealed_references_hide_their_secret(env: Env) -> None:
    """A browser's references keep their secret out of repr(); a secret too short to be safe is refused, and so is
    one given without a scope, where nothing is sealed."""
    app = tenant_ui(env, secret="hush, hush, hush, hush")
    assert "hush" not in repr(app.refs)
    assert "hush" not in repr(vars(app))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        tenant_ui(env, secret="short")
    with pytest.raises(ValueError, match="without scope= links carry the stored ids"):
        bemi_ui(env.bemi, authorize=allow_all, secret="hush, hush, hush, hush")


@given(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(["asc", "desc"]),
)
def test_sealed_cursors_read_back_as_given(lsn: int, ordinal: int, order: str) -> None:
    """Any cursor find() can write (bigint LSN and ordinal, either order) reads back unchanged from its token, and
    the token reads as no change or transaction reference."""
    from bemi_asgi.history.refs import SealedRefs

    refs = SealedRefs(b"sixteen bytes at least")
    cursor = encode_cursor(Cursor(lsn, ordinal, order))  # type: ignore[arg-type]
    token = refs.cursor(cursor)
    assert refs.find_cursor(token) == cursor
    assert refs.change_id(token) is None
    assert refs.transaction_id(token) is None


def test_sealed_tokens_are_the_documented_construction() -> None:
    """A change's token is base64url(tag + body) with tag = HMAC(k1, plaintext)[:16] and body = plaintext XOR
    HMAC(k2, tag), both keys derived from the secret: links written before keep reading back the same."""
    import base64
    import hashlib
    import hmac
    import struct

    from bemi_asgi.history.models import Change
    from bemi_asgi.history.refs import SealedRefs

    secret = b"sixteen bytes at least"
    tag_key = hmac.digest(secret, b"bemi-asgi ui refs: tag", hashlib.sha256)
    pad_key = hmac.digest(secret, b"bemi-asgi ui refs: pad", hashlib.sha256)
    plain = b"C" + struct.pack(">q", 4242)
    tag = hmac.digest(tag_key, plain, hashlib.sha256)[:16]
    pad = hmac.digest(pad_key, tag, hashlib.sha256)
    body = bytes(a ^ b for a, b in zip(plain, pad, strict=False))
    expected = base64.urlsafe_b64encode(tag + body).decode().rstrip("=")
    refs = SealedRefs(secret)
    assert refs.change(Change.model_construct(id=4242)) == expected
    assert refs.change_id(expected) == 4242


def test_context_chips_tell_equal_values_of_other_types_apart() -> None:
    """Values that Python holds equal or that print alike (1, 1.0, True, "1"; [1] and "[1]") each get the chip of
    their own JSON text on one page, whatever order they come in."""
    from bemi_asgi.history.models import Change, Operation
    from bemi_asgi.history.refs import Refs
    from bemi_asgi.ui.rows import TimelineRows
    from bemi_asgi.ui.view import TimelineFilters

    values: list[Any] = [1, 1.0, True, "1", [1], "[1]", 0.0, -0.0, 1]
    changes = [
        Change.model_construct(
            id=n,
            transaction_id=n,
            schema_="public",
            table="items",
            primary_key=str(n),
            committed_at=T0,
            operation=Operation.DELETE,
            before={"id": n},
            after={},
            context={"k": value},
        )
        for n, value in enumerate(values)
    ]
    html = TimelineRows(Refs(), "request_id", lambda trace, span: None).rows(
        lambda path, params: path + "?" + urlencode(params), changes, TimelineFilters()
    )
    shown = re.findall(r'<span class="k">k=</span>([^<]*)</a>', html)
    assert shown == [escape_text(context_value_text(value)) for value in values]
    assert shown[:6] == ["1", "1.0", "true", "&#34;1&#34;", "[1]", "&#34;[1]&#34;"]
