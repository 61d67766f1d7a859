"""Planner types and decision application, without etcd."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pytest

from connector.dynamo.planner.targets import (
    DecisionOutcome,
    SubComponentType,
    TargetReplica,
    apply_decision,
    resolve_component,
    resolve_targets,
)
from connector.errors import ComponentNotFound, CrashLoop, GraphError, ResourcesExhausted
from connector.graph.model import Graph, Readiness, ReadinessKind, Role, Service


def worker(name: str, sub: SubComponentType | None, component: str | None = None) -> Service:
    return Service(
        name=name,
        role=Role.WORKER,
        command=("w",),
        sub_component_type=sub,
        readiness=Readiness(kind=ReadinessKind.DISCOVERY, component=component),
    )


GRAPH = Graph(
    name="disagg",
    namespace="dyn",
    services={
        "Frontend": Service(name="Frontend", role=Role.FRONTEND, command=("fe",)),
        "Prefill": worker("Prefill", SubComponentType.PREFILL, "prefill"),
        "Decode": worker("Decode", SubComponentType.DECODE, "backend"),
    },
)


def test_sub_component_type_is_the_graph_enum() -> None:
    from connector.graph import model as graph

    assert SubComponentType is graph.SubComponentType
    assert SubComponentType("prefill") is SubComponentType.PREFILL


def test_target_replica_fields_match_dynamo() -> None:
    t = TargetReplica(sub_component_type=SubComponentType.DECODE, desired_replicas=3)
    assert (t.sub_component_type, t.component_name, t.desired_replicas) == (
        SubComponentType.DECODE,
        None,
        3,
    )


class DynamoSub(str, Enum):  # noqa: UP042  (exactly the shape of dynamo.planner's enum)
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class DynamoTarget:  # stands in for dynamo.planner's pydantic TargetReplica
    sub_component_type: DynamoSub
    desired_replicas: int
    component_name: str | None = None


def test_target_replica_from_dynamo_objects_and_mappings() -> None:
    assert TargetReplica.from_any(DynamoTarget(DynamoSub.PREFILL, 2, "Prefill")) == TargetReplica(
        sub_component_type=SubComponentType.PREFILL, component_name="Prefill", desired_replicas=2
    )
    assert TargetReplica.from_any(
        {"sub_component_type": "decode", "desired_replicas": 0}
    ) == TargetReplica(sub_component_type=SubComponentType.DECODE, desired_replicas=0)
    with pytest.raises(GraphError, match=r"^sub_component_type must be 'prefill' or 'decode', "):
        TargetReplica.from_any({"sub_component_type": "encode", "desired_replicas": 1})
    with pytest.raises(GraphError, match=r"^desired_replicas must be an integer, got '2'$"):
        TargetReplica.from_any({"sub_component_type": "decode", "desired_replicas": "2"})
    with pytest.raises(GraphError, match=r"^desired_replicas must be an integer, got True$"):
        TargetReplica.from_any({"sub_component_type": "decode", "desired_replicas": True})


def test_resolve_component_by_sub_type_and_name() -> None:
    assert resolve_component(GRAPH, SubComponentType.PREFILL).name == "Prefill"
    assert resolve_component(GRAPH, SubComponentType.DECODE, "Decode").name == "Decode"
    # Dynamo's Planner may use the discovery component name.
    assert resolve_component(GRAPH, SubComponentType.DECODE, "backend").name == "Decode"
    with pytest.raises(ComponentNotFound) as err:
        resolve_component(GRAPH, SubComponentType.DECODE, "Prefill")
    assert err.value.message == (
        "component 'Prefill' is not a decode worker (its subComponentType is prefill)"
    )
    with pytest.raises(ComponentNotFound) as err:
        resolve_component(GRAPH, SubComponentType.DECODE, "Nope")
    assert err.value.message == "graph 'disagg' has no component 'Nope'"


def test_resolve_component_missing_or_ambiguous() -> None:
    agg = Graph(name="agg", namespace="dyn", services={"Frontend": GRAPH.services["Frontend"]})
    with pytest.raises(ComponentNotFound) as missing:
        resolve_component(agg, SubComponentType.PREFILL)
    assert missing.value.message == "graph 'agg' has no component with subComponentType prefill"
    two = Graph(
        name="two",
        namespace="dyn",
        services={
            "DecodeA": worker("DecodeA", SubComponentType.DECODE),
            "DecodeB": worker("DecodeB", SubComponentType.DECODE),
        },
    )
    with pytest.raises(GraphError) as ambiguous:
        resolve_component(two, SubComponentType.DECODE)
    assert ambiguous.value.message == (
        "graph 'two' has several decode components (DecodeA, DecodeB); name one with component_name"
    )
    assert ambiguous.value.details["components"] == ["DecodeA", "DecodeB"]


def test_resolve_targets() -> None:
    targets = [
        TargetReplica(sub_component_type=SubComponentType.PREFILL, desired_replicas=2),
        {"sub_component_type": "decode", "desired_replicas": 4},
    ]
    assert resolve_targets(GRAPH, targets) == {"Prefill": 2, "Decode": 4}
    twice = [
        targets[0],
        TargetReplica(sub_component_type=SubComponentType.PREFILL, desired_replicas=1),
    ]
    with pytest.raises(GraphError, match=r"^two targets for component 'Prefill'$"):
        resolve_targets(GRAPH, twice)


@dataclass
class FakeScaler:
    """Records calls; ``results`` says what each component's scale does."""

    results: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    concurrent: int = 0
    max_concurrent: int = 0

    async def scale_component(
        self,
        name: str,
        replicas: int,
        blocking: bool = True,
        timeout_s: float | None = None,
        source: str = "api",
        decision_id: int | None = None,
    ) -> bool:
        self.calls.append(
            (
                name,
                replicas,
                {
                    "blocking": blocking,
                    "timeout_s": timeout_s,
                    "source": source,
                    "decision_id": decision_id,
                },
            )
        )
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        await asyncio.sleep(0.01)
        self.concurrent -= 1
        result = self.results.get(name, True)
        if isinstance(result, Exception):
            raise result
        return bool(result)


async def test_apply_decision_ok_scales_both_concurrently() -> None:
    scaler = FakeScaler()
    outcome = await apply_decision(GRAPH, scaler, 2, 3, 7, timeout_s=30)
    assert outcome == DecisionOutcome("ok", None, {"prefill": 2, "decode": 3})
    assert sorted(scaler.calls) == [
        ("Decode", 3, {"blocking": True, "timeout_s": 30, "source": "planner", "decision_id": 7}),
        ("Prefill", 2, {"blocking": True, "timeout_s": 30, "source": "planner", "decision_id": 7}),
    ]
    assert scaler.max_concurrent == 2


async def test_apply_decision_only_what_was_decided() -> None:
    scaler = FakeScaler()
    outcome = await apply_decision(GRAPH, scaler, None, 1, 0)
    assert outcome == DecisionOutcome("ok", None, {"decode": 1})
    assert [c[:2] for c in scaler.calls] == [("Decode", 1)]


async def test_apply_decision_partial_when_resources_run_out() -> None:
    exhausted = ResourcesExhausted(
        "Decode/3 needs 1 GPU; none free (GPU-a held by Decode/1, GPU-b held by Decode/2)",
        started=[],
        target=2,
    )
    scaler = FakeScaler(results={"Decode": exhausted})
    outcome = await apply_decision(GRAPH, scaler, 1, 4, 3)
    assert outcome == DecisionOutcome(
        "partial",
        "Decode: Decode/3 needs 1 GPU; none free (GPU-a held by Decode/1, GPU-b held by Decode/2)",
        {"prefill": 1, "decode": 2},
    )


async def test_apply_decision_partial_progress_timeout_and_failure() -> None:
    some = ResourcesExhausted("only 1 of 3 fit", started=["Decode/2"], target=2)
    outcome = await apply_decision(GRAPH, FakeScaler(results={"Decode": some}), None, 3, 1)
    assert outcome == DecisionOutcome("partial", "Decode: only 1 of 3 fit", {"decode": 2})

    outcome = await apply_decision(GRAPH, FakeScaler(results={"Prefill": False}), 2, None, 2)
    assert outcome == DecisionOutcome(
        "partial", "Prefill: 2 replicas not all ready before the timeout", {"prefill": 2}
    )

    crash = CrashLoop("Decode is in crashloop (exit 1); restart it first")
    outcome = await apply_decision(GRAPH, FakeScaler(results={"Decode": crash}), None, 2, 4)
    assert outcome == DecisionOutcome(
        "failed", "Decode: Decode is in crashloop (exit 1); restart it first", {}
    )


async def test_apply_decision_without_a_prefill_component() -> None:
    agg = Graph(
        name="agg", namespace="dyn", services={"Decode": worker("Decode", SubComponentType.DECODE)}
    )
    # Zero prefill workers asked of a graph without prefill: nothing to do.
    assert await apply_decision(agg, FakeScaler(), 0, 2, 0) == DecisionOutcome(
        "ok", None, {"decode": 2}
    )
    outcome = await apply_decision(agg, FakeScaler(), 1, 2, 1)
    assert outcome == DecisionOutcome(
        "partial", "graph 'agg' has no component with subComponentType prefill", {"decode": 2}
    )
