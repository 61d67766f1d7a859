"""A state write the OS refuses reaches an HTTP caller as ``503 state_unwritable``, and
nothing is lost: the change stays in memory and is carried out by the first write that works.

Real connector, real circusd, real app. The refusal is the kernel's own, made in a way that
works as root too (CI runs as root, where ``chmod`` stops no write): the state store's temp
file (``state.json.tmp``, the one name every write goes through) is made
a symlink to ``/dev/full``, whose writes fail with ENOSPC ("No space left on device"), a
full disk as the write sees it; or a directory, which no one can open for writing (EISDIR).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from connector.graph.model import Readiness, ReadinessKind
from connector.reconcile.state import StateStore
from tests.api_helpers import QUICK, serve
from tests.core_helpers import alive, make_graph, svc, wait_until

pytestmark = pytest.mark.integration

REFUSALS = {
    # case -> (how state.json.tmp is made unwritable, errno name, the OS's words)
    "disk full": ("symlink to /dev/full", "ENOSPC", "No space left on device"),
    "temp path taken by a directory": ("directory", "EISDIR", "Is a directory"),
}


def make_unwritable(store: StateStore, how: str) -> None:
    if how == "symlink to /dev/full":
        os.symlink("/dev/full", store.temp_path)
    else:
        store.temp_path.mkdir()


def make_writable(store: StateStore) -> None:
    if store.temp_path.is_symlink():
        store.temp_path.unlink()
    else:
        shutil.rmtree(store.temp_path)


def on_disk_target(store: StateStore, component: str) -> int:
    return int(json.loads(store.path.read_text())["components"][component]["target"])


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_refused_state_write_is_a_503_and_the_next_write_catches_up(
    tmp_path: Path, case: str
) -> None:
    how, errno_name, reason = REFUSALS[case]
    graph = make_graph(svc("Decode", replicas=1, max_replicas=3, readiness=QUICK), name="sw")
    async with serve(tmp_path, graph, token="t0ken") as served:
        conn = served.connector
        await wait_until(lambda: [r.phase for r in conn.state.replicas_of("Decode")] == ["ready"])
        (first,) = conn.state.replicas_of("Decode")
        store = conn.store
        path = str(store.path)
        make_unwritable(store, how)
        try:
            expected = {
                "error": {
                    "code": "state_unwritable",
                    "message": (
                        f"cannot write the connector's state to {path}: {reason} "
                        f"({errno_name}); what was asked for is kept in memory, written and "
                        "carried out once the working dir is writable again"
                    ),
                    "details": {"path": path, "errno": errno_name, "reason": reason},
                }
            }
            # A scale that waits waits for its own write, and hears of its failure.
            status, body, resp = await served.call(
                "PUT",
                "/v1/components/Decode/replicas",
                body={"replicas": 3, "wait": True, "timeout_s": 5},
                token="t0ken",
            )
            assert (status, resp.headers["Retry-After"], body) == (503, "5", expected)
            # One that does not wait answers before its write; with a write failed and none
            # succeeded since, it hears of that.
            status, body, resp = await served.call(
                "PUT", "/v1/components/Decode/replicas", body={"replicas": 3}, token="t0ken"
            )
            assert (status, resp.headers["Retry-After"], body) == (503, "5", expected)
            # Kept in memory: the API shows the new target; the disk still has the old one,
            # and no process was started for a record that is not on disk.
            status, replicas, _ = await served.call("GET", "/v1/components/Decode/replicas")
            assert status == 200
            assert (replicas["desired"], replicas["running"], replicas["ready"]) == (3, 1, 1)
            assert on_disk_target(store, "Decode") == 1
            assert [r.pid for r in conn.state.replicas_of("Decode")] == [first.pid, None, None]
            # A restart answers the same; it too is kept, and carried out once writable.
            status, body, _ = await served.call(
                "POST", "/v1/components/Decode/restart", body={}, token="t0ken"
            )
            assert (status, body) == (503, expected)
        finally:
            make_writable(store)
        # Writable again: the loop's next pass writes everything and carries it out.
        await wait_until(
            lambda: [r.phase for r in conn.state.replicas_of("Decode")] == ["ready"] * 3,
            limit_s=15,
        )
        on_disk = json.loads(store.path.read_text())
        assert on_disk["components"]["Decode"]["target"] == 3
        status, replicas, _ = await served.call("GET", "/v1/components/Decode/replicas")
        assert (replicas["desired"], replicas["running"], replicas["ready"]) == (3, 3, 3)
        pids = [r.pid for r in conn.state.replicas_of("Decode")]
        assert all(alive(pid) for pid in pids) and len(set(pids)) == 3
        # The restart asked for meanwhile was carried out too: the first replica is replaced.
        assert first.pid not in pids and not alive(first.pid)
        await wait_until(
            lambda: (
                sorted(r["phase"] for r in json.loads(store.path.read_text())["replicas"].values())
                == ["ready"] * 3
            )
        )


async def test_a_waiting_scale_hears_at_once_when_writes_start_failing(tmp_path: Path) -> None:
    """Writes that start failing while a scale waits end the wait with the 503 at once, not
    at its timeout (nothing can start or stop until its record is written); the target is
    kept and carried out once the dir is writable."""
    graph = make_graph(
        svc(
            "Decode",
            max_replicas=3,
            readiness=Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=2.0),
        ),
        name="sw",
    )
    async with serve(tmp_path, graph, token="t0ken") as served:
        conn = served.connector
        store = conn.store
        waiting = asyncio.ensure_future(
            served.call(
                "PUT",
                "/v1/components/Decode/replicas",
                body={"replicas": 3, "wait": True, "timeout_s": 60},
                token="t0ken",
            )
        )
        await wait_until(
            lambda: [r.phase for r in conn.state.replicas_of("Decode")] == ["starting"] * 3
        )
        make_unwritable(store, "symlink to /dev/full")
        try:
            t0 = time.monotonic()
            status, body, resp = await asyncio.wait_for(waiting, 30)
            assert time.monotonic() - t0 < 10  # the 2 s grace ends, its write fails: 503
            assert (status, resp.headers["Retry-After"]) == (503, "5")
            assert body["error"]["code"] == "state_unwritable"
            assert body["error"]["details"]["errno"] == "ENOSPC"
            assert conn.view(replicas=False).component("Decode").desired == 3  # kept
        finally:
            make_writable(store)
        await wait_until(
            lambda: [r.phase for r in conn.state.replicas_of("Decode")] == ["ready"] * 3,
            limit_s=15,
        )
        assert on_disk_target(store, "Decode") == 3
