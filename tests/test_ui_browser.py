"""The change browser in a real headless Chromium, served by uvicorn over real HTTP, on real stored changes.

Needs Debian's `chromium` (/usr/bin/chromium) and Playwright for Python (`pip install playwright`; its own browser
download is not used). Each test saves screenshots into test-artifacts/ui/ for a human to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route

import bemi_asgi
from bemi_asgi import Bemi, bemi_context
from bemi_asgi.ui import bemi_ui
from bemi_asgi.worker.pipeline import Worker

from ._change_writer import ChangeWriter, Row, migrate
from .test_ui import write_story
from .worker_support import prepare_source

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium") if Path("/usr/bin/chromium").exists() else Path(shutil.which("chromium") or "")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="browser tests need Playwright for Python: pip install playwright (no `playwright install` needed)",
    ),
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason="browser tests need Chromium at /usr/bin/chromium: apt-get install -y chromium",
    ),
]


def build_app(dsn: str) -> Starlette:
    """The app a user would write: x-user signs in (mallory is forbidden), x-tenant scopes to one tenant."""

    def authorize(request: Request) -> bool | None:
        user = request.headers.get("x-user")
        return None if user is None else user != "mallory"

    def scope(request: Request) -> dict[str, Any]:
        tenant = request.headers.get("x-tenant")
        return {} if tenant is None else {"tenant_id": int(tenant)}

    bemi = Bemi(dsn)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with bemi:
            yield

    ui = bemi_ui(bemi, authorize=authorize, scope=scope, poll_interval=0.2)
    return Starlette(routes=[Mount("/bemi", ui)], lifespan=lifespan)


@dataclass
class Server:
    url: str
    conn: asyncpg.Connection
    writer: ChangeWriter


@contextlib.contextmanager
def serve(app: Starlette, host: str = "127.0.0.1") -> Iterator[str]:
    """Run the app under uvicorn on a free port of 127.0.0.1 in a background thread; yield its base URL (named
    by `host`: "localhost" is the same machine but another site)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped before serving")
            threading.Event().wait(0.02)
        yield f"http://{host}:{port}/bemi"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
async def server(database: str) -> AsyncIterator[Server]:
    conn = await asyncpg.connect(database)
    await migrate(conn)
    writer = ChangeWriter(conn)
    await write_story(writer)
    try:
        with serve(build_app(database)) as url:
            yield Server(url, conn, writer)
    finally:
        await conn.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, headers: dict[str, str]) -> Page:
    context = await browser.new_context(extra_http_headers=headers, viewport={"width": 1400, "height": 900})
    return await context.new_page()


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_filter_open_a_row_see_the_difference_and_move_the_moment(server: Server, browser: Browser) -> None:
    """A signed-in user filters the timeline by user, opens a row, sees the changed field highlighted with its
    before and after values, and moves the as-of moment to see the row as it was then."""
    page = await open_page(browser, {"x-user": "ann"})
    await page.goto(server.url + "/")
    await page.wait_for_selector("#live.on")  # the live stream connected
    await shot(page, "timeline")
    assert await page.locator("tbody#changes-body tr").count() == 7

    await page.fill('input[name="c.user"]', "alice")
    await page.click("button[type=submit]")
    await page.wait_for_url("**/bemi/?*c.user=alice*")
    rows = page.locator("tbody#changes-body tr")
    assert await rows.count() == 2
    for text in await rows.all_inner_texts():
        assert "user=alice" in text
    await shot(page, "timeline-filtered")

    await rows.nth(0).locator("td:nth-child(4) a").click()
    await page.wait_for_url("**/bemi/row?*")
    assert await page.locator("h1").inner_text() == "Row 1 of public.items"
    assert await page.locator("section.step").count() == 3
    rename = page.locator("section.step").nth(1).locator("tr.changed")
    assert await rename.locator("td.field").inner_text() == "name"
    assert await rename.locator("td.mark").inner_text() == "~"
    assert await rename.locator("td.before").inner_text() == '"pen"'
    assert await rename.locator("td.after").inner_text() == '"ink pen"'
    before_bg = await rename.locator("td.before").evaluate("cell => getComputedStyle(cell).backgroundColor")
    after_bg = await rename.locator("td.after").evaluate("cell => getComputedStyle(cell).backgroundColor")
    assert before_bg != after_bg
    assert "rgba(0, 0, 0, 0)" not in (before_bg, after_bg)
    assert "price" in await page.locator("#state").inner_text()
    await shot(page, "row")

    await page.fill('input[name="at"]', "2025-03-01T12:02:30.000")
    await page.click("form.asof button")
    await page.wait_for_url("**at=2025-03-01T12%3A02%3A30*")
    state = dict(
        zip(
            await page.locator("#state td.field").all_inner_texts(),
            await page.locator("#state td.value").all_inner_texts(),
            strict=True,
        )
    )
    assert state == {"id": "1", "name": '"ink pen"', "price": "3"}
    assert await page.locator("section.step.effective").count() == 1
    assert await page.locator("section.step.future").count() == 1
    await shot(page, "row-as-of")

    await page.fill('input[name="at"]', "2025-03-01T11:00:00.000")
    await page.click("form.asof button")
    await page.wait_for_selector("#state-none")
    assert "did not exist yet" in await page.locator("#state-none").inner_text()

    await page.goto(server.url + "/?table=notes")  # the note was created in transaction 505, with an item update
    await page.locator("tbody#changes-body tr td:nth-child(7) a").click()
    await page.wait_for_url("**/bemi/transaction/*")
    assert await page.locator("section.step").count() == 2
    assert await page.locator("table.diff td.after", has_text="<script>").count() == 1  # shown as text
    await shot(page, "transaction")
    await page.context.close()


async def test_unauthorized_and_forbidden_visitors_are_refused(server: Server, browser: Browser) -> None:
    """A visitor who is not signed in gets 401 and one who is forbidden 403, and neither sees any change."""
    anonymous = await open_page(browser, {})
    response = await anonymous.goto(server.url + "/")
    assert response is not None
    assert response.status == 401
    assert "Sign in" in await anonymous.locator("main").inner_text()
    assert await anonymous.locator("tbody#changes-body").count() == 0
    await shot(anonymous, "unauthorized")
    forbidden = await open_page(browser, {"x-user": "mallory"})
    response = await forbidden.goto(server.url + "/row?table=items&key=1")
    assert response is not None
    assert response.status == 403
    assert "pen" not in await forbidden.content()
    await shot(forbidden, "forbidden")
    await anonymous.context.close()
    await forbidden.context.close()


async def test_scoped_user_sees_only_their_tenant_live_too(server: Server, browser: Browser) -> None:
    """A user scoped to tenant 1 sees only tenant 1's changes, cannot open tenant 2's row, and the live timeline
    adds a new tenant 1 change but never a tenant 2 one."""
    page = await open_page(browser, {"x-user": "ann", "x-tenant": "1"})
    await page.goto(server.url + "/")
    await page.wait_for_selector("#live.on")
    body = page.locator("tbody#changes-body")
    assert await body.locator("tr").count() == 3
    text = await body.inner_text()
    assert "cup" not in text
    assert "mug" not in text
    assert "tenant_id=2" not in text

    await server.writer.commit(
        [Row("CREATE", "items", 7, after={"id": 7, "name": "OTHER-TENANT"})], context={"tenant_id": 2}
    )
    await server.writer.commit(
        [Row("CREATE", "items", 8, after={"id": 8, "name": "brush"})], context={"tenant_id": 1, "user": "ann"}
    )
    # The tenant 2 change was stored first: had it been sent, it would be on the page by now.
    await page.wait_for_selector('tbody#changes-body tr.new:has-text("brush")')
    assert await body.locator("tr").count() == 4
    assert "brush" in await body.locator("tr").nth(0).inner_text()
    assert "OTHER-TENANT" not in await body.inner_text()
    assert "1 new" in await page.locator("#live").inner_text()
    await shot(page, "timeline-scoped-live")

    response = await page.goto(server.url + "/row?table=items&key=2")
    assert response is not None
    assert response.status == 404
    assert "cup" not in await page.content()
    await shot(page, "row-out-of-scope")
    await page.context.close()


async def test_overview_chart_renders_the_seeded_changes(server: Server, browser: Browser) -> None:
    """The overview draws one visible bar segment per bucket and operation of the seeded period, lists the tables
    and the top users, and its user links open the timeline filtered by that user."""
    page = await open_page(browser, {"x-user": "ann"})
    await page.goto(server.url + "/overview?since=2025-03-01T12:00&until=2025-03-01T12:10")
    bars = page.locator("svg#chart rect.bar")
    # Six one-minute buckets with changes, one of them stacking an UPDATE on a CREATE: seven segments.
    assert await bars.count() == 7
    assert len(set(await bars.evaluate_all("rs => rs.map(r => r.getAttribute('x'))"))) == 6
    assert sum([int(n) for n in await bars.evaluate_all("rs => rs.map(r => r.dataset.changes)")]) == 7
    for box in [await bars.nth(i).bounding_box() for i in range(7)]:
        assert box is not None
        assert box["height"] > 0
        assert box["width"] > 0
    fills = set(await bars.evaluate_all("rs => rs.map(r => getComputedStyle(r).fill)"))
    assert len(fills) == 3  # CREATE, UPDATE and DELETE in their own colours
    assert await page.locator("#per-table tbody tr").count() == 2
    assert "bob" in await page.locator("#top-user").inner_text()
    await shot(page, "overview")
    await page.locator("#top-user a", has_text="alice").click()
    await page.wait_for_url("**c.user=alice*")
    assert await page.locator("tbody#changes-body tr").count() == 2
    await page.context.close()


@dataclass
class Shop:
    """A tracked `items` table with the worker running, and the browser serving it with reverts allowed for ann."""

    url: str
    pool: asyncpg.Pool
    bemi: Bemi

    async def stored(self) -> None:
        """Wait until the worker stored everything committed so far."""
        await self.bemi.wait_for(await bemi_asgi.current_lsn(self.pool), timeout=60)

    async def name(self, key: int) -> str | None:
        name: str | None = await self.pool.fetchval("SELECT name FROM items WHERE id = $1", key)
        return name


def build_revert_app(dsn: str) -> Starlette:
    """The browser with reverts: ann may revert (named in the revert's context), mallory may only read; reverts
    are written through the app's own bemi pool, made in its lifespan."""

    def authorize(request: Request) -> bool | None:
        return None if request.headers.get("x-user") is None else True

    def authorize_revert(request: Request) -> dict[str, str] | bool:
        return {"reverted_by": "ann"} if request.headers.get("x-user") == "ann" else False

    bemi = Bemi(dsn)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with bemi:
            app.state.pool = await bemi_asgi.create_pool(dsn, min_size=1, max_size=2)
            try:
                yield
            finally:
                await app.state.pool.close()

    app = Starlette(lifespan=lifespan)
    ui = bemi_ui(bemi, authorize=authorize, authorize_revert=authorize_revert, revert_pool=lambda: app.state.pool)
    app.mount("/bemi", ui)
    return app


@pytest.fixture
async def shop(database: str) -> AsyncIterator[Shop]:
    prepare_source(database, "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)", ["items"])
    worker = Worker(database, status_interval=1.0)
    task = asyncio.create_task(worker.run())
    pool = await bemi_asgi.create_pool(database, min_size=1, max_size=2)
    try:
        with bemi_context(user="alice"):
            await pool.execute("INSERT INTO items VALUES (1, 'pen'), (2, 'cup')")
        with bemi_context(user="mallory"):
            await pool.execute("DELETE FROM items WHERE id = 1")
        with serve(build_revert_app(database)) as url:
            shop = Shop(url, pool, Bemi(pool))
            await shop.stored()
            yield shop
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await pool.close()


async def test_a_permitted_user_reverts_a_deleted_row_and_sees_it_back(shop: Shop, browser: Browser) -> None:
    """ann opens the deleted row, sees the revert plan (the INSERT, nothing written yet), applies it, and the row
    is back: in the table, on its page, and on the timeline as a change with her name in its context."""
    page = await open_page(browser, {"x-user": "ann"})
    await page.goto(shop.url + "/?table=items&op=DELETE")
    await page.locator("tbody#changes-body tr td:nth-child(4) a").click()
    await page.wait_for_url("**/bemi/row?*")
    assert "deleted" in await page.locator("#state-none").inner_text()
    await page.locator("section.step").first.locator("a.undo").click()
    await page.wait_for_url("**/bemi/revert?*")
    assert await page.locator("#outcome").get_attribute("data-outcome") == "plan"
    assert 'INSERT INTO "public"."items"' in await page.locator("#statements").inner_text()
    assert await shop.name(1) is None
    await shot(page, "revert-plan")
    await page.locator("#apply button").click()
    await page.wait_for_selector('#outcome[data-outcome="applied"]')
    assert await shop.name(1) == "pen"
    await shot(page, "revert-applied")
    await shop.stored()
    await page.locator("ul.restored a").click()
    await page.wait_for_url("**/bemi/row?*")
    state = await page.locator("#state").inner_text()
    assert "pen" in state
    await shot(page, "revert-row-back")
    await page.goto(shop.url + "/")
    newest = page.locator("tbody#changes-body tr").first
    assert "CREATE" in await newest.inner_text()
    assert "reverted_by=ann" in await newest.inner_text()
    await shot(page, "revert-on-timeline")
    await page.context.close()


async def test_an_unpermitted_user_sees_no_revert_button_and_a_forged_post_is_refused(
    shop: Shop, browser: Browser
) -> None:
    """mallory may read but not revert: no revert button on the row page, and a POST made up with the fields of
    ann's revert form (from the same origin) is refused without writing anything."""
    ann = await open_page(browser, {"x-user": "ann"})
    await ann.goto(shop.url + "/row?table=items&key=1")
    await ann.locator("section.step").first.locator("a.undo").click()
    await ann.wait_for_selector("#apply")
    fields = {
        name: value
        for name, value in await ann.locator("#apply input[type=hidden]").evaluate_all(
            "inputs => inputs.map(i => [i.name, i.value])"
        )
    }
    mallory = await open_page(browser, {"x-user": "mallory"})
    await mallory.goto(shop.url + "/row?table=items&key=1")
    assert await mallory.locator("section.step").count() == 2
    assert await mallory.locator("a.undo").count() == 0
    origin = shop.url.removesuffix("/bemi")
    forged = await mallory.context.request.post(shop.url + "/revert", form=fields, headers={"origin": origin})
    assert forged.status == 403
    assert "You may not revert changes." in await forged.text()
    await mallory.set_content(await forged.text())
    await shot(mallory, "revert-forged-refused")
    assert await shop.name(1) is None
    await ann.context.close()
    await mallory.context.close()


async def test_a_cross_site_post_is_refused(shop: Shop, browser: Browser) -> None:
    """A page on another site that submits ann's own revert form (token included) to the browser while she is
    signed in is refused: the request names the other origin and lacks her SameSite session cookie."""
    page = await open_page(browser, {"x-user": "ann"})
    await page.goto(shop.url + "/row?table=items&key=1")
    await page.locator("section.step").first.locator("a.undo").click()
    await page.wait_for_selector("#apply")
    form = await page.locator("#apply").evaluate("form => form.outerHTML")
    evil = Starlette(
        routes=[
            Route(
                "/bemi/",
                lambda request: HTMLResponse(
                    form.replace('action="/bemi/revert"', f'action="{shop.url}/revert"')
                    + "<script>document.getElementById('apply').submit()</script>"
                ),
            )
        ]
    )
    with serve(evil, host="localhost") as evil_url:
        await page.goto(evil_url + "/")
        await page.wait_for_selector('#outcome[data-outcome="refused"]')
    text = await page.locator("main").inner_text()
    assert "another site" in text
    assert "Nothing was changed" in text
    await shot(page, "revert-cross-site-refused")
    assert await shop.name(1) is None
    await page.context.close()
