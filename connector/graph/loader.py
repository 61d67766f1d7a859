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
  each becomes an entry of ``Graph.warnings`` and a ``connector.graph.model`` log warning.
- **``{python}``** in a command or argument becomes the running interpreter
  (``sys.executable``), so graphs can start project modules with the same Python.
- **``workingDir``** relative to the graph file's directory is made absolute.
- **Readiness** defaults to ``process`` (alive past a short grace period).

The Python graph API (:mod:`connector.graph_api`) builds the same raw mapping and passes
it to :func:`build_graph`, so both front doors share every rule here.

Just over 500 lines: the docstring above is the graph format's reference, and the code is
the sources (file, directory, ``module:attr``), strict YAML and ``build_graph``; the typed
reading of each section is in :mod:`connector.graph.sections`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from connector.errors import GraphError
from connector.graph import dynamo_defaults
from connector.graph.model import (
    Graph,
    PortSpec,
    Role,
    Service,
    SocketSpec,
    SubComponentType,
    find_cycle,
)
from connector.graph.reader import (
    GRAPH_NAME,
    NAMESPACE_NAME,
    PATTERN_RULES,
    SERVICE_NAME,
    Reader,
    choices,
    describe,
)
from connector.graph.sections import (
    allocations,
    check_allocation_envs,
    check_templates,
    container,
    envs_of,
    optional_seconds,
    readiness_of,
    resources_of,
    restart_of,
)

log = logging.getLogger("connector.graph")

KIND = "DynamoGraphDeployment"
DIRECTORY_FILES = ("graph.yaml", "dynamo.yaml")
_MODULE_REF = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

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
    r = Reader(origin)
    if not isinstance(raw, Mapping):
        r.fail("", f"must hold a mapping (a {KIND}), got {describe(raw)}")
    top = r.mapping(raw, "")
    r.known(top, "", _TOP_KEYS)
    kind = top.get("kind")
    if kind != KIND:
        r.fail("kind", f"must be {KIND}, got {describe(kind)}")
    if "apiVersion" in top:
        r.string(top["apiVersion"], "apiVersion")
    metadata = r.mapping(top.get("metadata"), "metadata", optional=False)
    r.known(metadata, "metadata", _METADATA_KEYS)
    name = r.string(metadata.get("name"), "metadata.name", GRAPH_NAME)
    meta_namespace = None
    if "namespace" in metadata:
        meta_namespace = r.string(metadata["namespace"], "metadata.namespace", NAMESPACE_NAME)
    spec = r.mapping(top.get("spec"), "spec", optional=False)
    r.known(spec, "spec", _SPEC_KEYS)
    graph_envs = envs_of(r, spec.get("envs"), "spec.envs")
    raw_services = r.mapping(spec.get("services"), "spec.services", optional=False)
    if not raw_services:
        r.fail("spec.services", "must declare at least one service")

    services: dict[str, Service] = {}
    seen: dict[str, str] = {}  # lowercased name -> name as declared
    for svc_name, svc_raw in raw_services.items():
        path = f"spec.services.{svc_name}"
        r.string(svc_name, path, SERVICE_NAME)
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
    r: Reader, name: str, meta_namespace: str | None, services: Mapping[str, Service]
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
    if not NAMESPACE_NAME.fullmatch(name):
        r.fail(
            "metadata.name",
            f"{name!r} cannot serve as the namespace ({PATTERN_RULES[NAMESPACE_NAME.pattern]}); "
            "set metadata.namespace or the services' dynamoNamespace",
        )
    return name


def _check_dependencies(r: Reader, services: Mapping[str, Service]) -> None:
    by_lower = {n.lower(): n for n in services}
    for svc in services.values():
        for i, dep in enumerate(svc.depends_on):
            if dep in services:
                continue
            r.service = svc.name
            hint = by_lower.get(dep.lower())
            known = f"did you mean {hint!r}?" if hint else f"services: {choices(services)}"
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
    r: Reader,
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
        dynamo_namespace = r.string(
            svc["dynamoNamespace"], f"{path}.dynamoNamespace", NAMESPACE_NAME
        )

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

    ports = allocations(r, local.get("ports"), f"{lp}.ports", "port", PortSpec)
    sockets = allocations(r, local.get("sockets"), f"{lp}.sockets", "socket", SocketSpec)
    command, args, working_dir = container(r, svc.get("extraPodSpec"), path, base_dir)
    own_envs = envs_of(r, svc.get("envs"), f"{path}.envs")
    envs = dict(graph_envs)
    envs.update(own_envs)  # a service's own value wins over the graph-wide one
    # The role's ports the service did not declare (DYN_SYSTEM_PORT, ...): named like
    # declared ones, so templates and readiness may use them.
    ports += dynamo_defaults.implicit_ports(role, ports, envs)
    allocated = {"port": [p.name for p in ports], "socket": [s.name for s in sockets]}

    for i, part in enumerate(command):
        check_templates(r, part, f"{path}.extraPodSpec.mainContainer.command[{i}]", allocated)
    for i, part in enumerate(args):
        check_templates(r, part, f"{path}.extraPodSpec.mainContainer.args[{i}]", allocated)

    for i, (_, value) in enumerate(graph_envs):
        check_templates(r, value, f"spec.envs[{i}].value", allocated, service=name)
    for i, (_, value) in enumerate(own_envs):
        check_templates(r, value, f"{path}.envs[{i}].value", allocated)
    check_allocation_envs(r, ports, f"{lp}.ports", envs)
    check_allocation_envs(r, sockets, f"{lp}.sockets", envs)

    resources = resources_of(r, svc.get("resources"), f"{path}.resources")
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
        readiness=readiness_of(r, local.get("readiness"), f"{lp}.readiness", ports, allocated)
        or dynamo_defaults.default_readiness(role, (*command, *args), envs, ports),
        graceful_stop_s=optional_seconds(
            r, local, "gracefulStopSeconds", lp, defaults.graceful_stop_s
        ),
        drain_s=optional_seconds(r, local, "drainSeconds", lp, None),
        restart=restart_of(r, local.get("restart"), f"{lp}.restart"),
        depends_on=depends_on,
        ports=ports,
        sockets=sockets,
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
