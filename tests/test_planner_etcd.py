"""The virtual-connector executor against a real etcd, with the test acting as the Planner.

The test writes exactly what Dynamo's ``VirtualConnectorCoordinator`` writes: the changed
counts, then ``decision_id``, all decimal strings on the Planner's own lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aetcd
import pytest

from connector.dynamo.planner.executor import SeenDecision, VirtualConnectorExecutor
from connector.dynamo.planner.targets import DecisionOutcome
from connector.events import EventLog
from exporter.exposition import Format
from exporter.process_tree import ProcessTreeSampler
from exporter.service import Exporter, build_exporter
from tests.exporter_helpers import Clock, FakeProcessTable, FakeReader, samples, view_of

pytestmark = pytest.mark.integration

NS = "dyn"
PREFIX = f"v1/{NS}/planner/"
ACK = (PREFIX + "scaled_decision_id").encode()


class Planner:
    """Writes decisions the way Dynamo's Planner does."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lease: Any = None

    async def start(self) -> None:
        self.lease = await self.client.lease(30)

    async def decide(
        self, decision_id: int, prefill: int | None = None, decode: int | None = None
    ) -> None:
        if prefill is not None:
            await self._put("num_prefill_workers", str(prefill))
        if decode is not None:
            await self._put("num_decode_workers", str(decode))
        await self._put("decision_id", str(decision_id))

    async def _put(self, name: str, value: str) -> None:
        await self.client.put((PREFIX + name).encode(), value.encode(), lease=self.lease)

    async def ack(self) -> Any:
        return await self.client.get(ACK)

    async def stop(self) -> None:
        await self.lease.revoke()


class Recorder:
    """An ``apply`` that records calls, can be held, and answers what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, int | None, int]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.running = 0
        self.max_running = 0
        self.outcome: Callable[[int | None, int | None], DecisionOutcome] = lambda p, d: (
            DecisionOutcome(
                "ok",
                None,
                {k: v for k, v in (("prefill", p), ("decode", d)) if v is not None},
            )
        )

    async def __call__(self, prefill: int | None, decode: int | None, decision_id: int) -> Any:
        self.calls.append((prefill, decode, decision_id))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            return self.outcome(prefill, decode)
        finally:
            self.running -= 1


async def until(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


async def ack_value(planner: Planner) -> bytes | None:
    got = await planner.ack()
    return None if got is None else bytes(got.value)


@pytest.fixture
async def client(etcd_server: Any) -> AsyncIterator[Any]:
    c = aetcd.Client(etcd_server.host, etcd_server.port, timeout=5)
    yield c
    await c.close()


@pytest.fixture
async def planner(client: Any) -> Planner:
    p = Planner(client)
    await p.start()
    return p


def executor(
    etcd_server: Any, apply: Any, events: EventLog | None = None
) -> VirtualConnectorExecutor:
    return VirtualConnectorExecutor(etcd_server.url, NS, apply, events, lease_ttl_s=5)


async def test_decision_applied_and_acknowledged_on_own_lease(
    etcd_server: Any, client: Any, planner: Planner
) -> None:
    events = EventLog()
    apply = Recorder()
    ex = executor(etcd_server, apply, events)
    await ex.start()
    try:
        await planner.decide(0, prefill=2, decode=1)
        await until(lambda: ack_value(planner))
        assert apply.calls == [(2, 1, 0)]
        ack = await planner.ack()
        assert bytes(ack.value) == b"0"
        assert ack.lease == ex.lease_id != planner.lease.id
        info = await client.get_lease_info(ex.lease_id)
        assert 0 < info.TTL <= 5
        assert [bytes(k) for k in info.keys] == [ACK]

        await planner.decide(1, decode=3)  # only decode changed: prefill stays as written
        await until(lambda: _ack_is(planner, b"1"))
        # etcd has the ack the moment the transaction commits; the executor records it when
        # its call returns, one loop turn later.
        await until(lambda: ex.acknowledged == 1)
        assert apply.calls == [(2, 1, 0), (2, 3, 1)]

        [first, second] = [e for e in events.since(0) if e.kind == "decision"]
        assert (first.source, first.outcome, first.reason) == ("planner", "ok", None)
        assert first.details == {
            "decision_id": 0,
            "num_prefill_workers": 2,
            "num_decode_workers": 1,
            "applied": {"prefill": 2, "decode": 1},
        }
        assert second.details["decision_id"] == 1
        assert ex.status()["acknowledged"] == 1
    finally:
        await ex.close()
    assert await planner.ack() is None  # the acknowledgement goes with the executor's lease


async def _ack_is(planner: Planner, expected: bytes | None) -> bool:
    return await ack_value(planner) == expected


async def test_partial_and_failed_decisions_are_acknowledged_and_recorded(
    etcd_server: Any, planner: Planner
) -> None:
    events = EventLog()
    apply = Recorder()
    apply.outcome = lambda p, d: DecisionOutcome(
        "partial", "Decode/3 needs 1 GPU; none free", {"prefill": 1, "decode": 2}
    )
    ex = executor(etcd_server, apply, events)
    await ex.start()
    try:
        await planner.decide(0, prefill=1, decode=4)
        await until(lambda: _ack_is(planner, b"0"))
        [event] = [e for e in events.since(0) if e.kind == "decision"]
        assert (event.outcome, event.reason) == ("partial", "Decode/3 needs 1 GPU; none free")
        assert event.details["applied"] == {"prefill": 1, "decode": 2}

        def explode(p: int | None, d: int | None) -> DecisionOutcome:
            raise RuntimeError("supervisor gone")

        apply.outcome = explode
        await planner.decide(1, decode=2)
        await until(lambda: _ack_is(planner, b"1"))
        event = events.since(event.seq)[-1]
        assert (event.kind, event.outcome, event.reason) == (
            "decision",
            "failed",
            "RuntimeError: supervisor gone",
        )

        # A value that is not a decimal integer is not applied, still acknowledged.
        await planner.client.put((PREFIX + "num_decode_workers").encode(), b"three")
        await planner.decide(2)
        await until(lambda: _ack_is(planner, b"2"))
        event = events.since(event.seq)[-1]
        assert (event.outcome, event.reason) == (
            "failed",
            "num_decode_workers is not a decimal integer: 'three'",
        )
        assert [c[2] for c in apply.calls] == [0, 1]
    finally:
        await ex.close()


async def test_decisions_during_an_apply_are_coalesced(etcd_server: Any, planner: Planner) -> None:
    apply = Recorder()
    apply.gate = asyncio.Event()
    ex = executor(etcd_server, apply)
    await ex.start()
    try:
        await planner.decide(0, prefill=1, decode=1)
        await asyncio.wait_for(apply.entered.wait(), 5)
        assert ex.status()["applying"] == 0
        for i in (1, 2, 3):
            await planner.decide(i, prefill=1 + i, decode=1)
        await asyncio.sleep(0.1)  # the watch has seen them; none may start yet
        assert apply.calls == [(1, 1, 0)]
        apply.gate.set()
        await until(lambda: _ack_is(planner, b"3"))
        assert apply.calls == [(1, 1, 0), (4, 1, 3)]
        assert apply.max_running == 1
    finally:
        await ex.close()


async def test_restart_picks_up_a_pending_decision_once(
    etcd_server: Any, client: Any, planner: Planner
) -> None:
    await planner.decide(0, prefill=2, decode=2)  # written while no executor runs
    apply = Recorder()
    first = executor(etcd_server, apply)
    await first.start()
    await until(lambda: _ack_is(planner, b"0"))
    assert apply.calls == [(2, 2, 0)]

    # A crashed executor leaves its ack behind until its lease expires. The next one takes
    # it as handled (no second apply) and binds it to its own lease.
    first._tasks, tasks = [], first._tasks
    for t in tasks:
        t.cancel()
    second_apply = Recorder()
    second = executor(etcd_server, second_apply)
    await second.start()
    try:
        ack = await planner.ack()
        assert (bytes(ack.value), ack.lease) == (b"0", second.lease_id)
        await asyncio.sleep(0.1)
        assert second_apply.calls == []
        await planner.decide(1, prefill=3)
        await until(lambda: _ack_is(planner, b"1"))
        assert second_apply.calls == [(3, 2, 1)]
    finally:
        await second.close()
        first.lease_id = None  # already superseded; nothing of it to revoke
        await first.close()


async def test_a_restarted_planner_counting_from_zero_is_followed(
    etcd_server: Any, client: Any, planner: Planner
) -> None:
    apply = Recorder()
    ex = executor(etcd_server, apply)
    await ex.start()
    try:
        for i in range(3):
            await planner.decide(i, decode=i + 1)
            await until(lambda i=i: _ack_is(planner, str(i).encode()))
        # The Planner dies: its keys go with its lease, and so does our stale ack.
        await planner.stop()
        await until(lambda: _ack_is(planner, None))
        reborn = Planner(client)
        await reborn.start()
        await reborn.decide(0, prefill=1, decode=1)
        await until(lambda: _ack_is(reborn, b"0"))
        assert apply.calls[-1] == (1, 1, 0)
        assert len(apply.calls) == 4
    finally:
        await ex.close()


async def test_no_acknowledgement_for_a_planner_that_left_during_the_apply(
    etcd_server: Any, client: Any, planner: Planner
) -> None:
    apply = Recorder()
    apply.gate = asyncio.Event()
    ex = executor(etcd_server, apply)
    await ex.start()
    try:
        await planner.decide(4, prefill=2)
        await asyncio.wait_for(apply.entered.wait(), 5)
        await planner.stop()  # its keys go with its lease while we are still applying
        apply.gate.set()
        await until(lambda: ex.applying is None)
        await asyncio.sleep(0.1)
        assert await planner.ack() is None  # a new Planner must not read a stale "4"
        reborn = Planner(client)
        await reborn.start()
        await reborn.decide(0, prefill=1)
        await until(lambda: _ack_is(reborn, b"0"))
        assert apply.calls == [(2, None, 4), (1, None, 0)]
    finally:
        await ex.close()


# ------------------------------------------------------------- what the exporter publishes

T0 = 1_700_000_000.0


def _planner_exporter(ex: VirtualConnectorExecutor) -> Exporter:
    """An exporter fed from the executor's status, as ``dynamo-local up`` wires it."""
    clock = Clock()
    return build_exporter(
        FakeReader(view_of((), (), taken_at=1.0)),
        planner_status=lambda: ex.status() if ex.running else {},
        interval_s=3600.0,
        processes=ProcessTreeSampler(FakeProcessTable({}), clock=clock),
        clock=clock,
    )


async def _gauges(exporter: Exporter) -> dict[str, float]:
    """The Planner gauges of a fresh snapshot: {name without prefix: value}."""
    await exporter.sample_once()
    text = exporter.exposition.render(Format.TEXT)
    out: dict[str, float] = {}
    for series, value in samples(text).items():
        if series.startswith("dynamo_local_planner_"):
            name, _, labels = series.partition("{")
            assert labels == f'dynamo_namespace="{NS}"}}', series
            out[name.removeprefix("dynamo_local_")] = value
    return out


async def test_the_decision_seen_and_acknowledged_reach_the_exporter(
    etcd_server: Any, planner: Planner
) -> None:
    apply = Recorder()
    apply.gate = asyncio.Event()
    clock = Clock(T0)
    ex = VirtualConnectorExecutor(etcd_server.url, NS, apply, lease_ttl_s=5, clock=clock)
    exporter = _planner_exporter(ex)
    assert await _gauges(exporter) == {}  # no executor: no series
    await ex.start()
    try:
        # Running, but the Planner has decided nothing: nothing to publish, and no zeros.
        assert await _gauges(exporter) == {}
        assert ex.status()["decision_id"] is None
        assert ex.status()["acknowledged"] is None

        await planner.decide(0, prefill=1, decode=1)
        await asyncio.wait_for(apply.entered.wait(), 5)
        # Being applied: seen, not acknowledged (the alert's condition, when it lasts).
        assert await _gauges(exporter) == {
            "planner_decision_id": 0,
            "planner_decision_seen_timestamp_seconds": T0,
        }

        # A newer decision during the apply is seen at once (the watch), applied after.
        clock.advance(10.0)
        await planner.decide(1, decode=2)
        await until(lambda: ex.seen is not None and ex.seen.decision_id == 1)
        assert await _gauges(exporter) == {
            "planner_decision_id": 1,
            "planner_decision_seen_timestamp_seconds": T0 + 10.0,
        }
        clock.advance(10.0)
        apply.gate.set()
        await until(lambda: _ack_is(planner, b"1"))
        await until(lambda: ex.acknowledged == 1)  # recorded once the transaction returns
        assert apply.calls == [(1, 1, 0), (1, 2, 1)]
        assert await _gauges(exporter) == {
            "planner_decision_id": 1,
            "planner_decision_acknowledged_id": 1,
            "planner_decision_seen_timestamp_seconds": T0 + 10.0,
        }
        status = ex.status()
        assert (status["decision_id"], status["decision_seen_at"], status["acknowledged"]) == (
            1,
            T0 + 10.0,
            1,
        )

        # The Planner goes (its keys with its lease): no decision, nothing acknowledged.
        await planner.stop()
        await until(lambda: ex.seen is None and ex.acknowledged is None)
        assert await _gauges(exporter) == {}
    finally:
        await ex.close()
    assert await _gauges(exporter) == {}  # closed: no series


async def test_a_decision_pending_at_start_is_seen_when_the_executor_starts(
    etcd_server: Any, planner: Planner
) -> None:
    await planner.decide(3, prefill=2)  # written while no executor runs
    apply = Recorder()
    apply.gate = asyncio.Event()
    ex = VirtualConnectorExecutor(etcd_server.url, NS, apply, lease_ttl_s=5, clock=Clock(T0))
    exporter = _planner_exporter(ex)
    await ex.start()
    try:
        assert ex.seen is not None
        assert (ex.seen.decision_id, ex.seen.seen_at) == (3, T0)
        await asyncio.wait_for(apply.entered.wait(), 5)
        assert await _gauges(exporter) == {
            "planner_decision_id": 3,
            "planner_decision_seen_timestamp_seconds": T0,
        }
        apply.gate.set()
        await until(lambda: _ack_is(planner, b"3"))
        await until(lambda: ex.acknowledged == 3)  # recorded once the transaction returns
        assert (await _gauges(exporter))["planner_decision_acknowledged_id"] == 3
    finally:
        await ex.close()


def test_older_observations_never_replace_newer_ones() -> None:
    async def apply(p: int | None, d: int | None, i: int) -> DecisionOutcome:
        return DecisionOutcome("ok")

    clock = Clock(T0)
    ex = VirtualConnectorExecutor("http://127.0.0.1:2379", NS, apply, clock=clock)
    ex._see(10, 3, create_revision=5)
    assert ex.seen == SeenDecision(decision_id=3, create_revision=5, seen_at=T0)
    ex._see(9, None)  # a listing answered after the watch event that followed it
    assert ex.seen == SeenDecision(3, 5, T0)
    clock.advance(1.0)
    ex._see(12, 3, create_revision=5)  # the same id written again: first seen at T0
    assert ex.seen == SeenDecision(3, 5, T0)
    ex._see(13, None)  # deleted
    assert ex.seen is None
    ex._see(14, 0, create_revision=14)  # a new Planner, counting from 0
    assert ex.seen == SeenDecision(0, 14, T0 + 1.0)


def test_an_acknowledgement_to_a_replaced_planner_does_not_count() -> None:
    async def apply(p: int | None, d: int | None, i: int) -> DecisionOutcome:
        return DecisionOutcome("ok")

    ex = VirtualConnectorExecutor("http://127.0.0.1:2379", NS, apply, clock=Clock(T0))
    ex._handled = (5, 3)  # decision 3 of the Planner whose key was created at revision 5
    ex._see(10, 3, create_revision=5)
    assert ex.acknowledged == 3
    ex._see(20, 0, create_revision=18)  # its key re-created: a new Planner (delete missed)
    assert ex.acknowledged is None
    assert (ex.status()["decision_id"], ex.status()["acknowledged"]) == (0, None)
