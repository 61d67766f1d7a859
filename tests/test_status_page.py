"""The status page in real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
playwright without any downloaded browser): it shows the components, follows a scale made
through the API live, and loads nothing from anywhere else. A screenshot is written to
``test-artifacts/status-page.png``."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_helpers import Served, serve
from tests.core_helpers import wait_until

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium"),
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def _open(browser: Any, url: str) -> tuple[Any, list[str], list[str]]:
    """A page on ``url`` that records console errors and every request it makes."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    await page.goto(url)
    return page, errors, requests


def _row(name: str, **attrs: object) -> str:
    extra = "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
    return f'#components tr[data-component="{name}"]{extra}'


async def test_page_shows_components_and_follows_a_scale(tmp_path: Path, browser: Any) -> None:
    async with serve(tmp_path) as api:
        view = api.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components))
        page, errors, requests = await _open(browser, api.url + "/")

        await page.wait_for_selector(_row("Decode", ready=1, desired=1, status="running"))
        names = await page.eval_on_selector_all(
            "#components tbody tr", "rows => rows.map(r => r.dataset.component)"
        )
        assert names == ["Frontend", "Prefill", "Decode", "Talker", "Slow", "Crashy"]
        assert await page.inner_text("#namespace") == "t"
        assert await page.get_attribute(_row("Decode") + " .badge", "class") == (
            "badge status-running"
        )
        await page.wait_for_selector('#live[data-state="live"]')

        status, _, _ = await api.call(
            "PUT", "/v1/components/Decode/replicas", body={"replicas": 3, "wait": True}
        )
        assert status == 200
        # The page learns it from the event stream (the backstop poll is 5 s away).
        await page.wait_for_selector(_row("Decode", ready=3, desired=3), timeout=4000)
        assert (await page.inner_text(_row("Decode") + " td.replicas")).startswith("3 / 3")
        event = await page.wait_for_selector(
            '#events li[data-kind="scale"][data-component="Decode"]', timeout=4000
        )
        assert "Decode 1 → 3 (api) ok" in await event.inner_text()

        await page.wait_for_selector("#queue-chart[data-points]")
        assert await page.inner_text("#gpus") == "no GPUs on this machine"

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        assert errors == []
        assert all(r.startswith(api.url + "/") for r in requests), requests


async def test_page_with_auth_all_asks_for_and_uses_the_token(tmp_path: Path, browser: Any) -> None:
    async with serve(tmp_path, token="page-token", auth_all=True) as api:
        page, _, _ = await _open(browser, api.url + "/")
        await page.wait_for_selector("#token-form:not([hidden])")
        await page.fill("#token-input", "page-token")
        await page.click("#token-form button")
        await page.wait_for_selector(_row("Decode"))
        await page.wait_for_selector('#live[data-state="live"]', timeout=6000)

        # A token in the URL fragment is taken once and removed from the address bar.
        second, errors, _ = await _open(browser, api.url + "/#token=page-token")
        await second.wait_for_selector(_row("Talker"))
        assert "token" not in second.url
        assert await second.is_hidden("#token-form")
        assert [e for e in errors if "401" not in e] == []


async def test_page_survives_a_server_restart_message(tmp_path: Path, browser: Any) -> None:
    served: Served
    async with serve(tmp_path) as served:
        page, _, _ = await _open(browser, served.url + "/")
        await page.wait_for_selector('#live[data-state="live"]')
        await served.server.stop()
        await page.wait_for_selector('#live[data-state="server stopped"]', timeout=5000)


async def test_gpu_map_and_queue_history(
    tmp_path: Path, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(tmp_path) as api:
        depth = iter(range(3, 1000, 4))

        async def queue() -> dict[str, Any]:
            return {"status": "ok", "pending": next(depth)}

        async def machine() -> dict[str, Any]:
            return {
                "gpus": [
                    {"uuid": "GPU-aaaa", "index": 0, "state": "allocated", "owners": ["Decode/1"]},
                    {"uuid": "GPU-bbbb", "index": 1, "state": "free", "owners": []},
                ],
                "cpu": {"allocatable_cores": 16.0, "reserved_cores": 2.0},
            }

        monkeypatch.setattr(api.connector, "get_prefill_queue_metrics", queue)
        monkeypatch.setattr(api.connector, "get_machine_resources", machine, raising=False)
        page, errors, _ = await _open(browser, api.url + "/")
        allocated = await page.wait_for_selector('.gpu[data-uuid="GPU-aaaa"]')
        assert await allocated.get_attribute("data-state") == "allocated"
        assert "allocated: Decode/1" in await allocated.inner_text()
        free = await page.wait_for_selector('.gpu[data-uuid="GPU-bbbb"]')
        assert await free.get_attribute("data-state") == "free"
        assert await page.inner_text("#budgets") == "reserved: CPU 2 / 16 cores"
        # Two polls, two points on the line; the headline shows the latest depth.
        await page.wait_for_selector('#queue-chart[data-points="2"]', timeout=6000)
        points = await page.get_attribute("#queue-chart polyline", "points")
        assert points is not None and len(points.split()) == 2
        assert await page.inner_text("#queue-now") == "7 pending"
        assert errors == []
