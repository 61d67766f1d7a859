"""Persistence of desired/observed state and the namespace lock."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from pathlib import Path

import pytest

from connector.errors import NamespaceLocked
from connector.reconcile.state import (
    WAKE_PER_TURN,
    WRITE_WINDOW_S,
    WRITES_PER_WINDOW,
    ComponentRecord,
    ConnectorState,
    ReplicaRecord,
    StateStore,
    WriteRate,
)


async def test_state_round_trips_exactly(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = ConnectorState(namespace="ns", graph_source="g.yaml")
    state.components["Decode"] = ComponentRecord(target=2, next_ordinal=3, restarts_total=1)
    state.replicas["ns.decode.1"] = ReplicaRecord(
        component="Decode",
        ordinal=1,
        watcher="ns.decode.1",
        phase="ready",
        pid=42,
        create_time=1.5,
        reservation={"gpus": ["GPU-1"], "ports": {"system": 20001}},
    )
    await store.save(state)
    loaded = store.load()
    assert loaded == state
    assert loaded is not None and loaded.replicas["ns.decode.1"].replica_id == "Decode/1"
    # The write is atomic: no temp file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


async def test_missing_state_is_none_and_wrong_version_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() is None
    (tmp_path / "state.json").write_text(json.dumps({"version": 99, "namespace": "x"}))
    with pytest.raises(ValueError, match="state version 99 is not 1"):
        store.load()


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    first.acquire()
    second = StateStore(tmp_path)
    with pytest.raises(NamespaceLocked) as err:
        second.acquire()
    assert err.value.details["holder_pid"] == str(os.getpid())
    first.release()
    second.acquire()  # free again once released
    second.release()


async def test_saves_asked_together_share_one_write_with_every_change(tmp_path: Path) -> None:
    """Stopping N replicas saves N times: those saves are coalesced, not N serializations
    of the whole state, and each caller's change is on disk when its save returns."""
    store = StateStore(tmp_path)
    state = ConnectorState(namespace="t")

    async def change_and_save(i: int) -> None:
        state.components[f"C{i}"] = ComponentRecord(target=i)
        await store.save(state)
        on_disk = json.loads((tmp_path / "state.json").read_text())
        assert on_disk["components"][f"C{i}"]["target"] == i

    await asyncio.gather(*(change_and_save(i) for i in range(200)))
    assert 1 <= store.writes_total <= 3
    assert sorted(store.load().components) == sorted(f"C{i}" for i in range(200))  # type: ignore[union-attr]
    before = store.writes_total
    state.components["late"] = ComponentRecord(target=7)
    await store.save(state)  # a save after the others is a write of its own
    assert store.writes_total == before + 1
    assert store.load().components["late"].target == 7  # type: ignore[union-attr]
    store.close()


def test_write_rate_lets_a_few_writes_through_then_one_per_share_of_the_window() -> None:
    rate = WriteRate(writes=3, window_s=0.3)
    for at in (10.0, 10.01, 10.02):  # a few saves in a row: no wait
        assert rate.wait_s(at) == 0.0
        rate.started(at)
    assert rate.wait_s(10.05) == pytest.approx(0.25)  # the 4th: when the 1st leaves the window
    rate.started(10.3)
    assert rate.wait_s(10.3) == pytest.approx(0.01)
    assert rate.wait_s(11.0) == 0.0  # quiet for a window: at once again


async def test_saves_that_keep_coming_are_written_at_a_bounded_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale of hundreds saves without pause for seconds: at most WRITES_PER_WINDOW
    writes start within any WRITE_WINDOW_S, and every caller still finds its own change on
    disk when its save returns."""
    store = StateStore(tmp_path)
    state = ConnectorState(namespace="t")
    starts: list[float] = []
    write = store._write

    def timed_write(text: str) -> None:
        starts.append(time.monotonic())
        write(text)

    monkeypatch.setattr(store, "_write", timed_write)

    async def change_and_save(i: int) -> None:
        state.components[f"C{i}"] = ComponentRecord(target=i)
        await store.save(state)
        on_disk = json.loads((tmp_path / "state.json").read_text())
        assert on_disk["components"][f"C{i}"]["target"] == i

    savers = []
    began = time.monotonic()
    for i in range(120):  # a save every 10 ms for ~1.2 s
        savers.append(asyncio.ensure_future(change_and_save(i)))
        await asyncio.sleep(0.01)
    await asyncio.gather(*savers)
    lasted = time.monotonic() - began
    # Each start is stamped a moment after the store let it start (the document is made in
    # between): a margin for that, far below the window.
    spread = [
        later - first for first, later in zip(starts, starts[WRITES_PER_WINDOW:], strict=False)
    ]
    assert len(spread) >= 2
    assert min(spread) >= WRITE_WINDOW_S - 0.05
    assert len(starts) <= WRITES_PER_WINDOW * (lasted / WRITE_WINDOW_S + 1)
    assert sorted(store.load().components) == sorted(f"C{i}" for i in range(120))  # type: ignore[union-attr]
    store.close()


async def test_a_failed_write_raises_in_every_caller_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that is full (as the kernel says it, ENOSPC) while saving: every caller of
    that write gets the error, the last good state.json stays, and the next save works."""
    store = StateStore(tmp_path)
    state = ConnectorState(namespace="t")
    state.components["A"] = ComponentRecord(target=1)
    await store.save(state)
    good = (tmp_path / "state.json").read_text()

    def disk_full(text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write", disk_full)
    state.components["A"] = ComponentRecord(target=2)
    results = await asyncio.gather(store.save(state), store.save(state), return_exceptions=True)
    assert [getattr(r, "errno", None) for r in results] == [errno.ENOSPC, errno.ENOSPC]
    assert (tmp_path / "state.json").read_text() == good
    monkeypatch.undo()
    await store.save(state)
    assert store.load().components["A"].target == 2  # type: ignore[union-attr]
    store.close()


class Turns:
    """Counts event loop turns: a callback that schedules itself again each turn."""

    def __init__(self) -> None:
        self.count = 0
        self._handle: asyncio.Handle | None = None

    def _tick(self) -> None:
        self.count += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def __enter__(self) -> Turns:
        self._handle = asyncio.get_running_loop().call_soon(self._tick)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.cancel()


async def test_the_callers_of_one_write_resume_a_bounded_number_a_loop_turn(
    tmp_path: Path,
) -> None:
    """A scale's replica tasks all wait on the same write; resumed in one loop turn they
    held the loop for tens of ms with 1,000 replicas. At most WAKE_PER_TURN resume a turn,
    every caller resumes, and a caller cancelled meanwhile costs the others nothing."""
    store = StateStore(tmp_path)
    state = ConnectorState(namespace="t")
    resumed_at: list[int] = []
    with Turns() as turns:

        async def save(i: int) -> None:
            state.components[f"C{i}"] = ComponentRecord(target=i)
            await store.save(state)
            resumed_at.append(turns.count)

        callers = [asyncio.ensure_future(save(i)) for i in range(200)]
        await asyncio.sleep(0)
        callers[5].cancel()
        results = await asyncio.gather(*callers, return_exceptions=True)
    assert [i for i, r in enumerate(results) if r is not None] == [5]
    assert isinstance(results[5], asyncio.CancelledError)
    assert store.writes_total == 1
    per_turn = [resumed_at.count(t) for t in sorted(set(resumed_at))]
    assert len(resumed_at) == 199
    assert max(per_turn) <= WAKE_PER_TURN
    assert len(per_turn) >= 199 // WAKE_PER_TURN
    assert sorted(store.load().components) == sorted(f"C{i}" for i in range(200))  # type: ignore[union-attr]
    store.close()
