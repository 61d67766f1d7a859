"""The launcher every replica starts through: the kernel kills the replica when its
supervisor dies (parent-death signal), pinned cores are applied, and the replica keeps the
launcher's PID (exec). Both the util-linux path and the Python fallback run for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from connector.graph.model import ResourceRequest
from connector.supervision import launcher
from tests.core_helpers import alive, make_graph, pids, running, svc, wait_until

ROOT = Path(__file__).resolve().parent.parent
FALLBACK = [sys.executable, "-m", "connector.supervision.launcher"]


def without_tools(monkeypatch: pytest.MonkeyPatch, *missing: str) -> None:
    real = launcher._tool
    monkeypatch.setattr(launcher, "_tool", lambda name: None if name in missing else real(name))


def test_prefix_uses_setpriv_and_taskset_when_both_exist() -> None:
    setpriv, taskset = launcher._tool("setpriv"), launcher._tool("taskset")
    if not (setpriv and taskset):
        pytest.skip("util-linux setpriv/taskset missing")
    assert launcher.launcher_prefix() == [setpriv, "--pdeathsig", "KILL", "--"]
    assert launcher.launcher_prefix((0, 3)) == [
        setpriv, "--pdeathsig", "KILL", "--", taskset, "-c", "0,3",
    ]  # fmt: skip


def test_prefix_falls_back_to_this_module_for_whatever_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    without_tools(monkeypatch, "taskset")
    # No taskset: the fallback pins, so pinning is never dropped in silence.
    assert launcher.launcher_prefix((1,)) == [*FALLBACK, "--cpus", "1", "--"]
    without_tools(monkeypatch, "setpriv", "taskset")
    assert launcher.launcher_prefix() == [*FALLBACK, "--"]
    assert launcher.launcher_prefix((0, 1)) == [*FALLBACK, "--cpus", "0,1", "--"]


def run_fallback(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FALLBACK, *args], capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_fallback_pins_and_execs_in_place() -> None:
    core = sorted(os.sched_getaffinity(0))[-1]
    script = "import os; print(os.getpid(), os.getppid(), sorted(os.sched_getaffinity(0)))"
    proc = subprocess.Popen(
        [*FALLBACK, "--cpus", str(core), "--", sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    out, _ = proc.communicate(timeout=30)
    # Same PID as the launcher started with (exec, no child), our child, pinned to one core.
    assert out.split(None, 2) == [str(proc.pid), str(os.getpid()), f"[{core}]\n"]
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, launcher.USAGE),
        (("--cpus", "x", "--", "true"), 2, "launcher: --cpus takes core numbers like 0,2"),
        (("--cpus", "4096", "--", "true"), 1, "launcher: cannot pin to CPUs [4096]: "),
        (("--", "no-such-command-here"), 127, "launcher: cannot run 'no-such-command-here': "),
    ],
)
def test_fallback_errors_are_one_clear_line(args: tuple[str, ...], code: int, message: str) -> None:
    result = run_fallback(*args)
    assert result.returncode == code
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("missing", [(), ("setpriv", "taskset")], ids=["util-linux", "fallback"])
def test_the_replica_dies_with_its_supervisor(
    monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...]
) -> None:
    if not missing and not launcher._tool("setpriv"):
        pytest.skip("util-linux setpriv missing")
    without_tools(monkeypatch, *missing)
    prefix = launcher.launcher_prefix((sorted(os.sched_getaffinity(0))[0],))
    # A stand-in supervisor: starts the replica through the launcher, prints its PID, waits.
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen({[*prefix, 'sleep', '300']!r})\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert supervisor.stdout is not None
        replica = int(supervisor.stdout.readline())
        deadline = time.monotonic() + 10
        # Up once it has exec'd sleep (the launcher keeps the PID).
        while psutil.Process(replica).name() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(10)
        deadline = time.monotonic() + 10
        while alive(replica):
            assert time.monotonic() < deadline, "the replica outlived its supervisor"
            time.sleep(0.02)
    finally:
        supervisor.kill()
        supervisor.wait()
        if supervisor.stdout is not None:
            supervisor.stdout.close()


@pytest.mark.integration
@pytest.mark.parametrize("missing", [(), ("taskset",)], ids=["taskset", "fallback"])
async def test_a_pinned_replica_runs_on_its_reserved_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...]
) -> None:
    without_tools(monkeypatch, *missing)
    pinned = ResourceRequest(cpu=1, pin_cpus=True)
    graph = make_graph(svc("Pinned", max_replicas=1, resources=pinned))
    async with running(graph, tmp_path / "wd") as conn:
        assert await conn.scale_component("Pinned", 1, timeout_s=30) is True
        (rec,) = conn.state.replicas_of("Pinned")
        pid = pids(conn, "Pinned")["Pinned/1"]
        assert pid is not None and rec.reservation is not None
        # Ready is "alive for its start-up grace": the launcher pins the cores and then
        # execs sleep on its own time (the Python fallback starts an interpreter first).
        await wait_until(lambda: psutil.Process(pid).name() == "sleep")
        assert psutil.Process(pid).cpu_affinity() == rec.reservation["cpus"]
        assert len(rec.reservation["cpus"]) == 1
        assert psutil.Process(pid).name() == "sleep"  # exec'd in place, whatever the path
