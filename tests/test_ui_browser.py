"""The change browser in a real headless Chromium, served by uvicorn over real HTTP, on real stored changes.

Needs Debian's `chromium` (/usr/bin/chromium) and Playwright for Python (`pip install playwright`; its own browser
download is not used). Each test saves screenshots into test-artifacts/ui/ for a human to look at.
"""

from __future__ import annotations

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
from starlette.routing import Mount

from bemi_asgi import Bemi
from bemi_asgi.ui import bemi_ui

from ._change_writer import ChangeWriter, Row, migrate
from .test_ui import write_story

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
def serve(dsn: str) -> Iterator[str]:
    """Run the app under uvicorn on a free port of 127.0.0.1 in a background thread; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(dsn), log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped before serving")
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{port}/bemi"
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
        with serve(database) as url:
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
