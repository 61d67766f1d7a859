"""What ``get_component_metrics`` and ``get_resource_usage`` return.

The numbers come from the exporter's latest snapshot, so the API, the CLI and ``/metrics``
always agree. ``dynamo-local up`` builds the exporter and hands its reader to the connector
(``set_metrics_source``); a connector used as a library with no exporter gets one started on
first use here. This module is the only place in ``connector`` that touches ``exporter``, and
only through its public factory, at run time: the exporter depends on the connector, never the
reverse at import time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connector.local import LocalConnector

FIRST_SNAPSHOT_WAIT_S = 5.0


def exporter_sources(connector: LocalConnector) -> dict[str, Any]:
    """The sources an exporter over ``connector`` reads (shared by ``up`` and the lazy path)."""
    manager = connector._resource_manager
    sources: dict[str, Any] = {
        "gpu_backend": getattr(manager, "gpu_backend", None),
        "machine_view": connector.get_machine_resources,
    }
    if connector.options.nats_url:
        sources["queue_reader"] = connector.get_prefill_queue_metrics
    stats = getattr(connector, "discovery_stats", None)
    if stats is not None and connector.options.discovery != "none":
        sources["discovery_stats"] = stats
    planner = getattr(connector, "planner_status", None)
    if planner is not None and connector.options.planner_executor:
        sources["planner_status"] = planner
    return sources


class _LocalExporter:
    """An exporter the connector started for itself; closed with the connector."""

    def __init__(self, exporter: Any) -> None:
        self.exporter = exporter

    async def close(self) -> None:
        await self.exporter.stop()


async def metrics_source(connector: LocalConnector) -> Callable[[str], dict[str, Any]]:
    if connector._metrics_source is not None:
        return connector._metrics_source
    from exporter.service import build_exporter

    exporter = build_exporter(connector, **exporter_sources(connector))
    await exporter.start()
    connector._extensions.append(_LocalExporter(exporter))
    # The first sampling cycle runs right after start; give it a bounded moment.
    for _ in range(int(FIRST_SNAPSHOT_WAIT_S / 0.05)):
        if exporter.latest_snapshot() is not None:
            break
        await asyncio.sleep(0.05)
    source: Callable[[str], dict[str, Any]] = exporter.component_metrics
    connector.set_metrics_source(source)
    return source


async def component_metrics(connector: LocalConnector, name: str) -> dict[str, Any]:
    """Per replica and totals: processes, CPU seconds and utilization, RSS/PSS/USS, GPU
    memory and SM utilization per GPU, from the latest sample."""
    source = await metrics_source(connector)
    return source(name)


async def resource_usage(connector: LocalConnector, name: str) -> dict[str, Any]:
    """Per replica: what is allocated (GPUs, fraction, CPU, memory, ports, sockets) and what
    is used: the same numbers as ``component_metrics``, plus the ports and sockets."""
    usage = await component_metrics(connector, name)
    views = {v.replica: v for v in connector.view().replicas_of(name)}
    for replica in usage.get("replicas", []):
        view = views.get(str(replica.get("replica")))
        if view is not None:
            allocated = replica.setdefault("allocated", {})
            allocated["ports"] = dict(view.ports)
            allocated["sockets"] = dict(view.sockets)
    return usage
