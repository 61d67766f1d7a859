"""The Python graph API: declarations become the same graph, with the same rules and
messages, as a YAML file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from connector.errors import GraphError
from connector.graph.loader import build_graph
from connector.graph.model import (
    Edge,
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
from connector.graph_api import ServiceDecl, depends, graph, service


def test_service_with_every_option_normalizes_like_yaml(tmp_path: Path) -> None:
    decode = service(
        "Decode",
        role="worker",
        sub_type=SubComponentType.DECODE,
        command=["{python}", "-m", "w"],
        args=["--sock", "{socket.kv}", "--port", "{port.system}"],
        replicas=2,
        min_replicas=1,
        max_replicas=6,
        gpu=1,
        cpu="500m",
        memory="2Gi",
        memory_limit="3Gi",
        cpu_pinning=True,
        envs={"MODE": "fast"},
        readiness={"discovery": {"component": "backend"}, "timeoutSeconds": 60},
        ports=[{"name": "system", "env": "DYN_SYSTEM_PORT"}],
        sockets=["kv"],
        working_dir=str(tmp_path),
        dynamo_namespace="dyn",
        graceful_stop_s=20,
        drain_s=1.5,
        restart={"policy": "on-failure", "backoffBaseSeconds": 2},
    )
    built = graph("g", decode)
    assert (built.name, built.namespace, built.source, built.warnings) == (
        "g",
        "dyn",
        "graph 'g'",
        (),
    )
    assert built.services == {
        "Decode": Service(
            name="Decode",
            role=Role.WORKER,
            command=(sys.executable, "-m", "w"),
            args=("--sock", "{socket.kv}", "--port", "{port.system}"),
            sub_component_type=SubComponentType.DECODE,
            replicas=2,
            dynamo_namespace="dyn",
            envs=(("MODE", "fast"),),
            working_dir=str(tmp_path),
            resources=ResourceRequest(
                gpu=1.0, cpu=0.5, memory_bytes=2 << 30, pin_cpus=True, memory_limit_bytes=3 << 30
            ),
            min_replicas=1,
            max_replicas=6,
            readiness=Readiness(kind=ReadinessKind.DISCOVERY, component="backend", timeout_s=60),
            graceful_stop_s=20.0,
            drain_s=1.5,
            restart=RestartPolicy(mode=RestartMode.ON_FAILURE, backoff_base_s=2.0),
            ports=(
                PortSpec("system", "DYN_SYSTEM_PORT"),
                # A worker's default ports beside the declared one
                # (connector.graph.dynamo_defaults).
                PortSpec("rpc", "DYN_TCP_RPC_PORT"),
                PortSpec("fpm", "DYN_FORWARDPASS_METRIC_PORT"),
                PortSpec("nixl", "VLLM_NIXL_SIDE_CHANNEL_PORT"),
            ),
            sockets=(SocketSpec("kv"),),
        )
    }


def test_defaults_match_a_minimal_yaml_service() -> None:
    built = graph("g", service("W", role=Role.WORKER, command=["w"]))
    yaml_built = build_graph(
        {
            "kind": "DynamoGraphDeployment",
            "metadata": {"name": "g"},
            "spec": {
                "services": {
                    "W": {
                        "componentType": "worker",
                        "extraPodSpec": {"mainContainer": {"command": ["w"]}},
                    }
                }
            },
        },
        origin="x",
    )
    assert built.services == yaml_built.services


def test_dependencies_join_the_graph_and_become_edges() -> None:
    prefill = service("Prefill", role="worker", sub_type="prefill", command=["p"])
    decode = service("Decode", role="worker", sub_type="decode", command=["d"], depends=[prefill])
    frontend = service("Frontend", role="frontend", command=["f"])
    assert frontend.depends(decode) is frontend
    planner = depends(service("Planner", role="planner", command=["pl"]), "Decode", prefill)
    built = graph("g", frontend, planner)
    assert list(built.services) == ["Frontend", "Planner", "Decode", "Prefill"]
    assert built.services["Planner"].depends_on == ("Decode", "Prefill")
    assert built.edges() == [
        Edge("Frontend", "Decode", "dependsOn"),
        Edge("Planner", "Decode", "dependsOn"),
        Edge("Planner", "Prefill", "dependsOn"),
        Edge("Decode", "Prefill", "dependsOn"),
    ]
    assert built.topological_order() == ["Prefill", "Decode", "Frontend", "Planner"]


def test_a_service_listed_and_reached_through_depends_counts_once() -> None:
    worker = service("W", role="worker", command=["w"])
    front = service("F", role="frontend", command=["f"], depends=[worker])
    assert list(graph("g", worker, front, worker).services) == ["W", "F"]


def test_namespace_argument_and_default() -> None:
    worker = service("W", role="worker", command=["w"])
    assert graph("g", worker).namespace == "g"
    assert graph("g", worker, namespace="dev").namespace == "dev"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replicas": -1}, "graph 'g': spec.services.W.replicas: must be >= 0, got -1"),
        (
            {"replicas": 5, "max_replicas": 4},
            "graph 'g': spec.services.W.replicas: must be within "
            "local.minReplicas..local.maxReplicas (0..4), got 5",
        ),
        (
            {"min_replicas": 3, "max_replicas": 2, "replicas": 2},
            "graph 'g': spec.services.W.local.minReplicas: must be <= local.maxReplicas (2), got 3",
        ),
        (
            {"role": "backend"},
            "graph 'g': spec.services.W.componentType: must be one of frontend, router, worker, "
            "planner, got str 'backend'",
        ),
        (
            {"role": "frontend", "sub_type": "decode"},
            "graph 'g': spec.services.W.subComponentType: only valid for componentType worker, "
            "got decode with componentType frontend",
        ),
        (
            {"memory": "lots"},
            "graph 'g': spec.services.W.resources.requests.memory: invalid quantity 'lots': "
            "expected a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, "
            "G, T, P, E), e.g. '512Mi'",
        ),
        (
            {"gpu": 1.5},
            "graph 'g': spec.services.W.resources.requests.gpu: gpu must be a whole number or a "
            "fraction below 1, got 1.5",
        ),
        (
            {"command": []},
            "graph 'g': spec.services.W.extraPodSpec.mainContainer.command: required: the "
            'program to run, e.g. ["python3", "-m", "dynamo.vllm"]',
        ),
        (
            {"args": ["{port.http}"]},
            "graph 'g': spec.services.W.extraPodSpec.mainContainer.args[0]: {port.http} names "
            "no port (its ports: system, rpc, fpm, nixl)",
        ),
        (
            {"depends": ["Missing"]},
            "graph 'g': spec.services.W.local.dependsOn[0]: unknown service 'Missing' "
            "(services: W)",
        ),
        (
            {"readiness": {"tcp": "grpc"}, "ports": ["system"]},
            "graph 'g': spec.services.W.local.readiness.tcp: names no port 'grpc' "
            "(its ports: system, rpc, fpm, nixl)",
        ),
        (
            {"restart": "sometimes"},
            "graph 'g': spec.services.W.local.restart.policy: must be one of always, "
            "on-failure, never, got str 'sometimes'",
        ),
    ],
)
def test_invalid_declarations_get_the_yaml_messages(
    kwargs: dict[str, object], message: str
) -> None:
    options: dict[str, object] = {"role": "worker", "command": ["w"], **kwargs}
    with pytest.raises(GraphError) as info:
        graph("g", service("W", **options))  # type: ignore[arg-type]
    assert info.value.message == message


def test_cycle_through_depends() -> None:
    a = service("A", role="worker", command=["a"])
    b = service("B", role="worker", command=["b"], depends=[a])
    a.depends(b)
    with pytest.raises(GraphError) as info:
        graph("g", a)
    assert info.value.message == "graph 'g': spec.services: dependsOn cycle: A -> B -> A"
    c = service("C", role="worker", command=["c"])
    with pytest.raises(GraphError) as info:
        graph("g", c.depends(c))
    assert info.value.message == "graph 'g': spec.services: dependsOn cycle: C -> C"


def test_two_declarations_with_one_name() -> None:
    first = service("W", role="worker", command=["w1"])
    second = service("W", role="worker", command=["w2"])
    with pytest.raises(GraphError) as info:
        graph("g", first, second)
    assert info.value.message == (
        "graph 'g': spec.services.W: declared twice (two service(...) calls with the same name)"
    )
    with pytest.raises(GraphError) as info:
        graph("g", first, service("w", role="worker", command=["w3"]))
    assert info.value.message == (
        "graph 'g': spec.services.w: name clashes with 'W': service names must differ ignoring "
        "case (they become lowercase Circus watcher names)"
    )


def test_only_declarations_are_accepted() -> None:
    with pytest.raises(GraphError) as info:
        graph("g", "Frontend")  # type: ignore[arg-type]
    assert info.value.message == (
        "graph 'g': expected services declared with service(...), got str 'Frontend'"
    )


def test_declaration_raw_is_the_yaml_shape() -> None:
    worker = service(
        "W", role="worker", command=["w"], gpu="0.5", ports=["system"], readiness="none"
    )
    decl = service("F", role="frontend", command=["f"], depends=[worker])
    assert isinstance(decl, ServiceDecl)
    assert repr(decl) == "ServiceDecl('F')"
    assert decl.to_raw() == {
        "componentType": "frontend",
        "replicas": 1,
        "extraPodSpec": {"mainContainer": {"command": ["f"], "args": []}},
        "resources": {"requests": {"gpu": 0, "cpu": 0}},
        "local": {"dependsOn": ["W"]},
    }
    assert worker.to_raw()["local"] == {"readiness": "none", "ports": ["system"]}
