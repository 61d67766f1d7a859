"""What ``get_component_metrics`` and ``get_resource_usage`` return.

The numbers come from the exporter's latest snapshot, so the API, the CLI and ``/metrics``
always agree. ``dynamo-local up`` (the composition root) builds the exporter and hands its
reader to the connector (``set_metrics_source``). A connector used as a library with no
reader gets one from the metrics provider installed under the entry-point group
:data:`PROVIDER_GROUP`: the exporter package registers itself there
(``exporter.embedded:attach``). So the connector never imports the exporter; the package
metadata says which one serves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any, Protocol

from connector.errors import ConnectorError
from connector.view import ConnectorView

PROVIDER_GROUP = "dynamo_local.metrics"

MetricsSource = Callable[[str], dict[str, Any]]


class MetricsUnavailable(ConnectorError):
    """No exporter reads this connector, and none is installed to start."""

    code = "metrics_unavailable"
    http_status = 503


class UsageHost(Protocol):
    """What the usage numbers need of the connector."""

    @property
    def metrics_source(self) -> MetricsSource | None: ...

    def view(self) -> ConnectorView: ...


def _provider() -> Callable[[Any], Awaitable[None]] | None:
    found = sorted(entry_points(group=PROVIDER_GROUP), key=lambda e: e.name)
    return found[0].load() if found else None


async def metrics_source(host: UsageHost) -> MetricsSource:
    """The connector's metrics reader, starting the installed provider on first use."""
    if host.metrics_source is None:
        provider = _provider()
        if provider is None:
            raise MetricsUnavailable(
                "no exporter reads this connector and none is installed: install the "
                f"exporter package (entry point group {PROVIDER_GROUP!r}) or run under "
                "`dynamo-local up`"
            )
        await provider(host)  # sets the connector's metrics source
    source = host.metrics_source
    if source is None:
        raise MetricsUnavailable(f"the {PROVIDER_GROUP!r} provider set no metrics source")
    return source


async def component_metrics(host: UsageHost, name: str) -> dict[str, Any]:
    """Per replica and totals: processes, CPU seconds and utilization, RSS/PSS/USS, GPU
    memory and SM utilization per GPU, from the latest sample."""
    source = await metrics_source(host)
    return source(name)


async def resource_usage(host: UsageHost, name: str) -> dict[str, Any]:
    """Per replica: what is allocated (GPUs, fraction, CPU, memory, ports, sockets) and what
    is used: the same numbers as ``component_metrics``, plus the ports and sockets."""
    usage = await component_metrics(host, name)
    views = {v.replica: v for v in host.view().replicas_of(name)}
    for replica in usage.get("replicas", []):
        view = views.get(str(replica.get("replica")))
        if view is not None:
            allocated = replica.setdefault("allocated", {})
            allocated["ports"] = dict(view.ports)
            allocated["sockets"] = dict(view.sockets)
    return usage
