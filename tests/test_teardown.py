"""A shutdown whose replica stops fail still stops circusd, so nothing is left running."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from connector.local import LocalConnector
from tests.core_helpers import alive, make_graph, options, pids, svc

pytestmark = pytest.mark.integration


async def test_a_failing_stop_still_takes_circusd_and_its_replicas_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = LocalConnector("t", make_graph(svc("Decode", replicas=2)), tmp_path, options())
    await conn.initialize()
    assert await conn.scale_component("Decode", 2, timeout_s=15)
    replica_pids = [p for p in pids(conn, "Decode").values() if p]
    assert conn.state.circusd is not None
    circusd_pid = conn.state.circusd["pid"]
    assert conn.reconciler is not None

    async def broken(why: str) -> None:
        raise RuntimeError("stop failed half-way")

    monkeypatch.setattr(conn.reconciler, "stop_all", broken)
    await conn.shutdown()
    assert not psutil.pid_exists(circusd_pid) or not alive(circusd_pid)
    assert [p for p in replica_pids if alive(p)] == []
