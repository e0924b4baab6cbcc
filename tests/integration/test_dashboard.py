"""The live dashboard at /ui in a real headless browser (Debian's chromium and
chromium-driver, driven by selenium): sign-in by the URL fragment, a create appears, a stop
removes it, live from the server-sent events; a screenshot is attached to the test output."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from services.api.ui import COOKIE
from services.runtime.service import RuntimeHandle
from shared.config import Settings
from tests.conftest import TEST_TOKEN, missing
from tests.support.api_server import serving_api
from tests.support.eventually import eventually

T = TypeVar("T")
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = "/usr/bin/chromedriver"


async def _in_thread(call: Callable[..., T], *args: Any) -> T:
    # The API and the runtime run in this event loop: blocking WebDriver calls go elsewhere.
    return await asyncio.to_thread(call, *args)


@pytest.fixture
async def browser() -> AsyncIterator[webdriver.Chrome]:
    binary = next((path for path in CHROMIUM if Path(path).is_file()), None)
    if binary is None or not Path(DRIVER).is_file():
        missing("no chromium / chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    try:
        driver = await _in_thread(webdriver.Chrome, options, Service(DRIVER))
    except WebDriverException as exc:
        missing(f"chromium did not start: {exc.msg}")
        raise
    try:
        yield driver
    finally:
        await _in_thread(driver.quit)


def _row_text(driver: webdriver.Chrome, chat: str) -> str | None:
    rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-chat="{chat}"]')
    return rows[0].text if rows else None


async def test_a_create_shows_up_live_and_a_stop_removes_it(
    settings: Settings,
    runtime: RuntimeHandle,
    browser: webdriver.Chrome,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    async with (
        serving_api(settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as api,
    ):
        await _in_thread(browser.get, f"{base}/ui#token={TEST_TOKEN}")
        try:
            await eventually(
                lambda: _in_thread(browser.execute_script, "return document.body.dataset.feed"),
                lambda feed: feed == "live",
                what="the dashboard signed in and its feed live",
            )
        except AssertionError as exc:
            source = await _in_thread(lambda: browser.page_source)
            raise AssertionError(f"{exc}\n--- {browser.current_url}\n{source[:3000]}") from None
        assert "token" not in await _in_thread(lambda: browser.current_url)  # not left in the address bar
        cookie = next(c for c in await _in_thread(browser.get_cookies) if c["name"] == COOKIE)
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert TEST_TOKEN not in cookie["value"]

        chat = str(uuid.uuid4())
        created = await api.post("/api/v1/sandboxes", json={"chat_id": chat, "labels": {"team": "browser"}})
        assert created.status_code == 201, created.text
        answered = time.monotonic()
        row = await eventually(lambda: _in_thread(_row_text, browser, chat), what="the new session's row")
        shown_after = time.monotonic() - answered
        assert row is not None
        assert "running" in row
        assert settings.runtime.node_id in row
        assert "team=browser" in row
        nodes = await _in_thread(browser.find_element, By.ID, "nodes")
        assert settings.runtime.node_id in await _in_thread(lambda: nodes.text)
        feed = await _in_thread(browser.find_element, By.ID, "feed")
        assert "running" in await _in_thread(lambda: feed.text)

        screenshot = tmp_path / "dashboard.png"
        await _in_thread(browser.save_screenshot, str(screenshot))
        record_property("screenshot", str(screenshot))
        print(f"\ndashboard screenshot: {screenshot} (the row appeared {shown_after:.2f}s after the 201)")  # noqa: T201 - the screenshot in the output

        stopped = await api.delete(f"/api/v1/sandboxes/{chat}")
        assert stopped.status_code == 200, stopped.text
        await eventually(
            lambda: _in_thread(_row_text, browser, chat), lambda text: text is None, what="the row removed"
        )
        await _in_thread(browser.get, "about:blank")  # closes the feed, so the server can stop


async def test_the_dashboard_is_behind_the_token(settings: Settings, runtime: RuntimeHandle) -> None:
    async with serving_api(settings) as base, httpx.AsyncClient(base_url=base, timeout=30) as anonymous:
        page = await anonymous.get("/ui")
        assert page.status_code == 200
        assert 'id="signin"' in page.text
        assert 'id="sessions"' not in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for path in ("/ui/state", "/ui/feed"):
            assert (await anonymous.get(path)).status_code == 401
        wrong = await anonymous.post("/ui/login", data={"token": "not-it"})
        assert wrong.status_code == 303
        assert wrong.headers["location"] == "/ui?error=token"
        assert COOKIE not in wrong.cookies
        cross = await anonymous.post(
            "/ui/login", data={"token": TEST_TOKEN}, headers={"Origin": "https://evil.example"}
        )
        assert COOKIE not in cross.cookies
        signed = await anonymous.post("/ui/login", data={"token": TEST_TOKEN})
        assert signed.status_code == 303
        set_cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in set_cookie
        assert "samesite=strict" in set_cookie.lower()
        assert "Path=/ui" in set_cookie
        assert TEST_TOKEN not in set_cookie
        state = await anonymous.get("/ui/state")  # the cookie jar sends it now
        assert state.status_code == 200, state.text
        assert state.json()["total"] == 0
        anonymous.cookies.clear()  # the header alone, no cookie
        assert (await anonymous.get("/ui/state")).status_code == 401
        header = await anonymous.get("/ui/state", headers={"X-API-Token": TEST_TOKEN})
        assert header.status_code == 200
