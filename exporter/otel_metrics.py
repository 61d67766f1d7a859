"""The metric catalog as OpenTelemetry instruments, for export over OTLP.

Each catalog entry becomes one observable instrument named by its ``otel_name`` (semantic
conventions where one fits: ``process.cpu.time``, ``hw.gpu.utilization``, ...; the mapping
is documented in ``docs/metrics.md``). Callbacks read the same families the Prometheus
collector renders, so both exports carry the same numbers; the families are rendered once per
OTel collection, not once per instrument. The scale-duration histogram is recorded as events
arrive (OTel has no observable histogram).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
from prometheus_client.metrics_core import Metric

from exporter.catalog import CATALOG, GPU, OTEL_ATTRIBUTES, SCALE_DURATION_BUCKETS, Group, Kind
from exporter.catalog import spec as catalog_spec

METER_NAME = "dynamo_local.exporter"


def attributes(labels: Mapping[str, str], group: Group | None = None) -> dict[str, str]:
    """Prometheus labels -> OTel attributes (``hw.type=gpu`` added on GPU metrics)."""
    out = {OTEL_ATTRIBUTES.get(k, f"dynamo_local.{k}"): v for k, v in labels.items()}
    if GPU in labels and group is Group.GPU:
        out["hw.type"] = "gpu"
    return out


class _FamilyCache:
    """Renders the families at most once per ``max_age_s`` for all instrument callbacks."""

    def __init__(self, render: Callable[[], Iterable[Metric]], max_age_s: float = 0.5) -> None:
        self._render = render
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._at = -1.0e9
        self._by_name: dict[str, Metric] = {}

    def get(self, name: str) -> Metric | None:
        with self._lock:
            now = time.monotonic()
            if now - self._at > self._max_age_s:
                self._by_name = {m.name: m for m in self._render()}
                self._at = now
            return self._by_name.get(name)


class OtelMetrics:
    """Observable instruments for every catalog metric, plus the scale-duration histogram."""

    def __init__(
        self, meter_provider: MeterProvider, render: Callable[[], Iterable[Metric]]
    ) -> None:
        meter = meter_provider.get_meter(METER_NAME)
        self._cache = _FamilyCache(render)
        for spec in CATALOG:
            if spec.kind is Kind.HISTOGRAM:
                continue
            callback = self._callback(spec.name)
            kwargs: dict[str, Any] = {
                "name": spec.otel_name,
                "callbacks": [callback],
                "unit": spec.otel_unit,
                "description": spec.help,
            }
            if spec.otel_instrument == "counter":
                meter.create_observable_counter(**kwargs)
            elif spec.otel_instrument == "updowncounter":
                meter.create_observable_up_down_counter(**kwargs)
            else:
                meter.create_observable_gauge(**kwargs)
        duration = catalog_spec("scale_duration_seconds")
        self._duration: Histogram = meter.create_histogram(
            duration.otel_name,
            unit=duration.otel_unit,
            description=duration.help,
            explicit_bucket_boundaries_advisory=list(SCALE_DURATION_BUCKETS),
        )

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        spec = catalog_spec(name)

        def observe(_: CallbackOptions) -> Iterable[Observation]:
            family = self._cache.get(spec.family_name)
            if family is None:
                return []
            return [
                Observation(sample.value, attributes(sample.labels, spec.group))
                for sample in family.samples
                if sample.name == spec.name
            ]

        return observe

    def record_scale(self, duration_s: float, labels: Mapping[str, str]) -> None:
        self._duration.record(duration_s, attributes(labels))
