"""The graph: what a user asks dynamo-local to run.

This module holds the *normalized* model every other module consumes. Files in Dynamo's
Kubernetes shape (``DynamoGraphDeployment``) and the small Python graph API are parsed into
these objects by :mod:`connector.graph.loader`; nothing else reads raw YAML.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from connector.errors import GraphError


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
    # Chosen by dynamo-local for the service's role (connector.graph.dynamo_defaults), not
    # written in the graph: a default discovery check falls back to the process check
    # when no discovery backend runs, instead of failing every replica.
    default: bool = False


@dataclass(frozen=True)
class ResourceRequest:
    """Per-replica resources. ``gpu`` is whole GPUs (>= 1, integer) or a fraction (< 1)."""

    gpu: float = 0.0
    cpu: float = 0.0  # cores
    memory_bytes: int = 0  # reserved against the machine's memory (requests, else limits)
    pin_cpus: bool = False
    # resources.limits.memory: a replica whose process tree's RSS goes above it is killed,
    # as Kubernetes' OOM killer would (0: no limit).
    memory_limit_bytes: int = 0


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
    # The most a drain waits, after the replica left discovery, for its in-flight requests
    # (connector.dynamo.drain). None: the default for a registered worker, nothing otherwise.
    drain_s: float | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    depends_on: tuple[str, ...] = ()
    ports: tuple[PortSpec, ...] = ()
    sockets: tuple[SocketSpec, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        return dict(self.envs)

    def spec_digest(self) -> str:
        """A digest of what a replica's process is made from (command, args, env, working
        dir, resources): a new digest is a new pod spec, in Kubernetes' words, and clears
        a crash loop the old one earned. Every part is a frozen value, so ``repr`` is
        stable across runs."""
        spec = (self.command, self.args, self.envs, self.working_dir, self.resources)
        return hashlib.sha256(repr(spec).encode()).hexdigest()[:16]


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

    def in_namespace(self, namespace: str) -> Graph:
        """The same graph run in Dynamo namespace ``namespace``: every service registers
        there (``DYN_NAMESPACE``) and the Planner executor watches it, whatever the file's
        ``dynamoNamespace`` said. What ``up --namespace`` and ``LocalConnector.create``
        mean by a namespace."""
        if namespace == self.namespace and all(
            s.dynamo_namespace in (None, namespace) for s in self.services.values()
        ):
            return self
        services = {n: replace(s, dynamo_namespace=None) for n, s in self.services.items()}
        return replace(self, namespace=namespace, services=services)

    def by_sub_type(self, sub: SubComponentType) -> list[Service]:
        return [s for s in self.services.values() if s.sub_component_type is sub]

    def edges(self) -> list[Edge]:
        """Topology edges: every ``dependsOn`` first, then the edges the roles imply.

        ``dependsOn`` edges go from a service to each service it depends on, in declaration
        order. Role edges follow a request through a Dynamo graph:

        - each frontend sends to each router;
        - the routers (or, where there are none, the frontends) send to each entry worker:
          decode workers and workers without a ``subComponentType`` (aggregated);
        - each decode worker sends to each prefill worker; with no decode worker, prefill
          workers are entry workers themselves;
        - planners watch rather than serve, and get no role edge.

        A role edge is left out where a ``dependsOn`` edge already joins the same two services
        (in either direction), so each pair is drawn once, with the edge the user declared.
        """
        edges = [
            Edge(svc.name, dep, "dependsOn")
            for svc in self.services.values()
            for dep in svc.depends_on
        ]
        joined = {frozenset((e.source, e.target)) for e in edges}
        for source, target in self._role_pairs():
            if frozenset((source, target)) not in joined:
                edges.append(Edge(source, target, "role"))
        return edges

    def _role_pairs(self) -> list[tuple[str, str]]:
        def named(role: Role, *subs: SubComponentType | None) -> list[str]:
            return [
                s.name
                for s in self.services.values()
                if s.role is role and (not subs or s.sub_component_type in subs)
            ]

        frontends = named(Role.FRONTEND)
        routers = named(Role.ROUTER)
        decode = named(Role.WORKER, SubComponentType.DECODE)
        prefill = named(Role.WORKER, SubComponentType.PREFILL)
        entry = named(Role.WORKER, SubComponentType.DECODE, None)
        if not decode:
            entry = named(Role.WORKER)  # aggregated and prefill workers take requests directly
        senders = routers or frontends
        pairs = [(f, r) for f in frontends for r in routers]
        pairs += [(s, w) for s in senders for w in entry]
        pairs += [(d, p) for d in decode for p in prefill]
        return pairs

    def topological_order(self) -> list[str]:
        """Service names, each after every service it depends on; otherwise declaration order.

        Raises :class:`GraphError` on a dependency cycle or an unknown ``depends_on`` name.
        """
        deps = {name: svc.depends_on for name, svc in self.services.items()}
        for name, targets in deps.items():
            for target in targets:
                if target not in deps:
                    raise GraphError(f"{self.source}: {name} depends on unknown service {target!r}")
        cycle = find_cycle(deps)
        if cycle:
            raise GraphError(f"{self.source}: dependsOn cycle: {' -> '.join(cycle)}")
        order: list[str] = []
        placed: set[str] = set()

        def place(name: str) -> None:
            if name in placed:
                return
            placed.add(name)
            for dep in deps[name]:
                place(dep)
            order.append(name)

        for name in deps:
            place(name)
        return order


def find_cycle(deps: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The first dependency cycle found, as names from and back to its first member.

    Walks services in declaration order, so the same graph always names the same cycle,
    e.g. ``["A", "B", "A"]``. Names that are not keys of ``deps`` are ignored.
    """
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in on_path:
            return [*path[path.index(name) :], name]
        if name in done or name not in deps:
            return None
        path.append(name)
        on_path.add(name)
        for dep in deps[name]:
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        on_path.discard(name)
        done.add(name)
        return None

    for name in deps:
        cycle = visit(name)
        if cycle:
            return cycle
    return None
