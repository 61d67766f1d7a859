"""Load and validate a graph: a YAML file, a directory, or a Python ``module:attr``.

A graph file reads like Dynamo's Kubernetes resource, so what a user deploys to a cluster
runs locally unchanged::

    apiVersion: nvidia.com/v1alpha1
    kind: DynamoGraphDeployment
    metadata: {name: demo}
    spec:
      services:
        Decode:
          componentType: worker          # frontend | router | worker | planner
          subComponentType: decode       # prefill | decode (workers only)
          replicas: 2
          resources: {limits: {gpu: 1}, requests: {cpu: 500m, memory: 1Gi}}
          envs: [{name: LOG_LEVEL, value: info}]
          extraPodSpec: {mainContainer: {command: [python3, -m, dynamo.vllm], args: []}}
          local: {...}                   # what only exists locally, see below

The ``local:`` block of a service: ``minReplicas``, ``maxReplicas``, ``readiness``,
``gracefulStopSeconds``, ``drainSeconds``, ``restart``, ``dependsOn``, ``ports``,
``sockets``, ``cpuPinning``.

Decisions, each tested:

- **Namespace.** The graph's Dynamo namespace is the ``dynamoNamespace`` its services
  share (when the services that set one all set the same), else ``metadata.namespace``,
  else ``metadata.name``. The shared ``dynamoNamespace`` comes first because that is the
  namespace the processes register in and the Planner writes its decisions to; in a file
  copied from a cluster, ``metadata.namespace`` is the *Kubernetes* namespace. When both are
  set and differ, a warning says which one is used.
- **Resources.** ``gpu`` comes from ``limits`` when set there (Dynamo puts GPUs under
  limits), else from ``requests``. ``cpu`` and ``memory`` come from ``requests`` when set,
  else from ``limits``: the request is what a replica is promised and what gets reserved,
  and Kubernetes likewise defaults a missing request to the limit. ``nvidia.com/gpu`` is
  read as ``gpu``.
- **Messages.** Errors and warnings start with the file as the user named it (the
  identifier, joined with ``graph.yaml``/``dynamo.yaml`` for a directory), then the path of
  the field: ``graph.yaml: spec.services.Decode.replicas: must be >= 0, got -1``. YAML
  syntax errors name ``file:line:column``. ``Graph.source`` holds the absolute path.
- **Unknown keys** (including Kubernetes-only ones such as ``image``) never fail a load:
  each becomes an entry of ``Graph.warnings`` and a ``connector.graph`` log warning.
- **``{python}``** in a command or argument becomes the running interpreter
  (``sys.executable``), so graphs can start project modules with the same Python.
- **``workingDir``** relative to the graph file's directory is made absolute.
- **Readiness** defaults to ``process`` (alive past a short grace period).

The Python graph API (:mod:`connector.graph_api`) builds the same raw mapping and passes
it to :func:`build_graph`, so both front doors share every rule here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from connector import dynamo_defaults, quantities, templates
from connector.errors import GraphError
from connector.graph import (
    Graph,
    PortSpec,
    Readiness,
    ReadinessKind,
    ResourceRequest,
    RestartMode,
    RestartPolicy,
    Role,
    Service,
    SocketSpec,
    SubComponentType,
    find_cycle,
)

log = logging.getLogger("connector.graph")

KIND = "DynamoGraphDeployment"
DIRECTORY_FILES = ("graph.yaml", "dynamo.yaml")

# Service names become Circus watcher names, which Circus lowercases.
_SERVICE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_GRAPH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ALLOCATION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # ports and sockets
_DYNAMO_NAME = re.compile(r"[A-Za-z0-9_-]+")  # discovery components and endpoints
_MODULE_REF = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
PYTHON_PLACEHOLDER = "{python}"

_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_KEYS = ("name", "namespace")
_SPEC_KEYS = ("services", "envs")
_SERVICE_KEYS = (
    "componentType",
    "subComponentType",
    "replicas",
    "dynamoNamespace",
    "resources",
    "envs",
    "extraPodSpec",
    "local",
)
_LOCAL_KEYS = (
    "minReplicas",
    "maxReplicas",
    "readiness",
    "gracefulStopSeconds",
    "drainSeconds",
    "restart",
    "dependsOn",
    "ports",
    "sockets",
    "cpuPinning",
)
_RESTART_KEYS = (
    "policy",
    "backoffBaseSeconds",
    "backoffMaxSeconds",
    "crashLoopFailures",
    "crashLoopWindowSeconds",
    "stableAfterSeconds",
)
_READINESS_KINDS = ("discovery", "http", "tcp", "process", "none")
_READINESS_SHORTHANDS = ("none", "process", "discovery")  # `readiness: none`
_RESOURCE_KEYS = ("gpu", "nvidia.com/gpu", "cpu", "memory")

T = TypeVar("T")


def _choices(values: Iterable[str]) -> str:
    return ", ".join(values)


class _Reader:
    """Typed access to the raw mapping; every failure names ``origin: path: reason``."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.warnings: list[str] = []
        self.service: str | None = None  # the service being read, for error details

    def fail(self, path: str, reason: str) -> NoReturn:
        details: dict[str, Any] = {"source": self.origin, "field": path}
        if self.service is not None:
            details["service"] = self.service
        prefix = f"{path}: " if path else ""
        raise GraphError(f"{self.origin}: {prefix}{reason}", **details)

    def warn(self, path: str, reason: str) -> None:
        message = f"{self.origin}: {path}: {reason}"
        self.warnings.append(message)
        log.warning("%s", message)

    def mapping(self, value: object, path: str, *, optional: bool = True) -> Mapping[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a mapping, got {_describe(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(f"{path}.{key}", f"keys must be strings, got {_describe(key)}")
        return value

    def known(self, value: Mapping[str, Any], path: str, keys: Iterable[str]) -> None:
        allowed = set(keys)
        for key in value:
            if key not in allowed:
                self.warn(_join(path, key), "not used by dynamo-local, ignored")

    def sequence(self, value: object, path: str) -> Sequence[Any]:
        if value is None:
            return ()
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            self.fail(path, f"must be a list, got {_describe(value)}")
        return value

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"must be a non-empty string, got {_describe(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"invalid name {value!r}: {_PATTERN_RULES[pattern.pattern]}")
        return value

    def text(self, value: object, path: str) -> str:
        """A command-line or env value: a string, or a number written without quotes."""
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        self.fail(path, f"must be a string, got {_describe(value)}")

    def integer(self, value: object, path: str, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, got {_describe(value)}")
        if value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}")
        return value

    def seconds(self, value: object, path: str, *, positive: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"must be a number of seconds, got {_describe(value)}")
        if positive and value <= 0:
            self.fail(path, f"must be > 0, got {value}")
        if value < 0:
            self.fail(path, f"must be >= 0, got {value}")
        return float(value)

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {_describe(value)}")
        return value

    def choice(self, value: object, path: str, options: Iterable[str]) -> str:
        allowed = list(options)
        if not isinstance(value, str) or value not in allowed:
            self.fail(path, f"must be one of {_choices(allowed)}, got {_describe(value)}")
        return value

    def quantity(self, value: object, path: str, parse: Callable[[object], T]) -> T:
        try:
            return parse(value)
        except ValueError as exc:
            self.fail(path, str(exc))


_PATTERN_RULES = {
    _SERVICE_NAME.pattern: "must start with a letter and hold only letters, digits, '_' and '-'",
    _NAMESPACE.pattern: "must start with a letter or digit and hold only letters, digits, "
    "'_' and '-'",
    _GRAPH_NAME.pattern: "must start with a letter or digit and hold only letters, digits, "
    "'_', '.' and '-'",
    _ENV_NAME.pattern: "must start with a letter or '_' and hold only letters, digits and '_'",
    _DYNAMO_NAME.pattern: "must hold only letters, digits, '_' and '-'",
}


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# --------------------------------------------------------------------------- the graph


def build_graph(
    raw: object,
    *,
    origin: str,
    source: str | None = None,
    base_dir: Path | None = None,
) -> Graph:
    """Validate a raw ``DynamoGraphDeployment`` mapping and normalize it into a :class:`Graph`.

    ``origin`` starts every message (a file name, or ``graph 'demo'`` for the Python API);
    ``source`` is recorded as :attr:`Graph.source` (default: ``origin``); ``base_dir``
    anchors relative ``workingDir`` values (the graph file's directory).
    """
    r = _Reader(origin)
    if not isinstance(raw, Mapping):
        r.fail("", f"must hold a mapping (a {KIND}), got {_describe(raw)}")
    top = r.mapping(raw, "")
    r.known(top, "", _TOP_KEYS)
    kind = top.get("kind")
    if kind != KIND:
        r.fail("kind", f"must be {KIND}, got {_describe(kind)}")
    if "apiVersion" in top:
        r.string(top["apiVersion"], "apiVersion")
    metadata = r.mapping(top.get("metadata"), "metadata", optional=False)
    r.known(metadata, "metadata", _METADATA_KEYS)
    name = r.string(metadata.get("name"), "metadata.name", _GRAPH_NAME)
    meta_namespace = None
    if "namespace" in metadata:
        meta_namespace = r.string(metadata["namespace"], "metadata.namespace", _NAMESPACE)
    spec = r.mapping(top.get("spec"), "spec", optional=False)
    r.known(spec, "spec", _SPEC_KEYS)
    graph_envs = _envs(r, spec.get("envs"), "spec.envs")
    raw_services = r.mapping(spec.get("services"), "spec.services", optional=False)
    if not raw_services:
        r.fail("spec.services", "must declare at least one service")

    services: dict[str, Service] = {}
    seen: dict[str, str] = {}  # lowercased name -> name as declared
    for svc_name, svc_raw in raw_services.items():
        path = f"spec.services.{svc_name}"
        r.string(svc_name, path, _SERVICE_NAME)
        clash = seen.get(svc_name.lower())
        if clash is not None:
            r.fail(
                path,
                f"name clashes with {clash!r}: service names must differ ignoring case "
                "(they become lowercase Circus watcher names)",
            )
        seen[svc_name.lower()] = svc_name
        r.service = svc_name
        services[svc_name] = _service(r, svc_name, svc_raw, path, graph_envs, base_dir)
    r.service = None

    _check_dependencies(r, services)
    namespace = _namespace(r, name, meta_namespace, services)
    return Graph(
        name=name,
        namespace=namespace,
        services=services,
        source=source if source is not None else origin,
        warnings=tuple(r.warnings),
    )


def _namespace(
    r: _Reader, name: str, meta_namespace: str | None, services: Mapping[str, Service]
) -> str:
    shared = {s.dynamo_namespace for s in services.values() if s.dynamo_namespace is not None}
    if len(shared) == 1:
        (dynamo_namespace,) = shared
        if meta_namespace is not None and meta_namespace != dynamo_namespace:
            r.warn(
                "metadata.namespace",
                f"{meta_namespace!r} differs from the services' dynamoNamespace "
                f"{dynamo_namespace!r}; the graph runs in {dynamo_namespace!r}",
            )
        return dynamo_namespace
    if meta_namespace is not None:
        return meta_namespace
    if not _NAMESPACE.fullmatch(name):
        r.fail(
            "metadata.name",
            f"{name!r} cannot serve as the namespace ({_PATTERN_RULES[_NAMESPACE.pattern]}); "
            "set metadata.namespace or the services' dynamoNamespace",
        )
    return name


def _check_dependencies(r: _Reader, services: Mapping[str, Service]) -> None:
    by_lower = {n.lower(): n for n in services}
    for svc in services.values():
        for i, dep in enumerate(svc.depends_on):
            if dep in services:
                continue
            r.service = svc.name
            hint = by_lower.get(dep.lower())
            known = f"did you mean {hint!r}?" if hint else f"services: {_choices(services)}"
            r.fail(
                f"spec.services.{svc.name}.local.dependsOn[{i}]",
                f"unknown service {dep!r} ({known})",
            )
    cycle = find_cycle({n: s.depends_on for n, s in services.items()})
    if cycle:
        r.service = None
        r.fail("spec.services", f"dependsOn cycle: {' -> '.join(cycle)}")


# --------------------------------------------------------------------------- one service


def _service(
    r: _Reader,
    name: str,
    raw: object,
    path: str,
    graph_envs: Sequence[tuple[str, str]],
    base_dir: Path | None,
) -> Service:
    svc = r.mapping(raw, path, optional=False)
    r.known(svc, path, _SERVICE_KEYS)
    role = Role(
        r.choice(svc.get("componentType"), f"{path}.componentType", (x.value for x in Role))
    )
    sub: SubComponentType | None = None
    if svc.get("subComponentType") is not None:
        sub = SubComponentType(
            r.choice(
                svc["subComponentType"],
                f"{path}.subComponentType",
                (x.value for x in SubComponentType),
            )
        )
        if role is not Role.WORKER:
            r.fail(
                f"{path}.subComponentType",
                f"only valid for componentType worker, got {sub.value} "
                f"with componentType {role.value}",
            )
    replicas = r.integer(svc.get("replicas", 1), f"{path}.replicas", minimum=0)
    dynamo_namespace = None
    if svc.get("dynamoNamespace") is not None:
        dynamo_namespace = r.string(svc["dynamoNamespace"], f"{path}.dynamoNamespace", _NAMESPACE)

    local = r.mapping(svc.get("local"), f"{path}.local")
    r.known(local, f"{path}.local", _LOCAL_KEYS)
    lp = f"{path}.local"
    min_replicas = r.integer(local.get("minReplicas", 0), f"{lp}.minReplicas", minimum=0)
    max_replicas = None
    if local.get("maxReplicas") is not None:
        max_replicas = r.integer(local["maxReplicas"], f"{lp}.maxReplicas", minimum=0)
        if min_replicas > max_replicas:
            r.fail(
                f"{lp}.minReplicas",
                f"must be <= local.maxReplicas ({max_replicas}), got {min_replicas}",
            )
    if replicas < min_replicas or (max_replicas is not None and replicas > max_replicas):
        bounds = (
            f"within local.minReplicas..local.maxReplicas ({min_replicas}..{max_replicas})"
            if max_replicas is not None
            else f">= local.minReplicas ({min_replicas})"
        )
        r.fail(f"{path}.replicas", f"must be {bounds}, got {replicas}")

    ports = _allocations(r, local.get("ports"), f"{lp}.ports", "port", PortSpec)
    sockets = _allocations(r, local.get("sockets"), f"{lp}.sockets", "socket", SocketSpec)
    command, args, working_dir = _container(r, svc.get("extraPodSpec"), path, base_dir)
    own_envs = _envs(r, svc.get("envs"), f"{path}.envs")
    envs = dict(graph_envs)
    envs.update(own_envs)  # a service's own value wins over the graph-wide one
    # The role's ports the service did not declare (DYN_SYSTEM_PORT, ...): named like
    # declared ones, so templates and readiness may use them.
    ports += dynamo_defaults.implicit_ports(role, ports, envs)
    allocated = {"port": [p.name for p in ports], "socket": [s.name for s in sockets]}

    for i, part in enumerate(command):
        _check_templates(r, part, f"{path}.extraPodSpec.mainContainer.command[{i}]", allocated)
    for i, part in enumerate(args):
        _check_templates(r, part, f"{path}.extraPodSpec.mainContainer.args[{i}]", allocated)

    for i, (_, value) in enumerate(graph_envs):
        _check_templates(r, value, f"spec.envs[{i}].value", allocated, service=name)
    for i, (_, value) in enumerate(own_envs):
        _check_templates(r, value, f"{path}.envs[{i}].value", allocated)
    _check_allocation_envs(r, ports, f"{lp}.ports", envs)
    _check_allocation_envs(r, sockets, f"{lp}.sockets", envs)

    resources = _resources(r, svc.get("resources"), f"{path}.resources")
    if "cpuPinning" in local and r.boolean(local["cpuPinning"], f"{lp}.cpuPinning"):
        if resources.cpu <= 0:
            r.fail(f"{lp}.cpuPinning", "needs a cpu request (resources.requests.cpu) above 0")
        resources = dataclasses.replace(resources, pin_cpus=True)

    depends_on = tuple(
        r.string(dep, f"{lp}.dependsOn[{i}]")
        for i, dep in enumerate(r.sequence(local.get("dependsOn"), f"{lp}.dependsOn"))
    )
    defaults = Service(name=name, role=role, command=command)
    return Service(
        name=name,
        role=role,
        command=command,
        args=args,
        sub_component_type=sub,
        replicas=replicas,
        dynamo_namespace=dynamo_namespace,
        envs=tuple(envs.items()),
        working_dir=working_dir,
        resources=resources,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        readiness=_readiness(r, local.get("readiness"), f"{lp}.readiness", ports, allocated)
        or dynamo_defaults.default_readiness(role, (*command, *args), envs, ports),
        graceful_stop_s=_optional_seconds(
            r, local, "gracefulStopSeconds", lp, defaults.graceful_stop_s
        ),
        drain_s=_optional_seconds(r, local, "drainSeconds", lp, None),
        restart=_restart(r, local.get("restart"), f"{lp}.restart"),
        depends_on=depends_on,
        ports=ports,
        sockets=sockets,
    )


def _optional_seconds(
    r: _Reader, block: Mapping[str, Any], key: str, path: str, default: T
) -> float | T:
    if block.get(key) is None:
        return default
    return r.seconds(block[key], f"{path}.{key}", positive=False)


def _container(
    r: _Reader, raw: object, path: str, base_dir: Path | None
) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    pod_path = f"{path}.extraPodSpec"
    pod = r.mapping(raw, pod_path)
    r.known(pod, pod_path, ("mainContainer",))
    main_path = f"{pod_path}.mainContainer"
    main = r.mapping(pod.get("mainContainer"), main_path)
    r.known(main, main_path, ("command", "args", "workingDir"))
    raw_command = r.sequence(main.get("command"), f"{main_path}.command")
    if not raw_command:
        r.fail(
            f"{main_path}.command",
            'required: the program to run, e.g. ["python3", "-m", "dynamo.vllm"]',
        )
    command = tuple(
        _expand_python(r.text(part, f"{main_path}.command[{i}]"))
        for i, part in enumerate(raw_command)
    )
    args = tuple(
        _expand_python(r.text(part, f"{main_path}.args[{i}]"))
        for i, part in enumerate(r.sequence(main.get("args"), f"{main_path}.args"))
    )
    working_dir = None
    if main.get("workingDir") is not None:
        working_dir = r.string(main["workingDir"], f"{main_path}.workingDir")
        if base_dir is not None and not Path(working_dir).is_absolute():
            working_dir = str(base_dir / working_dir)
    return command, args, working_dir


def _expand_python(text: str) -> str:
    return text.replace(PYTHON_PLACEHOLDER, sys.executable)


def _envs(r: _Reader, raw: object, path: str) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for i, item in enumerate(r.sequence(raw, path)):
        item_path = f"{path}[{i}]"
        entry = r.mapping(item, item_path, optional=False)
        r.known(entry, item_path, ("name", "value"))
        env_name = r.string(entry.get("name"), f"{item_path}.name", _ENV_NAME)
        if "value" not in entry:
            r.fail(f"{item_path}.value", "required (secrets and valueFrom are not read locally)")
        value = "" if entry["value"] is None else r.text(entry["value"], f"{item_path}.value")
        if env_name in found:
            r.warn(f"{item_path}.name", f"{env_name} is set twice; the last value wins")
            del found[env_name]  # keep the order of the last occurrence
        found[env_name] = value
    return list(found.items())


_Allocation = TypeVar("_Allocation", PortSpec, SocketSpec)


def _allocations(
    r: _Reader, raw: object, path: str, what: str, make: Callable[..., _Allocation]
) -> tuple[_Allocation, ...]:
    specs: list[_Allocation] = []
    names: set[str] = set()
    envs: dict[str, str] = {}
    for i, item in enumerate(r.sequence(raw, path)):
        item_path = f"{path}[{i}]"
        if isinstance(item, str):  # shorthand: just the name, handed over by template only
            item = {"name": item}
        entry = r.mapping(item, item_path, optional=False)
        r.known(entry, item_path, ("name", "env"))
        alloc_name = r.string(entry.get("name"), f"{item_path}.name", _ALLOCATION_NAME)
        if alloc_name in names:
            r.fail(f"{item_path}.name", f"duplicate {what} name {alloc_name!r}")
        names.add(alloc_name)
        env = None
        if entry.get("env") is not None:
            env = r.string(entry["env"], f"{item_path}.env", _ENV_NAME)
            if env in envs:
                r.fail(f"{item_path}.env", f"{env} is already the env of {what} {envs[env]!r}")
            envs[env] = alloc_name
        specs.append(make(name=alloc_name, env=env))
    return tuple(specs)


def _check_allocation_envs(
    r: _Reader, specs: Sequence[PortSpec | SocketSpec], path: str, envs: Mapping[str, str]
) -> None:
    for i, spec in enumerate(specs):
        if spec.env is not None and spec.env in envs:
            r.fail(
                f"{path}[{i}].env",
                f"{spec.env} is also set in envs; the allocated value would be overridden",
            )


def _check_templates(
    r: _Reader,
    text: str,
    path: str,
    allocated: Mapping[str, Sequence[str]],
    *,
    service: str | None = None,
) -> None:
    for template, kind in templates.undeclared(text, allocated):
        if kind == "gpu":
            r.fail(path, f"{template} is not a GPU field ({_choices(templates.GPU_FIELDS)})")
        declared = allocated[kind]
        listed = _choices(declared) if declared else "none"
        owner = f" of service {service}" if service else ""
        r.fail(
            path,
            # "its": local.ports plus the role's default ports (connector.dynamo_defaults).
            f"{template} names no {kind}{owner} (its {kind}s: {listed})",
        )


def _resources(r: _Reader, raw: object, path: str) -> ResourceRequest:
    block = r.mapping(raw, path)
    r.known(block, path, ("requests", "limits"))
    parsed: dict[str, dict[str, Any]] = {}
    given: dict[str, dict[str, object]] = {}  # the values as written, for messages
    for part in ("requests", "limits"):
        part_path = f"{path}.{part}"
        values = r.mapping(block.get(part), part_path)
        r.known(values, part_path, _RESOURCE_KEYS)
        if "gpu" in values and "nvidia.com/gpu" in values:
            r.fail(f"{part_path}.nvidia.com/gpu", "gpu is already set; give one of the two")
        parsed[part], given[part] = {}, {}
        for key in _RESOURCE_KEYS:
            if values.get(key) is None:
                continue
            field = "gpu" if key == "nvidia.com/gpu" else key
            parsed[part][field] = r.quantity(values[key], f"{part_path}.{key}", _PARSERS[field])
            given[part][field] = values[key]
    requests, limits = parsed["requests"], parsed["limits"]
    for field in ("cpu", "memory"):
        if field in requests and field in limits and requests[field] > limits[field]:
            r.fail(
                f"{path}.requests.{field}",
                f"must be <= resources.limits.{field} ({given['limits'][field]!r}), "
                f"got {given['requests'][field]!r}",
            )
    if "gpu" in requests and "gpu" in limits and requests["gpu"] != limits["gpu"]:
        r.warn(
            f"{path}.requests.gpu",
            f"{given['requests']['gpu']!r} differs from resources.limits.gpu "
            f"({given['limits']['gpu']!r}); the limit is used",
        )
    return ResourceRequest(
        gpu=float(limits.get("gpu", requests.get("gpu", 0.0))),
        cpu=float(requests.get("cpu", limits.get("cpu", 0.0))),
        memory_bytes=int(requests.get("memory", limits.get("memory", 0))),
        memory_limit_bytes=int(limits.get("memory", 0)),
    )


_PARSERS: dict[str, Callable[[object], float | int]] = {
    "gpu": quantities.parse_gpu,
    "cpu": quantities.parse_cpu,
    "memory": quantities.parse_memory,
}


def _readiness(
    r: _Reader,
    raw: object,
    path: str,
    ports: Sequence[PortSpec],
    allocated: Mapping[str, Sequence[str]],
) -> Readiness | None:
    if raw is None:
        return None  # the role's default (connector.dynamo_defaults)
    if isinstance(raw, str):  # shorthand: `readiness: none`, `process` or `discovery`
        kind = r.choice(raw, path, _READINESS_SHORTHANDS)
        return Readiness(kind=ReadinessKind(kind))
    block = r.mapping(raw, path, optional=False)
    keys = (*_READINESS_KINDS, "timeoutSeconds", "periodSeconds")
    kinds = [k for k in _READINESS_KINDS if k in block]
    if len(kinds) != 1:
        # An unknown key is then the likelier mistake (`type: none` is a natural guess), so
        # it is named first; with exactly one kind, unknown keys only warn, as elsewhere.
        for key, value in block.items():
            if key not in keys:
                hint = ""
                if value in _READINESS_SHORTHANDS:
                    hint = f" (for {value!r} alone, write the shorthand `readiness: {value}`)"
                r.fail(
                    _join(path, key),
                    f"unknown key {key!r}; expected one of {_choices(keys)}{hint}",
                )
        got = _choices(kinds) if kinds else "none of them"
        r.fail(
            path,
            f"must name exactly one of {_choices(_READINESS_KINDS)}, got {got} "
            f"(or use a shorthand: `readiness: none`, `process` or `discovery`)",
        )
    r.known(block, path, keys)
    (kind,) = kinds
    value = block[kind]
    kind_path = f"{path}.{kind}"
    defaults = Readiness()
    common: dict[str, Any] = {
        "kind": ReadinessKind(kind),
        "timeout_s": defaults.timeout_s,
        "period_s": defaults.period_s,
    }
    if block.get("timeoutSeconds") is not None:
        common["timeout_s"] = r.seconds(
            block["timeoutSeconds"], f"{path}.timeoutSeconds", positive=True
        )
    if block.get("periodSeconds") is not None:
        common["period_s"] = r.seconds(
            block["periodSeconds"], f"{path}.periodSeconds", positive=True
        )

    if kind == "discovery":
        return Readiness(**common, **_discovery(r, value, kind_path))
    if kind == "http":
        url = r.string(value, kind_path)
        if not url.startswith(("http://", "https://")):
            r.fail(kind_path, f"must be an http:// or https:// URL, got {url!r}")
        _check_templates(r, url, kind_path, allocated)
        return Readiness(**common, url=url)
    if kind == "tcp":
        return Readiness(**common, port=_tcp_port(r, value, kind_path, ports))
    if kind == "process":
        grace = r.mapping(value, kind_path)
        r.known(grace, kind_path, ("startupGraceSeconds",))
        startup = defaults.startup_grace_s
        if grace.get("startupGraceSeconds") is not None:
            startup = r.seconds(
                grace["startupGraceSeconds"], f"{kind_path}.startupGraceSeconds", positive=False
            )
        return Readiness(**common, startup_grace_s=startup)
    if value is not None:
        r.fail(kind_path, f"takes no value, got {_describe(value)}")
    return Readiness(**common)


def _discovery(r: _Reader, value: object, path: str) -> dict[str, Any]:
    if isinstance(value, str):  # shorthand: the one endpoint name
        value = {"endpoints": [value]}
    elif isinstance(value, list | tuple):  # shorthand: the endpoint names
        value = {"endpoints": value}
    block = r.mapping(value, path)
    r.known(block, path, ("component", "endpoints", "match"))
    out: dict[str, Any] = {}
    if block.get("component") is not None:
        out["component"] = r.string(block["component"], f"{path}.component", _DYNAMO_NAME)
    if block.get("endpoints") is not None:
        endpoints = r.sequence(block["endpoints"], f"{path}.endpoints")
        if not endpoints:
            r.fail(f"{path}.endpoints", "must name at least one endpoint")
        out["endpoints"] = tuple(
            r.string(e, f"{path}.endpoints[{i}]", _DYNAMO_NAME) for i, e in enumerate(endpoints)
        )
    if block.get("match") is not None:
        out["match"] = r.choice(block["match"], f"{path}.match", ("all", "any"))
    return out


def _tcp_port(r: _Reader, value: object, path: str, ports: Sequence[PortSpec]) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            r.fail(path, f"must be a port number 1..65535 or a declared port name, got {value}")
        return value
    name = r.string(value, path)
    declared = [p.name for p in ports]
    if name not in declared:
        listed = _choices(declared) if declared else "none"
        r.fail(path, f"names no port {name!r} (its ports: {listed})")
    return name


def _restart(r: _Reader, raw: object, path: str) -> RestartPolicy:
    if raw is None:
        return RestartPolicy()
    if isinstance(raw, str):  # shorthand: `restart: never`
        raw = {"policy": raw}
    block = r.mapping(raw, path, optional=False)
    r.known(block, path, _RESTART_KEYS)
    defaults = RestartPolicy()
    mode = defaults.mode
    if block.get("policy") is not None:
        mode = RestartMode(
            r.choice(block["policy"], f"{path}.policy", (m.value for m in RestartMode))
        )

    def seconds(key: str, default: float, *, positive: bool) -> float:
        if block.get(key) is None:
            return default
        return r.seconds(block[key], f"{path}.{key}", positive=positive)

    base = seconds("backoffBaseSeconds", defaults.backoff_base_s, positive=True)
    ceiling = seconds("backoffMaxSeconds", defaults.backoff_max_s, positive=True)
    if ceiling < base:
        key = "backoffMaxSeconds" if "backoffMaxSeconds" in block else "backoffBaseSeconds"
        r.fail(
            f"{path}.{key}",
            f"backoffMaxSeconds ({ceiling:g}) must be >= backoffBaseSeconds ({base:g})",
        )
    failures = defaults.crashloop_failures
    if block.get("crashLoopFailures") is not None:
        failures = r.integer(block["crashLoopFailures"], f"{path}.crashLoopFailures", minimum=1)
    return RestartPolicy(
        mode=mode,
        backoff_base_s=base,
        backoff_max_s=ceiling,
        stable_after_s=seconds("stableAfterSeconds", defaults.stable_after_s, positive=False),
        crashloop_failures=failures,
        crashloop_window_s=seconds(
            "crashLoopWindowSeconds", defaults.crashloop_window_s, positive=True
        ),
    )


# --------------------------------------------------------------------------- YAML files


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            duplicate = False
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        with contextlib.suppress(TypeError):  # unhashable: PyYAML reports it below
            seen.add(key)
    return dict(loader.construct_pairs(node, deep=True))


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def parse_yaml(text: str, origin: str) -> object:
    """The YAML document in ``text``; syntax errors name ``origin:line:column``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        reason = exc.problem or exc.context or "unreadable"
        context = exc.context_mark
        if exc.problem and exc.context and context and mark and context.line != mark.line:
            # e.g. an unclosed bracket: say where the construct that broke started
            reason += f" ({exc.context} started at line {context.line + 1})"
        raise GraphError(
            f"{where}: invalid YAML: {reason}",
            source=origin,
            line=mark.line + 1 if mark else None,
        ) from None
    except yaml.YAMLError as exc:
        raise GraphError(f"{origin}: invalid YAML: {exc}", source=origin) from None


def load_graph_file(path: Path, *, display: str | None = None) -> Graph:
    """Load one YAML graph file. ``display`` is how messages name it (default: ``path``)."""
    origin = display if display is not None else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GraphError(f"{origin}: not UTF-8 text ({exc.reason})", source=origin) from None
    except OSError as exc:
        raise GraphError(f"{origin}: cannot read: {exc.strerror}", source=origin) from None
    raw = parse_yaml(text, origin)
    return build_graph(
        raw, origin=origin, source=str(path.resolve()), base_dir=path.resolve().parent
    )


# --------------------------------------------------------------------------- identifiers


def load_graph(identifier: str | Path = ".", *, cwd: Path | None = None) -> Graph:
    """Resolve a ``bento_identifier`` to a validated :class:`Graph`, or raise :class:`GraphError`.

    ``identifier`` is, in this order of checks:

    - ``module:attr`` (``attr`` may be dotted) when no file of that name exists: imports
      ``module`` with ``cwd`` first on ``sys.path`` and takes ``attr``, a :class:`Graph`
      built with :func:`connector.graph_api.graph`, or a service declaration of
      :func:`connector.graph_api.service`, which stands for itself and everything it
      depends on (the way Dynamo's old SDK served ``graphs.agg:Frontend``);
    - a directory holding ``graph.yaml`` or ``dynamo.yaml`` (the first found is used);
    - a YAML file.

    Relative paths are taken from ``cwd`` (default: the process's working directory).
    """
    base = cwd if cwd is not None else Path.cwd()
    text = str(identifier)
    if isinstance(identifier, str) and _MODULE_REF.fullmatch(text) and not (base / text).exists():
        return _load_python(text, base)
    path = Path(identifier)
    full = path if path.is_absolute() else base / path
    if full.is_dir():
        found = [name for name in DIRECTORY_FILES if (full / name).is_file()]
        if not found:
            raise GraphError(
                f"{path}: no graph file in this directory "
                f"(looked for {' and '.join(DIRECTORY_FILES)})",
                source=str(path),
            )
        graph = load_graph_file(full / found[0], display=str(path / found[0]))
        if len(found) > 1:
            message = f"{path}: both {' and '.join(found)} exist; using {found[0]}"
            log.warning("%s", message)
            graph = dataclasses.replace(graph, warnings=(message, *graph.warnings))
        return graph
    if not full.exists():
        hint = ""
        if ":" in text:
            hint = " (a Python graph is named module:attr, e.g. examples.python_graph:graph)"
        raise GraphError(f"{path}: no such file or directory{hint}", source=str(path))
    return load_graph_file(full, display=str(path))


def _load_python(identifier: str, base: Path) -> Graph:
    module_name, _, attr = identifier.partition(":")
    base_entry = str(base)
    added = base_entry not in sys.path
    if added:
        sys.path.insert(0, base_entry)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise GraphError(
                f"{identifier}: no module named {missing!r} (searched {base} and sys.path)",
                source=identifier,
            ) from None
        raise GraphError(
            f"{identifier}: importing {module_name!r} failed: no module named {missing!r}",
            source=identifier,
        ) from None
    except GraphError as exc:  # the module built an invalid graph at import time
        raise GraphError(f"{identifier}: {exc.message}", **exc.details) from None
    except Exception as exc:
        raise GraphError(
            f"{identifier}: importing {module_name!r} failed: {type(exc).__name__}: {exc}",
            source=identifier,
        ) from None
    finally:
        if added:
            sys.path.remove(base_entry)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GraphError(
                f"{identifier}: module {module_name!r} has no attribute {attr!r}",
                source=identifier,
            )
        obj = getattr(obj, part)

    # A service declaration (connector.graph_api.service) stands for itself and what it
    # depends on. Recognized by its method, not its class: the API builds graphs with this
    # module, so this module must not import the API.
    to_graph = getattr(obj, "to_graph", None)
    if not isinstance(obj, Graph) and callable(to_graph):
        try:
            obj = to_graph()
        except GraphError as exc:
            raise GraphError(f"{identifier}: {exc.message}", **exc.details) from None
    if not isinstance(obj, Graph):
        raise GraphError(
            f"{identifier}: {attr} is of type {type(obj).__name__}, not a Graph "
            "(build one with connector.graph_api.graph(...))",
            source=identifier,
        )
    return dataclasses.replace(obj, source=identifier)
