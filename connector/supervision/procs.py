"""Process helpers: identity, trees, exit notification and process-group termination.

Replicas run in their own session (Circus calls ``setsid`` before exec), so a replica's
process group id is its pid, and a group kill reaches everything it started unless a child
moved itself to a new session; those are caught by walking the tree as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import psutil

from connector.supervision import proc_table
from connector.supervision.batched import Batched, Outcome


def same_process(pid: int | None, create_time: float | None) -> bool:
    """True when ``pid`` runs and is the process that was recorded (not a recycled pid)."""
    if pid is None:
        return False
    return pid in running_as_recorded([(pid, create_time)])


def running_as_recorded(recorded: Iterable[tuple[int, float | None]]) -> set[int]:
    """Of the ``(pid, create time)`` pairs, the pids that run (not zombies) and are the
    processes recorded (not recycled pids): one read of each pid's stat file."""
    wanted = list(recorded)
    found = proc_table.rows(pid for pid, _ in wanted)
    alive: set[int] = set()
    for pid, create_time in wanted:
        row = found.get(pid)
        if row is None or row.zombie:
            continue
        if create_time is None or abs(row.create_time - create_time) < 0.01:
            alive.add(pid)
    return alive


def create_time_of(pid: int) -> float | None:
    row = proc_table.rows([pid]).get(pid)
    return row.create_time if row is not None else None


def tree(pid: int, snapshot: proc_table.ProcessTree | None = None) -> list[psutil.Process]:
    """The process and all its descendants that are still alive, from ``snapshot`` (one
    :func:`process_tree` for many trees) or read now."""
    found: list[psutil.Process] = []
    for member in sorted((snapshot or process_tree()).of(pid)):
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(member))
    return found


def tree_rss(pid: int, snapshot: proc_table.ProcessTree | None = None) -> int:
    """Resident memory of the process and its descendants, summed (what the exporter shows
    as a replica's RSS). Processes that vanish meanwhile count as 0."""
    total = 0
    for proc in tree(pid, snapshot):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def process_table(attrs: Sequence[str]) -> Iterator[tuple[psutil.Process, dict[str, Any]]]:
    """Every process, with ``attrs`` read now (blocking: /proc). Not ``psutil.process_iter``:
    that keeps one global map of Process objects and sets their ``info`` on each call, so two
    threads iterating at once (tree walks, group kills, a sampler) read each other's
    attributes or fail (psutil #1991); fresh objects share nothing."""
    for pid in psutil.pids():
        try:
            proc = psutil.Process(pid)
            yield proc, proc.as_dict(list(attrs))
        except psutil.Error:
            continue  # gone meanwhile


def tree_pids(pid: int | None) -> set[int]:
    """``pid`` and its descendants, read now (blocking: reads /proc, call it in a thread;
    for many trees read one :func:`process_tree`)."""
    return process_tree().of(pid)


def process_tree() -> proc_table.ProcessTree:
    """Every process's children, read now (blocking: /proc)."""
    return proc_table.ProcessTree.read()


def _shared_reads_of_the_tree() -> Batched[None, proc_table.ProcessTree]:
    """Reads of the process tree shared by every walk asked for on one loop: a walk asked
    while a read is under way waits for the next read, which begins after it was asked, so
    no walk sees a table older than itself (a child that just left its process group is
    found), and N stops at once make a few reads, not N (each costs ~35 ms with 2,000
    processes running)."""

    def read_for_all(asked: list[None]) -> list[Outcome[proc_table.ProcessTree]]:
        tree = process_tree()
        return [tree] * len(asked)

    return Batched(read_for_all, "process-tree")


_shared_reads: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, Batched[None, proc_table.ProcessTree]
] = weakref.WeakKeyDictionary()


async def _shared_read() -> proc_table.ProcessTree:
    loop = asyncio.get_running_loop()
    reads = _shared_reads.get(loop)
    if reads is None:
        reads = _shared_reads[loop] = _shared_reads_of_the_tree()
    return await reads(None)


async def tree_pids_async(pid: int | None) -> set[int]:
    """:func:`tree_pids` from a read shared with the walks asked at the same time."""
    if not pid:
        return set()
    return (await _shared_read()).of(pid)


def signal_group(pid: int, sig: int, members: Collection[int] | None = None) -> None:
    """Signal the process group led by ``pid``, and every descendant outside it (``members``:
    the tree when the caller has just walked it)."""
    if members is None:
        members = tree_pids(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for member in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, sig)


def terminate_group(pid: int, graceful_s: float) -> str:
    """SIGTERM the group, wait up to ``graceful_s``, then SIGKILL what is left.

    Blocking: call it in a thread. Returns ``"terminated"`` or ``"killed"``.
    """
    members = tree(pid)
    if not members:
        return "terminated"
    signal_group(pid, signal.SIGTERM, [proc.pid for proc in members])
    _, alive = psutil.wait_procs(members, timeout=graceful_s)
    if not alive:
        return "terminated"
    signal_group(pid, signal.SIGKILL)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return "killed"


def _pidfd_of(pid: int, create_time: float | None) -> int | None:
    """A pidfd for ``pid`` while it is still the process identified as ``create_time``
    (blocking: it reads /proc). None when it is gone or pidfds are not available here."""
    if create_time is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if not same_process(pid, create_time):  # exited, and the pid maybe reused, meanwhile
        os.close(fd)
        return None
    return fd


async def _until_readable(fd: int, timeout_s: float) -> bool:
    """Wait for a pidfd to turn readable (its process exited; a zombie counts: circusd
    reaps its children only every check_delay), at most ``timeout_s``; closes ``fd``."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await asyncio.wait_for(exited, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def terminate_group_async(
    pid: int, graceful_s: float, members: set[int] | None = None
) -> str:
    """:func:`terminate_group` without holding a thread for the grace period: SIGTERM the
    group, wait for the leader on a pidfd and for the rest of its tree, then SIGKILL what is
    left. Returns ``"terminated"`` or ``"killed"``. ``members``: the tree, when the caller
    has just walked it (else it is walked here).

    Nothing here reads /proc on the loop: with hundreds of stops at once and the worker
    threads busy, the few reads a stop made on the loop (its leader's state, its tree's)
    held it up to ~30 ms a step. The leader's pidfd is opened in the thread, before the
    signal, so it fires even when the leader exits at once; a replica with no other process
    ends with no further read."""

    def term(members: set[int]) -> tuple[dict[int, float], int | None]:  # /proc: a thread
        found = identify(members)
        fd = _pidfd_of(pid, found.get(pid))
        if found:
            signal_group(pid, signal.SIGTERM, members)
        return found, fd

    def kill(alive: set[int]) -> None:
        signal_group(pid, signal.SIGKILL)  # walked again: what it started meanwhile too
        for other in alive:
            with contextlib.suppress(psutil.Error):
                psutil.Process(other).kill()

    walked = members if members is not None else await tree_pids_async(pid)
    signalled = asyncio.ensure_future(asyncio.to_thread(term, walked))
    try:
        running_now, fd = await asyncio.shield(signalled)
    except asyncio.CancelledError:  # the thread goes on: the pidfd it opens is closed then
        signalled.add_done_callback(_close_pidfd_of)
        raise
    deadline = time.monotonic() + graceful_s
    leader_gone = pid not in running_now
    if fd is not None:
        leader_gone = await _until_readable(fd, graceful_s)
    if leader_gone and running_now.keys() <= {pid}:
        return "terminated"
    # The rest of the tree was signalled with the group: gone at once, as a rule; all of
    # it shares the one grace period (and without a pidfd, the leader too).
    alive = await _until_gone(running_now, max(0.0, deadline - time.monotonic()))
    if not alive:
        return "terminated"
    await asyncio.to_thread(kill, alive)
    await _until_gone(running_now, 5.0)
    return "killed"


def _close_pidfd_of(done: asyncio.Future[tuple[dict[int, float], int | None]]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    fd = done.result()[1]
    if fd is not None:
        os.close(fd)


async def _until_gone(members: Mapping[int, float], timeout_s: float) -> set[int]:
    """Those of ``members`` still running after waiting up to ``timeout_s`` for them (each
    look in a thread: it reads /proc)."""
    deadline = time.monotonic() + timeout_s
    alive = await asyncio.to_thread(running, members)
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        alive = await asyncio.to_thread(running, members)
    return alive


def kill_leftovers(pgid: int, not_before: float | None) -> list[int]:
    """SIGKILL every process still in the group ``pgid`` that a replica started.

    When a replica's leader is already dead its children may live on, reparented and out of
    reach of a tree walk, but still in its process group. Only processes created after the
    replica (``not_before``) are touched, so a recycled group id never hits a stranger.
    Blocking: call it in a thread.
    """
    return kill_groups([(pgid, not_before)])


def kill_groups(
    groups: Collection[tuple[int, float | None]], table: proc_table.ProcessTree | None = None
) -> list[int]:
    """:func:`kill_leftovers` for many groups (``(pgid, not_before)``) from one read of the
    table (``table``, or one read now: a leftover may have forked a moment ago): when
    circusd dies, every replica's group at once. Blocking: call it in a thread."""
    not_before = dict(groups)
    killed: list[psutil.Process] = []
    for row in (table or process_tree()).rows:
        if row.pgrp not in not_before or row.zombie:
            continue
        start = not_before[row.pgrp]
        if start is not None and row.create_time + 0.01 < start:
            continue
        try:
            proc = psutil.Process(row.pid)
            if abs(proc.create_time() - row.create_time) >= 0.01:
                continue  # exited and its pid reused since the table was read
            proc.kill()
            killed.append(proc)
        except (psutil.Error, PermissionError):
            continue
    if killed:
        psutil.wait_procs(killed, timeout=5)
    return [p.pid for p in killed]


async def kill_leftovers_async(pgid: int, not_before: float | None) -> list[int]:
    """:func:`kill_leftovers` from a read of the table shared with the walks and kills
    asked at the same moment (a read that begins after this was asked)."""
    table = await _shared_read()
    return await asyncio.to_thread(kill_groups, [(pgid, not_before)], table)


def identify(pids: Collection[int]) -> dict[int, float]:
    """The running ones of ``pids`` with their start times, so that a later check can tell
    them from unrelated processes that got a recycled PID."""
    return {pid: row.create_time for pid, row in proc_table.rows(pids).items() if not row.zombie}


def running(identities: Mapping[int, float]) -> set[int]:
    """Those of :func:`identify`'s processes still running (zombies and recycled PIDs count
    as gone)."""
    return running_as_recorded(identities.items())


def wait_gone(identities: Mapping[int, float], timeout_s: float) -> bool:
    """Block until none of :func:`identify`'s processes runs, at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while running(identities):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class ExitWatcher:
    """Calls back on the event loop the moment a process exits (Linux pidfd, no polling).

    Works for processes that are not our children (they are circusd's). Where pidfd is not
    available the reconcile loop's periodic resync still notices the exit.
    """

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> bool:
        if pid in self._fds or not hasattr(os, "pidfd_open"):
            return pid in self._fds
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        loop = asyncio.get_running_loop()
        self._fds[pid] = fd

        def fired() -> None:
            self.unwatch(pid)
            on_exit(pid)

        loop.add_reader(fd, fired)
        return True

    def watching(self, pid: int | None) -> bool:
        """True while ``pid`` is watched: it ran when watched, and no exit was seen since."""
        return pid in self._fds

    def unwatch(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        for pid in list(self._fds):
            self.unwatch(pid)
