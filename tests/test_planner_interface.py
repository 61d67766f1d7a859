"""Dynamo's PlannerConnector surface, on a stand-in connector with a real view."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from connector.dynamo.planner.interface import PlannerConnectorMixin, model_name_of
from connector.dynamo.planner.targets import SubComponentType, TargetReplica
from connector.errors import ComponentNotFound, GraphError, InvalidReplicas, ScaleTimeout
from connector.graph.model import Graph, ResourceRequest, Role, Service
from connector.view import ComponentView, ConnectorView, ReplicaView


def svc(name: str, role: Role, sub: SubComponentType | None = None, **kw: Any) -> Service:
    return Service(
        name=name, role=role, command=kw.pop("command", ("run",)), sub_component_type=sub, **kw
    )


GRAPH = Graph(
    name="disagg",
    namespace="dyn",
    services={
        "Frontend": svc("Frontend", Role.FRONTEND),
        "Planner": svc("Planner", Role.PLANNER),
        "Prefill": svc(
            "Prefill",
            Role.WORKER,
            SubComponentType.PREFILL,
            command=("python", "-m", "dynamo.vllm", "--model", "Qwen/Qwen3-0.6B"),
            args=("--is-prefill-worker",),
            resources=ResourceRequest(gpu=2),
        ),
        "Decode": svc(
            "Decode",
            Role.WORKER,
            SubComponentType.DECODE,
            command=("python", "-m", "dynamo.vllm"),
            args=("--model=Qwen/Qwen3-0.6B",),
            resources=ResourceRequest(gpu=0.5),
        ),
    },
)


@dataclass
class Options:
    scale_timeout_s: float = 0.3


@dataclass
class Counts:
    desired: int
    ready: int
    in_flight: bool = False


@dataclass
class StandIn(PlannerConnectorMixin):
    graph: Graph = GRAPH
    options: Options = field(default_factory=Options)
    reconciler: Any = None
    counts: dict[str, Counts] = field(default_factory=dict)
    scaled: list[tuple[str, int, bool, str]] = field(default_factory=list)
    initialized: int = 0
    fail: dict[str, Exception] = field(default_factory=dict)

    async def initialize(self) -> None:
        self.initialized += 1

    def view(self) -> ConnectorView:
        comps, reps = [], []
        for name, s in self.graph.services.items():
            c = self.counts.get(name, Counts(1, 1))
            comps.append(
                ComponentView(
                    name=name,
                    role=s.role.value,
                    sub_component_type=s.sub_component_type.value if s.sub_component_type else None,
                    dynamo_namespace="dyn",
                    status="running",
                    desired=c.desired,
                    running=c.ready,
                    ready=c.ready,
                    restarts=0,
                    crashloops=0,
                    scale_in_flight=c.in_flight,
                    min_replicas=0,
                    max_replicas=None,
                )
            )
            for i in range(c.desired):
                reps.append(
                    ReplicaView(
                        component=name,
                        replica=str(i + 1),
                        watcher=f"w{name}{i}",
                        state="ready" if i < c.ready else "starting",
                        ready=i < c.ready,
                        pid=None,
                        create_time=None,
                        started_at=None,
                        restarts=0,
                        last_exit_code=None,
                    )
                )
        return ConnectorView("t", 0.0, tuple(comps), tuple(reps))

    async def scale_component(
        self,
        name: str,
        replicas: int,
        blocking: bool = True,
        timeout_s: float | None = None,
        source: str = "api",
        decision_id: int | None = None,
    ) -> bool:
        self.scaled.append((name, replicas, blocking, source))
        if name in self.fail:
            raise self.fail[name]
        self.counts[name] = Counts(replicas, replicas)
        return True


async def test_async_init_initializes() -> None:
    c = StandIn()
    await c.async_init()
    assert c.initialized == 1


async def test_validate_deployment() -> None:
    await StandIn().validate_deployment()
    await StandIn().validate_deployment("Prefill", "Decode")
    agg = Graph(name="agg", namespace="dyn", services={"Decode": GRAPH.services["Decode"]})
    await StandIn(graph=agg).validate_deployment(require_prefill=False)
    with pytest.raises(GraphError) as err:
        await StandIn(graph=agg).validate_deployment(decode_component_name="Prefill")
    assert err.value.message == (
        "graph 'agg' cannot be driven by the Planner: graph 'agg' has no component with "
        "subComponentType prefill; graph 'agg' has no component 'Prefill'"
    )


def test_model_name_and_gpu_counts() -> None:
    c = StandIn()
    assert c.get_model_name() == "Qwen/Qwen3-0.6B"
    assert c.get_gpu_counts() == (2, 1)  # half a GPU still takes one device
    agg = StandIn(
        graph=Graph(name="agg", namespace="dyn", services={"Decode": GRAPH.services["Decode"]})
    )
    assert agg.get_gpu_counts(require_prefill=False) == (None, 1)
    with pytest.raises(ComponentNotFound):
        agg.get_gpu_counts()
    nameless = Graph(name="x", namespace="dyn", services={"Frontend": GRAPH.services["Frontend"]})
    with pytest.raises(GraphError) as err:
        StandIn(graph=nameless).get_model_name(require_prefill=False, require_decode=False)
    assert err.value.message == (
        "graph 'x' names no model: no worker passes "
        "--served-model-name or --model-name or --model or --model-path"
    )


def test_model_name_conflicts_and_precedence() -> None:
    a = svc("A", Role.WORKER, command=("w", "--model", "m", "--served-model-name", "alias"))
    b = svc("B", Role.WORKER, command=("w", "--served-model-name=alias"))
    assert model_name_of([a, b]) == "alias"
    c = svc("C", Role.WORKER, command=("w", "--model", "other"))
    with pytest.raises(GraphError) as err:
        model_name_of([a, b, c])
    assert err.value.message == "workers serve different models (A, B: alias; C: other)"
    assert model_name_of([svc("D", Role.WORKER, command=("w",))]) is None


async def test_actual_worker_counts_and_stability() -> None:
    c = StandIn(counts={"Prefill": Counts(2, 2), "Decode": Counts(3, 3)})
    assert await c.get_actual_worker_counts() == (2, 3, True)
    c.counts["Decode"] = Counts(3, 2)
    assert await c.get_actual_worker_counts() == (2, 2, False)
    c.counts["Decode"] = Counts(3, 3, in_flight=True)
    assert await c.get_actual_worker_counts("Prefill", "Decode") == (2, 3, False)


async def test_wait_for_deployment_ready_and_timeout() -> None:
    c = StandIn(counts={"Decode": Counts(2, 1)})
    with pytest.raises(ScaleTimeout) as err:
        await c.wait_for_deployment_ready()
    assert err.value.message == "deployment not ready within 0.3 s: Decode not settled"

    async def settle() -> None:
        await asyncio.sleep(0.05)
        c.counts["Decode"] = Counts(2, 2)

    task = asyncio.create_task(settle())
    await c.wait_for_deployment_ready(timeout_s=5)
    await task
    # A planner component that is still starting is ignored on request.
    c.counts["Planner"] = Counts(1, 0)
    await c.wait_for_deployment_ready(include_planner=False)


async def test_set_component_replicas() -> None:
    c = StandIn()
    await c.set_component_replicas(
        [
            TargetReplica(sub_component_type=SubComponentType.PREFILL, desired_replicas=3),
            TargetReplica(
                sub_component_type=SubComponentType.DECODE,
                component_name="Decode",
                desired_replicas=1,
            ),
        ]
    )
    assert sorted(c.scaled) == [("Decode", 1, True, "planner"), ("Prefill", 3, True, "planner")]
    with pytest.raises(
        InvalidReplicas, match=r"^set_component_replicas needs at least one target$"
    ):
        await c.set_component_replicas([])


async def test_set_component_replicas_attempts_all_then_raises() -> None:
    c = StandIn(fail={"Prefill": InvalidReplicas("replicas must be >= 0, got -1")})
    with pytest.raises(InvalidReplicas, match=r"^replicas must be >= 0, got -1$"):
        await c.set_component_replicas(
            [
                {"sub_component_type": "prefill", "desired_replicas": -1},
                {"sub_component_type": "decode", "desired_replicas": 2},
            ],
            blocking=False,
        )
    assert sorted(c.scaled) == [("Decode", 2, False, "planner"), ("Prefill", -1, False, "planner")]
