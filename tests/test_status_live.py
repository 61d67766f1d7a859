"""The status page's live charts in real headless Chromium: plotly.js served by the connector
(from the installed plotly package), the connector's live timeline drawn as replicas per
component against the frontend's load and latency, a scale made through the API marked, a
running experiment named; nothing loaded from anywhere else, no console error. Screenshot:
``test-artifacts/status-live.png``.

The frontend is dynamo-local's mock worker (``--role frontend``), not Dynamo's: the charts
need a frontend's ``dynamo_frontend_*`` metrics on its HTTP port with requests moving, and
the mock serves exactly those (a simulated stream of 5 requests/s) in a fraction of a
second. The real frontend under load is in ``tests/test_api_experiments_real.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from connector.graph.model import SubComponentType
from tests.api_helpers import QUICK, serve
from tests.core_helpers import make_graph, svc, wait_until
from tests.test_prometheus_sd import mock_frontend
from tests.test_status_page import ARGS, ARTIFACTS, CHROMIUM, _open

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


def live_graph():  # type: ignore[no-untyped-def]
    return make_graph(
        mock_frontend(),
        svc(
            "Decode",
            sub_component_type=SubComponentType.DECODE,
            replicas=1,
            max_replicas=3,
            readiness=QUICK,
        ),
        name="live",
    )


CHART = "#live-chart"
# What plotly drew: each trace's name and its last y, and the markers' hover texts.
DRAWN = """div => ({
    names: div.data.map(t => t.name),
    last: Object.fromEntries(div.data.map(t => [t.name, t.y[t.y.length - 1]])),
    marks: (div.data.find(t => t.name === 'scale events') || {hovertext: []}).hovertext,
    lines: [...div.querySelectorAll('.scatterlayer .trace path.js-line')]
        .filter(l => (l.getAttribute('d') || '').length > 10).length,
    axes: [...div.querySelectorAll('.ytitle, .y2title, .y3title')].map(t => t.textContent),
})"""


async def _drawn(page: Any) -> dict[str, Any]:
    return dict(await page.eval_on_selector(CHART, DRAWN))


async def test_live_charts_draw_replicas_load_latency_and_scale_marks(
    tmp_path: Path, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIPERF", "/bin/true")  # the experiment below never reaches aiperf
    async with serve(tmp_path, live_graph()) as api:
        view = api.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components), 30)
        page, errors, requests = await _open(browser, api.url + "/")

        # A few seconds of samples, with the frontend's figures in them.
        await page.wait_for_function(
            f"() => document.querySelector('{CHART}').dataset.samples >= 4", timeout=20000
        )
        deadline = time.monotonic() + 20
        drawn = await _drawn(page)
        while drawn["last"].get("req/s") is None and time.monotonic() < deadline:
            await page.wait_for_timeout(500)
            drawn = await _drawn(page)
        assert drawn["names"] == [
            "Frontend desired",
            "Frontend ready",
            "Decode desired",
            "Decode ready",
            "req/s",
            "in flight",
            "TTFT p99 (s)",
            "ITL p99 (s)",
        ]
        assert drawn["axes"] == ["replicas", "load", "latency (s)"]
        assert drawn["last"]["Frontend ready"] == 1 and drawn["last"]["Decode ready"] == 1
        assert drawn["last"]["req/s"] > 0  # the mock frontend's simulated 5 requests/s
        assert drawn["last"]["TTFT p99 (s)"] > 0
        assert drawn["lines"] >= 6  # lines with points, not empty axes

        status, body, _ = await api.call(
            "PUT", "/v1/components/Decode/replicas", body={"replicas": 3, "wait": True}
        )
        assert status == 200, body
        await page.wait_for_function(
            "() => (document.querySelector('#live-chart').data || [])"
            ".some(t => t.name === 'scale events')",
            timeout=10000,
        )
        deadline = time.monotonic() + 10
        drawn = await _drawn(page)
        while drawn["last"]["Decode ready"] != 3 and time.monotonic() < deadline:
            await page.wait_for_timeout(300)
            drawn = await _drawn(page)
        assert drawn["last"]["Decode desired"] == 3 and drawn["last"]["Decode ready"] == 3
        assert len(drawn["marks"]) == 1
        assert drawn["marks"][0].startswith("scale Decode 1→3 (api) ok in ")
        assert await page.locator(f"{CHART} .scatterlayer .trace .point").count() >= 1

        # An experiment started through the API is named above the chart while it runs.
        status, run, _ = await api.call(
            "POST",
            "/v1/experiments",
            body={
                "name": "shown",
                "tokenizer": "t",
                "phases": [{"concurrency": 1, "inputTokens": 8, "outputTokens": 8, "duration": 5}],
            },
        )
        assert status == 202, run
        badge = await page.wait_for_selector(
            f'#experiment-now[data-state="running"][data-id="{run["id"]}"]', timeout=5000
        )
        # The mock frontend lists no model: the run waits for one.
        assert await badge.inner_text() == (
            "experiment shown: running · waiting for the frontend · 0%"
        )
        status, _, _ = await api.call("DELETE", f"/v1/experiments/{run['id']}")
        assert status == 200
        await page.wait_for_selector('#experiment-now[data-state="cancelled"]', timeout=5000)

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "status-live.png"), full_page=True)
        assert errors == [], errors
        assert all(r.startswith(api.url + "/") for r in requests), requests
        assert api.url + "/static/vendor/plotly.min.js" in requests


async def test_without_a_frontend_the_chart_shows_replicas_only(
    tmp_path: Path, browser: Any
) -> None:
    graph = make_graph(svc("Worker", replicas=2, max_replicas=2, readiness=QUICK), name="nofe")
    async with serve(tmp_path, graph) as api:
        page, errors, _ = await _open(browser, api.url + "/")
        await page.wait_for_function(
            f"() => document.querySelector('{CHART}').dataset.samples >= 2", timeout=20000
        )
        drawn = await _drawn(page)
        assert drawn["names"] == ["Worker desired", "Worker ready"]
        assert drawn["axes"] == ["replicas"]
        assert await page.inner_text("#live-status") == "no frontend in this graph: replicas only"
        assert errors == []
