"""dynamo-local exporter: metrics and traces of a supervised Dynamo graph.

The public entry points are re-exported lazily, so ``python -m exporter.catalog`` does not
import the whole package first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.http import add_metrics_route, metrics_handler
    from exporter.service import Exporter, build_exporter
    from exporter.tracing import Telemetry, setup_telemetry

__all__ = [
    "Exporter",
    "Telemetry",
    "add_metrics_route",
    "build_exporter",
    "metrics_handler",
    "setup_telemetry",
]

_HOMES = {
    "Exporter": "exporter.service",
    "build_exporter": "exporter.service",
    "add_metrics_route": "exporter.http",
    "metrics_handler": "exporter.http",
    "Telemetry": "exporter.tracing",
    "setup_telemetry": "exporter.tracing",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'exporter' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
