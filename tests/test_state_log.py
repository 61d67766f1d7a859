"""A working dir that stays unwritable is logged as one line when writes start failing, at
most one a minute while they keep failing, and one when they work again: no traceback per
reconcile pass."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from connector.reconcile import state as state_module
from connector.reconcile.state import ComponentRecord, ConnectorState, StateStore
from tests.core_helpers import make_graph, running, svc, wait_until
from tests.test_state_unwritable import make_unwritable, make_writable

FAILING = "cannot write the connector's state to {path}: No space left on device (ENOSPC)"


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("connector")]


async def test_failed_writes_are_logged_once_then_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector")
    store = StateStore(tmp_path)
    now = [1000.0]
    store._clock = lambda: now[0]
    state = ConnectorState(namespace="t")
    state.components["A"] = ComponentRecord(target=1)

    def disk_full(text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write", disk_full)
    for at in (0, 1, 30, 59.9, 60, 61, 119, 120.5):  # seconds into the failure
        now[0] = 1000.0 + at
        with pytest.raises(state_module.StateWriteFailed):
            await store.save(state)
    path = store.path
    assert lines(caplog) == [
        FAILING.format(path=path)
        + "; what was asked for is kept in memory, written and carried out once the working "
        "dir is writable again",
        f"still cannot write the connector's state to {path}: No space left on device "
        "(ENOSPC); 5 writes failed in 60 s",
        f"still cannot write the connector's state to {path}: No space left on device "
        "(ENOSPC); 8 writes failed in 120 s",
    ]
    assert not any(r.exc_info for r in caplog.records)
    caplog.clear()
    monkeypatch.undo()
    now[0] = 1200.0
    await store.save(state)
    await store.save(state)
    assert lines(caplog) == [
        f"the connector's state is written to {path} again, after 8 failed writes in 200 s"
    ]
    store.close()


@pytest.mark.integration
async def test_an_unwritable_working_dir_logs_one_line_not_a_traceback_per_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector")
    graph = make_graph(svc("Decode", replicas=1, max_replicas=3), name="sl")
    async with running(graph, tmp_path, resync_s=0.1) as conn:
        await wait_until(lambda: [r.phase for r in conn.state.replicas_of("Decode")] == ["ready"])
        store = conn.store
        caplog.clear()
        before = store.writes_total
        make_unwritable(store, "symlink to /dev/full")
        try:
            await wait_until(lambda: store.failure is not None)  # the next pass's save
            # A scale that does not wait hears of it; its save and its replicas' spawns fail
            # too, in the background.
            with pytest.raises(state_module.StateWriteFailed):
                await conn.scale_component("Decode", 3, blocking=False)
            await asyncio.sleep(3.0)  # about 30 passes, each of them saving
            assert store.writes_total - before >= 10
            assert store.failure is not None
            assert lines(caplog) == [store.failure.message]
            assert lines(caplog)[0].startswith(FAILING.format(path=store.path))
        finally:
            make_writable(store)
        await wait_until(lambda: store.failure is None)
        await wait_until(
            lambda: [r.phase for r in conn.state.replicas_of("Decode")] == ["ready"] * 3
        )
        assert [line.split(" again,")[0] for line in lines(caplog)[1:]] == [
            f"the connector's state is written to {store.path}"
        ]
        assert not any(r.exc_info for r in caplog.records)
