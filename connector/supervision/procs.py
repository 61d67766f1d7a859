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
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import psutil


def same_process(pid: int | None, create_time: float | None) -> bool:
    """True when ``pid`` runs and is the process that was recorded (not a recycled pid)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def create_time_of(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants that are still alive."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    """Resident memory of the process and its descendants, summed (what the exporter shows
    as a replica's RSS). Processes that vanish meanwhile count as 0."""
    total = 0
    for proc in tree(pid):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


# Children by parent, shared by every tree walk within this window: a walk of one tree
# reads every process's parent, so N stops (or a resync over N replicas) at once would
# otherwise read /proc N times over. A child born within the window and not yet in the map
# is still in its parent's process group, which stops signal as a whole.
_CHILDREN_TTL_S = 0.1
_children_lock = threading.Lock()
_children_at = -1.0
_children: dict[int, list[int]] = {}


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


def _children_by_parent() -> dict[int, list[int]]:
    global _children_at, _children
    with _children_lock:
        now = time.monotonic()
        if now - _children_at > _CHILDREN_TTL_S:
            fresh: dict[int, list[int]] = {}
            for proc, info in process_table(["ppid"]):
                ppid = info.get("ppid")
                if ppid is not None:
                    fresh.setdefault(ppid, []).append(proc.pid)
            _children, _children_at = fresh, now
        return _children


def tree_pids(pid: int | None) -> set[int]:
    """``pid`` and its descendants (blocking: reads /proc, call it in a thread)."""
    if not pid or not psutil.pid_exists(pid):
        return set()
    children = _children_by_parent()
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid``, and every descendant outside it."""
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
    signal_group(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=graceful_s)
    if not alive:
        return "terminated"
    signal_group(pid, signal.SIGKILL)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return "killed"


async def wait_exit(pid: int, create_time: float | None, timeout_s: float) -> bool:
    """Wait until ``pid`` has exited (a zombie counts: circusd reaps its children only
    every check_delay), at most ``timeout_s``. A pidfd wakes the loop the moment it exits,
    so thousands of stops wait at once without a thread or a poll each."""
    if not same_process(pid, create_time):
        return True
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd here: poll, gently
        deadline = time.monotonic() + timeout_s
        while same_process(pid, create_time):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        if not same_process(pid, create_time):  # exited before the reader was in place
            return True
        await asyncio.wait_for(exited, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def terminate_group_async(pid: int, graceful_s: float) -> str:
    """:func:`terminate_group` without holding a thread for the grace period: SIGTERM the
    group, wait for the leader on a pidfd and for the rest of its tree, then SIGKILL what is
    left. Returns ``"terminated"`` or ``"killed"``."""

    def term() -> dict[int, float]:  # reads /proc: in a thread
        found = identify(tree_pids(pid))
        if found:
            signal_group(pid, signal.SIGTERM)
        return found

    def kill(alive: set[int]) -> None:
        signal_group(pid, signal.SIGKILL)
        for other in alive:
            with contextlib.suppress(psutil.Error):
                psutil.Process(other).kill()

    members = await asyncio.to_thread(term)
    if not members:
        return "terminated"
    deadline = time.monotonic() + graceful_s
    if pid in members:
        await wait_exit(pid, members[pid], graceful_s)
    # The rest of the tree was signalled with the group: gone at once, as a rule; all of
    # it shares the one grace period.
    alive = await _until_gone(members, max(0.0, deadline - time.monotonic()))
    if not alive:
        return "terminated"
    await asyncio.to_thread(kill, alive)
    await _until_gone(members, 5.0)
    return "killed"


async def _until_gone(members: Mapping[int, float], timeout_s: float) -> set[int]:
    """Those of ``members`` still running after waiting up to ``timeout_s`` for them."""
    deadline = time.monotonic() + timeout_s
    alive = running(members)
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        alive = running(members)
    return alive


def kill_leftovers(pgid: int, not_before: float | None) -> list[int]:
    """SIGKILL every process still in the group ``pgid`` that a replica started.

    When a replica's leader is already dead its children may live on, reparented and out of
    reach of a tree walk, but still in its process group. Only processes created after the
    replica (``not_before``) are touched, so a recycled group id never hits a stranger.
    Blocking: call it in a thread.
    """
    killed: list[psutil.Process] = []
    for proc, info in process_table(["create_time"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            created = info.get("create_time")
            if not_before is not None and created is not None and created + 0.01 < not_before:
                continue
            proc.kill()
            killed.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    if killed:
        psutil.wait_procs(killed, timeout=5)
    return [p.pid for p in killed]


def identify(pids: Collection[int]) -> dict[int, float]:
    """The running ones of ``pids`` with their start times, so that a later check can tell
    them from unrelated processes that got a recycled PID."""
    found: dict[int, float] = {}
    for pid in pids:
        created = create_time_of(pid)
        if created is not None and same_process(pid, created):  # zombies are gone already
            found[pid] = created
    return found


def running(identities: Mapping[int, float]) -> set[int]:
    """Those of :func:`identify`'s processes still running (zombies and recycled PIDs count
    as gone)."""
    return {pid for pid, created in identities.items() if same_process(pid, created)}


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
