"""Attaching to a circusd someone else runs, instead of owning one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.core_helpers import alive, make_graph, phases, pids, running, svc

pytestmark = pytest.mark.integration


async def test_attach_to_external_circusd_and_leave_it_running(
    tmp_path: Path, circusd_server: Any
) -> None:
    graph = make_graph(svc("Decode", max_replicas=3))
    async with running(
        graph,
        tmp_path / "wd",
        circus_endpoint=circusd_server.endpoint,
        circus_pubsub_endpoint=circusd_server.pubsub_endpoint,
    ) as conn:
        assert await conn.scale_component("Decode", 2, timeout_s=15)
        assert phases(conn, "Decode") == {"Decode/1": "ready", "Decode/2": "ready"}
        listed = circusd_server.call("list")
        assert sorted(w for w in listed["watchers"] if w.startswith("t.")) == [
            "t.decode.1",
            "t.decode.2",
        ]
        before = list(pids(conn, "Decode").values())
    # Our replicas are gone, the external circusd is not.
    assert not any(alive(p) for p in before)
    assert alive(circusd_server.pid)
    assert [w for w in circusd_server.call("list")["watchers"] if w.startswith("t.")] == []
