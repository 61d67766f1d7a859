"""Resource inventory and all-or-nothing reservations: GPUs, CPU, memory, ports, sockets.

Every replica gets its resources here before its process starts and gives them back only
when they are really free: its processes are gone (psutil) and NVML lists none of its PIDs.
A GPU that stays busy past the release timeout is marked ``leaked`` and is not handed out
again until NVML shows it free.

``reserve`` is synchronous with no await inside, so on the event loop it is atomic; a lock
also makes it safe from threads. Nothing is ever over-allocated: a whole GPU has one holder,
fractions on one GPU sum to at most 1 and never share with a whole-GPU holder, and CPU cores
and memory stay within what the machine (and the connector's own affinity) offers.

Placement of N > 1 GPUs prefers a set connected by NVLink, then GPUs on one NUMA node, then
the lowest contiguous indices. GPUs that foreign processes (not ours) use beyond a memory
threshold are skipped. GPUs go to the process as ``CUDA_VISIBLE_DEVICES`` with UUIDs, because
CUDA's index order can differ from NVML's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from connector import procs
from connector.errors import ResourcesExhausted
from connector.graph import PortSpec, ResourceRequest, SocketSpec
from connector.nvml import GpuBackend, GpuDevice, GpuSample, open_gpu_backend
from connector.quantities import format_memory

EPS = 1e-9
SOCKET_PATH_LIMIT = 100  # sun_path is 108 bytes; keep a margin


@dataclass(frozen=True)
class Reservation:
    replica_id: str  # "Decode/3"
    component: str
    gpus: tuple[str, ...] = ()
    gpu_fraction: float = 0.0  # share of one GPU for a fractional request, else 0
    cpu_cores: float = 0.0
    cpus: tuple[int, ...] = ()  # pinned cores
    memory_bytes: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=dict)
    env_names: dict[str, str] = field(default_factory=dict)  # "port.NAME"/"socket.NAME" -> env var

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "component": self.component,
            "gpus": list(self.gpus),
            "gpu_fraction": self.gpu_fraction,
            "cpu_cores": self.cpu_cores,
            "cpus": list(self.cpus),
            "memory_bytes": self.memory_bytes,
            "ports": dict(self.ports),
            "sockets": dict(self.sockets),
            "env_names": dict(self.env_names),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reservation:
        return cls(
            replica_id=str(d["replica_id"]),
            component=str(d["component"]),
            gpus=tuple(d.get("gpus", ())),
            gpu_fraction=float(d.get("gpu_fraction", 0.0)),
            cpu_cores=float(d.get("cpu_cores", 0.0)),
            cpus=tuple(int(c) for c in d.get("cpus", ())),
            memory_bytes=int(d.get("memory_bytes", 0)),
            ports={str(k): int(v) for k, v in dict(d.get("ports", {})).items()},
            sockets={str(k): str(v) for k, v in dict(d.get("sockets", {})).items()},
            env_names={str(k): str(v) for k, v in dict(d.get("env_names", {})).items()},
        )

    def env(self) -> dict[str, str]:
        """What the replica's process is told about its allocation."""
        env = {
            # No GPU asked for means no GPU visible: a frontend never grabs a GPU by accident.
            "CUDA_VISIBLE_DEVICES": ",".join(self.gpus),
            "DYNAMO_LOCAL_GPUS": ",".join(self.gpus),
            "DYNAMO_LOCAL_REPLICA": self.replica_id,
        }
        if self.gpu_fraction:
            env["DYNAMO_LOCAL_GPU_MEMORY_FRACTION"] = f"{self.gpu_fraction:g}"
        if self.cpus:
            env["DYNAMO_LOCAL_CPUS"] = ",".join(str(c) for c in self.cpus)
        if self.cpu_cores:
            env["DYNAMO_LOCAL_CPU_CORES"] = f"{self.cpu_cores:g}"
        if self.memory_bytes:
            env["DYNAMO_LOCAL_MEMORY_BYTES"] = str(self.memory_bytes)
        for name, port in self.ports.items():
            var = self.env_names.get(f"port.{name}")
            if var:
                env[var] = str(port)
        for name, path in self.sockets.items():
            var = self.env_names.get(f"socket.{name}")
            if var:
                env[var] = path
        return env


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GpuDevice, ...]
    cpus: tuple[int, ...]
    memory_bytes: int
    gpu_reason: str | None = None  # why there are no GPUs, when there are none

    @classmethod
    def detect(cls, backend: GpuBackend | None, reason: str | None = None) -> Inventory:
        """Blocking (NVML): call in a thread."""
        gpus: list[GpuDevice] = backend.devices() if backend is not None else []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and gpus:
            allowed = [v.strip() for v in visible.split(",") if v.strip()]
            gpus = [g for g in gpus if str(g.index) in allowed or g.uuid in allowed]
            if not gpus:
                reason = f"CUDA_VISIBLE_DEVICES={visible!r} leaves no GPU to hand out"
        return cls(
            gpus=tuple(gpus),
            cpus=tuple(sorted(os.sched_getaffinity(0))),
            memory_bytes=int(psutil.virtual_memory().total),
            gpu_reason=reason if not gpus else None,
        )


@dataclass
class ReleaseResult:
    replica_id: str
    processes_gone: bool
    leaked_gpus: tuple[str, ...] = ()


def _short(uuid: str) -> str:
    return uuid[:12] + "…" if len(uuid) > 13 else uuid


def _ordinal(replica_id: str) -> str:
    return replica_id.rsplit("/", 1)[-1]


class ResourceManager:
    def __init__(
        self,
        inventory: Inventory,
        *,
        working_dir: Path,
        port_range: tuple[int, int] = (20000, 29999),
        foreign_memory_threshold_bytes: int = 1 << 30,
        release_timeout_s: float = 30.0,
        gpu_backend: GpuBackend | None = None,
        on_event: Callable[..., Any] | None = None,
    ) -> None:
        self.inventory = inventory
        self.working_dir = working_dir
        self.port_range = port_range
        self.foreign_threshold = foreign_memory_threshold_bytes
        self.release_timeout_s = release_timeout_s
        self.gpu_backend = gpu_backend
        self.on_event = on_event
        self._lock = threading.RLock()
        self._held: dict[str, Reservation] = {}
        self._leaked: set[str] = set()
        self._foreign_busy: dict[str, int] = {}  # uuid -> bytes used by processes not ours
        self._last_sample: list[GpuSample] = []
        self._next_port = port_range[0]
        self._leak_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(
        cls,
        gpu_backend: GpuBackend | None,
        *,
        working_dir: Path,
        gpu_reason: str | None = None,
        **kwargs: Any,
    ) -> ResourceManager:
        inventory = await asyncio.to_thread(Inventory.detect, gpu_backend, gpu_reason)
        return cls(inventory, working_dir=working_dir, gpu_backend=gpu_backend, **kwargs)

    # ---------------------------------------------------------------- queries

    def reservation(self, replica_id: str) -> Reservation | None:
        with self._lock:
            return self._held.get(replica_id)

    def reservations(self) -> list[Reservation]:
        with self._lock:
            return list(self._held.values())

    def _whole_holder(self, uuid: str) -> str | None:
        for r in self._held.values():
            if uuid in r.gpus and not r.gpu_fraction:
                return r.replica_id
        return None

    def _fraction_used(self, uuid: str) -> float:
        return sum(r.gpu_fraction for r in self._held.values() if r.gpu_fraction and uuid in r.gpus)

    def _holders(self, uuid: str) -> list[str]:
        return [r.replica_id for r in self._held.values() if uuid in r.gpus]

    # ------------------------------------------------------------ reservation

    def reserve(
        self,
        replica_id: str,
        component: str,
        request: ResourceRequest,
        ports: Sequence[PortSpec] = (),
        sockets: Sequence[SocketSpec] = (),
    ) -> Reservation:
        """Reserve everything one replica needs, or nothing (raises ResourcesExhausted)."""
        with self._lock:
            existing = self._held.get(replica_id)
            if existing is not None:
                return existing
            label = f"{component} replica {_ordinal(replica_id)}"
            gpus, fraction = self._pick_gpus(label, request.gpu)
            cores = self._check_cpu(label, request)
            self._check_memory(label, request.memory_bytes)
            port_map = self._pick_ports(label, ports)
            socket_map = self._socket_paths(component, replica_id, sockets)
            env_names = {f"port.{p.name}": p.env for p in ports if p.env}
            env_names.update({f"socket.{s.name}": s.env for s in sockets if s.env})
            reservation = Reservation(
                replica_id=replica_id,
                component=component,
                gpus=gpus,
                gpu_fraction=fraction,
                cpu_cores=request.cpu,
                cpus=cores,
                memory_bytes=request.memory_bytes,
                ports=port_map,
                sockets=socket_map,
                env_names=env_names,
            )
            self._held[replica_id] = reservation
        for path in socket_map.values():  # stale socket files from an earlier run
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return reservation

    def _usable(self, dev: GpuDevice) -> bool:
        return (
            dev.uuid not in self._leaked
            and self._foreign_busy.get(dev.uuid, 0) <= self.foreign_threshold
        )

    def _exhausted(self, message: str, **details: Any) -> ResourcesExhausted:
        return ResourcesExhausted(message, **details)

    def _pick_gpus(self, label: str, amount: float) -> tuple[tuple[str, ...], float]:
        if amount <= 0:
            return (), 0.0
        gpus = list(self.inventory.gpus)
        if not gpus:
            raise self._exhausted(
                f"{label} needs {amount:g} GPU{'s' if amount != 1 else ''}, 0 on this machine"
                f" ({self.inventory.gpu_reason or 'no GPU found'})",
                needed=amount,
                free=0,
                holders={},
            )
        if amount < 1:
            candidates = [
                g
                for g in gpus
                if self._usable(g)
                and self._whole_holder(g.uuid) is None
                and self._fraction_used(g.uuid) + amount <= 1 + EPS
            ]
            if not candidates:
                raise self._gpu_exhausted(label, amount, 0)
            # Best fit: the fullest GPU that still has room, so whole GPUs stay free.
            best = max(candidates, key=lambda g: (self._fraction_used(g.uuid), -g.index))
            return (best.uuid,), amount
        n = int(amount)
        free = [
            g
            for g in gpus
            if self._usable(g)
            and self._whole_holder(g.uuid) is None
            and self._fraction_used(g.uuid) == 0
        ]
        if len(free) < n:
            raise self._gpu_exhausted(label, n, len(free))
        return tuple(g.uuid for g in _place(free, n)), 0.0

    def _gpu_exhausted(self, label: str, needed: float, free: int) -> ResourcesExhausted:
        holders: dict[str, list[str]] = {}
        for g in self.inventory.gpus:
            who = self._holders(g.uuid)
            if who:
                holders[g.uuid] = who
            elif g.uuid in self._leaked:
                holders[g.uuid] = ["leaked"]
            elif self._foreign_busy.get(g.uuid, 0) > self.foreign_threshold:
                holders[g.uuid] = ["foreign processes"]
        parts = [f"{_short(u)} held by {', '.join(w)}" for u, w in holders.items()]
        unit = "GPU" if needed == 1 or needed < 1 else "GPUs"
        what = f"{needed:g} of a GPU" if needed < 1 else f"{needed:g} {unit}"
        message = f"{label} needs {what}, {free} free"
        if parts:
            message += "; " + "; ".join(parts)
        return self._exhausted(message, needed=needed, free=free, holders=holders)

    def _check_cpu(self, label: str, request: ResourceRequest) -> tuple[int, ...]:
        total = float(len(self.inventory.cpus))
        used = sum(r.cpu_cores for r in self._held.values())
        if request.cpu and used + request.cpu > total + EPS:
            raise self._exhausted(
                f"{label} needs {request.cpu:g} CPU core{'' if request.cpu == 1 else 's'}, "
                f"{max(total - used, 0):g} of {total:g} unreserved",
                needed=request.cpu,
                free=max(total - used, 0),
                kind="cpu",
            )
        if not request.pin_cpus or not request.cpu:
            return ()
        pinned = {c for r in self._held.values() for c in r.cpus}
        free = [c for c in self.inventory.cpus if c not in pinned]
        want = math.ceil(request.cpu)
        if len(free) < want:
            raise self._exhausted(
                f"{label} needs {want} pinned CPU cores, {len(free)} not pinned",
                needed=want,
                free=len(free),
                kind="cpu",
            )
        return tuple(free[:want])

    def _check_memory(self, label: str, amount: int) -> None:
        if not amount:
            return
        used = sum(r.memory_bytes for r in self._held.values())
        free = self.inventory.memory_bytes - used
        if amount > free:
            raise self._exhausted(
                f"{label} needs {format_memory(amount)} of memory, "
                f"{format_memory(max(free, 0))} unreserved",
                needed=amount,
                free=max(free, 0),
                kind="memory",
            )

    def _pick_ports(self, label: str, specs: Sequence[PortSpec]) -> dict[str, int]:
        if not specs:
            return {}
        taken = {p for r in self._held.values() for p in r.ports.values()}
        lo, hi = self.port_range
        span = hi - lo + 1
        out: dict[str, int] = {}
        tried = 0
        port = self._next_port
        while len(out) < len(specs) and tried < span:
            tried += 1
            candidate = port
            port = lo + (port - lo + 1) % span
            if candidate in taken or candidate in out.values() or not _port_free(candidate):
                continue
            out[specs[len(out)].name] = candidate
        if len(out) < len(specs):
            raise self._exhausted(
                f"{label} needs {len(specs)} ports, no free port left in {lo}-{hi}",
                needed=len(specs),
                free=len(out),
                kind="ports",
            )
        self._next_port = port
        return out

    def _socket_paths(
        self, component: str, replica_id: str, specs: Sequence[SocketSpec]
    ) -> dict[str, str]:
        base = self.working_dir / "sock"
        out: dict[str, str] = {}
        for spec in specs:
            path = base / f"{component.lower()}-{_ordinal(replica_id)}-{spec.name}.sock"
            if len(os.fsencode(str(path))) >= SOCKET_PATH_LIMIT:
                digest = hashlib.sha1(f"{replica_id}/{spec.name}".encode()).hexdigest()[:12]
                path = base / f"{digest}.sock"
            if len(os.fsencode(str(path))) >= SOCKET_PATH_LIMIT:
                raise self._exhausted(
                    f"working dir {self.working_dir} is too long for Unix socket paths "
                    f"(must stay under {SOCKET_PATH_LIMIT} bytes); use a shorter --working-dir",
                    working_dir=str(self.working_dir),
                    kind="sockets",
                )
            out[spec.name] = str(path)
        if out:
            base.mkdir(parents=True, exist_ok=True)
        return out

    def reserve_many(
        self,
        asks: Sequence[tuple[str, str, ResourceRequest, Sequence[PortSpec], Sequence[SocketSpec]]],
    ) -> tuple[list[Reservation], list[ResourcesExhausted]]:
        """Each ask all-or-nothing; those that fit are kept, the rest reported."""
        done: list[Reservation] = []
        failed: list[ResourcesExhausted] = []
        for replica_id, component, request, ports, sockets in asks:
            try:
                done.append(self.reserve(replica_id, component, request, ports, sockets))
            except ResourcesExhausted as exc:
                failed.append(exc)
        return done, failed

    def reservation_from_dict(self, data: Mapping[str, Any]) -> Reservation:
        return Reservation.from_dict(data)

    def adopt(self, reservation: Reservation) -> Reservation:
        """Re-install a persisted reservation (connector restart). Idempotent."""
        with self._lock:
            self._held.setdefault(reservation.replica_id, reservation)
            return self._held[reservation.replica_id]

    def adopt_dict(self, data: Mapping[str, Any]) -> Reservation:
        return self.adopt(Reservation.from_dict(data))

    # ---------------------------------------------------------------- release

    async def release(self, replica_id: str, pids: Collection[int]) -> ReleaseResult:
        """Give back a replica's resources once its processes are gone and, for GPUs, NVML
        lists none of its PIDs; a GPU still busy after the timeout is marked leaked."""
        with self._lock:
            reservation = self._held.get(replica_id)
        if reservation is None:
            return ReleaseResult(replica_id, True)
        pid_set = set(pids)
        gone = await asyncio.to_thread(procs.wait_gone, pid_set, self.release_timeout_s)
        leaked: tuple[str, ...] = ()
        if reservation.gpus and self.gpu_backend is not None and pid_set:
            leaked = await self._wait_gpus_free(reservation.gpus, pid_set)
        with self._lock:
            self._held.pop(replica_id, None)
            self._leaked.update(leaked)
        for uuid in leaked:
            # "leak" is the event catalog's kind (exporter/catalog.py EVENT_KINDS).
            self._emit(
                "leak",
                component=reservation.component,
                replica=replica_id,
                outcome="failed",
                reason=f"{_short(uuid)} still lists {replica_id}'s processes "
                f"{self.release_timeout_s:g} s after release",
                details={"gpu": uuid},
            )
            self._watch_leak(uuid, pid_set, reservation)
        for path in reservation.sockets.values():
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, path)
        return ReleaseResult(replica_id, gone, leaked)

    async def _wait_gpus_free(self, uuids: Sequence[str], pids: set[int]) -> tuple[str, ...]:
        deadline = time.monotonic() + self.release_timeout_s
        while True:
            busy = await asyncio.to_thread(self._gpus_listing, uuids, pids)
            if not busy or time.monotonic() >= deadline:
                return tuple(busy)
            await asyncio.sleep(0.1)

    def _gpus_listing(self, uuids: Sequence[str], pids: set[int]) -> list[str]:
        assert self.gpu_backend is not None
        samples = self.gpu_backend.sample()
        return [
            s.uuid for s in samples if s.uuid in uuids and any(p.pid in pids for p in s.processes)
        ]

    def _watch_leak(self, uuid: str, pids: set[int], reservation: Reservation) -> None:
        async def watch() -> None:
            while True:
                await asyncio.sleep(1.0)
                if not await asyncio.to_thread(self._gpus_listing, [uuid], pids):
                    with self._lock:
                        self._leaked.discard(uuid)
                    self._emit(
                        "leak",
                        component=reservation.component,
                        replica=reservation.replica_id,
                        outcome="ok",
                        reason=f"{_short(uuid)} is free again",
                        details={"gpu": uuid},
                    )
                    return

        task = asyncio.get_running_loop().create_task(watch())
        self._leak_tasks.add(task)
        task.add_done_callback(self._leak_tasks.discard)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(kind, **fields)

    # --------------------------------------------------------------- sampling

    def refresh(self, our_pids: Collection[int]) -> None:
        """Re-read NVML: who else uses each GPU (blocking: call in a thread)."""
        if self.gpu_backend is None:
            return
        samples = self.gpu_backend.sample()
        ours = set(our_pids)
        foreign = {
            s.uuid: sum(p.used_memory_bytes or 0 for p in s.processes if p.pid not in ours)
            for s in samples
        }
        with self._lock:
            self._last_sample = samples
            self._foreign_busy = foreign

    async def close(self) -> None:
        for task in list(self._leak_tasks):
            task.cancel()
        if self.gpu_backend is not None:
            await asyncio.to_thread(self.gpu_backend.close)

    # ------------------------------------------------------------------- view

    def machine_view(self) -> dict[str, Any]:
        """The whole machine for the API, the status page and the exporter."""
        with self._lock:
            samples = {s.uuid: s for s in self._last_sample}
            gpus = []
            for g in self.inventory.gpus:
                owners = self._holders(g.uuid)
                state = "leaked" if g.uuid in self._leaked else ("allocated" if owners else "free")
                entry: dict[str, Any] = {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "state": state,
                    "owners": owners,
                    "fraction_used": round(
                        1.0 if self._whole_holder(g.uuid) else self._fraction_used(g.uuid), 6
                    ),
                    "memory_total_bytes": g.memory_total_bytes,
                    "foreign_memory_bytes": self._foreign_busy.get(g.uuid, 0),
                    "blocked_by_foreign": self._foreign_busy.get(g.uuid, 0)
                    > self.foreign_threshold,
                }
                sample = samples.get(g.uuid)
                if sample is not None and sample.memory_used_bytes is not None:
                    entry["memory_used_bytes"] = sample.memory_used_bytes
                gpus.append(entry)
            reserved_cores = sum(r.cpu_cores for r in self._held.values())
            reserved_memory = sum(r.memory_bytes for r in self._held.values())
            return {
                "gpus": gpus,
                # A GPU busy with foreign processes is not allocated, but not usable either.
                "free_gpus": sum(
                    1 for g in gpus if g["state"] == "free" and not g["blocked_by_foreign"]
                ),
                "gpu_backend": self.inventory.gpu_reason or "ok",
                "cpu": {
                    "allocatable_cores": float(len(self.inventory.cpus)),
                    "reserved_cores": reserved_cores,
                    "pinned": sorted(c for r in self._held.values() for c in r.cpus),
                },
                "memory": {
                    "allocatable_bytes": self.inventory.memory_bytes,
                    "reserved_bytes": reserved_memory,
                },
                "ports": {r.replica_id: dict(r.ports) for r in self._held.values() if r.ports},
                "sockets": {
                    r.replica_id: dict(r.sockets) for r in self._held.values() if r.sockets
                },
                "port_range": list(self.port_range),
            }


def _place(free: list[GpuDevice], n: int) -> list[GpuDevice]:
    """Choose n of the free GPUs: NVLink-connected, then one NUMA node, then contiguous."""
    if n == 1:
        return free[:1]
    by_uuid = {g.uuid: g for g in free}
    for g in free:  # an NVLink clique containing g, lowest indices first
        if not g.nvlink_peers:
            continue
        group = [g]
        for peer in sorted(
            (by_uuid[u] for u in g.nvlink_peers if u in by_uuid), key=lambda d: d.index
        ):
            if all(peer.nvlink_peers and m.uuid in peer.nvlink_peers for m in group):
                group.append(peer)
            if len(group) == n:
                return group
    nodes: dict[int, list[GpuDevice]] = {}
    for g in free:
        if g.numa_node is not None:
            nodes.setdefault(g.numa_node, []).append(g)
    for node in sorted(nodes):
        if len(nodes[node]) >= n:
            return _contiguous(nodes[node], n)
    return _contiguous(free, n)


def _contiguous(free: list[GpuDevice], n: int) -> list[GpuDevice]:
    ordered = sorted(free, key=lambda g: g.index)
    for i in range(len(ordered) - n + 1):
        run = ordered[i : i + n]
        if run[-1].index - run[0].index == n - 1:
            return run
    return ordered[:n]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def open_resource_manager(
    gpu_backend_spec: str,
    *,
    working_dir: Path,
    namespace: str,
    port_range: tuple[int, int] = (20000, 29999),
    on_event: Callable[..., Any] | None = None,
    foreign_memory_threshold_bytes: int = 1 << 30,
    release_timeout_s: float = 30.0,
) -> ResourceManager:
    backend, reason = await asyncio.to_thread(open_gpu_backend, gpu_backend_spec)
    del namespace  # paths are under the namespace's working dir already
    return await ResourceManager.create(
        backend,
        working_dir=working_dir,
        gpu_reason=reason,
        port_range=port_range,
        on_event=on_event,
        foreign_memory_threshold_bytes=foreign_memory_threshold_bytes,
        release_timeout_s=release_timeout_s,
    )
