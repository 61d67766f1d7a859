"""The machine-wide replica budget (as a kubelet's maxPods): enforced by the library, so a
component with no maxReplicas cannot be given more processes than the machine can run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector import defaults
from connector.errors import InvalidReplicas, ReplicaBudgetExceeded
from connector.local import LocalConnector
from tests.api_helpers import serve
from tests.core_helpers import make_graph, options, running, svc

pytestmark = pytest.mark.integration


def test_the_default_budget_is_8_per_core_and_at_least_64() -> None:
    cores = len(os.sched_getaffinity(0))
    assert defaults.replica_budget() == max(64, 8 * cores)


async def test_a_component_without_max_takes_the_share_the_others_leave(tmp_path: Path) -> None:
    graph = make_graph(svc("Free", replicas=1), svc("Other", replicas=1, max_replicas=2))
    async with running(graph, tmp_path, max_replicas=4) as conn:
        assert conn.replica_budget == 4
        assert await conn.scale_component("Free", 3, timeout_s=15) is True
        with pytest.raises(ReplicaBudgetExceeded) as refused:
            await conn.scale_component("Free", 4)
        assert refused.value.message == (
            "Free: 4 replicas would make 5 in the graph, above this machine's replica budget "
            "of 4 (3 left for Free); raise it with `dynamo-local up --max-replicas N` "
            "(ConnectorOptions.max_replicas in Python)"
        )
        assert refused.value.details == {
            "component": "Free",
            "requested": 4,
            "budget": 4,
            "available": 3,
        }
        # Nothing changed: the target and the running replicas are as before.
        assert conn.state.components["Free"].target == 3
        assert len(conn.state.replicas_of("Free")) == 3
        with pytest.raises(ReplicaBudgetExceeded, match="would make 5"):
            await conn.scale_component("Other", 2)
        assert await conn.scale_component("Free", 2, timeout_s=15) is True
        assert await conn.scale_component("Other", 2, timeout_s=15) is True


async def test_a_graph_larger_than_the_budget_does_not_start(tmp_path: Path) -> None:
    conn = LocalConnector(
        "t",
        make_graph(svc("A", replicas=3), svc("B", replicas=2)),
        tmp_path,
        options(max_replicas=4),
    )
    with pytest.raises(ReplicaBudgetExceeded, match="the graph asks for 5 replicas"):
        await conn.initialize()
    assert conn.state.replicas == {}
    await conn.shutdown()


def test_a_budget_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidReplicas, match="max_replicas must be >= 1, got 0"):
        LocalConnector("t", make_graph(svc("A")), tmp_path, options(max_replicas=0))


async def test_the_api_answers_422_naming_the_budget(tmp_path: Path) -> None:
    graph = make_graph(svc("Free", replicas=0))
    async with serve(tmp_path, graph, max_replicas=2) as api:
        status, body, _ = await api.call(
            "PUT", "/v1/components/Free/replicas", body={"replicas": 3, "wait": False}
        )
        assert status == 422
        assert body["error"]["code"] == "replica_budget"
        assert "replica budget of 2" in body["error"]["message"]
        assert "--max-replicas" in body["error"]["message"]
        assert body["error"]["details"]["available"] == 2
