"""dynamo-local connector: supervises a Dynamo graph as processes on one machine."""

from connector.errors import (
    ComponentNotFound,
    ConnectorClosed,
    ConnectorError,
    CrashLoop,
    DiscoveryUnavailable,
    GraphError,
    InvalidReplicas,
    NamespaceLocked,
    ReplicaLimit,
    ResourcesExhausted,
    ScaleTimeout,
    SupervisorUnavailable,
)

__all__ = [
    "ComponentNotFound",
    "ConnectorClosed",
    "ConnectorError",
    "CrashLoop",
    "DiscoveryUnavailable",
    "GraphError",
    "InvalidReplicas",
    "NamespaceLocked",
    "ReplicaLimit",
    "ResourcesExhausted",
    "ScaleTimeout",
    "SupervisorUnavailable",
]
