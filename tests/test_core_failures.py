"""Crashes, crash loops, orphans, re-adoption and locking with real circusd and processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from connector.errors import CrashLoop, NamespaceLocked
from connector.graph.model import Readiness, ReadinessKind, RestartMode, RestartPolicy
from connector.local import LocalConnector
from tests.core_helpers import (
    FAST_RESTART,
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


async def test_sigkilled_replica_is_replaced_with_exit_recorded(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", replicas=2, restart=FAST_RESTART))
    async with running(graph, tmp_path) as conn:
        await conn.scale_component("Decode", 2, timeout_s=10)
        before = pids(conn, "Decode")
        victim = before["Decode/2"]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        await wait_until(
            lambda: (
                phases(conn, "Decode")["Decode/2"] == "ready"
                and pids(conn, "Decode")["Decode/2"] not in (None, victim)
            ),
            limit_s=10,
        )
        rec = conn.state.replicas_of("Decode")[1]
        assert rec.restarts == 1
        assert rec.last_exit is not None and rec.last_exit.code == -signal.SIGKILL
        assert rec.last_exit.reason == "killed by SIGKILL"
        assert pids(conn, "Decode")["Decode/1"] == before["Decode/1"]  # untouched
        assert replica_ids(conn, "Decode") == ["Decode/1", "Decode/2"]
        exits = kinds(conn, "exit", "Decode")
        assert [(e.replica, e.details["exit_code"]) for e in exits] == [("Decode/2", -9)]
        listing = {c["name"]: c for c in await conn.list_components()}
        assert listing["Decode"]["restarts"] == 1


async def test_a_fixed_spec_clears_the_crash_loop_on_the_next_up(tmp_path: Path) -> None:
    """As Kubernetes resets CrashLoopBackOff on a new pod spec: the user fixes the command
    and runs ``up`` again; an unchanged spec stays in its crash loop."""
    policy = RestartPolicy(backoff_base_s=0.05, backoff_max_s=0.1, crashloop_failures=2)
    broken = make_graph(svc("Broken", python_cmd("import sys; sys.exit(3)"), restart=policy))
    async with running(broken, tmp_path) as conn:
        assert await conn.scale_component("Broken", 1, timeout_s=15) is False
        assert conn.state.components["Broken"].crashloop is True
    async with running(broken, tmp_path) as conn:  # the same spec: still looping
        comp = conn.state.components["Broken"]
        assert comp.crashloop is True
        (adopt,) = kinds(conn, "adopt")
        assert adopt.reason is None
        assert "crashloop_cleared" not in adopt.details
        with pytest.raises(CrashLoop, match="Broken is in crashloop"):
            await conn.scale_component("Broken", 1)
    fixed = make_graph(svc("Broken", restart=policy))  # `sleep 300`: it runs now
    async with running(fixed, tmp_path) as conn:
        comp = conn.state.components["Broken"]
        assert (comp.crashloop, comp.crashloop_reason, comp.failures) == (False, None, [])
        (adopt,) = kinds(conn, "adopt")
        assert adopt.details["crashloop_cleared"] == ["Broken"]
        assert adopt.reason == (
            "crash loop cleared for Broken: the spec (command, args, env or resources) "
            "differs from the one that crash-looped"
        )
        assert await conn.scale_component("Broken", 1, timeout_s=15) is True
        ready = [r for r in conn.state.replicas_of("Broken") if r.phase == "ready"]
        assert len(ready) == 1
        assert psutil.Process(ready[0].pid).cmdline()[-2:] == ["sleep", "300"]
        listing = {c["name"]: c for c in await conn.list_components()}
        assert listing["Broken"]["status"] == "running"


async def test_instantly_exiting_component_reaches_crashloop_and_stops_spawning(
    tmp_path: Path,
) -> None:
    policy = RestartPolicy(backoff_base_s=0.05, backoff_max_s=0.1, crashloop_failures=4)
    # A start-up grace the crashing interpreter never outlives, even on a loaded machine
    # (0.1 s was not always enough for Python to start and exit): it must never count as
    # ready before it exits.
    graph = make_graph(
        svc(
            "Broken",
            python_cmd("import sys; print('bad config'); sys.exit(3)"),
            restart=policy,
            readiness=Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.5),
        )
    )
    async with running(graph, tmp_path) as conn:
        ok = await conn.scale_component("Broken", 1, timeout_s=15)
        assert ok is False
        comp = conn.state.components["Broken"]
        assert comp.crashloop is True
        assert comp.crashloop_reason is not None
        assert comp.crashloop_reason.startswith("4 failures within 300 s; last: Broken/1")
        assert "code 3" in comp.crashloop_reason
        listing = {c["name"]: c for c in await conn.list_components()}
        assert listing["Broken"]["status"] == "crashloop"
        assert listing["Broken"]["crashloops"] == 1
        starts = len(kinds(conn, "spawn", "Broken")) + len(kinds(conn, "restart", "Broken"))
        assert starts == 4
        await asyncio.sleep(1.0)  # no further spawns, however long we wait
        assert len(kinds(conn, "spawn", "Broken")) + len(kinds(conn, "restart", "Broken")) == 4
        crash = kinds(conn, "crashloop", "Broken")
        assert len(crash) == 1
        assert any("bad config" in line for line in crash[0].details["last_lines"])
        # The crashed replica's logs stay readable.
        lines = await conn.get_component_logs("Broken", lines=10)
        assert sum("bad config" in line for line in lines) == 4
        assert all(line.startswith("[Broken/1 stdout] ") for line in lines if "bad" in line)
        with pytest.raises(CrashLoop, match="Broken is in crashloop"):
            await conn.scale_component("Broken", 1)
        # restart_component clears the crash loop (and it loops again, being broken).
        assert await conn.restart_component("Broken", timeout_s=15) is False
        assert conn.state.components["Broken"].crashloops_total == 2


async def test_restart_policy_never_leaves_replica_exited(tmp_path: Path) -> None:
    graph = make_graph(
        svc(
            "Job",
            python_cmd("import sys; sys.exit(0)"),
            restart=RestartPolicy(mode=RestartMode.NEVER),
            readiness=Readiness(kind=ReadinessKind.NONE),
        )
    )
    async with running(graph, tmp_path) as conn:
        await conn.scale_component("Job", 1, blocking=False)
        await wait_until(lambda: phases(conn, "Job") == {"Job/1": "exited"})
        await asyncio.sleep(0.5)
        assert phases(conn, "Job") == {"Job/1": "exited"}
        assert conn.state.components["Job"].failures == []
        listing = {c["name"]: c for c in await conn.list_components()}
        assert listing["Job"]["status"] == "degraded"
        # "exited at once: ..." when it was gone before circusd could list it.
        assert listing["Job"]["reason"].endswith("exited with code 0")


async def test_graceful_stop_escalates_to_sigkill_of_the_group(tmp_path: Path) -> None:
    # The replica ignores SIGTERM and has a child in its group that ignores it too.
    code = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
        print("child", child.pid, flush=True)
        time.sleep(300)
        """
    )
    graph = make_graph(svc("Stubborn", python_cmd(code), graceful_stop_s=0.5))
    async with running(graph, tmp_path) as conn:
        await conn.scale_component("Stubborn", 1, timeout_s=10)
        leader = pids(conn, "Stubborn")["Stubborn/1"]
        assert leader is not None
        await wait_until(lambda: len(psutil.Process(leader).children()) == 1)
        child = psutil.Process(leader).children()[0].pid
        t0 = time.monotonic()
        assert await conn.scale_component("Stubborn", 0, timeout_s=10)
        took = time.monotonic() - t0
        assert 0.5 <= took < 5
        assert not alive(leader) and not alive(child)
        stop = kinds(conn, "stop", "Stubborn")[-1]
        assert stop.details == {"how": "killed"}


async def test_sigkill_circusd_leaves_no_orphan_and_recovers(tmp_path: Path) -> None:
    code = "import subprocess,sys,time; subprocess.Popen(['sleep','300']); time.sleep(300)"
    graph = make_graph(svc("Decode", python_cmd(code), replicas=2, restart=FAST_RESTART))
    async with running(graph, tmp_path) as conn:
        await conn.scale_component("Decode", 2, timeout_s=10)
        leaders = [p for p in pids(conn, "Decode").values() if p]
        await wait_until(lambda: all(len(psutil.Process(p).children()) == 1 for p in leaders))
        everyone = {c.pid for p in leaders for c in psutil.Process(p).children()} | set(leaders)
        assert conn.supervisor.info is not None and conn.supervisor.info.pid is not None
        os.kill(conn.supervisor.info.pid, signal.SIGKILL)
        # No replica process, nor anything it started, survives its supervisor.
        await wait_until(lambda: not any(alive(p) for p in everyone), limit_s=5)
        # And the connector starts a new circusd and brings the replicas back.
        await wait_until(
            lambda: (
                phases(conn, "Decode") == {"Decode/1": "ready", "Decode/2": "ready"}
                and not (set(pids(conn, "Decode").values()) & everyone)
            ),
            limit_s=15,
        )
        assert [e.outcome for e in kinds(conn, "supervisor")] == ["failed", "ok"]


def _connector_script(working_dir: Path, graph_file: Path) -> str:
    return textwrap.dedent(
        f"""
        import asyncio, pickle, sys
        sys.path.insert(0, {str(Path.cwd())!r})
        from connector.local import LocalConnector
        from tests.core_helpers import options

        async def main():
            graph = pickle.loads(open({str(graph_file)!r}, "rb").read())
            conn = LocalConnector("t", graph, __import__("pathlib").Path({str(working_dir)!r}),
                                  options())
            await conn.initialize()
            await conn.scale_component("Decode", 2, timeout_s=20)
            print("READY", flush=True)
            await asyncio.sleep(300)

        asyncio.run(main())
        """
    )


async def test_sigkilled_connector_replicas_are_readopted_not_duplicated(tmp_path: Path) -> None:
    import pickle

    graph = make_graph(svc("Decode", max_replicas=4))
    graph_file = tmp_path / "graph.pickle"
    graph_file.write_bytes(pickle.dumps(graph))
    wd = tmp_path / "wd"
    proc = subprocess.Popen(
        [sys.executable, "-c", _connector_script(wd, graph_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "READY"
        state = json.loads((wd / "state.json").read_text())
        old = {r["watcher"]: r["pid"] for r in state["replicas"].values()}
        assert len(old) == 2
        proc.kill()
        proc.wait()
        assert all(alive(p) for p in old.values())  # circusd keeps them running
        async with running(graph, wd) as conn:
            assert pids(conn, "Decode") == {
                "Decode/1": old["t.decode.1"],
                "Decode/2": old["t.decode.2"],
            }
            await asyncio.sleep(0.5)  # a few reconcile passes: nothing new is spawned
            assert kinds(conn, "spawn") == []
            adopt = kinds(conn, "adopt")[0]
            assert sorted(adopt.details["adopted"]) == ["Decode/1", "Decode/2"]
            assert phases(conn, "Decode") == {"Decode/1": "ready", "Decode/2": "ready"}
            assert await conn.scale_component("Decode", 3, timeout_s=10)
            assert replica_ids(conn, "Decode") == ["Decode/1", "Decode/2", "Decode/3"]
        assert not any(alive(p) for p in old.values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_detached_shutdown_keeps_replicas_for_the_next_connector(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", replicas=1))
    conn = LocalConnector("t", graph, tmp_path, options())
    await conn.initialize()
    await conn.scale_component("Decode", 1, timeout_s=10)
    pid = pids(conn, "Decode")["Decode/1"]
    await conn.shutdown(detach=True)
    await conn.shutdown(detach=True)  # idempotent
    assert alive(pid)
    async with running(graph, tmp_path) as again:
        assert pids(again, "Decode") == {"Decode/1": pid}
    assert not alive(pid)


async def test_second_connector_on_the_same_namespace_is_refused(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode"))
    async with running(graph, tmp_path):
        other = LocalConnector("t", graph, tmp_path, options())
        with pytest.raises(NamespaceLocked, match=r"another dynamo-local connector \(pid \d+\)"):
            await other.initialize()


async def test_stray_watchers_of_our_namespace_are_removed_on_start(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", replicas=1))
    conn = LocalConnector("t", graph, tmp_path, options())
    await conn.initialize()
    await conn.scale_component("Decode", 1, timeout_s=10)
    assert conn.reconciler is not None
    # Someone adds a watcher in our namespace behind our back.
    await conn.reconciler.channel.call(
        "add", name="t.decode.99", cmd="sleep", args=["300"], start=True, waiting=True
    )
    stray = (await conn.reconciler.channel.call("list", name="t.decode.99"))["pids"][0]
    await conn.shutdown(detach=True)
    async with running(graph, tmp_path) as again:
        assert kinds(again, "adopt")[0].details["stray"] == ["t.decode.99"]
        assert not alive(stray)
        assert replica_ids(again, "Decode") == ["Decode/1"]


async def test_a_log_file_that_cannot_be_made_fails_the_spawn_with_its_reason(
    tmp_path: Path,
) -> None:
    # The connector makes a replica's log files before circusd's add: a path it cannot
    # create (here a folder sits there) is a failed spawn with the reason, then backoff.
    graph = make_graph(svc("Decode", replicas=0, restart=FAST_RESTART))
    async with running(graph, tmp_path) as conn:
        blocked = tmp_path / "logs" / "t.decode.1.stdout.log"
        blocked.mkdir(parents=True)
        await conn.scale_component("Decode", 1, blocking=False)
        await wait_until(lambda: kinds(conn, "spawn", "Decode"), limit_s=10)
        first = kinds(conn, "spawn", "Decode")[0]
        assert first.outcome == "failed"
        assert first.reason.startswith("[Errno 21] Is a directory")
        assert str(blocked) in first.reason
        assert phases(conn, "Decode")["Decode/1"] in ("backoff", "spawning")
        blocked.rmdir()
        await wait_until(lambda: phases(conn, "Decode")["Decode/1"] == "ready", limit_s=15)
