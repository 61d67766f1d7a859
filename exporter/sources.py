"""Readings from the optional sources other parts of the connector provide as plain dicts.

The exporter does not import the resource manager, the discovery layer, the queue reader,
the Planner executor or the ScaledObject policies; it is handed callables that return dicts,
and parses them here into typed, immutable readings. A dict of the wrong shape is a failed
read with a message naming the key, never a silently wrong number.

The shapes are in :data:`SOURCE_SHAPES` (also printed in ``docs/metrics.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exporter.catalog import GPU_ALLOCATION_STATES

SOURCE_SHAPES = """\
# machine view (health source "resources"); keys not listed are ignored
{"gpus": [{"uuid": "GPU-...", "state": "free" | "allocated" | "leaked"}, ...],
 # a GPU without "state" is "allocated" when "owners" (or "owner") is non-empty, else "free"
 "free_gpus": int,                                              # optional: else counted
 "cpu": {"allocatable_cores": float, "reserved_cores": float},   # optional
 "memory": {"allocatable_bytes": int, "reserved_bytes": int},   # optional
 "lingering": [{"replica": str, "pids": [int]}, ...]}            # optional: counted

# prefill queue (health source "prefill_queue"): a status other than "ok" is a failed read
{"status": "ok" | "unavailable", "reason": str,
 "pending": int, "ack_pending": int, "redelivered": int, "consumers": int,
 "stream_messages": int, "stream_bytes": int,
 "enqueue_rate": float, "dequeue_rate": float,          # messages per second
 "oldest_pending_age_s": float}                         # every number optional

# discovery stats (health source "discovery")
{"instances": {"<component>": int, ...}, "stale_reaped_total": int}   # both optional

# Planner executor status (health source "planner"): {} while no executor runs (no series);
# keys not listed are ignored
{"namespace": str,                  # the Dynamo namespace whose v1/{ns}/planner/ it watches
 "decision_id": int | None,         # newest decision id seen in etcd; None: no decision
 "decision_seen_at": float | None,  # Unix time it was first seen; required with decision_id
 "acknowledged": int | None}        # newest id acknowledged to that Planner; None: none yet

# ScaledObject policies (health source "autoscaler"): {} while no policy runs (no series);
# keys not listed are ignored
{"scaled_objects": [
   {"scaled_object": str, "component": str,  # metadata.name, the graph service it drives
    "desired_replicas": int | None,          # None: not evaluated yet
    "triggers": [{"trigger": str,            # its name, else its index
                  "value": float | None,     # None: the query failed (or not evaluated yet)
                  "active": bool | None,     # None: not evaluated yet
                  "errors_total": int}, ...]}, ...]}
"""


class SourceFormatError(ValueError):
    """A source returned a value the exporter cannot read."""


@dataclass(frozen=True)
class GpuAllocation:
    uuid: str
    state: str  # free | allocated | leaked


@dataclass(frozen=True)
class MachineAllocation:
    gpus: tuple[GpuAllocation, ...]
    free_gpus: int
    cpu_allocatable_cores: float | None
    cpu_reserved_cores: float | None
    memory_allocatable_bytes: int | None
    memory_reserved_bytes: int | None
    lingering_replicas: int | None = None  # stopped, processes still running, still holding


@dataclass(frozen=True)
class QueueReading:
    pending: int | None
    ack_pending: int | None
    redelivered: int | None
    consumers: int | None
    stream_messages: int | None
    stream_bytes: int | None
    enqueue_rate: float | None
    dequeue_rate: float | None
    oldest_pending_age_s: float | None


@dataclass(frozen=True)
class DiscoveryReading:
    instances: tuple[tuple[str, int], ...]  # (component, count), sorted by component
    stale_reaped_total: int | None


@dataclass(frozen=True)
class PlannerReading:
    namespace: str  # Dynamo namespace
    decision_id: int | None  # newest decision id the executor has seen
    decision_seen_at: float | None  # Unix time it first saw it
    acknowledged_id: int | None  # newest id it acknowledged


@dataclass(frozen=True)
class TriggerReading:
    trigger: str
    value: float | None  # None: its query failed, or it was not evaluated yet
    active: bool | None  # None: not evaluated yet
    errors_total: int


@dataclass(frozen=True)
class ScaledObjectReading:
    scaled_object: str
    component: str
    desired_replicas: int | None  # None: not evaluated yet
    triggers: tuple[TriggerReading, ...]


@dataclass(frozen=True)
class AutoscalerReading:
    scaled_objects: tuple[ScaledObjectReading, ...]


def _list(data: Mapping[str, Any], key: str, what: str) -> list[Any] | tuple[Any, ...] | None:
    """``data[key]`` when it is a list (None when the key is absent), else a failed read
    naming it (an explicit null too)."""
    if key not in data:
        return None
    value = data[key]
    if not isinstance(value, list | tuple):
        raise SourceFormatError(f"{what}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SourceFormatError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _number(data: Mapping[str, Any], key: str, what: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SourceFormatError(f"{what}: {key!r} must be a number, got {value!r}")
    return float(value)


def _count(data: Mapping[str, Any], key: str, what: str) -> int | None:
    value = _number(data, key, what)
    if value is None:
        return None
    if value < 0 or value != int(value):
        raise SourceFormatError(f"{what}: {key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def parse_machine_view(value: Any) -> MachineAllocation:
    what = "machine view"
    data = _mapping(value, what)
    raw_gpus = _list(data, "gpus", what) or ()
    gpus: list[GpuAllocation] = []
    for i, raw in enumerate(raw_gpus):
        entry = _mapping(raw, f"{what}: gpus[{i}]")
        uuid = entry.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            raise SourceFormatError(f"{what}: gpus[{i}] has no 'uuid'")
        state = entry.get("state")
        if state is None:
            owners = entry.get("owners") or entry.get("owner")
            state = "allocated" if owners else "free"
        if state not in GPU_ALLOCATION_STATES:
            allowed = ", ".join(GPU_ALLOCATION_STATES)
            raise SourceFormatError(f"{what}: gpus[{i}] state {state!r} is not one of {allowed}")
        gpus.append(GpuAllocation(uuid, str(state)))
    free = _count(data, "free_gpus", what)
    cpu = _mapping(data.get("cpu") or {}, f"{what}: 'cpu'")
    memory = _mapping(data.get("memory") or {}, f"{what}: 'memory'")
    lingering = _list(data, "lingering", what)
    return MachineAllocation(
        gpus=tuple(sorted(gpus, key=lambda g: g.uuid)),
        free_gpus=free if free is not None else sum(g.state == "free" for g in gpus),
        cpu_allocatable_cores=_number(cpu, "allocatable_cores", f"{what}: cpu"),
        cpu_reserved_cores=_number(cpu, "reserved_cores", f"{what}: cpu"),
        memory_allocatable_bytes=_count(memory, "allocatable_bytes", f"{what}: memory"),
        memory_reserved_bytes=_count(memory, "reserved_bytes", f"{what}: memory"),
        lingering_replicas=None if lingering is None else len(lingering),
    )


class SourceUnavailable(RuntimeError):
    """The source answered, and said it cannot give numbers now (e.g. NATS is down)."""


def parse_queue(value: Any) -> QueueReading:
    what = "prefill queue"
    data = _mapping(value, what)
    status = data.get("status", "ok")
    if status != "ok":
        reason = data.get("reason") or "no reason given"
        raise SourceUnavailable(f"prefill queue is {status}: {reason}")
    return QueueReading(
        pending=_count(data, "pending", what),
        ack_pending=_count(data, "ack_pending", what),
        redelivered=_count(data, "redelivered", what),
        consumers=_count(data, "consumers", what),
        stream_messages=_count(data, "stream_messages", what),
        stream_bytes=_count(data, "stream_bytes", what),
        enqueue_rate=_number(data, "enqueue_rate", what),
        dequeue_rate=_number(data, "dequeue_rate", what),
        oldest_pending_age_s=_number(data, "oldest_pending_age_s", what),
    )


def parse_discovery(value: Any) -> DiscoveryReading:
    what = "discovery stats"
    data = _mapping(value, what)
    instances = _mapping(data.get("instances") or {}, f"{what}: 'instances'")
    counts: list[tuple[str, int]] = []
    for component in sorted(instances):
        count = _count(instances, component, f"{what}: instances")
        if count is not None:
            counts.append((str(component), count))
    return DiscoveryReading(tuple(counts), _count(data, "stale_reaped_total", what))


def parse_planner(value: Any) -> PlannerReading | None:
    """The executor's status; ``None`` (no series) for ``{}``, which means no executor runs."""
    what = "Planner executor status"
    data = _mapping(value, what)
    if not data:
        return None
    namespace = data.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise SourceFormatError(
            f"{what}: 'namespace' must be a non-empty string, got {namespace!r}"
        )
    decision_id = _count(data, "decision_id", what)
    seen_at = _number(data, "decision_seen_at", what)
    if decision_id is not None and seen_at is None:
        raise SourceFormatError(
            f"{what}: 'decision_seen_at' is missing for decision_id {decision_id}"
        )
    return PlannerReading(
        namespace=namespace,
        decision_id=decision_id,
        decision_seen_at=seen_at if decision_id is not None else None,
        acknowledged_id=_count(data, "acknowledged", what),
    )


def _name(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise SourceFormatError(f"{what}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _flag(data: Mapping[str, Any], key: str, what: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise SourceFormatError(f"{what}: {key!r} must be true, false or null, got {value!r}")
    return value


def parse_autoscaler(value: Any) -> AutoscalerReading | None:
    """The policies' status; ``None`` (no series) for ``{}``, which means none runs."""
    what = "autoscaler status"
    data = _mapping(value, what)
    if not data:
        return None
    readings: list[ScaledObjectReading] = []
    for i, raw in enumerate(_list(data, "scaled_objects", what) or ()):
        where = f"{what}: scaled_objects[{i}]"
        so = _mapping(raw, where)
        triggers: list[TriggerReading] = []
        for j, raw_trigger in enumerate(_list(so, "triggers", where) or ()):
            twhere = f"{where}: triggers[{j}]"
            t = _mapping(raw_trigger, twhere)
            triggers.append(
                TriggerReading(
                    trigger=_name(t, "trigger", twhere),
                    value=_number(t, "value", twhere),
                    active=_flag(t, "active", twhere),
                    errors_total=_count(t, "errors_total", twhere) or 0,
                )
            )
        readings.append(
            ScaledObjectReading(
                scaled_object=_name(so, "scaled_object", where),
                component=_name(so, "component", where),
                desired_replicas=_count(so, "desired_replicas", where),
                triggers=tuple(triggers),
            )
        )
    return AutoscalerReading(tuple(readings))
