"""The exporter as one object: sampler + registry + event counters (+ OTel instruments).

Composition root usage (CLI / server start-up)::

    telemetry = setup_telemetry()                      # exporter.tracing
    exporter = build_exporter(connector, gpu_backend=backend, queue_reader=..., ...)
    exporter.instrument_otel(telemetry.meter_provider) # when metrics are exported
    await exporter.start()
    app.router.add_get("/metrics", exporter.handle_metrics)
    connector.set_metrics_source(exporter.component_metrics)   # the connector's hook
    ...
    await exporter.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.metrics import MeterProvider
from prometheus_client.registry import CollectorRegistry

from connector.events import Event
from connector.view import ConnectorReader
from exporter.collector import RowCache, SnapshotCollector
from exporter.exposition import Exposition
from exporter.gpu_types import GpuSource
from exporter.http import metrics_handler
from exporter.otel_metrics import OtelMetrics
from exporter.process_tree import ProcessTreeSampler
from exporter.sampling import Sampler, Snapshot, SourceFn, empty_view
from exporter.scaling import ScalingMetrics
from exporter.usage import component_usage


class Exporter:
    """Samples in the background; renders the latest snapshot on every scrape."""

    def __init__(self, reader: ConnectorReader, sampler: Sampler, clock: Callable[[], float]):
        self.reader = reader
        self.sampler = sampler
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        self._otel: OtelMetrics | None = None
        self.scaling = ScalingMetrics(self._namespace_of, on_scale=self._record_scale)
        rows = RowCache()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.latest_snapshot, rows, clock))
        self.registry.register(self.scaling)
        self.exposition = Exposition(self.latest_snapshot, rows, self.scaling, clock)
        sampler.after_snapshot = self.exposition.prerender
        self.handle_metrics = metrics_handler(self.exposition)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Count past and future events, take a first snapshot, then sample every interval."""
        if self._task is not None:
            return
        # Replay what the ring still holds, then subscribe; both on the loop, so no event
        # falls in between, and ``seq`` makes a replayed event count once.
        for event in self.reader.recent_events(0):
            self.scaling.observe(event)
        self._unsubscribe = self.reader.subscribe_events(self.scaling.observe)
        await self.sampler.sample_once()
        self._task = asyncio.create_task(self._run_after_first(), name="exporter-sampler")

    async def _run_after_first(self) -> None:
        await asyncio.sleep(self.sampler.interval_s)
        await self.sampler.run()

    async def stop(self) -> None:
        """Stop sampling and unsubscribe. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if callable(self._unsubscribe):
            self._unsubscribe()
        self._unsubscribe = None

    async def sample_once(self) -> Snapshot:
        """Take a snapshot now (tests; the periodic loop does this by itself)."""
        return await self.sampler.sample_once()

    # --- reading ---------------------------------------------------------------------------
    def latest_snapshot(self) -> Snapshot | None:
        return self.sampler.latest

    def component_metrics(self, name: str) -> dict[str, Any]:
        """Usage of one component from the latest snapshot (what the connector's
        ``get_component_metrics`` and ``get_resource_usage`` return)."""
        snapshot = self.latest_snapshot()
        view = snapshot.view if snapshot is not None else empty_view()
        return component_usage(snapshot, view, name, self._clock())

    def instrument_otel(self, meter_provider: MeterProvider | None) -> None:
        """Export the catalog through OTel metrics too (no-op for ``None``)."""
        if meter_provider is None or self._otel is not None:
            return
        self._otel = OtelMetrics(meter_provider, self.registry.collect)

    def _namespace_of(self, component: str | None) -> str:
        snapshot = self.latest_snapshot()
        view = snapshot.view if snapshot is not None else None
        if view is None:
            with contextlib.suppress(Exception):
                view = self.reader.view()
        if view is None:
            return ""
        found = view.component(component) if component else None
        if found is not None and found.dynamo_namespace:
            return found.dynamo_namespace
        return view.namespace

    def _record_scale(self, event: Event, labels: dict[str, str]) -> None:
        if self._otel is not None and event.duration_s is not None:
            self._otel.record_scale(event.duration_s, labels)


def build_exporter(
    reader: ConnectorReader,
    *,
    gpu_backend: GpuSource | None = None,
    machine_view: SourceFn | None = None,
    queue_reader: SourceFn | None = None,
    discovery_stats: SourceFn | None = None,
    planner_status: SourceFn | None = None,
    autoscaler_status: SourceFn | None = None,
    interval_s: float = 1.0,
    detail_interval_s: float = 10.0,
    source_timeout_s: float | None = None,
    processes: ProcessTreeSampler | None = None,
    clock: Callable[[], float] = time.time,
) -> Exporter:
    """An exporter over ``reader``; call ``await exporter.start()`` on the connector's loop.

    ``machine_view``, ``queue_reader``, ``discovery_stats``, ``planner_status`` and
    ``autoscaler_status`` are
    optional callables returning the dicts described in :mod:`exporter.sources`; sync ones
    must not block (they run on the loop), async ones are awaited with a deadline.
    ``gpu_backend`` is called in a worker thread only. ``detail_interval_s`` bounds how often
    PSS/USS are re-read.
    """
    sampler = Sampler(
        reader,
        gpu_backend=gpu_backend,
        machine_view=machine_view,
        queue_reader=queue_reader,
        discovery_stats=discovery_stats,
        planner_status=planner_status,
        autoscaler_status=autoscaler_status,
        interval_s=interval_s,
        source_timeout_s=source_timeout_s,
        processes=processes or ProcessTreeSampler(detail_interval_s=detail_interval_s),
        clock=clock,
    )
    return Exporter(reader, sampler, clock)
