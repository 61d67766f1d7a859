"""Counters and the scale-duration histogram, fed by the connector's event log.

Subscribed to :class:`connector.events.EventLog` (events are pushed synchronously on the
event loop; scrapes read from a thread, hence the lock). Each finished scale observes its
duration with the operation's trace id as the exemplar, which OpenMetrics scrapes carry.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from connector.events import Event
from exporter.catalog import (
    EVENT_KINDS,
    SCALE_DURATION_BUCKETS,
    SCALE_OUTCOMES,
    SCALE_SOURCES,
    spec,
)

_OPERATIONS = spec("scale_operations_total")
_DURATION = spec("scale_duration_seconds")
_CRASHLOOPS = spec("crashloops_total")
_EVENTS = spec("events_total")


def _enum(value: str | None, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


def direction(event: Event) -> str:
    before, after = event.from_replicas, event.to_replicas
    if before is None or after is None or before == after:
        return "none"
    return "up" if after > before else "down"


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(SCALE_DURATION_BUCKETS) + 1))
    exemplars: list[Exemplar | None] = field(
        default_factory=lambda: [None] * (len(SCALE_DURATION_BUCKETS) + 1)
    )
    total: float = 0.0

    def observe(self, value: float, exemplar: Exemplar | None) -> None:
        i = bisect.bisect_left(SCALE_DURATION_BUCKETS, value)
        self.counts[i] += 1
        self.total += value
        if exemplar is not None:
            self.exemplars[i] = exemplar


class ScalingMetrics(Collector):
    """Counts events; ``observe`` is the :class:`EventLog` subscriber."""

    def __init__(
        self,
        namespace_of: Callable[[str | None], str],
        on_scale: Callable[[Event, dict[str, str]], None] | None = None,
    ) -> None:
        self._namespace_of = namespace_of
        self._on_scale = on_scale
        self._lock = threading.Lock()
        self._operations: dict[tuple[str, ...], int] = {}
        self._durations: dict[tuple[str, ...], _Histogram] = {}
        self._crashloops: dict[tuple[str, ...], int] = {}
        self._events: dict[tuple[str, ...], int] = {}
        self._last_seq = 0

    def observe(self, event: Event) -> None:
        """Account for one event (idempotent per ``seq``: replays are ignored)."""
        ns = self._namespace_of(event.component)
        with self._lock:
            if event.seq <= self._last_seq:
                return
            self._last_seq = event.seq
            key = (ns, _enum(event.kind, EVENT_KINDS))
            self._events[key] = self._events.get(key, 0) + 1
            if event.component is None:
                return
            if event.kind == "crashloop":
                ckey = (ns, event.component)
                self._crashloops[ckey] = self._crashloops.get(ckey, 0) + 1
            # A scale is counted when it finishes, i.e. when its event carries an outcome.
            if event.kind != "scale" or event.outcome is None:
                return
            way = direction(event)
            outcome = _enum(event.outcome, SCALE_OUTCOMES)
            okey = (ns, event.component, way, _enum(event.source, SCALE_SOURCES), outcome)
            self._operations[okey] = self._operations.get(okey, 0) + 1
            if event.duration_s is None or not math.isfinite(event.duration_s):
                return
            exemplar = (
                Exemplar({"trace_id": event.trace_id}, event.duration_s, event.time)
                if event.trace_id
                else None
            )
            hkey = (ns, event.component, way, outcome)
            self._durations.setdefault(hkey, _Histogram()).observe(event.duration_s, exemplar)
        if self._on_scale is not None:
            self._on_scale(event, dict(zip(_DURATION.labels, hkey, strict=True)))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            operations = sorted(self._operations.items())
            durations = sorted(
                (k, list(h.counts), list(h.exemplars), h.total) for k, h in self._durations.items()
            )
            crashloops = sorted(self._crashloops.items())
            events = sorted(self._events.items())
        if operations:
            fam = CounterMetricFamily(
                _OPERATIONS.family_name, _OPERATIONS.help, labels=list(_OPERATIONS.labels)
            )
            for labels, count in operations:
                fam.add_metric(list(labels), count)
            yield fam
        if durations:
            hist = HistogramMetricFamily(
                _DURATION.family_name,
                _DURATION.help,
                labels=list(_DURATION.labels),
                unit=_DURATION.unit,
            )
            bounds = [*(_le(b) for b in SCALE_DURATION_BUCKETS), "+Inf"]
            for labels, counts, exemplars, total in durations:
                buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
                cumulative = 0
                for bound, count, exemplar in zip(bounds, counts, exemplars, strict=True):
                    cumulative += count
                    if exemplar is None:
                        buckets.append((bound, cumulative))
                    else:
                        buckets.append((bound, cumulative, exemplar))
                hist.add_metric(list(labels), buckets, total)
            yield hist
        if crashloops:
            fam = CounterMetricFamily(
                _CRASHLOOPS.family_name, _CRASHLOOPS.help, labels=list(_CRASHLOOPS.labels)
            )
            for labels, count in crashloops:
                fam.add_metric(list(labels), count)
            yield fam
        if events:
            fam = CounterMetricFamily(
                _EVENTS.family_name, _EVENTS.help, labels=list(_EVENTS.labels)
            )
            for labels, count in events:
                fam.add_metric(list(labels), count)
            yield fam


def _le(bound: float) -> str:
    return repr(float(bound))
