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
from collections.abc import Callable, Collection, Mapping

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


def tree_pids(pid: int | None) -> set[int]:
    return {p.pid for p in tree(pid)} if pid else set()


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid``, and every descendant outside it."""
    members = tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


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


def kill_leftovers(pgid: int, not_before: float | None) -> list[int]:
    """SIGKILL every process still in the group ``pgid`` that a replica started.

    When a replica's leader is already dead its children may live on, reparented and out of
    reach of a tree walk, but still in its process group. Only processes created after the
    replica (``not_before``) are touched, so a recycled group id never hits a stranger.
    Blocking: call it in a thread.
    """
    killed: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            created = proc.info["create_time"]
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
