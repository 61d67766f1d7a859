"""Graph files: valid samples load to exact objects; each class of bad input names
file, field and reason; identifiers resolve (file, directory, module:attr)."""

from __future__ import annotations

import copy
import logging
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.errors import GraphError
from connector.graph.loader import build_graph, load_graph, load_graph_file
from connector.graph.model import (
    Edge,
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
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(__file__).resolve().parent / "graphs"
PY = sys.executable

BASE: dict[str, Any] = {
    "apiVersion": "nvidia.com/v1alpha1",
    "kind": "DynamoGraphDeployment",
    "metadata": {"name": "g"},
    "spec": {
        "services": {
            "Frontend": {
                "componentType": "frontend",
                "extraPodSpec": {"mainContainer": {"command": ["fe"]}},
            },
            "Decode": {
                "componentType": "worker",
                "subComponentType": "decode",
                "replicas": 2,
                "extraPodSpec": {"mainContainer": {"command": ["w"], "args": ["--x"]}},
                "local": {"maxReplicas": 4, "ports": [{"name": "system"}]},
            },
        }
    },
}


def raw_graph() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def decode(raw: dict[str, Any]) -> dict[str, Any]:
    svc: dict[str, Any] = raw["spec"]["services"]["Decode"]
    return svc


def write(tmp_path: Path, raw: object, name: str = "graph.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load_raw(tmp_path: Path, raw: object) -> Graph:
    write(tmp_path, raw)
    return load_graph("graph.yaml", cwd=tmp_path)


def error_of(tmp_path: Path, raw: object) -> str:
    with pytest.raises(GraphError) as info:
        load_raw(tmp_path, raw)
    return info.value.message


# ------------------------------------------------------------------ valid samples


def test_full_sample_loads_to_exact_objects() -> None:
    graph = load_graph(SAMPLES / "full.yaml")
    assert (graph.name, graph.namespace, graph.warnings) == ("full", "dev", ())
    assert graph.source == str(SAMPLES / "full.yaml")
    assert graph.services == {
        "Frontend": Service(
            name="Frontend",
            role=Role.FRONTEND,
            command=(PY, "-m", "fe"),
            args=("--port", "{port.http}", "8080"),
            envs=(("DYN_LOG", "debug"), ("SHARED", "graph")),
            ports=(PortSpec("http"),),
            readiness=Readiness(kind=ReadinessKind.HTTP, url="http://127.0.0.1:{port.http}/health"),
        ),
        "Router": Service(
            name="Router",
            role=Role.ROUTER,
            command=("router",),
            replicas=0,
            envs=(("DYN_LOG", "debug"), ("SHARED", "graph")),
            readiness=Readiness(kind=ReadinessKind.NONE),
            # A router's default ports (connector.graph.dynamo_defaults), not declared in the file.
            ports=(PortSpec("system", "DYN_SYSTEM_PORT"), PortSpec("rpc", "DYN_TCP_RPC_PORT")),
        ),
        "Decode": Service(
            name="Decode",
            role=Role.WORKER,
            command=("python3", "-m", "worker"),
            args=("--socket", "{socket.kv}"),
            sub_component_type=SubComponentType.DECODE,
            replicas=3,
            dynamo_namespace="dev",
            envs=(("DYN_LOG", "debug"), ("SHARED", "service"), ("SOCK", "{socket.kv}")),
            working_dir=str(SAMPLES / "work"),
            resources=ResourceRequest(
                gpu=1.0, cpu=1.5, memory_bytes=1 << 30, pin_cpus=True, memory_limit_bytes=2 << 30
            ),
            min_replicas=1,
            max_replicas=4,
            readiness=Readiness(
                kind=ReadinessKind.DISCOVERY,
                component="backend",
                endpoints=("generate", "clear"),
                match="any",
                timeout_s=300.0,
                period_s=0.5,
            ),
            graceful_stop_s=30.0,
            drain_s=2.5,
            restart=RestartPolicy(
                mode=RestartMode.ON_FAILURE,
                backoff_base_s=2.0,
                backoff_max_s=30.0,
                stable_after_s=10.0,
                crashloop_failures=3,
                crashloop_window_s=120.0,
            ),
            depends_on=("Prefill",),
            # `rpc` is declared without an env var, so the default `rpc` is not added.
            ports=(
                PortSpec("system", "DYN_SYSTEM_PORT"),
                PortSpec("rpc"),
                PortSpec("fpm", "DYN_FORWARDPASS_METRIC_PORT"),
                PortSpec("nixl", "VLLM_NIXL_SIDE_CHANNEL_PORT"),
            ),
            sockets=(SocketSpec("kv", "KV_SOCKET"),),
        ),
        "Prefill": Service(
            name="Prefill",
            role=Role.WORKER,
            command=("python3", "-m", "worker"),
            sub_component_type=SubComponentType.PREFILL,
            envs=(("DYN_LOG", "debug"), ("SHARED", "graph")),
            working_dir="/srv/prefill",
            resources=ResourceRequest(
                gpu=0.5, cpu=0.25, memory_bytes=512 << 20, memory_limit_bytes=512 << 20
            ),
            readiness=Readiness(kind=ReadinessKind.TCP, port="rpc"),
            restart=RestartPolicy(mode=RestartMode.NEVER),
            ports=(
                PortSpec("rpc"),
                PortSpec("system", "DYN_SYSTEM_PORT"),
                PortSpec("fpm", "DYN_FORWARDPASS_METRIC_PORT"),
                PortSpec("nixl", "VLLM_NIXL_SIDE_CHANNEL_PORT"),
            ),
        ),
        "Planner": Service(
            name="Planner",
            role=Role.PLANNER,
            command=("planner",),
            envs=(("DYN_LOG", "debug"), ("SHARED", "graph")),
            readiness=Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=3.0),
            depends_on=("Decode", "Prefill"),
            ports=(PortSpec("system", "DYN_SYSTEM_PORT"), PortSpec("rpc", "DYN_TCP_RPC_PORT")),
        ),
    }


def test_minimal_sample_takes_every_default() -> None:
    graph = load_graph(SAMPLES / "minimal.yaml")
    assert graph == Graph(
        name="minimal",
        namespace="minimal",
        services={
            "Worker": Service(
                name="Worker",
                role=Role.WORKER,
                command=("python3", "worker.py"),
                readiness=Readiness(kind=ReadinessKind.DISCOVERY, default=True),
                ports=(
                    PortSpec("system", "DYN_SYSTEM_PORT"),
                    PortSpec("rpc", "DYN_TCP_RPC_PORT"),
                    PortSpec("fpm", "DYN_FORWARDPASS_METRIC_PORT"),
                    PortSpec("nixl", "VLLM_NIXL_SIDE_CHANNEL_PORT"),
                ),
            )
        },
        source=str(SAMPLES / "minimal.yaml"),
    )
    svc = graph.services["Worker"]
    assert (svc.replicas, svc.min_replicas, svc.max_replicas) == (1, 0, None)
    # A worker is ready once registered, under the component it registers as (learnt).
    assert (svc.readiness.kind, svc.readiness.component) == (ReadinessKind.DISCOVERY, None)
    assert svc.restart.mode is RestartMode.ALWAYS


def test_demo_example_runs_mock_workers_in_namespace_demo() -> None:
    graph = load_graph(ROOT / "examples" / "demo.yaml")
    assert (graph.name, graph.namespace, graph.warnings) == ("demo", "demo", ())
    assert list(graph.services) == ["Frontend", "Prefill", "Decode"]
    mock = (PY, "-m", "connector.mockworker")
    ports = (PortSpec("system", "DYN_SYSTEM_PORT"), PortSpec("rpc", "DYN_TCP_RPC_PORT"))
    # Beside the declared ports, each role's defaults (connector.graph.dynamo_defaults).
    extra = {
        "Frontend": (PortSpec("http", "DYN_HTTP_PORT"),),
        "Prefill": (
            PortSpec("fpm", "DYN_FORWARDPASS_METRIC_PORT"),
            PortSpec("nixl", "VLLM_NIXL_SIDE_CHANNEL_PORT"),
        ),
        "Decode": (
            PortSpec("fpm", "DYN_FORWARDPASS_METRIC_PORT"),
            PortSpec("nixl", "VLLM_NIXL_SIDE_CHANNEL_PORT"),
        ),
    }
    small = ResourceRequest(gpu=0.0, cpu=0.1, memory_bytes=64 << 20)
    for n, s in graph.services.items():
        assert (s.command, s.ports, s.dynamo_namespace) == (mock, ports + extra[n], "demo")
    # Only the frontend has a memory limit (so the demo shows one on the dashboards).
    assert {n: s.resources for n, s in graph.services.items()} == {
        "Frontend": replace(small, memory_limit_bytes=1 << 30),
        "Prefill": small,
        "Decode": small,
    }
    shape = {
        n: (s.role, s.sub_component_type, s.replicas, s.min_replicas, s.max_replicas)
        for n, s in graph.services.items()
    }
    assert shape == {
        "Frontend": (Role.FRONTEND, None, 1, 0, 1),
        "Prefill": (Role.WORKER, SubComponentType.PREFILL, 1, 0, 4),
        "Decode": (Role.WORKER, SubComponentType.DECODE, 2, 1, 8),
    }
    worker_args = ("--role", "worker", "--endpoint", "generate")
    assert {n: s.args for n, s in graph.services.items()} == {
        "Frontend": ("--role", "frontend"),
        "Prefill": worker_args,
        "Decode": worker_args,
    }
    assert {n: s.readiness for n, s in graph.services.items()} == {
        "Frontend": Readiness(
            kind=ReadinessKind.HTTP, url="http://127.0.0.1:{port.system}/health", timeout_s=30
        ),
        "Prefill": Readiness(kind=ReadinessKind.DISCOVERY, component="prefill", timeout_s=30),
        "Decode": Readiness(kind=ReadinessKind.DISCOVERY, component="backend", timeout_s=30),
    }
    assert graph.edges() == [Edge("Frontend", "Decode", "role"), Edge("Decode", "Prefill", "role")]


def test_gpu_example_loads_cleanly() -> None:
    graph = load_graph(ROOT / "examples" / "disagg_gpu.yaml")
    assert (graph.name, graph.namespace, graph.warnings) == ("vllm-disagg", "vllm-disagg", ())
    gpus = {n: (s.resources.gpu, s.replicas) for n, s in graph.services.items()}
    assert gpus == {"Frontend": (0, 1), "Decode": (2, 1), "Prefill": (1, 2), "Planner": (0, 0)}
    assert graph.services["Decode"].resources.memory_bytes == 32 << 30
    assert graph.services["Decode"].envs == (("DYN_LOG", "info"), ("DYN_SYSTEM_ENABLED", "true"))
    assert graph.topological_order() == ["Frontend", "Decode", "Prefill", "Planner"]


def test_python_example_equals_the_yaml_demo() -> None:
    yaml_graph = load_graph(ROOT / "examples" / "demo.yaml")
    py_graph = load_graph("examples.python_graph:graph", cwd=ROOT)
    assert py_graph.services == yaml_graph.services
    assert (py_graph.name, py_graph.namespace, py_graph.source) == (
        "demo",
        "demo",
        "examples.python_graph:graph",
    )


# ------------------------------------------------------------------ invalid input


def set_in(raw: dict[str, Any], dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


D = "spec.services.Decode"
INVALID: list[tuple[str, object, str]] = [
    (f"{D}.replicas", -1, "graph.yaml: spec.services.Decode.replicas: must be >= 0, got -1"),
    (
        f"{D}.replicas",
        "two",
        "graph.yaml: spec.services.Decode.replicas: must be an integer, got str 'two'",
    ),
    (
        f"{D}.replicas",
        True,
        "graph.yaml: spec.services.Decode.replicas: must be an integer, got bool True",
    ),
    (
        f"{D}.replicas",
        9,
        "graph.yaml: spec.services.Decode.replicas: must be within "
        "local.minReplicas..local.maxReplicas (0..4), got 9",
    ),
    (
        f"{D}.local.minReplicas",
        5,
        "graph.yaml: spec.services.Decode.local.minReplicas: must be <= local.maxReplicas (4), "
        "got 5",
    ),
    (
        f"{D}.local.minReplicas",
        3,
        "graph.yaml: spec.services.Decode.replicas: must be within "
        "local.minReplicas..local.maxReplicas (3..4), got 2",
    ),
    (
        f"{D}.componentType",
        "backend",
        "graph.yaml: spec.services.Decode.componentType: must be one of frontend, router, "
        "worker, planner, got str 'backend'",
    ),
    (
        f"{D}.componentType",
        None,
        "graph.yaml: spec.services.Decode.componentType: must be one of frontend, router, "
        "worker, planner, got nothing",
    ),
    (
        f"{D}.subComponentType",
        "both",
        "graph.yaml: spec.services.Decode.subComponentType: must be one of prefill, decode, "
        "got str 'both'",
    ),
    (
        "spec.services.Frontend.subComponentType",
        "prefill",
        "graph.yaml: spec.services.Frontend.subComponentType: only valid for componentType "
        "worker, got prefill with componentType frontend",
    ),
    (
        f"{D}.resources",
        {"requests": {"memory": "12XB"}},
        "graph.yaml: spec.services.Decode.resources.requests.memory: invalid quantity '12XB': "
        "expected a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, "
        "T, P, E), e.g. '512Mi'",
    ),
    (
        f"{D}.resources",
        {"limits": {"gpu": 1.5}},
        "graph.yaml: spec.services.Decode.resources.limits.gpu: gpu must be a whole number or "
        "a fraction below 1, got 1.5",
    ),
    (
        f"{D}.resources",
        {"requests": {"cpu": "-1"}},
        "graph.yaml: spec.services.Decode.resources.requests.cpu: cpu must not be negative, "
        "got '-1'",
    ),
    (
        f"{D}.resources",
        {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
        "graph.yaml: spec.services.Decode.resources.requests.memory: must be <= "
        "resources.limits.memory ('1Gi'), got '2Gi'",
    ),
    (
        f"{D}.extraPodSpec",
        {"mainContainer": {"args": ["--x"]}},
        "graph.yaml: spec.services.Decode.extraPodSpec.mainContainer.command: required: the "
        'program to run, e.g. ["python3", "-m", "dynamo.vllm"]',
    ),
    (
        f"{D}.extraPodSpec",
        None,
        "graph.yaml: spec.services.Decode.extraPodSpec.mainContainer.command: required: the "
        'program to run, e.g. ["python3", "-m", "dynamo.vllm"]',
    ),
    (
        f"{D}.extraPodSpec.mainContainer.command",
        "python3 w.py",
        "graph.yaml: spec.services.Decode.extraPodSpec.mainContainer.command: must be a list, "
        "got str 'python3 w.py'",
    ),
    (
        f"{D}.local.dependsOn",
        ["Prefil"],
        "graph.yaml: spec.services.Decode.local.dependsOn[0]: unknown service 'Prefil' "
        "(services: Frontend, Decode)",
    ),
    (
        f"{D}.local.dependsOn",
        ["frontend"],
        "graph.yaml: spec.services.Decode.local.dependsOn[0]: unknown service 'frontend' "
        "(did you mean 'Frontend'?)",
    ),
    (
        f"{D}.local.dependsOn",
        ["Decode"],
        "graph.yaml: spec.services: dependsOn cycle: Decode -> Decode",
    ),
    (
        f"{D}.extraPodSpec.mainContainer.args",
        ["--port", "{port.http}"],
        "graph.yaml: spec.services.Decode.extraPodSpec.mainContainer.args[1]: {port.http} names "
        "no port (its ports: system, rpc, fpm, nixl)",
    ),
    (
        f"{D}.extraPodSpec.mainContainer.args",
        ["--sock={socket.kv}"],
        "graph.yaml: spec.services.Decode.extraPodSpec.mainContainer.args[0]: {socket.kv} names "
        "no socket (its sockets: none)",
    ),
    (
        f"{D}.extraPodSpec.mainContainer.args",
        ["--tensor-parallel-size", "{gpu.size}"],
        "graph.yaml: spec.services.Decode.extraPodSpec.mainContainer.args[1]: {gpu.size} is "
        "not a GPU field (count, fraction, uuids)",
    ),
    (
        f"{D}.envs",
        [{"name": "URL", "value": "http://h:{port.metrics}"}],
        "graph.yaml: spec.services.Decode.envs[0].value: {port.metrics} names no port "
        "(its ports: system, rpc, fpm, nixl)",
    ),
    (
        "spec.envs",
        [{"name": "PORT", "value": "{port.system}"}],
        "graph.yaml: spec.envs[0].value: {port.system} names no port of service "
        "Frontend (its ports: http)",
    ),
    (
        f"{D}.envs",
        [{"name": "1BAD", "value": "x"}],
        "graph.yaml: spec.services.Decode.envs[0].name: invalid name '1BAD': must start with a "
        "letter or '_' and hold only letters, digits and '_'",
    ),
    (
        f"{D}.envs",
        [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {}}}],
        "graph.yaml: spec.services.Decode.envs[0].value: required (secrets and valueFrom are "
        "not read locally)",
    ),
    (
        f"{D}.local.ports",
        [{"name": "system"}, {"name": "system"}],
        "graph.yaml: spec.services.Decode.local.ports[1].name: duplicate port name 'system'",
    ),
    (
        f"{D}.local.sockets",
        ["kv", "kv"],
        "graph.yaml: spec.services.Decode.local.sockets[1].name: duplicate socket name 'kv'",
    ),
    (
        f"{D}.local.ports",
        [{"name": "a", "env": "P"}, {"name": "b", "env": "P"}],
        "graph.yaml: spec.services.Decode.local.ports[1].env: P is already the env of port 'a'",
    ),
    (
        f"{D}.local.readiness",
        {"http": "127.0.0.1:8000/health"},
        "graph.yaml: spec.services.Decode.local.readiness.http: must be an http:// or https:// "
        "URL, got '127.0.0.1:8000/health'",
    ),
    (
        f"{D}.local.readiness",
        {"http": "http://127.0.0.1:{port.web}/"},
        "graph.yaml: spec.services.Decode.local.readiness.http: {port.web} names no port "
        "(its ports: system, rpc, fpm, nixl)",
    ),
    (
        f"{D}.local.readiness",
        {"tcp": "grpc"},
        "graph.yaml: spec.services.Decode.local.readiness.tcp: names no port 'grpc' "
        "(its ports: system, rpc, fpm, nixl)",
    ),
    (
        f"{D}.local.readiness",
        {"tcp": 70000},
        "graph.yaml: spec.services.Decode.local.readiness.tcp: must be a port number 1..65535 "
        "or a declared port name, got 70000",
    ),
    (
        f"{D}.local.readiness",
        {"http": "http://x/", "tcp": 80},
        "graph.yaml: spec.services.Decode.local.readiness: must name exactly one of discovery, "
        "http, tcp, process, none, got http, tcp (or use a shorthand: `readiness: none`, "
        "`process` or `discovery`)",
    ),
    (
        f"{D}.local.readiness",
        {"type": "none"},
        "graph.yaml: spec.services.Decode.local.readiness.type: unknown key 'type'; expected "
        "one of discovery, http, tcp, process, none, timeoutSeconds, periodSeconds (for 'none' "
        "alone, write the shorthand `readiness: none`)",
    ),
    (
        f"{D}.local.readiness",
        {"kind": "http"},
        "graph.yaml: spec.services.Decode.local.readiness.kind: unknown key 'kind'; expected "
        "one of discovery, http, tcp, process, none, timeoutSeconds, periodSeconds",
    ),
    (
        f"{D}.local.readiness",
        {"timeoutSeconds": 5},
        "graph.yaml: spec.services.Decode.local.readiness: must name exactly one of discovery, "
        "http, tcp, process, none, got none of them (or use a shorthand: `readiness: none`, "
        "`process` or `discovery`)",
    ),
    (
        f"{D}.local.readiness",
        {"discovery": {"endpoints": []}},
        "graph.yaml: spec.services.Decode.local.readiness.discovery.endpoints: must name at "
        "least one endpoint",
    ),
    (
        f"{D}.local.readiness",
        {"discovery": {"match": "most"}},
        "graph.yaml: spec.services.Decode.local.readiness.discovery.match: must be one of all, "
        "any, got str 'most'",
    ),
    (
        f"{D}.local.readiness",
        {"none": None, "timeoutSeconds": 0},
        "graph.yaml: spec.services.Decode.local.readiness.timeoutSeconds: must be > 0, got 0",
    ),
    (
        f"{D}.local.readiness",
        "eventually",
        "graph.yaml: spec.services.Decode.local.readiness: must be one of none, process, "
        "discovery, got str 'eventually'",
    ),
    (
        f"{D}.local.gracefulStopSeconds",
        -1,
        "graph.yaml: spec.services.Decode.local.gracefulStopSeconds: must be >= 0, got -1",
    ),
    (
        f"{D}.local.restart",
        {"policy": "sometimes"},
        "graph.yaml: spec.services.Decode.local.restart.policy: must be one of always, "
        "on-failure, never, got str 'sometimes'",
    ),
    (
        f"{D}.local.restart",
        {"backoffBaseSeconds": 10, "backoffMaxSeconds": 5},
        "graph.yaml: spec.services.Decode.local.restart.backoffMaxSeconds: backoffMaxSeconds (5) "
        "must be >= backoffBaseSeconds (10)",
    ),
    (
        f"{D}.local.restart",
        {"crashLoopFailures": 0},
        "graph.yaml: spec.services.Decode.local.restart.crashLoopFailures: must be >= 1, got 0",
    ),
    (
        f"{D}.local.cpuPinning",
        True,
        "graph.yaml: spec.services.Decode.local.cpuPinning: needs a cpu request "
        "(resources.requests.cpu) above 0",
    ),
    (
        f"{D}.local.cpuPinning",
        "yes please",
        "graph.yaml: spec.services.Decode.local.cpuPinning: must be true or false, "
        "got str 'yes please'",
    ),
    (
        f"{D}.dynamoNamespace",
        "my.ns",
        "graph.yaml: spec.services.Decode.dynamoNamespace: invalid name 'my.ns': must start "
        "with a letter or digit and hold only letters, digits, '_' and '-'",
    ),
    (
        f"{D}.local",
        ["not", "a", "mapping"],
        "graph.yaml: spec.services.Decode.local: must be a mapping, got a list",
    ),
    (
        "spec.services",
        {},
        "graph.yaml: spec.services: must declare at least one service",
    ),
    (
        "spec.services",
        None,
        "graph.yaml: spec.services: must be a mapping, got nothing",
    ),
    (
        "kind",
        "Deployment",
        "graph.yaml: kind: must be DynamoGraphDeployment, got str 'Deployment'",
    ),
    (
        "metadata",
        {},
        "graph.yaml: metadata.name: must be a non-empty string, got nothing",
    ),
    (
        "metadata.name",
        "my.graph",
        "graph.yaml: metadata.name: 'my.graph' cannot serve as the namespace (must start with a "
        "letter or digit and hold only letters, digits, '_' and '-'); set metadata.namespace or "
        "the services' dynamoNamespace",
    ),
]


@pytest.mark.parametrize(("field", "value", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_field_names_file_field_and_reason(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    raw = raw_graph()
    set_in(raw, field, value)
    assert error_of(tmp_path, raw) == message


def test_error_details_name_service_and_field(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["replicas"] = -1
    write(tmp_path, raw)
    with pytest.raises(GraphError) as info:
        load_graph("graph.yaml", cwd=tmp_path)
    assert info.value.details == {
        "source": "graph.yaml",
        "field": "spec.services.Decode.replicas",
        "service": "Decode",
    }
    assert (info.value.code, info.value.http_status) == ("invalid_graph", 422)


def test_replicas_below_min_without_max(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["local"] = {"minReplicas": 3}
    assert error_of(tmp_path, raw) == (
        "graph.yaml: spec.services.Decode.replicas: must be >= local.minReplicas (3), got 2"
    )


def test_port_env_also_set_in_envs_is_refused(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["local"]["ports"] = [{"name": "system", "env": "DYN_SYSTEM_PORT"}]
    decode(raw)["envs"] = [{"name": "DYN_SYSTEM_PORT", "value": "9000"}]
    assert error_of(tmp_path, raw) == (
        "graph.yaml: spec.services.Decode.local.ports[0].env: DYN_SYSTEM_PORT is also set in "
        "envs; the allocated value would be overridden"
    )


def test_longer_cycle_is_named_in_order(tmp_path: Path) -> None:
    raw = raw_graph()
    services = raw["spec"]["services"]
    services["Prefill"] = copy.deepcopy(services["Frontend"])
    services["Frontend"]["local"] = {"dependsOn": ["Decode"]}
    decode(raw)["local"]["dependsOn"] = ["Prefill"]
    services["Prefill"]["local"] = {"dependsOn": ["Frontend"]}
    assert error_of(tmp_path, raw) == (
        "graph.yaml: spec.services: dependsOn cycle: Frontend -> Decode -> Prefill -> Frontend"
    )


def test_duplicate_names_differing_in_case(tmp_path: Path) -> None:
    raw = raw_graph()
    raw["spec"]["services"]["decode"] = copy.deepcopy(decode(raw))
    assert error_of(tmp_path, raw) == (
        "graph.yaml: spec.services.decode: name clashes with 'Decode': service names must "
        "differ ignoring case (they become lowercase Circus watcher names)"
    )


def test_invalid_service_name(tmp_path: Path) -> None:
    raw = raw_graph()
    raw["spec"]["services"]["2nd.worker"] = copy.deepcopy(decode(raw))
    assert error_of(tmp_path, raw) == (
        "graph.yaml: spec.services.2nd.worker: invalid name '2nd.worker': must start with a "
        "letter and hold only letters, digits, '_' and '-'"
    )


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "graph.yaml").write_text(
        "kind: DynamoGraphDeployment\nmetadata:\n  name: g\n  bad: [1, 2\nspec: {}\n"
    )
    with pytest.raises(GraphError) as info:
        load_graph("graph.yaml", cwd=tmp_path)
    assert info.value.message == (
        "graph.yaml:5:5: invalid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence started at line 4)"
    )
    assert info.value.details == {"source": "graph.yaml", "line": 5}


def test_duplicate_yaml_key_is_an_error_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "graph.yaml").write_text(
        textwrap.dedent(
            """\
            kind: DynamoGraphDeployment
            metadata: {name: g}
            spec:
              services:
                Decode: {componentType: worker}
                Decode: {componentType: frontend}
            """
        )
    )
    with pytest.raises(GraphError) as info:
        load_graph("graph.yaml", cwd=tmp_path)
    assert info.value.message == "graph.yaml:6:5: invalid YAML: duplicate key 'Decode'"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "graph.yaml: must hold a mapping (a DynamoGraphDeployment), got nothing"),
        ("- a\n- b\n", "graph.yaml: must hold a mapping (a DynamoGraphDeployment), got a list"),
        (
            "just text\n",
            "graph.yaml: must hold a mapping (a DynamoGraphDeployment), got str 'just text'",
        ),
        ("kind: Pod\n", "graph.yaml: kind: must be DynamoGraphDeployment, got str 'Pod'"),
        ("metadata: {name: g}\n", "graph.yaml: kind: must be DynamoGraphDeployment, got nothing"),
        (
            "kind: DynamoGraphDeployment\nmetadata: {name: g}\n",
            "graph.yaml: spec: must be a mapping, got nothing",
        ),
        (
            "kind: DynamoGraphDeployment\nmetadata: {name: g}\nspec: {services: {1: {}}}\n",
            "graph.yaml: spec.services.1: keys must be strings, got int 1",
        ),
    ],
)
def test_documents_that_are_not_a_graph(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "graph.yaml").write_text(text)
    with pytest.raises(GraphError) as info:
        load_graph("graph.yaml", cwd=tmp_path)
    assert info.value.message == message


def test_unreadable_encoding(tmp_path: Path) -> None:
    (tmp_path / "graph.yaml").write_bytes(b"kind: \xff\xfe\n")
    with pytest.raises(GraphError) as info:
        load_graph("graph.yaml", cwd=tmp_path)
    assert info.value.message == "graph.yaml: not UTF-8 text (invalid start byte)"


# ------------------------------------------------------------------ warnings


def test_unknown_keys_warn_and_are_listed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="connector.graph"):
        graph = load_graph("kubernetes.yaml", cwd=SAMPLES)
    prefix = "kubernetes.yaml: "
    expected = [
        "metadata.labels: not used by dynamo-local, ignored",
        "spec.backendFramework: not used by dynamo-local, ignored",
        "spec.services.Frontend.livenessProbe: not used by dynamo-local, ignored",
        "spec.services.Frontend.extraPodSpec.mainContainer.image: not used by dynamo-local, "
        "ignored",
        "spec.services.Decode.envFromSecret: not used by dynamo-local, ignored",
        "spec.services.Decode.extraPodSpec.tolerations: not used by dynamo-local, ignored",
        "spec.services.Decode.envs[0].valueFrom: not used by dynamo-local, ignored",
        "spec.services.Decode.resources.limits.ephemeral-storage: not used by dynamo-local, "
        "ignored",
        "spec.services.Decode.local.readiness.initialDelaySeconds: not used by dynamo-local, "
        "ignored",
        "spec.services.Decode.local.restart.jitter: not used by dynamo-local, ignored",
        "metadata.namespace: 'dynamo-system' differs from the services' dynamoNamespace "
        "'vllm-agg'; the graph runs in 'vllm-agg'",
    ]
    assert list(graph.warnings) == [prefix + w for w in expected]
    assert [r.getMessage() for r in caplog.records if r.name == "connector.graph"] == list(
        graph.warnings
    )
    decode_svc = graph.services["Decode"]
    assert decode_svc.readiness == Readiness(kind=ReadinessKind.DISCOVERY, endpoints=("generate",))
    assert decode_svc.envs == (("HF_TOKEN", ""),)
    assert decode_svc.resources == ResourceRequest(gpu=1.0)


def test_env_set_twice_warns_and_the_last_wins(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["envs"] = [
        {"name": "A", "value": "1"},
        {"name": "B", "value": 2},
        {"name": "A", "value": "3"},
    ]
    graph = load_raw(tmp_path, raw)
    assert graph.services["Decode"].envs == (("B", "2"), ("A", "3"))
    assert graph.warnings == (
        "graph.yaml: spec.services.Decode.envs[2].name: A is set twice; the last value wins",
    )


# ------------------------------------------------------------------ resources and namespace


@pytest.mark.parametrize(
    ("resources", "expected", "warnings"),
    [
        (
            {"requests": {"gpu": 1, "cpu": "500m", "memory": "1Gi"}},
            ResourceRequest(gpu=1.0, cpu=0.5, memory_bytes=1 << 30),
            (),
        ),
        (
            {"limits": {"gpu": 2, "cpu": 2, "memory": "2G"}},
            ResourceRequest(
                gpu=2.0, cpu=2.0, memory_bytes=2_000_000_000, memory_limit_bytes=2_000_000_000
            ),
            (),
        ),
        (
            {
                "requests": {"cpu": 1, "memory": "1Gi"},
                "limits": {"cpu": 4, "memory": "8Gi", "nvidia.com/gpu": "0.5"},
            },
            # The request is reserved; the limit is what the replica may not go above.
            ResourceRequest(gpu=0.5, cpu=1.0, memory_bytes=1 << 30, memory_limit_bytes=8 << 30),
            (),
        ),
        (
            {"requests": {"gpu": 1}, "limits": {"gpu": 2}},
            ResourceRequest(gpu=2.0),
            (
                "graph.yaml: spec.services.Decode.resources.requests.gpu: 1 differs from "
                "resources.limits.gpu (2); the limit is used",
            ),
        ),
    ],
)
def test_limits_win_for_gpu_requests_win_for_cpu_and_memory(
    tmp_path: Path,
    resources: dict[str, Any],
    expected: ResourceRequest,
    warnings: tuple[str, ...],
) -> None:
    raw = raw_graph()
    decode(raw)["resources"] = resources
    graph = load_raw(tmp_path, raw)
    assert graph.services["Decode"].resources == expected
    assert graph.warnings == warnings


def test_gpu_given_twice_in_one_block(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["resources"] = {"limits": {"gpu": 1, "nvidia.com/gpu": 1}}
    assert error_of(tmp_path, raw) == (
        "graph.yaml: spec.services.Decode.resources.limits.nvidia.com/gpu: gpu is already set; "
        "give one of the two"
    )


@pytest.mark.parametrize(
    ("metadata", "namespaces", "expected"),
    [
        ({"name": "g"}, (None, None), "g"),
        ({"name": "g", "namespace": "dev"}, (None, None), "dev"),
        ({"name": "g"}, ("dyn", None), "dyn"),
        ({"name": "g"}, ("dyn", "dyn"), "dyn"),
        ({"name": "g", "namespace": "dev"}, ("a", "b"), "dev"),
        ({"name": "g"}, ("a", "b"), "g"),
    ],
)
def test_namespace_is_shared_dynamo_namespace_then_metadata(
    tmp_path: Path,
    metadata: dict[str, str],
    namespaces: tuple[str | None, str | None],
    expected: str,
) -> None:
    raw = raw_graph()
    raw["metadata"] = metadata
    for svc, ns in zip(raw["spec"]["services"].values(), namespaces, strict=True):
        if ns is not None:
            svc["dynamoNamespace"] = ns
    graph = load_raw(tmp_path, raw)
    assert graph.namespace == expected
    assert graph.warnings == ()


def test_python_placeholder_becomes_the_interpreter(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["extraPodSpec"]["mainContainer"]["command"] = ["{python}", "-c", "pass"]
    decode(raw)["extraPodSpec"]["mainContainer"]["args"] = ["--py={python}"]
    svc = load_raw(tmp_path, raw).services["Decode"]
    assert (svc.command, svc.args) == ((PY, "-c", "pass"), (f"--py={PY}",))


def test_relative_working_dir_is_anchored_at_the_graph_file(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["extraPodSpec"]["mainContainer"]["workingDir"] = "run/here"
    sub = tmp_path / "conf"
    sub.mkdir()
    write(sub, raw)
    graph = load_graph("conf", cwd=tmp_path)
    assert graph.services["Decode"].working_dir == str(sub.resolve() / "run" / "here")


def test_build_graph_validates_a_mapping_directly() -> None:
    graph = build_graph(raw_graph(), origin="inline")
    assert (graph.source, list(graph.services)) == ("inline", ["Frontend", "Decode"])
    raw = raw_graph()
    decode(raw)["replicas"] = -1
    with pytest.raises(GraphError, match=r"^inline: spec\.services\.Decode\.replicas: "):
        build_graph(raw, origin="inline")


# ------------------------------------------------------------------ identifiers


def test_directory_with_graph_yaml(tmp_path: Path) -> None:
    write(tmp_path, raw_graph(), "graph.yaml")
    graph = load_graph(".", cwd=tmp_path)
    assert (graph.name, graph.source) == ("g", str(tmp_path.resolve() / "graph.yaml"))


def test_directory_with_dynamo_yaml(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["replicas"] = -1
    (tmp_path / "dir").mkdir()
    write(tmp_path / "dir", raw, "dynamo.yaml")
    with pytest.raises(GraphError) as info:
        load_graph("dir", cwd=tmp_path)
    assert info.value.message == (
        "dir/dynamo.yaml: spec.services.Decode.replicas: must be >= 0, got -1"
    )


def test_directory_with_both_files_prefers_graph_yaml(tmp_path: Path) -> None:
    write(tmp_path, raw_graph(), "graph.yaml")
    other = raw_graph()
    other["metadata"]["name"] = "other"
    write(tmp_path, other, "dynamo.yaml")
    graph = load_graph(tmp_path)
    assert graph.name == "g"
    assert graph.warnings == (
        f"{tmp_path}: both graph.yaml and dynamo.yaml exist; using graph.yaml",
    )


def test_directory_without_a_graph_file(tmp_path: Path) -> None:
    (tmp_path / "graph.yml").write_text("kind: DynamoGraphDeployment\n")
    with pytest.raises(GraphError) as info:
        load_graph(".", cwd=tmp_path)
    assert info.value.message == (
        ".: no graph file in this directory (looked for graph.yaml and dynamo.yaml)"
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GraphError) as info:
        load_graph("nope.yaml", cwd=tmp_path)
    assert info.value.message == "nope.yaml: no such file or directory"


def test_absolute_path_is_named_as_given(tmp_path: Path) -> None:
    raw = raw_graph()
    decode(raw)["replicas"] = -1
    path = write(tmp_path, raw)
    with pytest.raises(GraphError) as info:
        load_graph_file(path)
    assert info.value.message == f"{path}: spec.services.Decode.replicas: must be >= 0, got -1"


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    """A folder for throwaway graph modules; forgets them afterwards."""
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write_module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


GRAPH_MODULE = """\
from connector.graph_api import graph, service

worker = service("Worker", role="worker", command=["w"])
frontend = service("Frontend", role="frontend", command=["fe"], depends=[worker])
pipeline = graph("pipe", frontend)
not_a_graph = {"services": []}

class Holder:
    inner = pipeline
"""


def test_module_attr_resolves_a_graph(modules: Path) -> None:
    write_module(modules, "gm_ok", GRAPH_MODULE)
    graph = load_graph("gm_ok:pipeline", cwd=modules)
    assert (graph.name, graph.namespace, graph.source) == ("pipe", "pipe", "gm_ok:pipeline")
    assert list(graph.services) == ["Frontend", "Worker"]
    assert graph.edges() == [Edge("Frontend", "Worker", "dependsOn")]
    assert str(modules) not in sys.path
    assert load_graph("gm_ok:Holder.inner", cwd=modules).services == graph.services


def test_module_attr_naming_a_service_takes_it_and_its_dependencies(modules: Path) -> None:
    write_module(modules, "gm_root", GRAPH_MODULE)
    graph = load_graph("gm_root:frontend", cwd=modules)
    assert (graph.name, graph.source, list(graph.services)) == (
        "frontend",
        "gm_root:frontend",
        ["Frontend", "Worker"],
    )
    alone = load_graph("gm_root:worker", cwd=modules)
    assert list(alone.services) == ["Worker"]


def test_module_missing(modules: Path) -> None:
    with pytest.raises(GraphError) as info:
        load_graph("gm_absent:graph", cwd=modules)
    assert info.value.message == (
        f"gm_absent:graph: no module named 'gm_absent' (searched {modules} and sys.path)"
    )


def test_module_whose_import_fails(modules: Path) -> None:
    write_module(modules, "gm_needs", "import not_installed_anywhere\n")
    write_module(modules, "gm_raises", "raise RuntimeError('boom')\n")
    with pytest.raises(GraphError) as info:
        load_graph("gm_needs:graph", cwd=modules)
    assert info.value.message == (
        "gm_needs:graph: importing 'gm_needs' failed: no module named 'not_installed_anywhere'"
    )
    with pytest.raises(GraphError) as info:
        load_graph("gm_raises:graph", cwd=modules)
    assert info.value.message == "gm_raises:graph: importing 'gm_raises' failed: RuntimeError: boom"


def test_module_building_an_invalid_graph(modules: Path) -> None:
    write_module(
        modules,
        "gm_invalid",
        """\
        from connector.graph_api import graph, service
        graph = graph("g", service("W", role="worker", command=["w"], replicas=-1))
        """,
    )
    with pytest.raises(GraphError) as info:
        load_graph("gm_invalid:graph", cwd=modules)
    assert info.value.message == (
        "gm_invalid:graph: graph 'g': spec.services.W.replicas: must be >= 0, got -1"
    )
    assert info.value.details["field"] == "spec.services.W.replicas"


def test_module_attr_missing_or_not_a_graph(modules: Path) -> None:
    write_module(modules, "gm_attrs", GRAPH_MODULE)
    with pytest.raises(GraphError) as info:
        load_graph("gm_attrs:nothing", cwd=modules)
    assert info.value.message == "gm_attrs:nothing: module 'gm_attrs' has no attribute 'nothing'"
    with pytest.raises(GraphError) as info:
        load_graph("gm_attrs:not_a_graph", cwd=modules)
    assert info.value.message == (
        "gm_attrs:not_a_graph: not_a_graph is of type dict, not a Graph "
        "(build one with connector.graph_api.graph(...))"
    )


def test_existing_file_wins_over_module_syntax(tmp_path: Path) -> None:
    write(tmp_path, raw_graph(), "a:b")
    assert load_graph("a:b", cwd=tmp_path).name == "g"


def test_missing_path_with_colon_hints_at_module_syntax(tmp_path: Path) -> None:
    with pytest.raises(GraphError) as info:
        load_graph("graphs/x.py:graph", cwd=tmp_path)
    assert info.value.message == (
        "graphs/x.py:graph: no such file or directory (a Python graph is named module:attr, "
        "e.g. examples.python_graph:graph)"
    )


# ------------------------------------------------------------------ topology


def svc(
    name: str, role: Role, sub: SubComponentType | None = None, deps: tuple[str, ...] = ()
) -> Service:
    return Service(name=name, role=role, command=("x",), sub_component_type=sub, depends_on=deps)


def graph_of(*services: Service) -> Graph:
    return Graph(name="t", namespace="t", services={s.name: s for s in services})


W, P, Dd = Role.WORKER, SubComponentType.PREFILL, SubComponentType.DECODE


def test_role_edges_follow_frontend_router_decode_prefill() -> None:
    graph = graph_of(
        svc("Frontend", Role.FRONTEND),
        svc("Router", Role.ROUTER),
        svc("Decode", W, Dd),
        svc("Prefill", W, P),
        svc("Planner", Role.PLANNER),
    )
    assert graph.edges() == [
        Edge("Frontend", "Router", "role"),
        Edge("Router", "Decode", "role"),
        Edge("Decode", "Prefill", "role"),
    ]


def test_role_edges_without_router_or_decode() -> None:
    aggregated = graph_of(svc("Fe", Role.FRONTEND), svc("Agg", W), svc("Agg2", W))
    assert aggregated.edges() == [Edge("Fe", "Agg", "role"), Edge("Fe", "Agg2", "role")]
    prefill_only = graph_of(svc("Fe", Role.FRONTEND), svc("Pre", W, P))
    assert prefill_only.edges() == [Edge("Fe", "Pre", "role")]
    mixed = graph_of(svc("Fe", Role.FRONTEND), svc("Agg", W), svc("Dec", W, Dd), svc("Pre", W, P))
    assert mixed.edges() == [
        Edge("Fe", "Agg", "role"),
        Edge("Fe", "Dec", "role"),
        Edge("Dec", "Pre", "role"),
    ]


def test_depends_on_edges_come_first_and_replace_role_edges_of_the_same_pair() -> None:
    graph = graph_of(
        svc("Frontend", Role.FRONTEND),
        svc("Decode", W, Dd, deps=("Frontend",)),
        svc("Prefill", W, P),
        svc("Planner", Role.PLANNER, deps=("Decode", "Prefill")),
    )
    assert graph.edges() == [
        Edge("Decode", "Frontend", "dependsOn"),
        Edge("Planner", "Decode", "dependsOn"),
        Edge("Planner", "Prefill", "dependsOn"),
        Edge("Decode", "Prefill", "role"),
    ]


def test_topological_order_puts_dependencies_first() -> None:
    graph = graph_of(
        svc("A", Role.FRONTEND, deps=("C",)),
        svc("B", W),
        svc("C", W, deps=("B",)),
        svc("D", Role.PLANNER),
    )
    assert graph.topological_order() == ["B", "C", "A", "D"]


def test_topological_order_refuses_cycles_and_unknown_names() -> None:
    cyclic = graph_of(svc("A", W, deps=("B",)), svc("B", W, deps=("A",)))
    with pytest.raises(GraphError, match=r"^<memory>: dependsOn cycle: A -> B -> A$"):
        cyclic.topological_order()
    dangling = graph_of(svc("A", W, deps=("Z",)))
    with pytest.raises(GraphError, match=r"^<memory>: A depends on unknown service 'Z'$"):
        dangling.topological_order()
