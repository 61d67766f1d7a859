"""Topology: the joined JSON, DOT and Mermaid text (exact), and observed TCP links."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from connector.dynamo.discovery.cache import parse_instance
from connector.dynamo.discovery.keys import encode_value, instance_key, instance_value
from connector.dynamo.topology import (
    ObservedLink,
    build_topology,
    observe_links,
    to_dot,
    to_mermaid,
)
from connector.graph.model import Graph, Readiness, ReadinessKind, ResourceRequest, Role, Service
from connector.graph.model import SubComponentType as Sub
from connector.view import ComponentView, ConnectorView, ReplicaView

GRAPH = Graph(
    name="demo",
    namespace="dyn",
    services={
        "Frontend": Service(name="Frontend", role=Role.FRONTEND, command=("fe",), replicas=1),
        "Decode": Service(
            name="Decode",
            role=Role.WORKER,
            command=("w",),
            sub_component_type=Sub.DECODE,
            replicas=2,
            depends_on=("Frontend",),
            resources=ResourceRequest(gpu=1, cpu=2.0, memory_bytes=1 << 30),
            readiness=Readiness(kind=ReadinessKind.DISCOVERY, component="backend"),
        ),
    },
)


def comp(name: str, role: str, sub: str | None, desired: int, ready: int) -> ComponentView:
    return ComponentView(
        name=name,
        role=role,
        sub_component_type=sub,
        dynamo_namespace="dyn",
        status="running" if ready == desired else "starting",
        desired=desired,
        running=ready,
        ready=ready,
        restarts=0,
        crashloops=0,
        scale_in_flight=False,
        min_replicas=0,
        max_replicas=None,
    )


def rep(component: str, ordinal: int, port: int, gpu: str, state: str = "ready") -> ReplicaView:
    return ReplicaView(
        component=component,
        replica=str(ordinal),
        watcher=f"demo.{component.lower()}.{ordinal}",
        state=state,
        ready=state == "ready",
        pid=1000 + ordinal,
        create_time=None,
        started_at=None,
        restarts=0,
        last_exit_code=None,
        gpus=(gpu,) if gpu else (),
        ports={"rpc": port},
    )


VIEW = ConnectorView(
    namespace="demo",
    taken_at=0.0,
    components=(
        comp("Frontend", "frontend", None, 1, 1),
        comp("Decode", "worker", "decode", 2, 1),
    ),
    replicas=(
        rep("Decode", 2, 20012, "GPU-b", state="starting"),
        rep("Decode", 1, 20011, "GPU-a"),
        rep("Frontend", 1, 20001, ""),
    ),
)


def inst(ns: str, component: str, endpoint: str, iid: int, port: int):
    key = instance_key(ns, component, endpoint, iid)
    value = encode_value(instance_value(ns, component, endpoint, iid, "127.0.0.1", port))
    parsed = parse_instance(key, value, "etcd")
    assert parsed is not None
    return parsed


INSTANCES = [
    inst("dyn", "backend", "generate", 0xA1, 20011),
    inst("dyn", "backend", "clear_kv_blocks", 0xA1, 20011),
    inst("dyn", "backend", "generate", 0xF00, 31000),  # ours by name, no owner (foreign)
    inst("other", "backend", "generate", 0xB2, 40000),  # another namespace: external
]


def test_build_topology_joins_graph_view_and_instances() -> None:
    topo = build_topology(GRAPH, VIEW, INSTANCES, links=[ObservedLink("Frontend", "Decode", 3)])
    assert topo["graph"] == "demo"
    assert topo["namespace"] == "demo"
    frontend, decode = topo["nodes"]
    assert frontend == {
        "id": "Frontend",
        "role": "frontend",
        "sub_component_type": None,
        "dynamo_namespace": "dyn",
        "dynamo_component": "frontend",
        "status": "running",
        "replicas": {"desired": 1, "running": 1, "ready": 1},
        "endpoints": [],
        "instances": [],
        "resources": {"per_replica": {"gpu": 0.0, "cpu": 0.0, "memory_bytes": 0}, "gpus": []},
        "replica_states": {"Frontend/1": "ready"},
    }
    assert decode["dynamo_component"] == "backend"
    assert decode["status"] == "starting"
    assert decode["replicas"] == {"desired": 2, "running": 1, "ready": 1}
    assert decode["endpoints"] == ["clear_kv_blocks", "generate"]
    assert decode["instances"] == [
        {
            "id": "a1",
            "namespace": "dyn",
            "component": "backend",
            "endpoint": "clear_kv_blocks",
            "address": "127.0.0.1:20011",
            "replica": "Decode/1",
            "backend": "etcd",
        },
        {
            "id": "a1",
            "namespace": "dyn",
            "component": "backend",
            "endpoint": "generate",
            "address": "127.0.0.1:20011",
            "replica": "Decode/1",
            "backend": "etcd",
        },
        {
            "id": "f00",
            "namespace": "dyn",
            "component": "backend",
            "endpoint": "generate",
            "address": "127.0.0.1:31000",
            "replica": None,
            "backend": "etcd",
        },
    ]
    assert decode["resources"] == {
        "per_replica": {"gpu": 1, "cpu": 2.0, "memory_bytes": 1073741824},
        "gpus": ["GPU-a", "GPU-b"],
    }
    assert decode["replica_states"] == {"Decode/1": "ready", "Decode/2": "starting"}
    assert list(decode["replica_states"]) == ["Decode/1", "Decode/2"]
    assert topo["edges"] == [
        {"source": "Decode", "target": "Frontend", "kind": "dependsOn"},
        {"source": "Frontend", "target": "Decode", "kind": "observed", "connections": 3},
    ]
    assert [(e["namespace"], e["id"], e["replica"]) for e in topo["external"]] == [
        ("other", "b2", None)
    ]


def test_explicit_owners_override_port_matching() -> None:
    owners = {INSTANCES[2].key: "Decode/2"}
    topo = build_topology(GRAPH, VIEW, INSTANCES, owners=owners)
    assert [i["replica"] for i in topo["nodes"][1]["instances"]] == [
        "Decode/1",
        "Decode/1",
        "Decode/2",
    ]


def test_graph_edges_are_used_when_the_graph_provides_them() -> None:
    from connector.graph.model import Edge

    class EdgedGraph(Graph):
        def edges(self) -> list[Edge]:
            return [Edge("Frontend", "Decode", "role")]

    graph = EdgedGraph(name="demo", namespace="dyn", services=GRAPH.services)
    topo = build_topology(graph, VIEW, [])
    assert topo["edges"] == [{"source": "Frontend", "target": "Decode", "kind": "role"}]


def test_dot_text_is_exact() -> None:
    topo = build_topology(GRAPH, VIEW, INSTANCES, links=[ObservedLink("Frontend", "Decode", 3)])
    assert to_dot(topo) == (
        'digraph "demo" {\n'
        "  rankdir=LR;\n"
        '  node [shape=box, style=rounded, fontname="Helvetica"];\n'
        '  "Frontend" [label="Frontend\\nfrontend\\n1/1 ready, running"];\n'
        '  "Decode" [label="Decode\\nworker (decode)\\n1/2 ready, starting\\n3 instances"];\n'
        '  "Decode" -> "Frontend" [label="dependsOn"];\n'
        '  "Frontend" -> "Decode" [label="observed (3)", style=dashed];\n'
        "}\n"
    )


def test_mermaid_text_is_exact() -> None:
    topo = build_topology(GRAPH, VIEW, INSTANCES, links=[ObservedLink("Frontend", "Decode", 3)])
    assert to_mermaid(topo) == (
        "flowchart LR\n"
        '  n0["Frontend<br/>frontend<br/>1/1 ready, running"]\n'
        '  n1["Decode<br/>worker (decode)<br/>1/2 ready, starting<br/>3 instances"]\n'
        '  n1 -->|"dependsOn"| n0\n'
        '  n0 -.->|"observed (3)"| n1\n'
    )


def test_quotes_in_names_are_escaped() -> None:
    graph = Graph(
        name='my "graph"',
        namespace="dyn",
        services={'A"1': Service(name='A"1', role=Role.ROUTER, command=("r",))},
    )
    view = ConnectorView(namespace="demo", taken_at=0.0, components=(), replicas=())
    topo = build_topology(graph, view, [])
    dot = to_dot(topo)
    assert 'digraph "my \\"graph\\"" {' in dot
    assert '  "A\\"1" [label="A\\"1\\nrouter\\n0/1 ready, stopped"];' in dot
    assert '  n0["A#quot;1<br/>router<br/>0/1 ready, stopped"]' in to_mermaid(topo)


SERVER = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
conn, _ = s.accept()
time.sleep(30)
"""


def test_observe_links_between_real_processes() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            with socket.create_connection(("127.0.0.1", port)):
                deadline = time.monotonic() + 5
                links: list[ObservedLink] = []
                while time.monotonic() < deadline:
                    links = observe_links({"Frontend": [os.getpid()], "Decode": [server.pid]})
                    if links:
                        break
                    time.sleep(0.02)
                assert links == [ObservedLink("Frontend", "Decode", 1)]
        finally:
            server.kill()
