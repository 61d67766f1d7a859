"""Per-replica CPU and memory, summed over each replica's whole process tree.

A replica is the process Circus started plus everything it forked (a vLLM engine, its
tokenizer workers, ...). One pass per cycle reads every process's parent once, builds the
parent -> children map, and walks it from each replica's root; each member is then read once
inside psutil's ``oneshot``. Blocking: run :meth:`ProcessTreeSampler.sample` in a thread.

What psutil reads is injected (:class:`ProcessTable`), so tests replay exact numbers.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil

COMMAND_MAX_CHARS = 160


@dataclass(frozen=True)
class ProcReading:
    """One process at one moment."""

    cpu_seconds: float  # user + system, own and of reaped children
    rss_bytes: int
    zombie: bool = False
    pss_bytes: int | None = None  # only when read with detail
    uss_bytes: int | None = None


class ProcessTable(Protocol):
    """What the sampler needs from the operating system (psutil in production)."""

    def parents(self) -> Mapping[int, int]:
        """Parent pid of every process now running."""
        ...

    def create_time(self, pid: int) -> float | None:
        """Start time (Unix seconds) of ``pid``; ``None`` when it is gone."""
        ...

    def read(self, pid: int, *, detail: bool) -> ProcReading | None:
        """CPU and memory of ``pid`` (PSS/USS too when ``detail``); ``None`` when gone."""
        ...

    def command(self, pid: int) -> str | None: ...

    def cpus_available(self, pid: int) -> int | None:
        """CPUs the process may run on (its affinity)."""
        ...


class PsutilProcessTable:
    """The real :class:`ProcessTable`: psutil, with Process objects cached across cycles.

    The parent map is the one bulk read (every process on the machine, every cycle). psutil
    has no public bulk call for it (``process_iter`` builds an object and reads each process
    twice), so on Linux it is one read of ``/proc/<pid>/stat`` per process, which also
    yields the start time that tells a recycled pid from the process cached under it. Per
    process numbers come from psutil inside ``oneshot``.
    """

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc_root = proc_root
        self._raw = os.path.isdir(os.path.join(proc_root, "self"))
        self._procs: dict[int, psutil.Process] = {}
        self._started: dict[int, bytes] = {}
        # smaps_rollup makes PSS/USS a single small read; without it psutil parses the whole
        # smaps file, which is too slow to do for every process of every replica.
        self.detail_supported = os.path.exists(os.path.join(proc_root, "self", "smaps_rollup"))

    def parents(self) -> dict[int, int]:
        if not self._raw:
            return self._parents_psutil()
        out: dict[int, int] = {}
        started: dict[int, bytes] = {}
        for name in os.listdir(self._proc_root):
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self._proc_root, name, "stat"), "rb") as f:
                    data = f.read()
            except OSError:
                continue  # exited while we listed
            # Fields after the command name (which may hold spaces and parentheses):
            # state ppid ... starttime is field 22, i.e. index 19 after the ')'.
            fields = data[data.rfind(b")") + 2 :].split(b" ", 20)
            pid = int(name)
            out[pid] = int(fields[1])
            started[pid] = fields[19]
        # Forget cached objects of processes that are gone or whose pid was reused.
        self._procs = {
            pid: proc
            for pid, proc in self._procs.items()
            if self._started.get(pid) == started.get(pid)
        }
        self._started = started
        return out

    def _parents_psutil(self) -> dict[int, int]:
        out: dict[int, int] = {}
        procs: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                out[proc.pid] = proc.ppid()
            except psutil.Error:
                continue
            procs[proc.pid] = proc
        self._procs = procs
        return out

    def _proc(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = proc
        return proc

    def create_time(self, pid: int) -> float | None:
        proc = self._proc(pid)
        if proc is None:
            return None
        try:
            return proc.create_time()
        except psutil.Error:
            return None

    def read(self, pid: int, *, detail: bool) -> ProcReading | None:
        proc = self._proc(pid)
        if proc is None:
            return None
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                zombie = proc.status() == psutil.STATUS_ZOMBIE
                rss = proc.memory_info().rss
                pss = uss = None
                if detail and self.detail_supported and not zombie:
                    try:
                        full = proc.memory_full_info()
                        pss, uss = getattr(full, "pss", None), full.uss
                    except psutil.AccessDenied:
                        pass
        except psutil.Error:
            return None
        cpu = times.user + times.system + times.children_user + times.children_system
        return ProcReading(cpu, rss, zombie, pss, uss)

    def command(self, pid: int) -> str | None:
        proc = self._proc(pid)
        if proc is None:
            return None
        try:
            argv = proc.cmdline()
        except psutil.Error:
            return None
        return " ".join(argv)[:COMMAND_MAX_CHARS] if argv else None

    def cpus_available(self, pid: int) -> int | None:
        proc = self._proc(pid)
        if proc is None:
            return None
        try:
            return len(proc.cpu_affinity() or []) or None
        except (psutil.Error, AttributeError):
            return None


@dataclass(frozen=True)
class ReplicaRoot:
    """The process a replica runs as, as the connector recorded it."""

    component: str
    replica: str
    pid: int
    create_time: float | None  # None: trust the pid (nothing recorded)


@dataclass(frozen=True)
class ReplicaProcesses:
    """CPU and memory of one replica's process tree at one moment."""

    component: str
    replica: str
    pid: int
    pids: tuple[int, ...]  # root first
    command: str | None
    cpu_seconds_total: float
    cpu_utilization_ratio: float | None  # None on the first sample of a process
    memory_rss_bytes: int
    memory_pss_bytes: int | None
    memory_uss_bytes: int | None


_Identity = tuple[int, float]  # (pid, create time): a pid cannot be recycled under it


@dataclass
class _Detail:
    pss: int | None
    uss: int | None
    read_at: float


class ProcessTreeSampler:
    """Turns replica roots into per-replica sums; keeps what deltas and caches need.

    Not thread-safe: one sampling thread calls :meth:`sample` at a time.
    """

    def __init__(
        self,
        table: ProcessTable | None = None,
        *,
        detail_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table: ProcessTable = table if table is not None else PsutilProcessTable()
        self.detail_interval_s = detail_interval_s
        self._clock = clock
        # Per replica process identity: (last cpu total, when). Counters never go backwards
        # within one identity even when a child exits without being reaped by the tree.
        self._cpu: dict[tuple[str, str, _Identity], tuple[float, float]] = {}
        self._detail: dict[_Identity, _Detail] = {}
        self._commands: dict[_Identity, str | None] = {}
        self._cpus: dict[_Identity, int | None] = {}

    def sample(self, roots: Sequence[ReplicaRoot]) -> tuple[ReplicaProcesses, ...]:
        now = self._clock()
        parents = self.table.parents()
        children: dict[int, list[int]] = defaultdict(list)
        for pid, ppid in parents.items():
            children[ppid].append(pid)
        out: list[ReplicaProcesses] = []
        cpu_seen: dict[tuple[str, str, _Identity], tuple[float, float]] = {}
        detail_seen: dict[_Identity, _Detail] = {}
        for root in roots:
            if root.pid not in parents:
                continue
            started = self.table.create_time(root.pid)
            if started is None or (
                root.create_time is not None and abs(started - root.create_time) > 0.01
            ):
                continue  # the recorded process is gone and its pid was recycled
            usage = self._sample_tree(root, (root.pid, started), children, now, detail_seen)
            if usage is None:
                continue
            replica, key, cpu_total = usage
            cpu_seen[key] = (cpu_total, now)
            out.append(replica)
        # Forget what belongs to processes that are gone, so nothing grows without bound.
        self._cpu = cpu_seen
        self._detail = detail_seen
        live = {key[2] for key in cpu_seen}
        self._commands = {k: v for k, v in self._commands.items() if k in live}
        self._cpus = {k: v for k, v in self._cpus.items() if k in live}
        return tuple(out)

    def _sample_tree(
        self,
        root: ReplicaRoot,
        identity: _Identity,
        children: Mapping[int, list[int]],
        now: float,
        detail_seen: dict[_Identity, _Detail],
    ) -> tuple[ReplicaProcesses, tuple[str, str, _Identity], float] | None:
        pids = list(_walk(root.pid, children))
        cpu = 0.0
        rss = 0
        pss: int | None = 0
        uss: int | None = 0
        counted: list[int] = []
        for pid in pids:
            member = identity if pid == root.pid else self._identity(pid)
            if member is None:
                continue
            detail = self._detail.get(member)
            fresh = detail is None or now - detail.read_at >= self.detail_interval_s
            reading = self.table.read(pid, detail=fresh)
            if reading is None:
                continue
            if pid == root.pid and reading.zombie:
                return None  # the replica's process exited; its series go away now
            if fresh:
                detail = _Detail(reading.pss_bytes, reading.uss_bytes, now)
            assert detail is not None
            detail_seen[member] = detail
            counted.append(pid)
            cpu += reading.cpu_seconds
            rss += reading.rss_bytes
            pss = None if pss is None or detail.pss is None else pss + detail.pss
            uss = None if uss is None or detail.uss is None else uss + detail.uss
        if not counted or counted[0] != root.pid:
            return None
        key = (root.component, root.replica, identity)
        previous = self._cpu.get(key)
        utilization: float | None = None
        if previous is not None:
            cpu = max(cpu, previous[0])
            elapsed = now - previous[1]
            cpus = self._cpus_of(identity)
            if elapsed > 0 and cpus:
                utilization = min(1.0, (cpu - previous[0]) / elapsed / cpus)
        return (
            ReplicaProcesses(
                component=root.component,
                replica=root.replica,
                pid=root.pid,
                pids=tuple(counted),
                command=self._command_of(identity),
                cpu_seconds_total=cpu,
                cpu_utilization_ratio=utilization,
                memory_rss_bytes=rss,
                memory_pss_bytes=pss,
                memory_uss_bytes=uss,
            ),
            key,
            cpu,
        )

    def _identity(self, pid: int) -> _Identity | None:
        started = self.table.create_time(pid)
        return None if started is None else (pid, started)

    def _command_of(self, identity: _Identity) -> str | None:
        if identity not in self._commands:
            self._commands[identity] = self.table.command(identity[0])
        return self._commands[identity]

    def _cpus_of(self, identity: _Identity) -> int | None:
        if identity not in self._cpus:
            self._cpus[identity] = self.table.cpus_available(identity[0])
        return self._cpus[identity]


def _walk(root: int, children: Mapping[int, Iterable[int]]) -> Iterable[int]:
    """``root`` and all its descendants, root first (iterative: trees can be deep)."""
    stack = [root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        yield pid
        stack.extend(sorted(children.get(pid, ()), reverse=True))
