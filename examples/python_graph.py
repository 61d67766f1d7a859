"""The demo graph (``demo.yaml``) declared with the Python graph API.

    dynamo-local up examples.python_graph:graph

Run from the project root: the loader puts the working directory first on ``sys.path``.
It loads to exactly the services of ``examples/demo.yaml`` (a test checks).
"""

from __future__ import annotations

from connector.graph_api import ServiceDecl, service
from connector.graph_api import graph as build_graph

MOCK_WORKER = ["{python}", "-m", "connector.mockworker"]
PORTS = [
    {"name": "system", "env": "DYN_SYSTEM_PORT"},
    {"name": "rpc", "env": "DYN_TCP_RPC_PORT"},
]


def worker(
    name: str, sub_type: str, component: str, *, replicas: int, min_replicas: int, max_replicas: int
) -> ServiceDecl:
    """A mock Dynamo worker that is ready once it registered ``component/generate``."""
    return service(
        name,
        role="worker",
        sub_type=sub_type,
        dynamo_namespace="demo",
        command=MOCK_WORKER,
        args=["--role", "worker", "--endpoint", "generate"],
        cpu="100m",
        memory="64Mi",
        ports=PORTS,
        readiness={
            "discovery": {"component": component, "endpoints": ["generate"]},
            "timeoutSeconds": 30,
        },
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        graceful_stop_s=5,
    )


prefill = worker("Prefill", "prefill", "prefill", replicas=1, min_replicas=0, max_replicas=4)
decode = worker("Decode", "decode", "backend", replicas=2, min_replicas=1, max_replicas=8)
frontend = service(
    "Frontend",
    role="frontend",
    dynamo_namespace="demo",
    command=MOCK_WORKER,
    args=["--role", "frontend"],
    cpu="100m",
    memory="64Mi",
    memory_limit="1Gi",
    max_replicas=1,
    ports=PORTS,
    readiness={"http": "http://127.0.0.1:{port.system}/health", "timeoutSeconds": 30},
    graceful_stop_s=5,
)

graph = build_graph("demo", frontend, prefill, decode)
