"""Turns a snapshot into rows per catalog metric, and rows into prometheus_client families.

Nothing here reads psutil, NVML or any source: it only reads an immutable
:class:`~exporter.sampling.Snapshot` (which holds the connector's view as of the sampling
cycle). Rows are built anew from each snapshot, so the series of a replica that is gone
vanish by themselves. The scrape path renders rows straight to text
(:mod:`exporter.exposition`); :class:`SnapshotCollector` serves the same rows to
prometheus_client registries (and through them to the OTel export).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter.catalog import (
    BY_NAME,
    CATALOG,
    COMPONENT_STATES,
    GPU_ALLOCATION_STATES,
    REPLICA_STATES,
    THROTTLE_REASONS,
    Kind,
    MetricSpec,
)
from exporter.sampling import Snapshot

_ORDER = {spec.name: i for i, spec in enumerate(CATALOG)}
P = "dynamo_local_"
AGE = P + "exporter_snapshot_age_seconds"

Row = tuple[tuple[str, ...], float]  # label values in the catalog's label order, value


class Rows:
    """Samples per catalog metric; only metrics with samples are emitted, in catalog order."""

    def __init__(self) -> None:
        self._rows: dict[str, list[Row]] = {}

    def add(self, name: str, labels: tuple[str, ...], value: float | None) -> None:
        if value is None:
            return  # unavailable: omitted, never a sentinel
        rows = self._rows.get(name)
        if rows is None:
            if len(labels) != len(BY_NAME[name].labels):
                raise ValueError(f"{name}: labels {labels!r} do not match the catalog")
            rows = self._rows[name] = []
        rows.append((labels, float(value)))

    def families(self) -> list[tuple[MetricSpec, list[Row]]]:
        ordered = sorted(self._rows.items(), key=lambda kv: _ORDER[kv[0]])
        return [(BY_NAME[name], rows) for name, rows in ordered]


def throttle_reasons(value: object) -> tuple[str, ...] | None:
    """Active throttle reasons from an NVML bit mask or an iterable of reason names."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return tuple(r for bit, r in enumerate(THROTTLE_REASONS) if value & (1 << bit))
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return tuple(str(v) for v in value)
    return None


def snapshot_rows(snapshot: Snapshot) -> list[tuple[MetricSpec, list[Row]]]:
    """Every family a snapshot determines (all but the snapshot age, which needs a clock)."""
    f = Rows()
    view = snapshot.view
    namespace_of = {c.name: c.dynamo_namespace or view.namespace for c in view.components}
    _components(f, snapshot, namespace_of)
    _replicas(f, snapshot, namespace_of)
    _usage(f, snapshot, namespace_of)
    _gpus(f, snapshot)
    _machine(f, snapshot)
    _queue_and_discovery(f, snapshot)
    _planner(f, snapshot)
    _autoscaler(f, snapshot, namespace_of)
    _health(f, snapshot)
    return f.families()


def age_rows(snapshot: Snapshot, now: float) -> list[tuple[MetricSpec, list[Row]]]:
    return [(BY_NAME[AGE], [((), max(0.0, now - snapshot.taken_at))])]


def _components(f: Rows, snapshot: Snapshot, namespace_of: dict[str, str]) -> None:
    view = snapshot.view
    for c in view.components:
        base = (namespace_of[c.name], c.name)
        f.add(P + "component_info", (*base, c.role, c.sub_component_type or ""), 1)
        f.add(P + "component_replicas_desired", base, c.desired)
        f.add(P + "component_replicas_running", base, c.running)
        f.add(P + "component_replicas_ready", base, c.ready)
        f.add(P + "component_replicas_min", base, c.min_replicas)
        f.add(P + "component_replicas_max", base, c.max_replicas)
        replicas = view.replicas_of(c.name)
        crashloop = sum(r.state == "crashloop" for r in replicas)
        f.add(P + "component_replicas_crashloop", base, crashloop)
        for state in COMPONENT_STATES:
            f.add(P + "component_state", (*base, state), c.status == state)
        f.add(P + "component_restarts_total", base, c.restarts)
        f.add(P + "component_scale_in_flight", base, c.scale_in_flight)
        allocated = sum(len(r.gpus) * (r.gpu_fraction or 1.0) for r in replicas)
        f.add(P + "component_gpus_allocated", base, allocated)


def _replicas(f: Rows, snapshot: Snapshot, namespace_of: dict[str, str]) -> None:
    view = snapshot.view
    for r in view.replicas:
        base = (namespace_of.get(r.component, view.namespace), r.component, r.replica)
        f.add(P + "replica_ready", base, r.ready)
        for state in REPLICA_STATES:
            f.add(P + "replica_state", (*base, state), r.state == state)
        f.add(P + "replica_restarts_total", base, r.restarts)
        started = r.started_at if r.started_at is not None else r.create_time
        f.add(P + "replica_start_time_seconds", base, started)
        for gpu in r.gpus:
            f.add(P + "replica_gpu_allocated_ratio", (*base, gpu), r.gpu_fraction or 1.0)
        f.add(P + "replica_cpu_reserved_cores", base, r.cpu_cores or None)
        f.add(P + "replica_memory_reserved_bytes", base, r.memory_bytes or None)
        f.add(P + "replica_memory_limit_bytes", base, r.memory_limit_bytes or None)


def _usage(f: Rows, snapshot: Snapshot, namespace_of: dict[str, str]) -> None:
    default_ns = snapshot.view.namespace
    for u in snapshot.replicas:
        base = (namespace_of.get(u.component, default_ns), u.component, u.replica)
        f.add(P + "replica_info", (*base, str(u.pid), u.command or ""), 1)
        f.add(P + "replica_processes", base, u.processes)
        f.add(P + "replica_cpu_seconds_total", base, u.cpu_seconds_total)
        f.add(P + "replica_cpu_utilization_ratio", base, u.cpu_utilization_ratio)
        f.add(P + "replica_memory_rss_bytes", base, u.memory_rss_bytes)
        f.add(P + "replica_memory_pss_bytes", base, u.memory_pss_bytes)
        f.add(P + "replica_memory_uss_bytes", base, u.memory_uss_bytes)
        for g in u.gpus:
            f.add(P + "replica_gpu_memory_used_bytes", (*base, g.gpu), g.memory_used_bytes)
            f.add(P + "replica_gpu_sm_utilization_ratio", (*base, g.gpu), g.sm_utilization_ratio)


def _gpus(f: Rows, snapshot: Snapshot) -> None:
    names = {d.uuid: d.name for d in snapshot.gpu_devices}
    for s in snapshot.gpus:
        gpu = (s.uuid,)
        f.add(P + "gpu_info", (s.uuid, str(s.index), names.get(s.uuid, "")), 1)
        f.add(P + "gpu_utilization_ratio", gpu, s.utilization_ratio)
        f.add(P + "gpu_memory_used_bytes", gpu, s.memory_used_bytes)
        f.add(P + "gpu_memory_total_bytes", gpu, s.memory_total_bytes)
        f.add(P + "gpu_temperature_celsius", gpu, s.temperature_celsius)
        f.add(P + "gpu_power_watts", gpu, s.power_watts)
        f.add(P + "gpu_energy_joules_total", gpu, s.energy_joules)
        active = throttle_reasons(s.throttle_reasons)
        if active is not None:
            for reason in THROTTLE_REASONS:
                f.add(P + "gpu_throttle_reason", (s.uuid, reason), reason in active)
        f.add(P + "gpu_ecc_uncorrected_errors_total", gpu, s.ecc_uncorrected_volatile)


def _machine(f: Rows, snapshot: Snapshot) -> None:
    m = snapshot.machine
    if m is None:
        return
    f.add(P + "gpus_allocatable", (), len(m.gpus))
    f.add(P + "gpus_free", (), m.free_gpus)
    f.add(P + "cpu_allocatable_cores", (), m.cpu_allocatable_cores)
    f.add(P + "cpu_reserved_cores", (), m.cpu_reserved_cores)
    f.add(P + "memory_allocatable_bytes", (), m.memory_allocatable_bytes)
    f.add(P + "memory_reserved_bytes", (), m.memory_reserved_bytes)
    f.add(P + "replicas_lingering", (), m.lingering_replicas)
    for g in m.gpus:
        for state in GPU_ALLOCATION_STATES:
            f.add(P + "gpu_allocation_state", (g.uuid, state), g.state == state)


def _queue_and_discovery(f: Rows, snapshot: Snapshot) -> None:
    ns = (snapshot.view.namespace,)
    q = snapshot.queue
    if q is not None:
        f.add(P + "prefill_queue_pending_messages", ns, q.pending)
        f.add(P + "prefill_queue_ack_pending_messages", ns, q.ack_pending)
        f.add(P + "prefill_queue_redelivered_messages", ns, q.redelivered)
        f.add(P + "prefill_queue_consumers", ns, q.consumers)
        f.add(P + "prefill_queue_stream_messages", ns, q.stream_messages)
        f.add(P + "prefill_queue_stream_bytes", ns, q.stream_bytes)
        f.add(P + "prefill_queue_enqueued_per_second", ns, q.enqueue_rate)
        f.add(P + "prefill_queue_dequeued_per_second", ns, q.dequeue_rate)
        f.add(P + "prefill_queue_oldest_pending_age_seconds", ns, q.oldest_pending_age_s)
    d = snapshot.discovery
    if d is not None:
        for component, count in d.instances:
            f.add(P + "discovery_instances", (*ns, component), count)
        f.add(P + "discovery_stale_reaped_total", ns, d.stale_reaped_total)


def _planner(f: Rows, snapshot: Snapshot) -> None:
    p = snapshot.planner
    if p is None:
        return  # no executor: no series (not zeros)
    ns = (p.namespace,)
    f.add(P + "planner_decision_id", ns, p.decision_id)
    f.add(P + "planner_decision_acknowledged_id", ns, p.acknowledged_id)
    f.add(P + "planner_decision_seen_timestamp_seconds", ns, p.decision_seen_at)


def _autoscaler(f: Rows, snapshot: Snapshot, namespace_of: dict[str, str]) -> None:
    a = snapshot.autoscaler
    if a is None:
        return  # no policy: no series (not zeros)
    for so in a.scaled_objects:
        base = (namespace_of.get(so.component, snapshot.view.namespace), so.component)
        f.add(P + "autoscaler_desired_replicas", (*base, so.scaled_object), so.desired_replicas)
        for t in so.triggers:
            labels = (*base, so.scaled_object, t.trigger)
            f.add(P + "autoscaler_metric_value", labels, t.value)
            f.add(P + "autoscaler_active", labels, t.active)
            f.add(P + "autoscaler_errors_total", labels, t.errors_total)


def _health(f: Rows, snapshot: Snapshot) -> None:
    for h in snapshot.health:
        source = (h.source,)
        f.add(P + "exporter_source_up", source, h.up)
        f.add(P + "exporter_source_last_success_timestamp_seconds", source, h.last_success)
        f.add(P + "exporter_source_collection_duration_seconds", source, h.duration_s)
        f.add(P + "exporter_source_errors_total", source, h.errors_total)
    f.add(P + "exporter_snapshot_timestamp_seconds", (), snapshot.taken_at)
    f.add(P + "exporter_snapshots_total", (), snapshot.seq)
    f.add(P + "exporter_collection_cpu_seconds_total", (), snapshot.collection_cpu_seconds_total)


def new_family(spec: MetricSpec) -> Metric:
    """An empty prometheus_client family for a catalog entry."""
    labels = list(spec.labels)
    if spec.kind is Kind.COUNTER:
        return CounterMetricFamily(spec.family_name, spec.help, labels=labels, unit=spec.unit)
    if spec.kind is Kind.GAUGE:
        return GaugeMetricFamily(spec.family_name, spec.help, labels=labels, unit=spec.unit)
    if spec.kind is Kind.INFO:
        return InfoMetricFamily(spec.family_name, spec.help, labels=labels)
    raise ValueError(f"{spec.name}: {spec.kind} families are built by their own collector")


def to_families(rows: Iterable[tuple[MetricSpec, list[Row]]]) -> list[Metric]:
    out: list[Metric] = []
    for spec, samples in rows:
        family = new_family(spec)
        for labels, value in samples:
            if isinstance(family, InfoMetricFamily):
                family.add_metric(list(labels), {})
            elif isinstance(family, CounterMetricFamily | GaugeMetricFamily):
                family.add_metric(list(labels), value)
        out.append(family)
    return out


class RowCache:
    """The rows of the latest snapshot, built once per snapshot however many readers ask."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = -1
        self._rows: list[tuple[MetricSpec, list[Row]]] = []

    def rows(self, snapshot: Snapshot) -> list[tuple[MetricSpec, list[Row]]]:
        with self._lock:
            if snapshot.seq != self._seq:
                self._rows = snapshot_rows(snapshot)
                self._seq = snapshot.seq
            return self._rows


class SnapshotCollector(Collector):
    """For prometheus_client registries: the latest snapshot's families, then its age."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        cache: RowCache,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot = snapshot
        self._cache = cache
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        yield from to_families(self._cache.rows(snapshot))
        yield from to_families(age_rows(snapshot, self._clock()))
