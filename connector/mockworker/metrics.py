"""Metrics the way a Dynamo process exposes them, fed by simulated requests.

Series names and labels follow ai-dynamo-runtime 1.6.1's system server (``DYN_SYSTEM_PORT``):
``dynamo_component_*`` with ``dynamo_namespace``, ``dynamo_component``, ``dynamo_endpoint``
and ``worker_id`` (the instance id in hex), ``dynamo_component_uptime_seconds`` with only
``worker_id``; a frontend adds ``dynamo_frontend_*`` labelled by ``model``. Values move:
a simulated request stream (``--request-rate`` per second) drives counters, gauges and
histograms, so dashboards and rate() queries have something to show.
"""

from __future__ import annotations

import asyncio
import random
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from connector.mockworker.config import MockConfig

COMPONENT_LABELS = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint", "worker_id")
FRONTEND_ENDPOINT = "chat_completions"


class MockMetrics:
    """One registry per process; series appear once the worker has an instance id."""

    def __init__(self, cfg: MockConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.monotonic()
        self.worker_id: str | None = None
        r = self.registry
        self.requests = Counter(
            "dynamo_component_requests",
            "Requests handled by this endpoint",
            COMPONENT_LABELS,
            registry=r,
        )
        self.inflight = Gauge(
            "dynamo_component_inflight_requests",
            "Requests being handled by this endpoint now",
            COMPONENT_LABELS,
            registry=r,
        )
        self.duration = Histogram(
            "dynamo_component_request_duration_seconds",
            "Time to handle a request",
            COMPONENT_LABELS,
            registry=r,
        )
        self.request_bytes = Counter(
            "dynamo_component_request_bytes",
            "Request payload bytes received",
            COMPONENT_LABELS,
            registry=r,
        )
        self.response_bytes = Counter(
            "dynamo_component_response_bytes",
            "Response payload bytes sent",
            COMPONENT_LABELS,
            registry=r,
        )
        self.uptime = Gauge(
            "dynamo_component_uptime_seconds",
            "Seconds since this process started",
            ("worker_id",),
            registry=r,
        )
        self.fe_requests = Counter(
            "dynamo_frontend_requests",
            "LLM requests processed by the frontend",
            ("model", "endpoint", "request_type", "status"),
            registry=r,
        )
        self.fe_queued = Gauge(
            "dynamo_frontend_queued_requests",
            "Requests waiting for their first token",
            ("model",),
            registry=r,
        )
        self.fe_inflight = Gauge(
            "dynamo_frontend_inflight_requests",
            "Requests in flight to the engine",
            ("model",),
            registry=r,
        )
        self.fe_ttft = Histogram(
            "dynamo_frontend_time_to_first_token_seconds",
            "Time to first token",
            ("model",),
            registry=r,
        )

    @property
    def is_frontend(self) -> bool:
        return self.cfg.role == "frontend"

    def bind(self, instance_id: int) -> None:
        """Create every series at zero for this instance, so they exist before traffic."""
        self.worker_id = f"{instance_id:x}"
        for endpoint in self.cfg.endpoints:
            labels = self._labels(endpoint)
            for metric in (self.requests, self.request_bytes, self.response_bytes):
                metric.labels(*labels)
            self.inflight.labels(*labels).set(0)
            self.duration.labels(*labels)
        self.uptime.labels(self.worker_id).set(0)
        if self.is_frontend:
            model = self.cfg.model
            self.fe_requests.labels(model, FRONTEND_ENDPOINT, "stream", "success")
            self.fe_queued.labels(model).set(0)
            self.fe_inflight.labels(model).set(0)
            self.fe_ttft.labels(model)

    def _labels(self, endpoint: str) -> tuple[str, str, str, str]:
        assert self.worker_id is not None
        return (self.cfg.namespace, self.cfg.component, endpoint, self.worker_id)

    def exposition(self) -> bytes:
        if self.worker_id is not None:
            self.uptime.labels(self.worker_id).set(round(time.monotonic() - self.started, 3))
        return generate_latest(self.registry)

    async def simulate(self) -> None:
        """Start simulated requests at ``request_rate`` per second, round-robin over the
        endpoints, until cancelled."""
        rate = self.cfg.request_rate
        if rate <= 0 or self.worker_id is None:
            return
        running: set[asyncio.Task[None]] = set()
        n = 0
        try:
            while True:
                endpoint = self.cfg.endpoints[n % len(self.cfg.endpoints)]
                n += 1
                task = asyncio.get_running_loop().create_task(self._one_request(endpoint))
                running.add(task)
                task.add_done_callback(running.discard)
                await asyncio.sleep(self.rng.expovariate(rate))
        finally:
            for task in list(running):
                task.cancel()

    async def _one_request(self, endpoint: str) -> None:
        labels = self._labels(endpoint)
        model = self.cfg.model
        rng = self.rng
        start = time.monotonic()
        queued = self.is_frontend
        self.inflight.labels(*labels).inc()
        if self.is_frontend:
            self.fe_queued.labels(model).inc()
            self.fe_inflight.labels(model).inc()
        try:
            ttft = rng.uniform(0.005, 0.08)
            await asyncio.sleep(ttft)
            if self.is_frontend:
                queued = False
                self.fe_queued.labels(model).dec()
                self.fe_ttft.labels(model).observe(ttft)
            await asyncio.sleep(rng.uniform(0.005, 0.15))
            self.requests.labels(*labels).inc()
            self.request_bytes.labels(*labels).inc(rng.randint(200, 4000))
            self.response_bytes.labels(*labels).inc(rng.randint(100, 8000))
            self.duration.labels(*labels).observe(time.monotonic() - start)
            if self.is_frontend:
                self.fe_requests.labels(model, FRONTEND_ENDPOINT, "stream", "success").inc()
        finally:
            self.inflight.labels(*labels).dec()
            if self.is_frontend:
                self.fe_inflight.labels(model).dec()
            if queued:  # cancelled before its first token
                self.fe_queued.labels(model).dec()
