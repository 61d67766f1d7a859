"""The JSON shapes of components and replicas, made from the connector's read-only view."""

from __future__ import annotations

from typing import Any

from connector.errors import ComponentNotFound
from connector.view import ComponentView, ConnectorView, ReplicaView


def component_json(c: ComponentView) -> dict[str, Any]:
    return {
        "name": c.name,
        "role": c.role,
        "sub_component_type": c.sub_component_type,
        "dynamo_namespace": c.dynamo_namespace,
        "status": c.status,
        "replicas": {
            "desired": c.desired,
            "running": c.running,
            "ready": c.ready,
            "min": c.min_replicas,
            "max": c.max_replicas,
        },
        "restarts": c.restarts,
        "crashloops": c.crashloops,
        "scale_in_flight": c.scale_in_flight,
        "reason": c.reason,
    }


def replica_json(r: ReplicaView) -> dict[str, Any]:
    return {
        "replica": r.replica,
        "component": r.component,
        "watcher": r.watcher,
        "state": r.state,
        "ready": r.ready,
        "pid": r.pid,
        "started_at": r.started_at,
        "restarts": r.restarts,
        "last_exit_code": r.last_exit_code,
        "gpus": list(r.gpus),
        "gpu_fraction": r.gpu_fraction,
        "cpu_cores": r.cpu_cores,
        "memory_bytes": r.memory_bytes,
        "ports": dict(r.ports),
        "sockets": dict(r.sockets),
    }


def require_component(view: ConnectorView, name: str, graph_name: str) -> ComponentView:
    """The component called ``name``, or 404 naming the ones that exist."""
    found = view.component(name)
    if found is None:
        known = ", ".join(sorted(c.name for c in view.components)) or "none"
        raise ComponentNotFound(
            f"no component {name!r} in graph {graph_name!r} (components: {known})",
            component=name,
        )
    return found


def sorted_replicas(view: ConnectorView, name: str) -> list[ReplicaView]:
    return sorted(view.replicas_of(name), key=lambda r: (len(r.replica), r.replica))
