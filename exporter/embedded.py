"""An exporter over a connector, wired by the exporter itself: what ``dynamo-local up``
builds, and what a connector used as a library starts on first use of its usage numbers
(this module's :func:`attach` is registered in the package metadata under the
``dynamo_local.metrics`` entry-point group, so the connector never imports the exporter).

It reads the connector only through its public methods.
"""

from __future__ import annotations

import asyncio
from typing import Any

from exporter.service import Exporter, build_exporter

FIRST_SNAPSHOT_WAIT_S = 5.0


def exporter_sources(connector: Any) -> dict[str, Any]:
    """The sources an exporter over ``connector`` reads (shared by ``up`` and
    :func:`attach`): its GPU backend, machine view, and the interop readers it runs."""
    sources: dict[str, Any] = {
        "gpu_backend": connector.gpu_backend,
        "machine_view": connector.get_machine_resources,
    }
    options = connector.options
    if options.nats_url:
        sources["queue_reader"] = connector.get_prefill_queue_metrics
    if options.discovery != "none":
        sources["discovery_stats"] = connector.discovery_stats
    if options.planner_executor:
        sources["planner_status"] = connector.planner_status
    if getattr(options, "scaled_objects", ()):
        sources["autoscaler_status"] = connector.autoscaler_status
    return sources


class _Attached:
    """Closes the exporter with the connector it was attached to."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    async def close(self) -> None:
        await self.exporter.stop()


async def attach(connector: Any) -> Exporter:
    """Start an exporter over ``connector``, make it the connector's metrics source and
    close it with the connector. Waits a bounded moment for the first snapshot."""
    exporter = build_exporter(connector, **exporter_sources(connector))
    await exporter.start()
    connector.attach(_Attached(exporter))
    for _ in range(int(FIRST_SNAPSHOT_WAIT_S / 0.05)):
        if exporter.latest_snapshot() is not None:
            break
        await asyncio.sleep(0.05)
    connector.set_metrics_source(exporter.component_metrics)
    return exporter
