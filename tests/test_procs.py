"""Process helpers: the process table (read from several threads at once: tree walks of
stops, group kills, the exporter's sampler; what each reads must be its own, and the fast
/proc read must give psutil's numbers), and stopping a replica's process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from connector.supervision import proc_table, procs


def test_process_table_shares_no_object_with_psutil_process_iter() -> None:
    """psutil.process_iter keeps one global map of Process objects and sets their ``info`` on
    every call, so two threads iterating at once read each other's attributes (psutil
    #1991); process_table must hand out objects and dicts of its own."""
    cached = {proc.pid: proc for proc in psutil.process_iter(["ppid"])}
    rows = {proc.pid: (proc, info) for proc, info in procs.process_table(["ppid", "status"])}
    common = cached.keys() & rows.keys()
    assert os.getpid() in common
    assert all(rows[pid][0] is not cached[pid] for pid in common)
    assert all(rows[pid][1] is not cached[pid].info for pid in common)
    assert all(set(info) == {"ppid", "status"} for _, info in rows.values())
    assert rows[os.getpid()][1]["ppid"] == os.getppid()


def _sleeper(tmp_path: Path, name: str, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``sleep`` under another name: the kernel's ``comm`` is the executable's name."""
    exe = tmp_path / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    return subprocess.Popen([str(exe), *args], **kwargs)


def test_proc_table_reads_parent_group_and_start_as_psutil_does(tmp_path: Path) -> None:
    """One read of /proc/<pid>/stat gives the numbers psutil gives, also for a process whose
    name holds a space and ')' (the name field is parenthesised and may hold anything)."""
    child = _sleeper(tmp_path, "x) (y", "60", start_new_session=True)
    try:
        rows = {row.pid: row for row in proc_table.scan()}
        me, it = rows[os.getpid()], rows[child.pid]
        assert (me.ppid, me.pgrp, me.zombie) == (os.getppid(), os.getpgid(0), False)
        assert (it.ppid, it.pgrp, it.zombie) == (os.getpid(), child.pid, False)
        assert psutil.Process(child.pid).name() == "x) (y"
        assert it.create_time == pytest.approx(psutil.Process(child.pid).create_time(), abs=1e-6)
        assert me.create_time == pytest.approx(psutil.Process().create_time(), abs=1e-6)
        assert len(rows) == len(set(psutil.pids()) & rows.keys()) >= 2
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert {row.pid: row for row in proc_table.scan()}[child.pid].zombie
    finally:
        child.kill()
        child.wait()


def test_identity_checks_read_stat_once_and_tell_running_zombie_gone_and_recycled(
    tmp_path: Path,
) -> None:
    """The loop's check that every running replica is still the process it recorded: running
    and recorded, a zombie (exited, not reaped), a recorded start that differs (the pid
    reused by another process) and a pid that is gone; create times as psutil gives them."""
    alive = _sleeper(tmp_path, "alive", "60")
    dead = _sleeper(tmp_path, "dead", "60")
    try:
        created = psutil.Process(alive.pid).create_time()
        assert procs.create_time_of(alive.pid) == pytest.approx(created, abs=1e-6)
        dead_created = procs.create_time_of(dead.pid)
        dead.kill()
        os.waitid(os.P_PID, dead.pid, os.WEXITED | os.WNOWAIT)  # a zombie now
        gone = subprocess.Popen(["true"])
        gone.wait()
        recorded = [
            (alive.pid, created),
            (dead.pid, dead_created),
            (os.getpid(), psutil.Process().create_time() - 5.0),  # another process's start
            (gone.pid, None),
            (os.getpid(), None),  # no start recorded: running is enough
        ]
        assert procs.running_as_recorded(recorded) == {alive.pid, os.getpid()}
        assert procs.running_as_recorded(recorded[:4]) == {alive.pid}
        assert procs.same_process(alive.pid, created)
        assert not procs.same_process(alive.pid, created + 0.5)
        assert not procs.same_process(dead.pid, dead_created)
        assert not procs.same_process(None, None)
        assert procs.create_time_of(gone.pid) is None
    finally:
        for child in (alive, dead):
            child.kill()
            child.wait()


def test_children_map_is_the_psutil_parent_map() -> None:
    by_psutil: dict[int, set[int]] = {}
    for proc, info in procs.process_table(["ppid"]):
        by_psutil.setdefault(info["ppid"], set()).add(proc.pid)
    ours = {
        ppid: set(kids) for ppid, kids in proc_table.children_by_parent(proc_table.scan()).items()
    }
    # processes may start or end between the two reads: compare this process's own tree
    assert ours.get(os.getpid(), set()) == by_psutil.get(os.getpid(), set())
    assert ours[os.getppid()] >= {os.getpid()}


async def test_a_leader_that_exits_on_sigterm_is_terminated_at_once() -> None:
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        t0 = time.monotonic()
        assert await procs.terminate_group_async(child.pid, 10.0) == "terminated"
        assert time.monotonic() - t0 < 5.0  # the pidfd fired, not the 10 s grace
        assert child.wait(5) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


async def test_a_leader_that_ignores_sigterm_is_killed_after_its_grace() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(1, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"1\n"
        t0 = time.monotonic()
        assert await procs.terminate_group_async(child.pid, 0.5) == "killed"
        assert 0.5 <= time.monotonic() - t0 < 5.0
        assert child.wait(5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


async def test_a_child_in_a_session_of_its_own_is_stopped_with_its_leader() -> None:
    """The group signal misses a child that called setsid; the tree walk reaches it."""
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    grandchild = None
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        assert os.getpgid(grandchild) == grandchild != child.pid
        created = psutil.Process(grandchild).create_time()
        assert await procs.terminate_group_async(child.pid, 5.0) == "terminated"
        assert child.wait(5) == -signal.SIGTERM
        assert not procs.same_process(grandchild, created)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
        if grandchild is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)


async def test_walks_asked_together_share_one_read_and_none_sees_an_older_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fifty stops walking their trees at once read the process table once; a walk asked
    while a read is under way gets the next read, so it sees a child born meanwhile."""
    reads: list[float] = []
    first_read_started = threading.Event()
    release_first_read = threading.Event()
    real = procs.process_tree

    def counted() -> proc_table.ProcessTree:
        table = real()
        reads.append(time.monotonic())
        if len(reads) == 1:  # read; held until a child is born and another walk asked
            first_read_started.set()
            release_first_read.wait(10)
        return table

    monkeypatch.setattr(procs, "process_tree", counted)
    me = os.getpid()
    first = asyncio.gather(*(procs.tree_pids_async(me) for _ in range(50)))
    await asyncio.to_thread(first_read_started.wait, 10)
    child = subprocess.Popen(["sleep", "60"])  # born while the first read is under way
    try:
        later = asyncio.ensure_future(procs.tree_pids_async(me))
        await asyncio.sleep(0.05)
        assert not later.done()  # waits for a read that begins after it was asked
        release_first_read.set()
        trees = await first
        # fifty walks, all answered by the first read (it was made before the child)
        assert all(me in tree and child.pid not in tree for tree in trees)
        assert child.pid in await later
        assert len(reads) == 2
    finally:
        release_first_read.set()
        child.kill()
        child.wait()


def _group_with_leftovers() -> tuple[subprocess.Popen[bytes], float, list[int]]:
    """A replica whose leader died and left two children in its process group."""
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & sleep 60 & echo started; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert leader.stdout is not None and leader.stdout.readline() == b"started\n"
    created = psutil.Process(leader.pid).create_time()
    kids = [p.pid for p in psutil.Process(leader.pid).children()]
    assert len(kids) == 2 and all(os.getpgid(k) == leader.pid for k in kids)
    leader.kill()
    leader.wait()
    assert leader.stdout is not None
    leader.stdout.close()
    return leader, created, kids


def test_kill_groups_kills_every_leftover_of_the_groups_named_and_nothing_else() -> None:
    """When circusd dies every replica's group is cleared from one read of the table;
    a group not named, and processes older than their replica, are left alone."""
    first, first_created, first_kids = _group_with_leftovers()
    second, second_created, second_kids = _group_with_leftovers()
    third, _, third_kids = _group_with_leftovers()
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        killed = procs.kill_groups(
            [
                (first.pid, first_created),
                (second.pid, second_created),
                (third.pid, time.time() + 100),  # "started later": these are not its own
            ]
        )
        assert sorted(killed) == sorted(first_kids + second_kids)
        assert all(
            not psutil.pid_exists(k) or psutil.Process(k).status() == "zombie" for k in killed
        )
        assert all(procs.same_process(k, None) for k in third_kids)
        assert stranger.poll() is None
    finally:
        for pid in first_kids + second_kids + third_kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stranger.kill()
        stranger.wait()


async def test_a_stop_cancelled_while_it_signals_leaves_no_pidfd_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newer plan may cancel a stop while its thread identifies and signals the group;
    the thread goes on, and the pidfd it opened for the leader is closed when it ends."""
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    in_thread = threading.Event()
    real = procs.identify

    def slow_identify(pids: Any) -> dict[int, float]:
        in_thread.set()
        time.sleep(0.3)
        return real(pids)

    monkeypatch.setattr(procs, "identify", slow_identify)
    try:
        fds_before = len(os.listdir("/proc/self/fd"))
        stop = asyncio.ensure_future(procs.terminate_group_async(child.pid, 5.0))
        await asyncio.to_thread(in_thread.wait, 5)
        stop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stop
        assert child.wait(5) == -signal.SIGTERM  # the thread went on and signalled
        await asyncio.sleep(0.1)  # its result, and the pidfd, are handled on the loop
        assert len(os.listdir("/proc/self/fd")) == fds_before
    finally:
        child.kill()
        child.wait()
