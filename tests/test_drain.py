"""Draining a worker: after it left discovery, wait until its in-flight requests are done
(read from its own /metrics, as Dynamo 1.6.1's runtime exposes them), within a bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from connector.dynamo.drain import SETTLE_S, inflight_requests, wait_idle


def exposition(generate: int, clear: int) -> str:
    """The family as a Dynamo 1.6.1 worker's system port shows it (two endpoints)."""
    labels = 'dynamo_component="backend",dynamo_namespace="dyn",dynamo_endpoint='
    return "\n".join(
        [
            "# HELP dynamo_component_inflight_requests Number of requests being processed",
            "# TYPE dynamo_component_inflight_requests gauge",
            f'dynamo_component_inflight_requests{{{labels}"generate"}} {generate}',
            f'dynamo_component_inflight_requests{{{labels}"clear_kv_blocks"}} {clear}',
            "# TYPE dynamo_component_requests_total counter",
            f'dynamo_component_requests_total{{{labels}"generate"}} 7',
            "",
        ]
    )


def test_inflight_is_the_sum_over_endpoints() -> None:
    assert inflight_requests(exposition(2, 1)) == 3.0
    assert inflight_requests(exposition(0, 0)) == 0.0
    assert inflight_requests("# TYPE other gauge\nother 5\n") is None


class Worker:
    """A worker's /metrics whose in-flight count the test sets."""

    def __init__(self) -> None:
        self.inflight = 0
        self.port = 0

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=exposition(self.inflight, 0))


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = Worker()
    app = web.Application()
    app.router.add_get("/metrics", w.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    w.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield w
    await runner.cleanup()


async def test_the_drain_waits_for_in_flight_requests_then_ends(worker: Worker) -> None:
    worker.inflight = 2
    started = time.monotonic()

    async def finish_later() -> None:
        await asyncio.sleep(1.0)
        worker.inflight = 0

    finishing = asyncio.create_task(finish_later())
    result = await wait_idle(worker.port, limit_s=10)
    await finishing
    waited = time.monotonic() - started
    assert (result.inflight, result.timed_out) == (0.0, False)
    assert 1.0 <= waited < 3.0


async def test_an_idle_worker_is_drained_after_the_settle_period(worker: Worker) -> None:
    result = await wait_idle(worker.port, limit_s=10)
    assert (result.inflight, result.timed_out) == (0.0, False)
    assert SETTLE_S <= result.waited_s < SETTLE_S + 1.0


async def test_the_drain_gives_up_at_its_bound(worker: Worker) -> None:
    worker.inflight = 1
    result = await wait_idle(worker.port, limit_s=1.0)
    assert (result.inflight, result.timed_out) == (1.0, True)
    assert 1.0 <= result.waited_s < 2.5


async def test_without_metrics_only_an_explicit_drain_is_waited_whole() -> None:
    await_default = await wait_idle(None, limit_s=5.0)
    assert (await_default.inflight, await_default.timed_out) == (None, False)
    assert await_default.waited_s < SETTLE_S + 0.5
    explicit = await wait_idle(None, limit_s=1.5, full_without_metrics=True)
    assert 1.5 <= explicit.waited_s < 2.5
