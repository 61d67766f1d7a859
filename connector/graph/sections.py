"""Readers of one service's sections: container, envs, ports and sockets, resources,
readiness, restart policy. Each takes the :class:`~connector.graph.reader.Reader` and the
section's path, and returns the normalized model value or fails naming the field."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from connector.graph import quantities, templates
from connector.graph.model import (
    PortSpec,
    Readiness,
    ReadinessKind,
    ResourceRequest,
    RestartMode,
    RestartPolicy,
    SocketSpec,
)
from connector.graph.reader import (
    ALLOCATION_NAME,
    DYNAMO_NAME,
    ENV_NAME,
    Reader,
    choices,
    describe,
    join_path,
)

PYTHON_PLACEHOLDER = "{python}"
T = TypeVar("T")
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


def optional_seconds(
    r: Reader, block: Mapping[str, Any], key: str, path: str, default: T
) -> float | T:
    if block.get(key) is None:
        return default
    return r.seconds(block[key], f"{path}.{key}", positive=False)


def container(
    r: Reader, raw: object, path: str, base_dir: Path | None
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


def envs_of(r: Reader, raw: object, path: str) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for i, item in enumerate(r.sequence(raw, path)):
        item_path = f"{path}[{i}]"
        entry = r.mapping(item, item_path, optional=False)
        r.known(entry, item_path, ("name", "value"))
        env_name = r.string(entry.get("name"), f"{item_path}.name", ENV_NAME)
        if "value" not in entry:
            r.fail(f"{item_path}.value", "required (secrets and valueFrom are not read locally)")
        value = "" if entry["value"] is None else r.text(entry["value"], f"{item_path}.value")
        if env_name in found:
            r.warn(f"{item_path}.name", f"{env_name} is set twice; the last value wins")
            del found[env_name]  # keep the order of the last occurrence
        found[env_name] = value
    return list(found.items())


_Allocation = TypeVar("_Allocation", PortSpec, SocketSpec)


def allocations(
    r: Reader, raw: object, path: str, what: str, make: Callable[..., _Allocation]
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
        alloc_name = r.string(entry.get("name"), f"{item_path}.name", ALLOCATION_NAME)
        if alloc_name in names:
            r.fail(f"{item_path}.name", f"duplicate {what} name {alloc_name!r}")
        names.add(alloc_name)
        env = None
        if entry.get("env") is not None:
            env = r.string(entry["env"], f"{item_path}.env", ENV_NAME)
            if env in envs:
                r.fail(f"{item_path}.env", f"{env} is already the env of {what} {envs[env]!r}")
            envs[env] = alloc_name
        specs.append(make(name=alloc_name, env=env))
    return tuple(specs)


def check_allocation_envs(
    r: Reader, specs: Sequence[PortSpec | SocketSpec], path: str, envs: Mapping[str, str]
) -> None:
    for i, spec in enumerate(specs):
        if spec.env is not None and spec.env in envs:
            r.fail(
                f"{path}[{i}].env",
                f"{spec.env} is also set in envs; the allocated value would be overridden",
            )


def check_templates(
    r: Reader,
    text: str,
    path: str,
    allocated: Mapping[str, Sequence[str]],
    *,
    service: str | None = None,
) -> None:
    for template, kind in templates.undeclared(text, allocated):
        if kind == "gpu":
            r.fail(path, f"{template} is not a GPU field ({choices(templates.GPU_FIELDS)})")
        declared = allocated[kind]
        listed = choices(declared) if declared else "none"
        owner = f" of service {service}" if service else ""
        r.fail(
            path,
            # "its": local.ports plus the role's default ports (connector.graph.dynamo_defaults).
            f"{template} names no {kind}{owner} (its {kind}s: {listed})",
        )


def resources_of(r: Reader, raw: object, path: str) -> ResourceRequest:
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


def readiness_of(
    r: Reader,
    raw: object,
    path: str,
    ports: Sequence[PortSpec],
    allocated: Mapping[str, Sequence[str]],
) -> Readiness | None:
    if raw is None:
        return None  # the role's default (connector.graph.dynamo_defaults)
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
                    join_path(path, key),
                    f"unknown key {key!r}; expected one of {choices(keys)}{hint}",
                )
        got = choices(kinds) if kinds else "none of them"
        r.fail(
            path,
            f"must name exactly one of {choices(_READINESS_KINDS)}, got {got} "
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
        check_templates(r, url, kind_path, allocated)
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
        r.fail(kind_path, f"takes no value, got {describe(value)}")
    return Readiness(**common)


def _discovery(r: Reader, value: object, path: str) -> dict[str, Any]:
    if isinstance(value, str):  # shorthand: the one endpoint name
        value = {"endpoints": [value]}
    elif isinstance(value, list | tuple):  # shorthand: the endpoint names
        value = {"endpoints": value}
    block = r.mapping(value, path)
    r.known(block, path, ("component", "endpoints", "match"))
    out: dict[str, Any] = {}
    if block.get("component") is not None:
        out["component"] = r.string(block["component"], f"{path}.component", DYNAMO_NAME)
    if block.get("endpoints") is not None:
        endpoints = r.sequence(block["endpoints"], f"{path}.endpoints")
        if not endpoints:
            r.fail(f"{path}.endpoints", "must name at least one endpoint")
        out["endpoints"] = tuple(
            r.string(e, f"{path}.endpoints[{i}]", DYNAMO_NAME) for i, e in enumerate(endpoints)
        )
    if block.get("match") is not None:
        out["match"] = r.choice(block["match"], f"{path}.match", ("all", "any"))
    return out


def _tcp_port(r: Reader, value: object, path: str, ports: Sequence[PortSpec]) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            r.fail(path, f"must be a port number 1..65535 or a declared port name, got {value}")
        return value
    name = r.string(value, path)
    declared = [p.name for p in ports]
    if name not in declared:
        listed = choices(declared) if declared else "none"
        r.fail(path, f"names no port {name!r} (its ports: {listed})")
    return name


def restart_of(r: Reader, raw: object, path: str) -> RestartPolicy:
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
