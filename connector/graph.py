"""The graph: what a user asks dynamo-local to run.

This module holds the *normalized* model every other module consumes. Files in Dynamo's
Kubernetes shape (``DynamoGraphDeployment``) and the small Python graph API are parsed into
these objects by :mod:`connector.graph_loader`; nothing else reads raw YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    """What a component is in a Dynamo graph (``componentType``)."""

    FRONTEND = "frontend"
    ROUTER = "router"
    WORKER = "worker"
    PLANNER = "planner"


class SubComponentType(StrEnum):
    """Which half of disaggregated serving a worker does (``subComponentType``)."""

    PREFILL = "prefill"
    DECODE = "decode"


class RestartMode(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class ReadinessKind(StrEnum):
    """How a replica proves it is ready.

    ``process``: alive past ``startup_grace_s``. ``discovery``: registered in Dynamo's
    discovery for its endpoint(s). ``http``: a URL answers 2xx. ``tcp``: a port accepts.
    ``none``: ready as soon as spawned.
    """

    PROCESS = "process"
    DISCOVERY = "discovery"
    HTTP = "http"
    TCP = "tcp"
    NONE = "none"


@dataclass(frozen=True)
class RestartPolicy:
    mode: RestartMode = RestartMode.ALWAYS
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # A replica that stayed up this long gets its backoff reset.
    stable_after_s: float = 60.0
    # Crash-loop budget: this many failures within the window put the component in crashloop.
    crashloop_failures: int = 5
    crashloop_window_s: float = 300.0


@dataclass(frozen=True)
class Readiness:
    kind: ReadinessKind = ReadinessKind.PROCESS
    # discovery: the Dynamo component name the replica registers as (default: the service
    # name lowercased) and the endpoint names that must (all) or may (any) be registered.
    component: str | None = None
    endpoints: tuple[str, ...] = ("generate",)
    match: str = "all"  # "all" | "any"
    # http: URL, may contain {port.NAME} templates. tcp: a port name or number.
    url: str | None = None
    port: str | int | None = None
    timeout_s: float = 120.0
    startup_grace_s: float = 0.5
    period_s: float = 0.2


@dataclass(frozen=True)
class ResourceRequest:
    """Per-replica resources. ``gpu`` is whole GPUs (>= 1, integer) or a fraction (< 1)."""

    gpu: float = 0.0
    cpu: float = 0.0  # cores
    memory_bytes: int = 0
    pin_cpus: bool = False


@dataclass(frozen=True)
class PortSpec:
    """A port allocated per replica; handed over as env var ``env`` and ``{port.NAME}``."""

    name: str
    env: str | None = None


@dataclass(frozen=True)
class SocketSpec:
    """A Unix socket path allocated per replica; env var ``env`` and ``{socket.NAME}``."""

    name: str
    env: str | None = None


@dataclass(frozen=True)
class Service:
    """One component of the graph, normalized."""

    name: str
    role: Role
    command: tuple[str, ...]
    args: tuple[str, ...] = ()
    sub_component_type: SubComponentType | None = None
    replicas: int = 1
    dynamo_namespace: str | None = None
    envs: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None
    resources: ResourceRequest = field(default_factory=ResourceRequest)
    min_replicas: int = 0
    max_replicas: int | None = None
    readiness: Readiness = field(default_factory=Readiness)
    graceful_stop_s: float = 10.0
    drain_s: float = 0.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    depends_on: tuple[str, ...] = ()
    ports: tuple[PortSpec, ...] = ()
    sockets: tuple[SocketSpec, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        return dict(self.envs)


@dataclass(frozen=True)
class Edge:
    """A topology edge: ``source`` depends on / sends to ``target``."""

    source: str
    target: str
    kind: str  # "dependsOn" | "role"


@dataclass(frozen=True)
class Graph:
    name: str
    namespace: str
    services: dict[str, Service]
    source: str = "<memory>"  # file path or module:attr it came from, for messages
    warnings: tuple[str, ...] = ()  # unknown keys and other non-fatal findings

    def service(self, name: str) -> Service:
        return self.services[name]

    def by_sub_type(self, sub: SubComponentType) -> list[Service]:
        return [s for s in self.services.values() if s.sub_component_type is sub]
