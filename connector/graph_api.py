"""Declare a graph in Python, the way Dynamo's old SDK declared service graphs.

::

    from connector.graph_api import graph, service

    prefill = service("Prefill", role="worker", sub_type="prefill", command=["python3", "w.py"])
    decode = service("Decode", role="worker", sub_type="decode", command=["python3", "w.py"],
                     replicas=2, gpu=1, memory="8Gi", depends=[prefill])
    frontend = service("Frontend", role="frontend", command=["python3", "fe.py"])
    frontend.depends(decode)
    demo = graph("demo", frontend)  # Decode and Prefill join through depends

``dynamo-local up module:demo`` (or ``module:frontend``, the root service) runs it.

Each declaration turns into the same raw ``DynamoGraphDeployment`` mapping a YAML file
holds, and :func:`graph` validates it with :func:`connector.graph.loader.build_graph`: the
rules and messages are the YAML ones, so messages name YAML fields (``replicas``,
``local.maxReplicas``, ``extraPodSpec.mainContainer.command``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from connector.errors import GraphError
from connector.graph.loader import KIND, build_graph
from connector.graph.model import Graph, Role, SubComponentType

API_VERSION = "nvidia.com/v1alpha1"


class ServiceDecl:
    """One declared service: its raw ``spec.services.<name>`` mapping and its dependencies."""

    def __init__(self, name: str, raw: dict[str, Any], depends: Iterable[ServiceDecl | str]):
        self.name = name
        self.raw = raw
        self.dependencies: list[ServiceDecl | str] = []
        self.depends(*depends)

    def depends(self, *others: ServiceDecl | str) -> ServiceDecl:
        """Declare that this service depends on ``others`` (declarations or names).

        Returns this declaration, so calls chain. A declaration named here joins any graph
        this service is part of.
        """
        self.dependencies.extend(others)  # checked (unknown names, cycles) by graph()
        return self

    def to_raw(self) -> dict[str, Any]:
        """The ``spec.services.<name>`` mapping, ``dependsOn`` included."""
        raw = dict(self.raw)
        names = [d.name if isinstance(d, ServiceDecl) else d for d in self.dependencies]
        if names:
            raw["local"] = {**raw.get("local", {}), "dependsOn": names}
        return raw

    def to_graph(self) -> Graph:
        """The graph of this service and everything it depends on, named after it (what
        ``dynamo-local up module:service`` runs)."""
        return graph(self.name.lower(), self)

    def __repr__(self) -> str:
        return f"ServiceDecl({self.name!r})"


def service(
    name: str,
    *,
    role: Role | str,
    command: Sequence[str],
    args: Sequence[str] = (),
    sub_type: SubComponentType | str | None = None,
    replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    gpu: float | str = 0,
    cpu: float | str = 0,
    memory: int | str | None = None,
    memory_limit: int | str | None = None,
    cpu_pinning: bool | None = None,
    envs: Mapping[str, str] | None = None,
    readiness: str | Mapping[str, Any] | None = None,
    ports: Sequence[str | Mapping[str, str]] = (),
    sockets: Sequence[str | Mapping[str, str]] = (),
    working_dir: str | None = None,
    dynamo_namespace: str | None = None,
    graceful_stop_s: float | None = None,
    drain_s: float | None = None,
    restart: str | Mapping[str, Any] | None = None,
    depends: Sequence[ServiceDecl | str] = (),
) -> ServiceDecl:
    """Declare a service. Values take the forms of the YAML fields they fill:

    ``role``/``sub_type`` -> ``componentType``/``subComponentType``; ``gpu``/``cpu``/``memory``
    -> ``resources.requests`` (quantities such as ``"500m"``, ``"8Gi"``) and ``memory_limit``
    -> ``resources.limits.memory``; ``envs`` ->
    ``envs``; ``readiness`` (``"none"``, ``{"discovery": {"component": "backend"}}``,
    ``{"http": "http://127.0.0.1:{port.system}/health", "timeoutSeconds": 30}``...),
    ``ports``/``sockets`` (``"system"`` or ``{"name": "system", "env": "DYN_SYSTEM_PORT"}``),
    ``restart`` (``"never"`` or ``{"policy": ..., "backoffBaseSeconds": ...}``) and the
    ``*_s`` durations -> the ``local`` block. Nothing is checked here; :func:`graph` checks.
    """
    container: dict[str, Any] = {"command": list(command), "args": list(args)}
    if working_dir is not None:
        container["workingDir"] = working_dir
    raw: dict[str, Any] = {
        "componentType": _value(role),
        "replicas": replicas,
        "extraPodSpec": {"mainContainer": container},
    }
    if sub_type is not None:
        raw["subComponentType"] = _value(sub_type)
    if dynamo_namespace is not None:
        raw["dynamoNamespace"] = dynamo_namespace
    requests = {"gpu": gpu, "cpu": cpu, "memory": memory}
    raw["resources"] = {"requests": {k: v for k, v in requests.items() if v is not None}}
    if memory_limit is not None:
        raw["resources"]["limits"] = {"memory": memory_limit}
    if envs:
        raw["envs"] = [{"name": k, "value": v} for k, v in envs.items()]
    local = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "readiness": readiness,
        "gracefulStopSeconds": graceful_stop_s,
        "drainSeconds": drain_s,
        "restart": restart,
        "ports": list(ports) or None,
        "sockets": list(sockets) or None,
        "cpuPinning": cpu_pinning,
    }
    raw["local"] = {k: v for k, v in local.items() if v is not None}
    return ServiceDecl(name, raw, depends)


def depends(source: ServiceDecl, *targets: ServiceDecl | str) -> ServiceDecl:
    """``source`` depends on each of ``targets``; the same as ``source.depends(*targets)``."""
    return source.depends(*targets)


def graph(name: str, *services: ServiceDecl, namespace: str | None = None) -> Graph:
    """Validate the services, and every service they depend on, into a :class:`Graph`.

    The namespace follows the YAML rule (see :mod:`connector.graph.loader`): the services'
    shared ``dynamo_namespace``, else ``namespace``, else ``name``. Raises
    :class:`GraphError` with messages that start ``graph '<name>':``.
    """
    origin = f"graph {name!r}"
    declared: dict[str, ServiceDecl] = {}
    pending = list(services)
    while pending:
        decl = pending.pop(0)
        if not isinstance(decl, ServiceDecl):
            raise GraphError(
                f"{origin}: expected services declared with service(...), "
                f"got {type(decl).__name__} {decl!r}",
                source=origin,
            )
        known = declared.get(decl.name)
        if known is decl:
            continue
        if known is not None:
            raise GraphError(
                f"{origin}: spec.services.{decl.name}: declared twice (two service(...) "
                "calls with the same name)",
                source=origin,
                field=f"spec.services.{decl.name}",
                service=decl.name,
            )
        declared[decl.name] = decl
        pending += [d for d in decl.dependencies if isinstance(d, ServiceDecl)]
    metadata = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    raw = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {"services": {n: d.to_raw() for n, d in declared.items()}},
    }
    return build_graph(raw, origin=origin)


def _value(value: Role | SubComponentType | str) -> str:
    return value.value if isinstance(value, Role | SubComponentType) else value
