"""Scaling through the reconcile loop with a real circusd and real processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from connector.errors import ComponentNotFound, InvalidReplicas, ReplicaLimit
from connector.graph.model import Readiness, ReadinessKind
from connector.local import LocalConnector
from tests.core_helpers import (
    alive,
    kinds,
    make_graph,
    options,
    phases,
    pids,
    python_cmd,
    replica_ids,
    running,
    svc,
    wait_until,
)

pytestmark = pytest.mark.integration


async def test_scale_0_3_1_0_exact_replica_sets(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", max_replicas=8))
    async with running(graph, tmp_path) as conn:
        assert replica_ids(conn, "Decode") == []
        assert await conn.scale_component("Decode", 3, timeout_s=20) is True
        assert phases(conn, "Decode") == {
            "Decode/1": "ready",
            "Decode/2": "ready",
            "Decode/3": "ready",
        }
        before = pids(conn, "Decode")
        assert all(alive(p) for p in before.values())
        assert await conn.get_component_replicas("Decode") == 3
        # Scale-down takes the newest first.
        assert await conn.scale_component("Decode", 1, timeout_s=20) is True
        assert replica_ids(conn, "Decode") == ["Decode/1"]
        assert pids(conn, "Decode")["Decode/1"] == before["Decode/1"]
        assert not alive(before["Decode/2"]) and not alive(before["Decode/3"])
        assert await conn.scale_component("Decode", 0, timeout_s=20) is True
        assert replica_ids(conn, "Decode") == []
        assert not alive(before["Decode/1"])
        # circusd holds exactly the watchers we think it holds.
        assert conn.reconciler is not None
        listed = await conn.reconciler.channel.call("list")
        assert [w for w in listed["watchers"] if w.startswith("t.")] == []
        scale_events = [(e.from_replicas, e.to_replicas, e.outcome) for e in kinds(conn, "scale")]
        assert scale_events == [(0, 3, "ok"), (3, 1, "ok"), (1, 0, "ok")]


async def test_scale_down_prefers_not_ready_then_newest(tmp_path: Path) -> None:
    # "Slow" probes a TCP port nobody listens on, so its replicas never become ready.
    graph = make_graph(
        svc(
            "Worker",
            python_cmd("import time; time.sleep(300)"),
            max_replicas=5,
            readiness=Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.1),
        ),
        svc(
            "Slow",
            python_cmd("import time; time.sleep(300)"),
            max_replicas=5,
            readiness=Readiness(kind=ReadinessKind.TCP, port=1, timeout_s=60, period_s=0.05),
        ),
    )
    async with running(graph, tmp_path) as conn:
        assert await conn.scale_component("Worker", 3, timeout_s=20)
        assert await conn.scale_component("Slow", 2, blocking=False)
        # Both records exist at once (spawning); each turns starting when its process is up,
        # however long a loaded machine takes for that.
        await wait_until(lambda: set(phases(conn, "Slow").values()) == {"starting"})
        assert set(phases(conn, "Slow").values()) == {"starting"}
        # Worker: all ready, so the newest two go.
        assert await conn.scale_component("Worker", 1, timeout_s=20)
        assert replica_ids(conn, "Worker") == ["Worker/1"]
        # Slow: nothing is ready; newest goes first.
        await conn.scale_component("Slow", 1, blocking=False)
        # The victim's record goes once its stop has finished, on its own task.
        await wait_until(lambda: replica_ids(conn, "Slow") == ["Slow/1"])
        assert replica_ids(conn, "Slow") == ["Slow/1"]


async def test_concurrent_scale_calls_last_target_wins(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", max_replicas=10))
    async with running(graph, tmp_path) as conn:
        results = await asyncio.gather(
            conn.scale_component("Decode", 4, timeout_s=20),
            conn.scale_component("Decode", 6, timeout_s=20),
            conn.scale_component("Decode", 2, timeout_s=20),
        )
        # The first two were superseded; the last one converged.
        assert results == [False, False, True]
        assert conn.reconciler is not None
        await asyncio.sleep(0.3)
        assert len(replica_ids(conn, "Decode")) == 2
        assert set(phases(conn, "Decode").values()) == {"ready"}
        listed = await conn.reconciler.channel.call("list")
        ours = sorted(w for w in listed["watchers"] if w.startswith("t.decode."))
        assert ours == sorted(r.watcher for r in conn.state.replicas_of("Decode"))
        # Every spawned replica was either kept or stopped: none leaked.
        spawned = {e.replica for e in kinds(conn, "spawn", "Decode")}
        stopped = {e.replica for e in kinds(conn, "stop", "Decode")}
        assert spawned - stopped == set(replica_ids(conn, "Decode"))
        outcomes = [e.outcome for e in kinds(conn, "scale", "Decode")]
        assert outcomes == ["superseded", "superseded", "ok"]


async def test_k_replicas_spawn_concurrently(tmp_path: Path) -> None:
    # Each replica needs 0.5 s of start-up grace; 6 of them in sequence would take 3 s.
    graph = make_graph(
        svc(
            "Decode",
            max_replicas=6,
            readiness=Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.5),
        )
    )
    async with running(graph, tmp_path) as conn:
        t0 = time.monotonic()
        assert await conn.scale_component("Decode", 6, timeout_s=20)
        assert time.monotonic() - t0 < 2.5


async def test_add_and_remove_component_step_by_one(tmp_path: Path) -> None:
    graph = make_graph(svc("Prefill", replicas=1, max_replicas=3))
    async with running(graph, tmp_path) as conn:
        assert await conn.add_component("Prefill") is True
        assert await conn.get_component_replicas("Prefill") == 2
        assert await conn.remove_component("Prefill") is True
        assert await conn.remove_component("Prefill") is True
        assert await conn.remove_component("Prefill") is True  # already 0: no-op
        assert replica_ids(conn, "Prefill") == []


async def test_bad_scale_requests_raise_typed_errors(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", replicas=1, min_replicas=1, max_replicas=2))
    async with running(graph, tmp_path) as conn:
        assert await conn.scale_component("Decode", 1, timeout_s=10)
        with pytest.raises(ComponentNotFound, match="no component 'Nope' in graph 'test'"):
            await conn.scale_component("Nope", 1)
        with pytest.raises(InvalidReplicas, match="replicas must be >= 0, got -1"):
            await conn.scale_component("Decode", -1)
        with pytest.raises(InvalidReplicas, match="must be an integer"):
            await conn.scale_component("Decode", True)  # type: ignore[arg-type]
        with pytest.raises(ReplicaLimit, match=r"3 replicas is outside .*\(1\.\.2\)"):
            await conn.scale_component("Decode", 3)
        with pytest.raises(ReplicaLimit, match=r"0 replicas is outside"):
            await conn.scale_component("Decode", 0)
        # Nothing changed.
        assert conn.state.components["Decode"].target == 1
        assert await conn.get_component_replicas("Decode") == 1


async def test_list_components_reports_status_and_counts(tmp_path: Path) -> None:
    graph = make_graph(svc("Frontend", replicas=1), svc("Idle"))
    async with running(graph, tmp_path) as conn:
        await conn.scale_component("Frontend", 1, timeout_s=10)
        listing = {c["name"]: c for c in await conn.list_components()}
        assert listing["Frontend"]["status"] == "running"
        assert listing["Frontend"]["replicas"] == {"desired": 1, "running": 1, "ready": 1}
        assert listing["Frontend"]["scale_in_flight"] is False
        assert listing["Idle"]["status"] == "stopped"
        assert listing["Idle"]["replicas"] == {"desired": 0, "running": 0, "ready": 0}


async def test_wait_started_wakes_once_the_connector_is_up_or_shut_down(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", replicas=1, max_replicas=2))
    conn = LocalConnector("t", graph, tmp_path / "up", options())
    waiter = asyncio.create_task(conn.wait_started())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await conn.initialize()
    try:
        assert await asyncio.wait_for(waiter, 5) is True
        # By then the loop runs and has started what the graph asks for.
        assert replica_ids(conn, "Decode") == ["Decode/1"]
    finally:
        await conn.shutdown()
    assert await conn.wait_started() is False

    never = LocalConnector("t", graph, tmp_path / "never", options())
    waiter = asyncio.create_task(never.wait_started())
    await never.shutdown()  # before it ever started
    assert await asyncio.wait_for(waiter, 5) is False


async def test_stops_signal_and_remove_a_bounded_number_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale to zero drains every replica at once but signals and removes at most
    STOP_SLOTS of them at a time (circusd removes one watcher at a time; a thousand stops
    at once flooded the event loop)."""
    from connector.reconcile import base
    from connector.supervision import procs

    monkeypatch.setattr(base, "STOP_SLOTS", 2)
    real = procs.terminate_group_async
    inside: list[int] = []
    most = 0
    stopping_at_first: list[int] = []

    graph = make_graph(svc("Decode", max_replicas=6, drain_s=0.3))
    async with running(graph, tmp_path) as conn:

        async def counted(pid: int, graceful_s: float, members: set[int] | None = None) -> str:
            nonlocal most
            if not stopping_at_first:
                stopping_at_first.append(list(phases(conn, "Decode").values()).count("stopping"))
            inside.append(pid)
            most = max(most, len(inside))
            try:
                await asyncio.sleep(0.2)
                return await real(pid, graceful_s, members)
            finally:
                inside.remove(pid)

        monkeypatch.setattr(procs, "terminate_group_async", counted)
        assert await conn.scale_component("Decode", 6, timeout_s=20)
        running_pids = list(pids(conn, "Decode").values())
        assert await conn.scale_component("Decode", 0, timeout_s=20)
        assert replica_ids(conn, "Decode") == []
        assert most == 2
        assert stopping_at_first == [6]  # all drained together; only the stops wait
        assert not any(alive(pid) for pid in running_pids)
        assert [e.details["how"] for e in kinds(conn, "stop", "Decode")] == ["terminated"] * 6
