"""One component's usage as a plain dict, from the same snapshot the scrape renders.

This is what the connector's ``get_component_metrics(name)`` and ``get_resource_usage(name)``
return (the connector is handed :meth:`exporter.service.Exporter.component_metrics` as a
callable; it never imports the exporter). Values that are unavailable are left out.
"""

from __future__ import annotations

from typing import Any

from connector.view import ConnectorView, ReplicaView
from exporter.sampling import ReplicaUsage, Snapshot


def _replica_dict(view: ReplicaView | None, usage: ReplicaUsage | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if view is not None:
        out |= {"replica": view.replica, "state": view.state, "ready": view.ready}
        if view.pid is not None:
            out["pid"] = view.pid
        allocated: dict[str, Any] = {"gpus": list(view.gpus)}
        if view.gpu_fraction:
            allocated["gpu_fraction"] = view.gpu_fraction
        if view.cpu_cores:
            allocated["cpu_cores"] = view.cpu_cores
        if view.memory_bytes:
            allocated["memory_bytes"] = view.memory_bytes
        out["allocated"] = allocated
    if usage is not None:
        out.setdefault("replica", usage.replica)
        out["pid"] = usage.pid
        out["processes"] = usage.processes
        out["cpu_seconds_total"] = usage.cpu_seconds_total
        if usage.cpu_utilization_ratio is not None:
            out["cpu_utilization_ratio"] = usage.cpu_utilization_ratio
        out["memory_rss_bytes"] = usage.memory_rss_bytes
        if usage.memory_pss_bytes is not None:
            out["memory_pss_bytes"] = usage.memory_pss_bytes
        if usage.memory_uss_bytes is not None:
            out["memory_uss_bytes"] = usage.memory_uss_bytes
        gpus: list[dict[str, Any]] = []
        for g in usage.gpus:
            entry: dict[str, Any] = {"gpu": g.gpu}
            if g.memory_used_bytes is not None:
                entry["memory_used_bytes"] = g.memory_used_bytes
            if g.sm_utilization_ratio is not None:
                entry["sm_utilization_ratio"] = g.sm_utilization_ratio
            gpus.append(entry)
        out["gpus"] = gpus
    return out


def component_usage(
    snapshot: Snapshot | None, view: ConnectorView, name: str, now: float
) -> dict[str, Any]:
    """Per-replica and total usage of ``name``; replicas not yet sampled carry only state."""
    component = view.component(name)
    namespace = component.dynamo_namespace if component is not None else view.namespace
    out: dict[str, Any] = {"component": name, "namespace": namespace or view.namespace}
    usage: dict[str, ReplicaUsage] = {}
    if snapshot is not None:
        out["snapshot_time"] = snapshot.taken_at
        out["snapshot_age_s"] = max(0.0, now - snapshot.taken_at)
        usage = {u.replica: u for u in snapshot.replicas_of(name)}
    views = {r.replica: r for r in view.replicas_of(name)}
    order = sorted(set(views) | set(usage), key=lambda r: (len(r), r))
    replicas = [_replica_dict(views.get(r), usage.get(r)) for r in order]
    out["replicas"] = replicas
    sampled = list(usage.values())
    totals: dict[str, Any] = {"replicas": len(replicas), "sampled_replicas": len(sampled)}
    if sampled:
        totals["processes"] = sum(u.processes for u in sampled)
        totals["cpu_seconds_total"] = sum(u.cpu_seconds_total for u in sampled)
        totals["memory_rss_bytes"] = sum(u.memory_rss_bytes for u in sampled)
        pss = [u.memory_pss_bytes for u in sampled]
        if all(v is not None for v in pss):
            totals["memory_pss_bytes"] = sum(v for v in pss if v is not None)
        uss = [u.memory_uss_bytes for u in sampled]
        if all(v is not None for v in uss):
            totals["memory_uss_bytes"] = sum(v for v in uss if v is not None)
        gpu_memory = [g.memory_used_bytes for u in sampled for g in u.gpus]
        if any(v is not None for v in gpu_memory):
            totals["gpu_memory_used_bytes"] = sum(v for v in gpu_memory if v is not None)
    out["totals"] = totals
    return out
