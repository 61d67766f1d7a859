"""Turns the connector's records into the read-only view (``connector.view``)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from connector.graph.model import Graph
from connector.reconcile.operations import ScaleOp
from connector.reconcile.state import ComponentRecord, ConnectorState, ReplicaRecord
from connector.view import ComponentView, ConnectorView, ReplicaView


def component_status(comp: ComponentRecord, recs: list[ReplicaRecord]) -> str:
    """One word for a component: starting, running, degraded, crashloop or stopped."""
    if comp.crashloop:
        return "crashloop"
    live = [r for r in recs if r.phase != "stopping"]
    if comp.target == 0 and not recs:
        return "stopped"
    ready = sum(1 for r in live if r.phase == "ready")
    if ready == comp.target and len(recs) == comp.target:
        return "running"
    failing = any(r.phase in ("backoff", "exited") for r in live)
    if not failing and all(r.phase in ("spawning", "starting", "ready") for r in live):
        return "starting" if ready < comp.target else "running"
    return "degraded"


def replica_view(
    rec: ReplicaRecord, crashloop: bool = False, memory_limit_bytes: int = 0
) -> ReplicaView:
    """``memory_limit_bytes``: the limit the reconcile loop enforces on this replica now
    (its service's ``resources.limits.memory`` in the current graph; 0 for none)."""
    res = rec.reservation or {}
    # A replica left down by its component's crash loop reads as "crashloop", not "exited".
    state = "crashloop" if crashloop and rec.phase == "exited" else rec.phase
    return ReplicaView(
        component=rec.component,
        replica=str(rec.ordinal),
        watcher=rec.watcher,
        state=state,
        ready=rec.phase == "ready",
        pid=rec.pid,
        create_time=rec.create_time,
        started_at=rec.spawned_at,
        restarts=rec.restarts,
        last_exit_code=rec.last_exit.code if rec.last_exit else None,
        gpus=tuple(res.get("gpus", ())),
        gpu_fraction=float(res.get("gpu_fraction", 0.0)),
        cpu_cores=float(res.get("cpu_cores", 0.0)),
        memory_bytes=int(res.get("memory_bytes", 0)),
        memory_limit_bytes=memory_limit_bytes,
        ports=dict(res.get("ports", {})),
        sockets=dict(res.get("sockets", {})),
        log_paths=dict(rec.log_paths),
    )


def build_view(
    namespace: str,
    graph: Graph,
    state: ConnectorState,
    ops: Mapping[str, ScaleOp],
    replicas: bool = True,
) -> ConnectorView:
    """The snapshot of ``state`` (``ops``: the scale operation in flight per component);
    without ``replicas``, the components only (their counts included)."""
    components = []
    for name, svc in graph.services.items():
        comp = state.components.get(name) or ComponentRecord(target=svc.replicas)
        recs = state.replicas_of(name)
        op = ops.get(name)
        status = component_status(comp, recs)
        reason = comp.crashloop_reason if comp.crashloop else None
        if reason is None and status == "degraded":
            exits = [r.last_exit for r in recs if r.last_exit is not None]
            if exits:
                last = max(exits, key=lambda e: e.at)
                reason = last.reason
        components.append(
            ComponentView(
                name=name,
                role=svc.role.value,
                sub_component_type=svc.sub_component_type.value if svc.sub_component_type else None,
                dynamo_namespace=svc.dynamo_namespace or graph.namespace,
                status=status,
                desired=comp.target,
                running=sum(1 for r in recs if r.phase in ("starting", "ready")),
                ready=sum(1 for r in recs if r.phase == "ready"),
                restarts=comp.restarts_total,
                crashloops=comp.crashloops_total,
                scale_in_flight=(op is not None and not op.done)
                or any(r.phase in ("spawning", "stopping") for r in recs),
                min_replicas=svc.min_replicas,
                max_replicas=svc.max_replicas,
                reason=reason,
            )
        )
    looping = {name for name, comp in state.components.items() if comp.crashloop}
    # The limit comes from the graph, as the reconcile loop reads it when it enforces it (the
    # reservation holds what was reserved, not the limit).
    limits = {name: svc.resources.memory_limit_bytes for name, svc in graph.services.items()}
    views = tuple(
        replica_view(r, r.component in looping, limits.get(r.component, 0))
        for r in (state.replicas.values() if replicas else ())
    )
    return ConnectorView(
        namespace=namespace,
        taken_at=time.time(),
        components=tuple(components),
        replicas=views,
    )
