"""dynamo-local connector: supervises a Dynamo graph as processes on one machine.

The public face of the package::

    from connector import LocalConnector

    c = await LocalConnector.create("demo", "examples/demo.yaml")  # ready to use
    try:
        await c.scale_component("Decode", 3)
    finally:
        await c.shutdown()

Everything named in ``__all__`` is importable from here. The connector, the graph loader
and the graph API are loaded on first use (PEP 562), so that the small processes which
import one submodule of this package (the mock worker, the Circus stream class loaded
inside circusd) do not pay for the whole connector at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from connector.errors import (
    ComponentNotFound,
    ConnectorClosed,
    ConnectorError,
    ConnectorStarting,
    CrashLoop,
    DiscoveryUnavailable,
    GraphError,
    InvalidOptions,
    InvalidReplicas,
    NamespaceLocked,
    ReplicaLimit,
    ResourcesExhausted,
    ScaleTimeout,
    StateWriteFailed,
    SupervisorUnavailable,
)

if TYPE_CHECKING:
    from connector import graph_api
    from connector.graph.loader import build_graph, load_graph
    from connector.graph.model import Graph, Service
    from connector.local import LocalConnector
    from connector.options import ConnectorOptions

# name -> the module that defines it, imported on first access.
_LAZY = {
    "LocalConnector": "connector.local",
    "ConnectorOptions": "connector.options",
    "Graph": "connector.graph.model",
    "Service": "connector.graph.model",
    "load_graph": "connector.graph.loader",
    "build_graph": "connector.graph.loader",
}


def __getattr__(name: str) -> Any:
    if name == "graph_api":  # the Python graph API (``graph_api.graph``, ``.service``)
        value: Any = importlib.import_module("connector.graph_api")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'connector' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"graph_api"})


__all__ = [
    "ComponentNotFound",
    "ConnectorClosed",
    "ConnectorError",
    "ConnectorOptions",
    "ConnectorStarting",
    "CrashLoop",
    "DiscoveryUnavailable",
    "Graph",
    "GraphError",
    "InvalidOptions",
    "InvalidReplicas",
    "LocalConnector",
    "NamespaceLocked",
    "ReplicaLimit",
    "ResourcesExhausted",
    "ScaleTimeout",
    "Service",
    "StateWriteFailed",
    "SupervisorUnavailable",
    "build_graph",
    "graph_api",
    "load_graph",
]
