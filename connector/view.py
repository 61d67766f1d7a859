"""The read-only view of the connector that the exporter, the API and the status page read.

Immutable snapshots: taking one is cheap (no I/O), and nothing a reader does can change
the connector. This is the narrow interface between ``connector`` and ``exporter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from connector.events import Event, Subscriber


@dataclass(frozen=True)
class ReplicaView:
    component: str
    replica: str  # ordinal as a string, the ``replica`` label
    watcher: str
    state: str  # spawning | starting | ready | stopping | backoff | exited | crashloop
    ready: bool
    pid: int | None
    create_time: float | None
    started_at: float | None
    restarts: int
    last_exit_code: int | None
    gpus: tuple[str, ...] = ()  # GPU UUIDs allocated to this replica
    gpu_fraction: float = 0.0  # share of one GPU for fractional requests (0 for whole GPUs)
    cpu_cores: float = 0.0
    memory_bytes: int = 0
    # The service's resources.limits.memory (0: none): a replica whose process tree's RSS
    # goes above it is killed.
    memory_limit_bytes: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=dict)
    log_paths: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentView:
    name: str
    role: str
    sub_component_type: str | None
    dynamo_namespace: str
    status: str  # starting | running | degraded | crashloop | stopped
    desired: int
    running: int
    ready: int
    restarts: int
    crashloops: int
    scale_in_flight: bool
    min_replicas: int
    max_replicas: int | None
    reason: str | None = None


@dataclass(frozen=True)
class ConnectorView:
    namespace: str
    taken_at: float
    components: tuple[ComponentView, ...]
    replicas: tuple[ReplicaView, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def component(self, name: str) -> ComponentView | None:
        return next((c for c in self.components if c.name == name), None)

    def replicas_of(self, name: str) -> list[ReplicaView]:
        return [r for r in self.replicas if r.component == name]


class ConnectorReader(Protocol):
    """What readers may ask of a running connector."""

    def view(self) -> ConnectorView: ...

    def recent_events(self, since: int = 0) -> list[Event]: ...

    def subscribe_events(self, fn: Subscriber) -> Any: ...
