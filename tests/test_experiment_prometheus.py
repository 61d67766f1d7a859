"""The experiment's two ways to the frontend's figures agree: a real Prometheus scraping a
frontend's ``/metrics`` (here one whose counters grow at a known pace: 10 requests/s, 30% of
first tokens under 0.1 s, the rest under 1 s) answers the experiment's PromQL with the rate
and the percentiles that the direct computation from two scrapes gives."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from connector.experiment import metrics
from connector.experiment.sampler import PrometheusSource
from tests.servers import PrometheusFactory, free_port, wait_until_async
from tests.test_experiment_summary import FRONTEND_TEXT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus"),
]

RATE = 10.0  # requests per second, all of them successful


def _text(elapsed: float) -> str:
    n = RATE * elapsed
    return FRONTEND_TEXT.format(ok=n, failed=0, inflight=3, t1=0.3 * n, t2=n, i1=20 * n)


@pytest.fixture
async def frontend() -> AsyncIterator[str]:
    started = time.monotonic()

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(text=_text(time.monotonic() - started), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_promql_and_the_direct_computation_agree(
    frontend: str, prometheus_server: PrometheusFactory
) -> None:
    prometheus = prometheus_server([frontend], scrape_interval="1s")
    source = PrometheusSource(prometheus.url, 'job="job0"', window_s=5.0)
    try:

        async def figures() -> metrics.Figures | None:
            # Until the 5 s window holds enough scrapes, rate() extrapolates from a few.
            got = await source.figures(time.time())
            near = got.request_rate is not None and abs(got.request_rate - RATE) < 0.1 * RATE
            return got if near and got.ttft_p99_s is not None else None

        got = await wait_until_async(figures, timeout=30.0, interval=0.5)
    finally:
        await source.close()
    direct = metrics.window(metrics.parse_totals(_text(10)), metrics.parse_totals(_text(15)), 5.0)
    assert direct.request_rate == pytest.approx(RATE)
    assert got.errors_per_s == 0.0
    assert got.inflight == 3.0
    # The percentiles depend on the buckets' proportions only: the same on both ways.
    for name in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
        assert getattr(got, name) == pytest.approx(getattr(direct, name), rel=1e-6), name
    assert direct.ttft_p50_s == pytest.approx(0.1 + 0.9 * (5 - 3) / 7)
