"""The background sampler: every interval, read every source into one immutable snapshot.

psutil and NVML run in worker threads (they block: NVML calls take up to ~20 ms); the
connector's view and the optional sources are read on the event loop (sync callables must be
cheap and non-blocking like ``ConnectorReader.view``; async ones are awaited with a
deadline). A scrape renders the latest snapshot and never calls any of this.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from connector.view import ConnectorReader, ConnectorView
from exporter.gpu_types import GpuDeviceFacts, GpuReading, GpuSource
from exporter.health import HealthTracker, SourceHealth, describe
from exporter.process_tree import ProcessTreeSampler, ReplicaProcesses, ReplicaRoot
from exporter.sources import (
    AutoscalerReading,
    DiscoveryReading,
    MachineAllocation,
    PlannerReading,
    QueueReading,
    parse_autoscaler,
    parse_discovery,
    parse_machine_view,
    parse_planner,
    parse_queue,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SourceFn = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class ReplicaGpuUsage:
    gpu: str  # UUID
    memory_used_bytes: int | None
    sm_utilization_ratio: float | None


@dataclass(frozen=True)
class ReplicaUsage:
    """What one replica's process tree used at the snapshot."""

    component: str
    replica: str
    pid: int
    command: str | None
    processes: int
    cpu_seconds_total: float
    cpu_utilization_ratio: float | None
    memory_rss_bytes: int
    memory_pss_bytes: int | None
    memory_uss_bytes: int | None
    gpus: tuple[ReplicaGpuUsage, ...]


@dataclass(frozen=True)
class Snapshot:
    """Everything one sampling cycle read. Immutable: scrapes share it across threads."""

    seq: int
    taken_at: float  # Unix time the cycle started
    view: ConnectorView
    replicas: tuple[ReplicaUsage, ...]
    gpu_devices: tuple[GpuDeviceFacts, ...]
    gpus: tuple[GpuReading, ...]
    machine: MachineAllocation | None
    queue: QueueReading | None
    discovery: DiscoveryReading | None
    planner: PlannerReading | None  # None: no executor runs (or its read failed)
    health: tuple[SourceHealth, ...]
    collection_cpu_seconds_total: float
    autoscaler: AutoscalerReading | None = None  # None: no policy runs (or its read failed)

    def replicas_of(self, component: str) -> list[ReplicaUsage]:
        return [r for r in self.replicas if r.component == component]


def empty_view(namespace: str = "") -> ConnectorView:
    return ConnectorView(namespace=namespace, taken_at=0.0, components=(), replicas=())


class Sampler:
    """Produces :class:`Snapshot` objects; :meth:`run` does so every ``interval_s``."""

    def __init__(
        self,
        reader: ConnectorReader,
        *,
        gpu_backend: GpuSource | None = None,
        machine_view: SourceFn | None = None,
        queue_reader: SourceFn | None = None,
        discovery_stats: SourceFn | None = None,
        planner_status: SourceFn | None = None,
        autoscaler_status: SourceFn | None = None,
        interval_s: float = 1.0,
        source_timeout_s: float | None = None,
        processes: ProcessTreeSampler | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"sampling interval must be positive, got {interval_s!r} s")
        self.reader = reader
        self.gpu_backend = gpu_backend
        self.interval_s = interval_s
        self.source_timeout_s = source_timeout_s or max(2.0, interval_s)
        self.processes = processes or ProcessTreeSampler()
        self.health = HealthTracker(clock)
        self._clock = clock
        self._optional: list[tuple[str, SourceFn, Callable[[Any], Any]]] = [
            (name, fn, parse)
            for name, fn, parse in (
                ("resources", machine_view, parse_machine_view),
                ("prefill_queue", queue_reader, parse_queue),
                ("discovery", discovery_stats, parse_discovery),
                ("planner", planner_status, parse_planner),
                ("autoscaler", autoscaler_status, parse_autoscaler),
            )
            if fn is not None
        ]
        self._seq = 0
        self._cpu_total = 0.0
        self._devices: tuple[GpuDeviceFacts, ...] = ()
        self._last_view: ConnectorView | None = None
        # A thread that overran its cycle is not started again until it returns, so a hung
        # NVML call cannot pile up threads.
        self._busy: dict[str, asyncio.Future[Any]] = {}
        self.latest: Snapshot | None = None
        # Runs in a worker thread after each snapshot (the exposition pre-renders there).
        self.after_snapshot: Callable[[Snapshot], None] | None = None
        self._cycle_lock: asyncio.Lock | None = None

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled (fixed cadence, no drift)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample_once()
            except Exception:  # a bug in one cycle must not end sampling for good
                log.exception("exporter sampling cycle failed")
            next_at += self.interval_s
            now = loop.time()
            if next_at < now:  # overran: skip the missed ticks rather than bursting
                next_at = now + self.interval_s
            await asyncio.sleep(next_at - now)

    async def sample_once(self) -> Snapshot:
        """One cycle. Cycles never overlap: a call during a running cycle waits for it."""
        if self._cycle_lock is None:
            self._cycle_lock = asyncio.Lock()
        async with self._cycle_lock:
            return await self._cycle()

    async def _cycle(self) -> Snapshot:
        taken_at = self._clock()
        view, view_ok = self._read_view()
        roots = [
            ReplicaRoot(r.component, r.replica, r.pid, r.create_time)
            for r in view.replicas
            if r.pid is not None
        ]
        procs_job = (
            self._in_thread("processes", self._sample_processes, roots) if view_ok else _none()
        )
        gpu_job = self._in_thread("nvml", self._sample_gpus) if self.gpu_backend else _none()
        optional_jobs = [self._read_optional(name, fn, parse) for name, fn, parse in self._optional]
        procs, gpus, *optional = await asyncio.gather(procs_job, gpu_job, *optional_jobs)
        readings: dict[str, Any] = {
            name: value for (name, _, _), value in zip(self._optional, optional, strict=True)
        }
        samples: tuple[GpuReading, ...] = gpus or ()
        self._seq += 1
        snapshot = Snapshot(
            seq=self._seq,
            taken_at=taken_at,
            view=view,
            replicas=_attribute_gpus(procs or (), samples),
            gpu_devices=self._devices if self.gpu_backend else (),
            gpus=samples,
            machine=readings.get("resources"),
            queue=readings.get("prefill_queue"),
            discovery=readings.get("discovery"),
            planner=readings.get("planner"),
            health=self.health.snapshot(),
            collection_cpu_seconds_total=self._cpu_total,
            autoscaler=readings.get("autoscaler"),
        )
        self.latest = snapshot
        if self.after_snapshot is not None:
            try:
                await asyncio.to_thread(self.after_snapshot, snapshot)
            except Exception:  # rendering problems must not stop sampling
                log.exception("exporter: post-snapshot rendering failed")
        return snapshot

    def _read_view(self) -> tuple[ConnectorView, bool]:
        started = time.perf_counter()
        try:
            view = self.reader.view()
        except Exception as exc:  # the connector is broken: report it, sample nothing
            self.health.failure("processes", time.perf_counter() - started, describe(exc))
            previous = self._last_view
            return empty_view(previous.namespace if previous else ""), False
        self._last_view = view
        return view, True

    async def _in_thread(self, source: str, fn: Callable[..., T], *args: Any) -> T | None:
        busy = self._busy.get(source)
        if busy is not None and not busy.done():
            self.health.failure(source, 0.0, "previous read still running")
            return None
        started = time.perf_counter()
        future = asyncio.ensure_future(asyncio.to_thread(self._timed, fn, *args))
        # Collected here so a read that fails after its deadline is not reported as an
        # unretrieved exception.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._busy[source] = future
        try:
            result, cpu_s = await asyncio.wait_for(asyncio.shield(future), self.source_timeout_s)
        except TimeoutError:
            self.health.failure(
                source, time.perf_counter() - started, f"timed out after {self.source_timeout_s} s"
            )
            return None
        except Exception as exc:
            self.health.failure(source, time.perf_counter() - started, describe(exc))
            return None
        self._cpu_total += cpu_s
        self.health.success(source, time.perf_counter() - started)
        return result

    @staticmethod
    def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        cpu0 = time.thread_time()
        result = fn(*args)
        return result, time.thread_time() - cpu0

    def _sample_processes(self, roots: list[ReplicaRoot]) -> tuple[ReplicaProcesses, ...]:
        return self.processes.sample(roots)

    def _sample_gpus(self) -> tuple[GpuReading, ...]:
        assert self.gpu_backend is not None
        samples = tuple(self.gpu_backend.sample())
        known = {d.uuid for d in self._devices}
        if not self._devices or any(s.uuid not in known for s in samples):
            self._devices = tuple(self.gpu_backend.devices())
        return samples

    async def _read_optional(self, name: str, fn: SourceFn, parse: Callable[[Any], T]) -> T | None:
        started = time.perf_counter()
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(_awaitable(value), self.source_timeout_s)
            reading = parse(value)
        except TimeoutError:
            self.health.failure(
                name, time.perf_counter() - started, f"timed out after {self.source_timeout_s} s"
            )
            return None
        except Exception as exc:
            self.health.failure(name, time.perf_counter() - started, describe(exc))
            return None
        self.health.success(name, time.perf_counter() - started)
        return reading


async def _none() -> None:
    return None


async def _awaitable(value: Awaitable[T]) -> T:
    return await value


def _attribute_gpus(
    procs: tuple[ReplicaProcesses, ...], samples: tuple[GpuReading, ...]
) -> tuple[ReplicaUsage, ...]:
    """Join NVML's per-PID memory and SM samples to the replicas whose trees hold the PIDs."""
    owner: dict[int, tuple[str, str]] = {}
    for p in procs:
        for pid in p.pids:
            owner[pid] = (p.component, p.replica)
    memory: dict[tuple[str, str, str], int] = {}
    sm: dict[tuple[str, str, str], float] = {}
    touched: dict[tuple[str, str], set[str]] = defaultdict(set)
    for sample in samples:
        for gp in sample.processes:
            who = owner.get(gp.pid)
            if who is None:
                continue
            key = (*who, sample.uuid)
            touched[who].add(sample.uuid)
            if gp.used_memory_bytes is not None:
                memory[key] = memory.get(key, 0) + gp.used_memory_bytes
            if gp.sm_util_ratio is not None:
                sm[key] = min(1.0, sm.get(key, 0.0) + gp.sm_util_ratio)
    out: list[ReplicaUsage] = []
    for p in procs:
        who = (p.component, p.replica)
        gpus = tuple(
            ReplicaGpuUsage(uuid, memory.get((*who, uuid)), sm.get((*who, uuid)))
            for uuid in sorted(touched.get(who, ()))
        )
        out.append(
            ReplicaUsage(
                component=p.component,
                replica=p.replica,
                pid=p.pid,
                command=p.command,
                processes=len(p.pids),
                cpu_seconds_total=p.cpu_seconds_total,
                cpu_utilization_ratio=p.cpu_utilization_ratio,
                memory_rss_bytes=p.memory_rss_bytes,
                memory_pss_bytes=p.memory_pss_bytes,
                memory_uss_bytes=p.memory_uss_bytes,
                gpus=gpus,
            )
        )
    return tuple(out)
