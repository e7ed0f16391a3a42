"""The /dashboard page in headless Chromium draws the analytics of real events.

Needs Debian's ``chromium`` and the ``playwright`` Python package (its own browsers are not
used); skipped when either is missing. The screenshot goes to ``$COSCRIBE_ARTIFACTS`` (default
``<repo>/artifacts``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Services, create_app
from gateway.auth import sign_token
from gateway.readmodels import Extension
from gateway.store import Store, StoreConfig

pytestmark = [
    pytest.mark.slow,
]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("COSCRIBE_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "artifacts"))
SECRET = b"test-secret"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """A gateway on a free port with the read side and embedded stores."""
    services = Services(store=Store(StoreConfig(data_dir=tmp_path)), secret=SECRET,
                        extensions=[Extension()])
    client = TestClient(TestServer(create_app(services), host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def artifacts() -> Path:
    """Where the screenshot goes (skips the test if there is no Chromium to take it)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


async def test_dashboard_draws_the_series_of_real_events(
    server: TestClient[Any, Any], artifacts: Path
) -> None:
    """The page loads without a token, then charts exactly the edits the test made."""
    playwright = pytest.importorskip("playwright.async_api")
    token = sign_token(SECRET, "ann")
    headers = {"Authorization": f"Bearer {token}"}
    edits = {"Quarterly report": 7, "Meeting notes": 3}
    for title, n in edits.items():
        r = await server.post("/v1/documents", json={"title": title, "text": ""},
                              headers=headers)
        doc = (await r.json())["id"]
        for v in range(n):
            r = await server.post(f"/v1/documents/{doc}/ops", json={"v": v, "op": ["ab"]},
                                  headers=headers)
            assert r.status == 200
    page_url = str(server.make_url("/dashboard")) + f"#token={token}"
    async with playwright.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            response = await page.goto(page_url)
            assert response is not None and response.status == 200
            await page.wait_for_selector("body[data-state=ready]", timeout=15000)
            assert not errors
            values = await page.eval_on_selector_all(
                "#chart-edits rect", "els => els.map(e => Number(e.dataset.value))")
            assert len(values) >= 24 and sum(values) == 10  # 24 h, widened to whole hours
            inserted = await page.eval_on_selector_all(
                "#chart-chars rect[data-key=chars_inserted]",
                "els => els.reduce((a, e) => a + Number(e.dataset.value), 0)")
            assert inserted == 20
            assert await page.text_content("#total-edits") == "10 total"
            titles = await page.eval_on_selector_all(
                "#top tbody tr td:first-child", "els => els.map(e => e.textContent)")
            assert titles == ["Quarterly report", "Meeting notes"]
            png = await page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
            assert len(png) > 10_000
        finally:
            await browser.close()
