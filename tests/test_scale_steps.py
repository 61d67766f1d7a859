"""Large scales planned a step at a time: a scale that does not wait answers after the first
step, the rest follows with the event loop free in between, ports are probed off the loop
and never collide, and a refusal in a later step settles the op as a waited one would."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from connector.graph.model import PortSpec, ResourceRequest
from connector.reconcile.loop import PLAN_STEP
from connector.resources.manager import ResourceManager
from connector.resources.reservation import Inventory
from tests.core_helpers import kinds, make_graph, running, svc, wait_until
from tests.test_resources import free_run

pytestmark = pytest.mark.integration


def index_matches_holds(m: ResourceManager) -> None:
    """The manager's index is what a walk over every hold finds."""
    holds = [r for _, r in m._holds()]
    assert m._index.ports == dict(Counter(p for r in holds for p in r.ports.values()))
    assert m._index.sockets == dict(Counter(p for r in holds for p in r.sockets.values()))
    assert m._index.pinned == dict(Counter(c for r in holds for c in r.cpus))
    assert m._index.cpu == sum((Fraction(r.cpu_cores) for r in holds), Fraction(0))
    assert m._index.memory == sum(r.memory_bytes for r in holds)


async def test_probed_ports_skip_a_squatter_and_the_index_follows_every_hold(
    tmp_path: Path,
) -> None:
    first = free_run(8)
    m = ResourceManager(
        Inventory(gpus=(), cpus=(0, 1, 2, 3), memory_bytes=1 << 30),
        working_dir=tmp_path,
        port_range=(first, first + 7),
    )
    two = [PortSpec("system"), PortSpec("rpc")]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", first + 1))  # someone else's, bound only
        a = m.reserve("A/1", "A", ResourceRequest(cpu=0.5, memory_bytes=1 << 20), two)
        assert a.ports == {"system": first, "rpc": first + 2}
        probed = await asyncio.to_thread(m.probe_ports, 4)
        # Neither the squatter's port nor a held one; from where the next reservation looks.
        assert probed == {first + 3, first + 4, first + 5, first + 6}
        b = m.reserve("B/1", "B", ResourceRequest(cpu=1, pin_cpus=True), two, probed=probed)
        assert b.ports == {"system": first + 3, "rpc": first + 4}
        index_matches_holds(m)
        # A port probed free is still never handed out twice.
        c = m.reserve("C/1", "C", ResourceRequest(), two, probed=probed)
        assert set(c.ports.values()).isdisjoint({*a.ports.values(), *b.ports.values()})
        index_matches_holds(m)
    await m.release("A/1", ())
    index_matches_holds(m)
    assert first not in m._index.ports
    await m.release("B/1", ())
    await m.release("C/1", ())
    index_matches_holds(m)
    assert not m._index.ports and not m._index.pinned
    assert (m._index.cpu, m._index.memory) == (Fraction(0), 0)


async def test_a_scale_that_does_not_wait_plans_the_rest_in_steps(tmp_path: Path) -> None:
    n = PLAN_STEP + 6
    first = free_run(2 * n + 10)
    graph = make_graph(svc("W", ports=(PortSpec("system", "SYS"), PortSpec("rpc", "RPC"))))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", first + 5))
        squatter.listen()
        async with running(
            graph, tmp_path, max_replicas=n, port_range=(first, first + 2 * n + 9)
        ) as conn:
            rec = conn.reconciler
            assert rec is not None
            calls: Counter[str] = Counter()
            call = rec.channel.call

            async def counted(
                command: str, timeout_s: float | None = None, **kw: Any
            ) -> dict[str, Any]:
                calls[command] += 1
                return await call(command, timeout_s, **kw)

            rec.channel.call = counted  # type: ignore[method-assign]
            assert await conn.scale_component("W", n, blocking=False) is True
            # Answered after the first step: the rest is still to be planned.
            assert len(conn.state.replicas_of("W")) == PLAN_STEP
            assert conn.view().components[0].desired == n
            await wait_until(lambda: rec.converged("W") and "W" not in rec.ops, 60)
            recs = conn.state.replicas_of("W")
            assert [r.ordinal for r in recs] == list(range(1, n + 1))
            ports = [p for r in recs for p in (r.reservation or {})["ports"].values()]
            assert len(ports) == 2 * n == len(set(ports)) and first + 5 not in ports
            # circusd's answer to a waited add names the pid: no `list` per replica.
            assert calls["add"] == n and calls["list"] == 0
            assert [(e.to_replicas, e.outcome) for e in kinds(conn, "scale")] == [(n, "ok")]
            assert await conn.scale_component("W", 0, blocking=False) is True
            await wait_until(lambda: not conn.state.replicas, 60)
            machine = await conn.get_machine_resources()
            assert machine["ports"] == {}


async def test_a_newer_target_during_the_steps_wins(tmp_path: Path) -> None:
    n = 2 * PLAN_STEP + 1
    graph = make_graph(svc("W", ports=(PortSpec("rpc", "RPC"),)))
    async with running(graph, tmp_path, max_replicas=n) as conn:
        rec = conn.reconciler
        assert rec is not None
        assert await conn.scale_component("W", n, blocking=False) is True
        assert await conn.scale_component("W", 3, timeout_s=60) is True
        await asyncio.sleep(0.3)  # a cancelled continuation would have started more by now
        assert len(conn.state.replicas_of("W")) == 3
        assert [(e.to_replicas, e.outcome) for e in kinds(conn, "scale")] == [
            (n, "superseded"),
            (3, "ok"),
        ]


async def test_a_refusal_in_a_later_step_settles_the_op_partial(tmp_path: Path) -> None:
    fit = PLAN_STEP + 3
    first = free_run(fit)
    graph = make_graph(svc("W", ports=(PortSpec("rpc", "RPC"),)))
    async with running(
        graph, tmp_path, max_replicas=fit + 20, port_range=(first, first + fit - 1)
    ) as conn:
        rec = conn.reconciler
        assert rec is not None
        # The first step fits, so the answer is "accepted"; the refusal comes later.
        assert await conn.scale_component("W", fit + 10, blocking=False) is True
        await wait_until(lambda: bool(kinds(conn, "scale")), 60)
        (event,) = kinds(conn, "scale")
        assert (event.to_replicas, event.outcome) == (fit, "partial")
        assert "needs 1 port, 0 free" in (event.reason or "")
        assert rec.component_record("W").target == fit
        await wait_until(lambda: rec.converged("W"), 60)
        assert len(conn.state.replicas_of("W")) == fit
        refused = [e for e in kinds(conn, "allocate") if e.outcome == "refused"]
        assert len(refused) == 1


async def test_a_scale_is_planned_at_circusds_pace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """circusd adds and removes one watcher at a time: a plan keeps fewer than PLAN_AHEAD
    (here 8) of the component's replicas waiting for their add before it plans the next
    step (PLAN_STEP), so 100 replicas never all sit planned at once with their first steps
    on the loop together; scaling down, every replica stops (and drains) at once."""
    import connector.reconcile.loop as loop_module

    monkeypatch.setattr(loop_module, "PLAN_AHEAD", 8)
    n = 100
    async with running(make_graph(svc("W")), tmp_path, max_replicas=n) as conn:
        rec = conn.reconciler
        assert rec is not None
        most: Counter[str] = Counter()
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                phases = Counter(r.phase for r in conn.state.replicas.values())
                for phase in ("spawning", "stopping"):
                    most[phase] = max(most[phase], phases[phase])
                await asyncio.sleep(0)

        sampler = asyncio.ensure_future(sample())
        assert await conn.scale_component("W", n, blocking=False) is True
        await wait_until(lambda: rec.converged("W") and "W" not in rec.ops, 60)
        assert len(conn.state.replicas_of("W")) == n
        assert 8 <= most["spawning"] <= 8 - 1 + PLAN_STEP
        assert await conn.scale_component("W", 0, blocking=False) is True
        await wait_until(lambda: not conn.state.replicas, 60)
        done.set()
        await sampler
        # Stops are not held back by stops in flight: a stop may drain, all drain together.
        assert most["stopping"] == n
        await wait_until(lambda: "W" not in rec.ops, 10)
        assert [(e.to_replicas, e.outcome) for e in kinds(conn, "scale")] == [(n, "ok"), (0, "ok")]
