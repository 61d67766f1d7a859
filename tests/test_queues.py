"""Prefill queue metrics: real nats-server with JetStream, a real /metrics endpoint."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from aiohttp import web

from connector.dynamo.prefill_queue import PrefillQueueMonitor, default_stream

STREAM = "dyn_prefill_queue"
SUBJECT = f"{STREAM}.queue"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


METRICS = """\
# HELP dynamo_frontend_queued_requests Requests waiting.
# TYPE dynamo_frontend_queued_requests gauge
dynamo_frontend_queued_requests{dynamo_namespace="dyn",model="m1"} 4
dynamo_frontend_queued_requests{dynamo_namespace="dyn",model="m2"} 3
dynamo_frontend_queued_requests{dynamo_namespace="other",model="m1"} 100
# HELP dynamo_frontend_inflight_requests In flight.
# TYPE dynamo_frontend_inflight_requests gauge
dynamo_frontend_inflight_requests 9
"""


@pytest.fixture
async def metrics_url() -> AsyncIterator[str]:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS, content_type="text/plain")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def test_default_stream_name() -> None:
    assert default_stream("dyn") == "dyn_prefill_queue"


async def test_nats_down_is_unavailable_fast_and_never_raises() -> None:
    url = f"nats://127.0.0.1:{unused_port()}"
    monitor = PrefillQueueMonitor(url, STREAM)
    started = time.monotonic()
    result = await monitor.read()
    assert time.monotonic() - started < 1.0
    assert result.pop("reason").startswith(f"NATS at {url} is not reachable: ")
    assert result == {
        "status": "unavailable",
        "source": "jetstream",
        "stream": STREAM,
        "consumer": "worker-group",
    }
    await monitor.close()


async def test_no_source_configured() -> None:
    monitor = PrefillQueueMonitor(None, STREAM)
    assert await monitor.read() == {
        "status": "unavailable",
        "reason": "no prefill queue source configured (NATS URL or metrics URL)",
        "source": "jetstream",
        "stream": STREAM,
        "consumer": "worker-group",
    }


async def test_metrics_gauge_summed_over_matching_series(metrics_url: str) -> None:
    monitor = PrefillQueueMonitor(
        None,
        STREAM,
        metrics_url=f"{metrics_url}/metrics",
        metric_name="dynamo_frontend_queued_requests",
        metric_labels={"dynamo_namespace": "dyn"},
    )
    assert await monitor.read() == {
        "status": "ok",
        "source": "metrics",
        "url": f"{metrics_url}/metrics",
        "metric": "dynamo_frontend_queued_requests",
        "pending": 7,
    }


async def test_metrics_missing_series_bad_status_and_unreachable(metrics_url: str) -> None:
    missing = PrefillQueueMonitor(
        None, STREAM, metrics_url=f"{metrics_url}/metrics", metric_name="nope_total"
    )
    result: dict[str, Any] = await missing.read()
    assert (result["status"], result["reason"]) == (
        "unavailable",
        f"{metrics_url}/metrics has no nope_total series",
    )
    broken = PrefillQueueMonitor(None, STREAM, metrics_url=f"{metrics_url}/broken", metric_name="x")
    result = await broken.read()
    assert result["reason"] == f"{metrics_url}/broken answered HTTP 503"
    gone = f"http://127.0.0.1:{unused_port()}/metrics"
    result = await PrefillQueueMonitor(None, STREAM, metrics_url=gone, metric_name="x").read()
    assert result["status"] == "unavailable"
    assert result["reason"].startswith(f"{gone} is not reachable: ")


async def test_metrics_fallback_when_nats_is_down(metrics_url: str) -> None:
    nats_url = f"nats://127.0.0.1:{unused_port()}"
    monitor = PrefillQueueMonitor(
        nats_url,
        STREAM,
        metrics_url=f"{metrics_url}/metrics",
        metric_name="dynamo_frontend_inflight_requests",
    )
    result = await monitor.read()
    assert result.pop("fallback_reason").startswith(f"NATS at {nats_url} is not reachable: ")
    assert result == {
        "status": "ok",
        "source": "metrics",
        "url": f"{metrics_url}/metrics",
        "metric": "dynamo_frontend_inflight_requests",
        "pending": 9,
    }
    await monitor.close()


# ------------------------------------------------------------ real JetStream


@pytest.mark.integration
async def test_jetstream_counts_rates_and_age(nats_server: Any) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT])
        sub = await js.pull_subscribe(SUBJECT, durable="worker-group")
        for _ in range(10):
            await js.publish(SUBJECT, b"0123456789")
        clock = Clock(1000.0)
        wall = Clock(0.0)
        monitor = PrefillQueueMonitor(nats_server.url, STREAM, clock=clock, wall_clock=wall)

        info = await nc.jsm().get_msg(STREAM, 1)
        assert info.time is not None
        wall.now = info.time.timestamp() + 12.5

        first = await monitor.read()
        assert first == {
            "status": "ok",
            "source": "jetstream",
            "stream": STREAM,
            "consumer": "worker-group",
            "consumers": 1,
            "stream_messages": 10,
            "stream_bytes": first["stream_bytes"],
            "pending": 10,
            "ack_pending": 0,
            "redelivered": 0,
            "oldest_pending_age_s": first["oldest_pending_age_s"],
        }
        # From the server's timestamp of message 1 (float seconds: exact to a microsecond).
        assert first["oldest_pending_age_s"] == pytest.approx(12.5, abs=1e-6)
        assert first["stream_bytes"] > 100  # 10 payloads of 10 bytes plus headers

        # A worker takes 4 and acknowledges 3; 6 more are enqueued; 2.0 s pass.
        msgs = await sub.fetch(4, timeout=2)
        assert len(msgs) == 4
        for msg in msgs[:3]:
            await msg.ack_sync()
        for _ in range(6):
            await js.publish(SUBJECT, b"0123456789")
        clock.now += 2.0
        oldest_unacked = await nc.jsm().get_msg(STREAM, 4)
        assert oldest_unacked.time is not None
        wall.now = oldest_unacked.time.timestamp() + 3.0

        second = await monitor.read()
        assert {k: v for k, v in second.items() if k != "stream_bytes"} == {
            "status": "ok",
            "source": "jetstream",
            "stream": STREAM,
            "consumer": "worker-group",
            "consumers": 1,
            "stream_messages": 16,
            "pending": 12,
            "ack_pending": 1,
            "redelivered": 0,
            "oldest_pending_age_s": second["oldest_pending_age_s"],
            "enqueue_rate": 3.0,  # 6 messages / 2.0 s
            "dequeue_rate": 2.0,  # 4 delivered / 2.0 s
        }
        # The oldest unacknowledged message is the 4th (delivered, not acked).
        assert second["oldest_pending_age_s"] == pytest.approx(3.0, abs=1e-6)
        await monitor.close()
    finally:
        await nc.close()


@pytest.mark.integration
async def test_missing_stream_and_consumer(nats_server: Any) -> None:
    monitor = PrefillQueueMonitor(nats_server.url, "absent_prefill_queue")
    assert await monitor.read() == {
        "status": "unavailable",
        "reason": "JetStream stream 'absent_prefill_queue' does not exist",
        "source": "jetstream",
        "stream": "absent_prefill_queue",
        "consumer": "worker-group",
    }
    await monitor.close()
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name="lonely", subjects=["lonely.queue"])
        lonely = PrefillQueueMonitor(nats_server.url, "lonely")
        result = await lonely.read()
        assert result == {
            "status": "ok",
            "source": "jetstream",
            "stream": "lonely",
            "consumer": "worker-group",
            "consumers": 0,
            "stream_messages": 0,
            "stream_bytes": 0,
            "reason": "consumer 'worker-group' does not exist on stream 'lonely'",
        }
        await lonely.close()
    finally:
        await nc.close()
