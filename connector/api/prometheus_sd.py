"""Prometheus HTTP service discovery: where each running replica serves its ``/metrics``.

``GET /v1/prometheus/targets`` answers in Prometheus' ``http_sd_configs`` format: a list of
``{"targets": ["host:port"], "labels": {...}}`` groups. Replica ports are allocated per
replica and move when a replica restarts on a port someone else took, so a static scrape
config cannot follow them; this list always matches what runs now.

Each group is labelled the way the connector's own ``dynamo_local_*`` series are
(``dynamo_namespace``, ``dynamo_component`` = the graph's service name, ``replica`` = the
ordinal), so Dynamo's series and ours join on those labels in PromQL.
"""

from __future__ import annotations

from typing import Any

from connector.graph.dynamo_defaults import METRICS_PORT, ROLE_PORTS
from connector.graph.model import Graph, Role, Service
from connector.view import ConnectorView, ReplicaView

# Replicas are told to listen on loopback (connector.graph.dynamo_defaults.LOOPBACK_ENV).
REPLICA_HOST = "127.0.0.1"
METRICS_PATH = "/metrics"
CONNECTOR_ROLE = "connector"
# Replica phases with a live process whose metrics server may answer.
RUNNING_STATES = frozenset({"starting", "ready"})


def metrics_port_name(role: Role, service: Service | None) -> str | None:
    """The name of the port a replica of ``role`` serves ``/metrics`` on.

    The process reads that port from an environment variable (``DYN_SYSTEM_PORT`` for
    workers, ``DYN_HTTP_PORT`` for the frontend), so a port the service declares under
    another name but with that variable is the one it listens on; otherwise the role's
    default port name. ``None`` when the role has no metrics port.
    """
    name = METRICS_PORT.get(role)
    if name is None:
        return None
    env = next((p.env for p in ROLE_PORTS.get(role, ()) if p.name == name), None)
    if service is not None and env is not None:
        for port in service.ports:
            if port.env == env:
                return port.name
    return name


def _replica_group(
    replica: ReplicaView, namespace: str, role: Role, service: Service | None
) -> dict[str, Any] | None:
    if replica.state not in RUNNING_STATES or replica.pid is None:
        return None
    name = metrics_port_name(role, service)
    port = replica.ports.get(name) if name is not None else None
    if port is None:
        return None
    return {
        "targets": [f"{REPLICA_HOST}:{port}"],
        "labels": {
            "__metrics_path__": METRICS_PATH,
            "dynamo_namespace": namespace,
            "dynamo_component": replica.component,
            "replica": replica.replica,
            "role": role.value,
        },
    }


def target_groups(
    view: ConnectorView, graph: Graph, connector_address: str | None
) -> list[dict[str, Any]]:
    """The connector's own ``/metrics`` first (when ``connector_address`` is given: the
    server has an exporter), then one group per running replica with a metrics port, by
    component name and ordinal."""
    groups: list[dict[str, Any]] = []
    if connector_address is not None:
        groups.append(
            {
                "targets": [connector_address],
                "labels": {
                    "__metrics_path__": METRICS_PATH,
                    "dynamo_namespace": view.namespace,
                    "role": CONNECTOR_ROLE,
                },
            }
        )
    for component in sorted(view.components, key=lambda c: c.name):
        role = Role(component.role)
        service = graph.services.get(component.name)
        replicas = sorted(view.replicas_of(component.name), key=lambda r: int(r.replica))
        for replica in replicas:
            group = _replica_group(replica, component.dynamo_namespace, role, service)
            if group is not None:
                groups.append(group)
    return groups
