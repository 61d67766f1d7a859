"""The Prometheus collector: fresh metric families from the latest snapshot on every scrape.

Nothing here reads psutil, NVML or any source: it only turns an immutable
:class:`~exporter.sampling.Snapshot` (and the connector's current view, which is cheap and
in memory) into families named by the catalog. Because families are built anew on each
scrape, the series of a replica that is gone vanish by themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from connector.view import ConnectorView
from exporter.catalog import (
    BY_NAME,
    CATALOG,
    COMP,
    COMPONENT_STATES,
    GPU,
    GPU_ALLOCATION_STATES,
    NS,
    REPLICA,
    REPLICA_STATES,
    THROTTLE_REASONS,
    Kind,
    MetricSpec,
)
from exporter.sampling import Snapshot

_ORDER = {spec.name: i for i, spec in enumerate(CATALOG)}


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


class Families:
    """Collects samples per catalog metric; only metrics with samples are emitted."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[MetricSpec, Metric]] = {}

    def add(self, name: str, labels: Mapping[str, str], value: float | None) -> None:
        if value is None:
            return  # unavailable: omitted, never a sentinel
        spec = BY_NAME[name]
        entry = self._families.get(name)
        if entry is None:
            entry = self._families[name] = (spec, new_family(spec))
        family = entry[1]
        values = [labels[label] for label in spec.labels]
        if isinstance(family, InfoMetricFamily):
            family.add_metric(values, {})
        elif isinstance(family, CounterMetricFamily | GaugeMetricFamily):
            family.add_metric(values, float(value))

    def metrics(self) -> list[Metric]:
        return [m for _, (_, m) in sorted(self._families.items(), key=lambda kv: _ORDER[kv[0]])]


P = "dynamo_local_"


def throttle_reasons(value: object) -> tuple[str, ...] | None:
    """Active throttle reasons from an NVML bit mask or an iterable of reason names."""
    if value is None:
        return None
    if isinstance(value, int):
        return tuple(r for bit, r in enumerate(THROTTLE_REASONS) if value & (1 << bit))
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return tuple(str(v) for v in value)
    return None


def render(snapshot: Snapshot | None, view: ConnectorView, now: float) -> list[Metric]:
    """All snapshot-based families, in catalog order."""
    f = Families()
    namespace_of = {c.name: c.dynamo_namespace or view.namespace for c in view.components}
    if snapshot is not None:
        for c in snapshot.view.components:
            namespace_of.setdefault(c.name, c.dynamo_namespace or snapshot.view.namespace)
    _components(f, view)
    _replicas(f, view, namespace_of)
    if snapshot is not None:
        default_ns = view.namespace or snapshot.view.namespace
        _usage(f, snapshot, namespace_of, default_ns)
        _gpus(f, snapshot)
        _machine(f, snapshot)
        _queue_and_discovery(f, snapshot, default_ns)
        _health(f, snapshot, now)
    return f.metrics()


def _components(f: Families, view: ConnectorView) -> None:
    for c in view.components:
        labels = {NS: c.dynamo_namespace or view.namespace, COMP: c.name}
        f.add(
            P + "component_info",
            {**labels, "role": c.role, "sub_component_type": c.sub_component_type or ""},
            1,
        )
        f.add(P + "component_replicas_desired", labels, c.desired)
        f.add(P + "component_replicas_running", labels, c.running)
        f.add(P + "component_replicas_ready", labels, c.ready)
        f.add(P + "component_replicas_min", labels, c.min_replicas)
        f.add(P + "component_replicas_max", labels, c.max_replicas)
        replicas = view.replicas_of(c.name)
        f.add(
            P + "component_replicas_crashloop",
            labels,
            sum(r.state == "crashloop" for r in replicas),
        )
        for state in COMPONENT_STATES:
            f.add(P + "component_state", {**labels, "state": state}, c.status == state)
        f.add(P + "component_restarts_total", labels, c.restarts)
        f.add(P + "component_scale_in_flight", labels, c.scale_in_flight)
        f.add(
            P + "component_gpus_allocated",
            labels,
            sum(len(r.gpus) * (r.gpu_fraction or 1.0) for r in replicas),
        )


def _replicas(f: Families, view: ConnectorView, namespace_of: Mapping[str, str]) -> None:
    for r in view.replicas:
        labels = {NS: namespace_of.get(r.component, view.namespace), COMP: r.component}
        labels[REPLICA] = r.replica
        f.add(P + "replica_ready", labels, r.ready)
        for state in REPLICA_STATES:
            f.add(P + "replica_state", {**labels, "state": state}, r.state == state)
        f.add(P + "replica_restarts_total", labels, r.restarts)
        started = r.started_at if r.started_at is not None else r.create_time
        f.add(P + "replica_start_time_seconds", labels, started)
        for gpu in r.gpus:
            f.add(P + "replica_gpu_allocated_ratio", {**labels, GPU: gpu}, r.gpu_fraction or 1.0)
        f.add(P + "replica_cpu_reserved_cores", labels, r.cpu_cores or None)
        f.add(P + "replica_memory_reserved_bytes", labels, r.memory_bytes or None)


def _usage(
    f: Families, snapshot: Snapshot, namespace_of: Mapping[str, str], default_ns: str
) -> None:
    for u in snapshot.replicas:
        labels = {NS: namespace_of.get(u.component, default_ns), COMP: u.component}
        labels[REPLICA] = u.replica
        info = {**labels, "pid": str(u.pid), "command": u.command or ""}
        f.add(P + "replica_info", info, 1)
        f.add(P + "replica_processes", labels, u.processes)
        f.add(P + "replica_cpu_seconds_total", labels, u.cpu_seconds_total)
        f.add(P + "replica_cpu_utilization_ratio", labels, u.cpu_utilization_ratio)
        f.add(P + "replica_memory_rss_bytes", labels, u.memory_rss_bytes)
        f.add(P + "replica_memory_pss_bytes", labels, u.memory_pss_bytes)
        f.add(P + "replica_memory_uss_bytes", labels, u.memory_uss_bytes)
        for g in u.gpus:
            gl = {**labels, GPU: g.gpu}
            f.add(P + "replica_gpu_memory_used_bytes", gl, g.memory_used_bytes)
            f.add(P + "replica_gpu_sm_utilization_ratio", gl, g.sm_utilization_ratio)


def _gpus(f: Families, snapshot: Snapshot) -> None:
    devices = {d.uuid: d for d in snapshot.gpu_devices}
    for s in snapshot.gpus:
        labels = {GPU: s.uuid}
        device = devices.get(s.uuid)
        name = device.name if device is not None else ""
        f.add(P + "gpu_info", {**labels, "index": str(s.index), "name": name}, 1)
        f.add(P + "gpu_utilization_ratio", labels, s.utilization_ratio)
        f.add(P + "gpu_memory_used_bytes", labels, s.memory_used_bytes)
        f.add(P + "gpu_memory_total_bytes", labels, s.memory_total_bytes)
        f.add(P + "gpu_temperature_celsius", labels, s.temperature_celsius)
        f.add(P + "gpu_power_watts", labels, s.power_watts)
        f.add(P + "gpu_energy_joules_total", labels, s.energy_joules)
        active = throttle_reasons(s.throttle_reasons)
        if active is not None:
            for reason in THROTTLE_REASONS:
                f.add(P + "gpu_throttle_reason", {**labels, "reason": reason}, reason in active)
        f.add(P + "gpu_ecc_uncorrected_errors_total", labels, s.ecc_uncorrected_volatile)


def _machine(f: Families, snapshot: Snapshot) -> None:
    m = snapshot.machine
    if m is None:
        return
    f.add(P + "gpus_allocatable", {}, len(m.gpus))
    f.add(P + "gpus_free", {}, m.free_gpus)
    f.add(P + "cpu_allocatable_cores", {}, m.cpu_allocatable_cores)
    f.add(P + "cpu_reserved_cores", {}, m.cpu_reserved_cores)
    f.add(P + "memory_allocatable_bytes", {}, m.memory_allocatable_bytes)
    f.add(P + "memory_reserved_bytes", {}, m.memory_reserved_bytes)
    for g in m.gpus:
        for state in GPU_ALLOCATION_STATES:
            f.add(P + "gpu_allocation_state", {GPU: g.uuid, "state": state}, g.state == state)


def _queue_and_discovery(f: Families, snapshot: Snapshot, namespace: str) -> None:
    ns = {NS: namespace}
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
            f.add(P + "discovery_instances", {**ns, COMP: component}, count)
        f.add(P + "discovery_stale_reaped_total", ns, d.stale_reaped_total)


def _health(f: Families, snapshot: Snapshot, now: float) -> None:
    for h in snapshot.health:
        labels = {"source": h.source}
        f.add(P + "exporter_source_up", labels, h.up)
        f.add(P + "exporter_source_last_success_timestamp_seconds", labels, h.last_success)
        f.add(P + "exporter_source_collection_duration_seconds", labels, h.duration_s)
        f.add(P + "exporter_source_errors_total", labels, h.errors_total)
    f.add(P + "exporter_snapshot_age_seconds", {}, max(0.0, now - snapshot.taken_at))
    f.add(P + "exporter_snapshot_timestamp_seconds", {}, snapshot.taken_at)
    f.add(P + "exporter_snapshots_total", {}, snapshot.seq)
    f.add(P + "exporter_collection_cpu_seconds_total", {}, snapshot.collection_cpu_seconds_total)


class SnapshotCollector(Collector):
    """Registered in the exporter's registry; renders whatever snapshot is latest."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        view: Callable[[], ConnectorView],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot = snapshot
        self._view = view
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from render(self._snapshot(), self._view(), self._clock())
