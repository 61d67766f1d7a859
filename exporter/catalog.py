"""The metric catalog: every metric dynamo-local publishes, in one place.

The Prometheus collector, the OpenTelemetry export, ``docs/metrics.md``, the dashboards and
the alert tests all read this table, so a metric exists exactly when it is listed here.

``python -m exporter.catalog_docs --markdown`` prints ``docs/metrics.md`` from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from connector import vocabulary
from connector.vocabulary import ComponentStatus, EventKind, Outcome, Source

PREFIX = "dynamo_local_"


class Kind(StrEnum):
    """Prometheus metric type."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    INFO = "info"


class Group(StrEnum):
    """Where a metric's numbers come from; also the section it is documented under."""

    COMPONENT = "component"
    REPLICA = "replica"
    GPU = "gpu"
    ALLOCATION = "allocation"
    QUEUE = "prefill_queue"
    DISCOVERY = "discovery"
    SCALING = "scaling"
    PLANNER = "planner"
    AUTOSCALER = "autoscaler"
    EXPORTER = "exporter"


GROUP_TITLES: dict[Group, str] = {
    Group.COMPONENT: "Components (connector state)",
    Group.REPLICA: "Replicas (process trees, psutil and NVML per-process)",
    Group.GPU: "GPUs (NVML)",
    Group.ALLOCATION: "Allocation (resource manager)",
    Group.QUEUE: "Prefill queue (NATS JetStream)",
    Group.DISCOVERY: "Discovery (etcd or file backend)",
    Group.SCALING: "Scaling and events (event log)",
    Group.PLANNER: "Planner decisions (virtual-connector executor)",
    Group.AUTOSCALER: "Autoscaler (KEDA ScaledObject policies)",
    Group.EXPORTER: "Exporter health",
}

# Label names. ``dynamo_namespace`` and ``dynamo_component`` match Dynamo's own series so
# the two join in PromQL.
NS = "dynamo_namespace"
COMP = "dynamo_component"
REPLICA = "replica"
GPU = "gpu"
SCALED_OBJECT = "scaled_object"
TRIGGER = "trigger"

# Small fixed enums: every value a label may take. Values outside an enum are folded into
# ``other`` so that nothing a caller sends can grow the number of series without bound.
# From the connector's vocabulary, so a word it speaks is never filed under "other".
COMPONENT_STATES = vocabulary.values(ComponentStatus)
REPLICA_STATES = vocabulary.REPLICA_STATES
SCALE_DIRECTIONS = ("up", "down", "none")
SCALE_SOURCES = (*vocabulary.values(Source), "other")
SCALE_OUTCOMES = (*vocabulary.values(Outcome), "other")
EVENT_KINDS = (*vocabulary.values(EventKind), "other")
HEALTH_SOURCES = (
    "processes",
    "nvml",
    "discovery",
    "prefill_queue",
    "resources",
    "planner",
    "autoscaler",
)
GPU_ALLOCATION_STATES = ("free", "allocated", "leaked")
# NVML clock-event ("throttle") reasons, decoded from the bit mask.
THROTTLE_REASONS = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
)

ENUMS: dict[str, tuple[str, ...]] = {
    "state": COMPONENT_STATES,  # per-metric override below for replicas and GPUs
    "direction": SCALE_DIRECTIONS,
    "source": SCALE_SOURCES,
    "outcome": SCALE_OUTCOMES,
    "kind": EVENT_KINDS,
    "reason": THROTTLE_REASONS,
}

# Seconds. Scale operations range from a ~30 ms spawn of a tiny process to minutes of model
# loading, so the buckets span both.
SCALE_DURATION_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

# Prometheus label name -> OpenTelemetry attribute name (used by the OTLP metrics export).
OTEL_ATTRIBUTES: dict[str, str] = {
    NS: "dynamo.namespace",
    COMP: "dynamo.component",
    REPLICA: "dynamo_local.replica",
    GPU: "hw.id",
    "index": "hw.gpu.index",
    "name": "hw.model",
    "pid": "process.pid",
    "command": "process.command_line",
    "role": "dynamo_local.role",
    "sub_component_type": "dynamo_local.sub_component_type",
    "state": "dynamo_local.state",
    "direction": "dynamo_local.direction",
    "source": "dynamo_local.source",
    "outcome": "dynamo_local.outcome",
    "kind": "dynamo_local.event.kind",
    "reason": "hw.gpu.throttle_reason",
    SCALED_OBJECT: "dynamo_local.autoscaler.scaled_object",
    TRIGGER: "dynamo_local.autoscaler.trigger",
}

# Prometheus unit suffix -> UCUM unit used by OpenTelemetry.
OTEL_UNITS: dict[str, str] = {
    "seconds": "s",
    "bytes": "By",
    "ratio": "1",
    "celsius": "Cel",
    "watts": "W",
    "joules": "J",
    "cores": "{cpu}",
    "": "1",
}


@dataclass(frozen=True)
class MetricSpec:
    """One metric.

    ``name`` is the exposed name: counters end in ``_total``, info metrics in ``_info``,
    and the unit suffix precedes them. ``otel_name`` is the OpenTelemetry instrument name
    (a semantic-convention name where one fits, else ``dynamo_local.*``).
    """

    name: str
    kind: Kind
    unit: str
    help: str
    labels: tuple[str, ...]
    group: Group
    otel_name: str
    otel_instrument: str  # gauge | counter | updowncounter | histogram
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def family_name(self) -> str:
        """The name prometheus_client families take (without ``_total``/``_info``)."""
        if self.kind is Kind.COUNTER:
            return self.name.removesuffix("_total")
        if self.kind is Kind.INFO:
            return self.name.removesuffix("_info")
        return self.name

    @property
    def otel_unit(self) -> str:
        return OTEL_UNITS[self.unit]

    def enum_values(self, label: str) -> tuple[str, ...] | None:
        return self.enums.get(label) or (ENUMS.get(label) if label in self.labels else None)


def _spec(
    name: str,
    kind: Kind,
    unit: str,
    labels: Iterable[str],
    group: Group,
    otel_name: str,
    help: str,
    *,
    otel_instrument: str | None = None,
    enums: dict[str, tuple[str, ...]] | None = None,
) -> MetricSpec:
    default_instrument = {
        Kind.COUNTER: "counter",
        Kind.HISTOGRAM: "histogram",
        Kind.GAUGE: "gauge",
        Kind.INFO: "gauge",
    }[kind]
    return MetricSpec(
        name=PREFIX + name,
        kind=kind,
        unit=unit,
        help=help,
        labels=tuple(labels),
        group=group,
        otel_name=otel_name,
        otel_instrument=otel_instrument or default_instrument,
        enums=enums or {},
    )


_C = (NS, COMP)
_R = (NS, COMP, REPLICA)
_SO = (NS, COMP, SCALED_OBJECT)
_T = (*_SO, TRIGGER)
GAUGE, COUNTER, HISTOGRAM, INFO = Kind.GAUGE, Kind.COUNTER, Kind.HISTOGRAM, Kind.INFO

CATALOG: tuple[MetricSpec, ...] = (
    # --- components -----------------------------------------------------------------------
    _spec("component_info", INFO, "", (*_C, "role", "sub_component_type"), Group.COMPONENT,
          "dynamo_local.component.info",
          "Static facts about a component of the graph: its role and sub-component type "
          "(empty when it has none). Always 1."),
    _spec("component_replicas_desired", GAUGE, "", _C, Group.COMPONENT,
          "dynamo_local.component.replicas.desired",
          "Replicas the connector is asked to run (graph, API or Planner target)."),
    _spec("component_replicas_running", GAUGE, "", _C, Group.COMPONENT,
          "dynamo_local.component.replicas.running",
          "Replicas whose process is alive."),
    _spec("component_replicas_ready", GAUGE, "", _C, Group.COMPONENT,
          "dynamo_local.component.replicas.ready",
          "Replicas that passed their readiness probe (registered in discovery)."),
    _spec("component_replicas_min", GAUGE, "", _C, Group.COMPONENT,
          "dynamo_local.component.replicas.min",
          "Lowest replica count a scale may set."),
    _spec("component_replicas_max", GAUGE, "", _C, Group.COMPONENT,
          "dynamo_local.component.replicas.max",
          "Highest replica count a scale may set; absent when unbounded."),
    _spec("component_replicas_crashloop", GAUGE, "", _C, Group.COMPONENT,
          "dynamo_local.component.replicas.crashloop",
          "Replicas of the component held in the crash-loop state."),
    _spec("component_state", GAUGE, "", (*_C, "state"), Group.COMPONENT,
          "dynamo_local.component.state",
          "Component state: 1 for the current state, 0 for the others.",
          enums={"state": COMPONENT_STATES}),
    _spec("component_restarts_total", COUNTER, "", _C, Group.COMPONENT,
          "dynamo_local.component.restarts",
          "Replica restarts of the component (crashes and restart requests)."),
    _spec("component_scale_in_flight", GAUGE, "", _C, Group.COMPONENT,
          "dynamo_local.component.scale_in_flight",
          "1 while a scale operation on the component has not converged, else 0."),
    _spec("component_gpus_allocated", GAUGE, "", _C, Group.ALLOCATION,
          "dynamo_local.component.gpus.allocated",
          "GPUs allocated to the component's replicas (fractional shares add up)."),
    # --- replicas ---------------------------------------------------------------------------
    _spec("replica_info", INFO, "", (*_R, "pid", "command"), Group.REPLICA,
          "dynamo_local.replica.info",
          "Process identity of a replica: root pid and command line (first 160 characters). "
          "Always 1. The only metric that carries a pid."),
    _spec("replica_ready", GAUGE, "", _R, Group.REPLICA, "dynamo_local.replica.ready",
          "1 when the replica passed its readiness probe, else 0."),
    _spec("replica_state", GAUGE, "", (*_R, "state"), Group.REPLICA, "dynamo_local.replica.state",
          "Replica state: 1 for the current state, 0 for the others.",
          enums={"state": REPLICA_STATES}),
    _spec("replica_restarts_total", COUNTER, "", _R, Group.REPLICA, "dynamo_local.replica.restarts",
          "Restarts of this replica slot."),
    _spec("replica_start_time_seconds", GAUGE, "seconds", _R, Group.REPLICA,
          "dynamo_local.replica.start_time",
          "Unix time the replica's current process started."),
    _spec("replica_processes", GAUGE, "", _R, Group.REPLICA, "dynamo_local.replica.processes",
          "Processes in the replica's tree (the root and all its descendants)."),
    _spec("replica_cpu_seconds_total", COUNTER, "seconds", _R, Group.REPLICA, "process.cpu.time",
          "CPU time (user + system) of the replica's whole process tree, including reaped "
          "children."),
    _spec("replica_cpu_utilization_ratio", GAUGE, "ratio", _R, Group.REPLICA,
          "process.cpu.utilization",
          "CPU time of the process tree over the last sampling interval, divided by the "
          "interval and by the CPUs available to the replica (0..1)."),
    _spec("replica_memory_rss_bytes", GAUGE, "bytes", _R, Group.REPLICA, "process.memory.usage",
          "Resident set size summed over the process tree (shared pages count once per "
          "process).", otel_instrument="updowncounter"),
    _spec("replica_memory_pss_bytes", GAUGE, "bytes", _R, Group.REPLICA,
          "dynamo_local.replica.memory.pss",
          "Proportional set size summed over the process tree (refreshed at most every "
          "detail interval; absent where the kernel does not expose it)."),
    _spec("replica_memory_uss_bytes", GAUGE, "bytes", _R, Group.REPLICA,
          "dynamo_local.replica.memory.uss",
          "Unique set size summed over the process tree (memory freed if it exited; refreshed "
          "at most every detail interval)."),
    _spec("replica_gpu_memory_used_bytes", GAUGE, "bytes", (*_R, GPU), Group.REPLICA,
          "dynamo_local.replica.gpu.memory.usage",
          "GPU memory used by the replica's processes on one GPU (NVML per-process "
          "accounting)."),
    _spec("replica_gpu_sm_utilization_ratio", GAUGE, "ratio", (*_R, GPU), Group.REPLICA,
          "dynamo_local.replica.gpu.utilization",
          "SM utilization of one GPU by the replica's processes (NVML per-process samples, "
          "0..1)."),
    _spec("replica_gpu_allocated_ratio", GAUGE, "ratio", (*_R, GPU), Group.ALLOCATION,
          "dynamo_local.replica.gpu.allocated",
          "Share of a GPU allocated to the replica: 1 for a whole GPU, the fraction for a "
          "shared one. Which component holds each GPU."),
    _spec("replica_cpu_reserved_cores", GAUGE, "cores", _R, Group.ALLOCATION,
          "dynamo_local.replica.cpu.reserved",
          "CPU cores reserved for the replica (absent when it requested none)."),
    _spec("replica_memory_reserved_bytes", GAUGE, "bytes", _R, Group.ALLOCATION,
          "dynamo_local.replica.memory.reserved",
          "Memory reserved for the replica (absent when it requested none)."),
    _spec("replica_memory_limit_bytes", GAUGE, "bytes", _R, Group.ALLOCATION,
          "dynamo_local.replica.memory.limit",
          "The replica's memory limit (resources.limits.memory): the connector kills the "
          "replica when dynamo_local_replica_memory_rss_bytes goes above it. Absent when its "
          "service sets none."),
    # --- GPUs ---------------------------------------------------------------------------------
    _spec("gpu_info", INFO, "", (GPU, "index", "name"), Group.GPU, "dynamo_local.gpu.info",
          "A GPU NVML reports: UUID, NVML index and product name. Always 1."),
    _spec("gpu_utilization_ratio", GAUGE, "ratio", (GPU,), Group.GPU, "hw.gpu.utilization",
          "Fraction of the last sample period during which a kernel ran on the GPU."),
    _spec("gpu_memory_used_bytes", GAUGE, "bytes", (GPU,), Group.GPU, "hw.gpu.memory.usage",
          "GPU memory in use (all processes, including foreign ones).",
          otel_instrument="updowncounter"),
    _spec("gpu_memory_total_bytes", GAUGE, "bytes", (GPU,), Group.GPU, "hw.gpu.memory.limit",
          "GPU memory installed (framebuffer total).", otel_instrument="updowncounter"),
    _spec("gpu_temperature_celsius", GAUGE, "celsius", (GPU,), Group.GPU, "hw.temperature",
          "GPU core temperature (NVML GPU sensor)."),
    _spec("gpu_power_watts", GAUGE, "watts", (GPU,), Group.GPU, "hw.power",
          "GPU power draw as NVML reports it (whole board)."),
    _spec("gpu_energy_joules_total", COUNTER, "joules", (GPU,), Group.GPU, "hw.energy",
          "Energy the GPU consumed since the driver loaded."),
    _spec("gpu_throttle_reason", GAUGE, "", (GPU, "reason"), Group.GPU,
          "dynamo_local.gpu.throttle_reason",
          "1 for each clock-event (throttle) reason NVML reports active, 0 for the others."),
    _spec("gpu_ecc_uncorrected_errors_total", COUNTER, "", (GPU,), Group.GPU, "hw.errors",
          "Uncorrected ECC errors since the driver loaded (volatile counter)."),
    _spec("gpu_allocation_state", GAUGE, "", (GPU, "state"), Group.ALLOCATION,
          "dynamo_local.gpu.allocation_state",
          "Allocation state of a GPU the connector may hand out: 1 for the current state.",
          enums={"state": GPU_ALLOCATION_STATES}),
    # --- machine allocation -----------------------------------------------------------------
    _spec("gpus_allocatable", GAUGE, "", (), Group.ALLOCATION, "dynamo_local.gpus.allocatable",
          "GPUs the connector may hand out (NVML inventory limited by CUDA_VISIBLE_DEVICES)."),
    _spec("gpus_free", GAUGE, "", (), Group.ALLOCATION, "dynamo_local.gpus.free",
          "Allocatable GPUs with no owner."),
    _spec("cpu_allocatable_cores", GAUGE, "cores", (), Group.ALLOCATION,
          "dynamo_local.cpu.allocatable", "CPU cores the connector may reserve."),
    _spec("cpu_reserved_cores", GAUGE, "cores", (), Group.ALLOCATION, "dynamo_local.cpu.reserved",
          "CPU cores reserved by replicas."),
    _spec("memory_allocatable_bytes", GAUGE, "bytes", (), Group.ALLOCATION,
          "dynamo_local.memory.allocatable", "Memory the connector may reserve."),
    _spec("memory_reserved_bytes", GAUGE, "bytes", (), Group.ALLOCATION,
          "dynamo_local.memory.reserved", "Memory reserved by replicas."),
    _spec("replicas_lingering", GAUGE, "", (), Group.ALLOCATION,
          "dynamo_local.replicas.lingering",
          "Stopped replicas whose processes outlived the release timeout; their GPUs, cores, "
          "memory and ports stay held until the processes exit."),
    # --- prefill queue ----------------------------------------------------------------------
    _spec("prefill_queue_pending_messages", GAUGE, "", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.pending",
          "Messages in the prefill queue not yet delivered to a worker (consumer num_pending)."),
    _spec("prefill_queue_ack_pending_messages", GAUGE, "", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.ack_pending",
          "Messages delivered to a worker and not yet acknowledged."),
    _spec("prefill_queue_redelivered_messages", GAUGE, "", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.redelivered",
          "Messages delivered more than once and not yet acknowledged."),
    _spec("prefill_queue_consumers", GAUGE, "", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.consumers", "Consumers bound to the prefill stream."),
    _spec("prefill_queue_stream_messages", GAUGE, "", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.stream.messages", "Messages stored in the stream."),
    _spec("prefill_queue_stream_bytes", GAUGE, "bytes", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.stream.size", "Bytes stored in the stream."),
    _spec("prefill_queue_enqueued_per_second", GAUGE, "", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.enqueue_rate",
          "Messages added to the queue per second over the queue reader's last window."),
    _spec("prefill_queue_dequeued_per_second", GAUGE, "", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.dequeue_rate",
          "Messages taken from the queue per second over the queue reader's last window."),
    _spec("prefill_queue_oldest_pending_age_seconds", GAUGE, "seconds", (NS,), Group.QUEUE,
          "dynamo_local.prefill_queue.oldest_pending_age",
          "Age of the oldest pending message (absent when the queue is empty or it cannot "
          "be read)."),
    # --- discovery --------------------------------------------------------------------------
    _spec("discovery_instances", GAUGE, "", _C, Group.DISCOVERY,
          "dynamo_local.discovery.instances",
          "Instances registered in Dynamo discovery for the component."),
    _spec("discovery_stale_reaped_total", COUNTER, "", (NS,), Group.DISCOVERY,
          "dynamo_local.discovery.stale_reaped",
          "Stale discovery entries (owner dead) removed by the reaper."),
    # --- scaling and events -----------------------------------------------------------------
    _spec("scale_operations_total", COUNTER, "", (*_C, "direction", "source", "outcome"),
          Group.SCALING, "dynamo_local.scale.operations",
          "Finished scale operations by direction, who asked (source) and outcome."),
    _spec("scale_duration_seconds", HISTOGRAM, "seconds", (*_C, "direction", "outcome"),
          Group.SCALING, "dynamo_local.scale.duration",
          "Time from a scale request to convergence (or its timeout). In OpenMetrics each "
          "bucket carries the operation's trace id as an exemplar."),
    _spec("crashloops_total", COUNTER, "", _C, Group.SCALING, "dynamo_local.crashloops",
          "Times a replica of the component entered the crash-loop state."),
    _spec("events_total", COUNTER, "", (NS, "kind"), Group.SCALING, "dynamo_local.events",
          "Structured events the connector emitted, by kind."),
    # --- Planner decisions (only while the virtual-connector executor runs) ------------------
    _spec("planner_decision_id", GAUGE, "", (NS,), Group.PLANNER,
          "dynamo_local.planner.decision.id",
          "Newest decision id the Planner executor has seen in etcd for the namespace "
          "(decision_id under v1/{namespace}/planner/). Absent while the Planner has written "
          "none or its keys are gone, and when no executor runs."),
    _spec("planner_decision_acknowledged_id", GAUGE, "", (NS,), Group.PLANNER,
          "dynamo_local.planner.decision.acknowledged_id",
          "Newest decision id the Planner executor acknowledged (scaled_decision_id) to the "
          "Planner now in etcd. Absent until it acknowledged one; below "
          "dynamo_local_planner_decision_id while a decision is being applied."),
    _spec("planner_decision_seen_timestamp_seconds", GAUGE, "seconds", (NS,), Group.PLANNER,
          "dynamo_local.planner.decision.seen_timestamp",
          "Unix time the Planner executor first saw the decision in "
          "dynamo_local_planner_decision_id."),
    # --- autoscaler (only while ScaledObject policies run) -----------------------------------
    _spec("autoscaler_metric_value", GAUGE, "", _T, Group.AUTOSCALER,
          "dynamo_local.autoscaler.metric.value",
          "Value a ScaledObject trigger's query returned at its last evaluation (the trigger "
          "label is its name, else its index). Absent while the query fails or before the "
          "first evaluation: a failed query is never published, nor read, as 0."),
    _spec("autoscaler_desired_replicas", GAUGE, "", _SO, Group.AUTOSCALER,
          "dynamo_local.autoscaler.desired_replicas",
          "Replica count the ScaledObject's last evaluation gave the component (KEDA's "
          "activation and the HPA algorithm with its behaviors); with up --dry-run, the "
          "count it would set. Absent before the first evaluation."),
    _spec("autoscaler_active", GAUGE, "", _T, Group.AUTOSCALER,
          "dynamo_local.autoscaler.active",
          "1 when the trigger's last value was above its activationThreshold (KEDA's "
          "activity, which scales from and to zero), else 0; 0 while its query fails."),
    _spec("autoscaler_errors_total", COUNTER, "", _T, Group.AUTOSCALER,
          "dynamo_local.autoscaler.errors",
          "Failed queries of the trigger (errors, timeouts, empty results with "
          "ignoreNullValues false); a failed query is never read as zero demand."),
    # --- exporter health --------------------------------------------------------------------
    _spec("exporter_source_up", GAUGE, "", ("source",), Group.EXPORTER,
          "dynamo_local.exporter.source.up",
          "1 when the exporter's last read of the source succeeded, else 0. processes: "
          "connector state and process trees; nvml: GPUs; discovery: discovery instances "
          "(etcd or file backend); prefill_queue: prefill queue (NATS JetStream or a /metrics "
          "gauge); resources: allocation; planner: the Planner executor's decisions; "
          "autoscaler: the ScaledObject policies. Sources "
          "the exporter was not given are absent.",
          enums={"source": HEALTH_SOURCES}),
    _spec("exporter_source_last_success_timestamp_seconds", GAUGE, "seconds", ("source",),
          Group.EXPORTER, "dynamo_local.exporter.source.last_success",
          "Unix time of the source's last successful read.",
          enums={"source": HEALTH_SOURCES}),
    _spec("exporter_source_collection_duration_seconds", GAUGE, "seconds", ("source",),
          Group.EXPORTER, "dynamo_local.exporter.source.collection_duration",
          "Wall time of the source's last read.", enums={"source": HEALTH_SOURCES}),
    _spec("exporter_source_errors_total", COUNTER, "", ("source",), Group.EXPORTER,
          "dynamo_local.exporter.source.errors", "Failed reads of the source.",
          enums={"source": HEALTH_SOURCES}),
    _spec("exporter_snapshot_age_seconds", GAUGE, "seconds", (), Group.EXPORTER,
          "dynamo_local.exporter.snapshot.age",
          "Age of the snapshot this scrape rendered (scrapes never sample)."),
    _spec("exporter_snapshot_timestamp_seconds", GAUGE, "seconds", (), Group.EXPORTER,
          "dynamo_local.exporter.snapshot.timestamp",
          "Unix time the rendered snapshot was taken."),
    _spec("exporter_snapshots_total", COUNTER, "", (), Group.EXPORTER,
          "dynamo_local.exporter.snapshots", "Snapshots the sampler produced."),
    _spec("exporter_collection_cpu_seconds_total", COUNTER, "seconds", (), Group.EXPORTER,
          "dynamo_local.exporter.collection.cpu_time",
          "CPU time the sampler threads spent reading process trees and NVML."),
)  # fmt: skip

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOG}


def spec(name: str) -> MetricSpec:
    """The catalog entry for an exposed metric name (with or without the prefix)."""
    full = name if name.startswith(PREFIX) else PREFIX + name
    try:
        return BY_NAME[full]
    except KeyError:
        raise KeyError(f"metric {full!r} is not in the catalog (exporter/catalog.py)") from None
