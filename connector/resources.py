"""Resource inventory and all-or-nothing reservations: GPUs, CPU, memory, ports, sockets.

Every replica gets its resources here before its process starts and gives them back only
when they are really free: its processes are gone (psutil) and NVML lists none of its PIDs.
Processes that outlive the release timeout keep everything held (``lingering``) until they
exit. A GPU that stays busy past the release timeout, or whose processes NVML cannot list,
is marked ``leaked`` and is not handed out again until NVML shows it free.

``reserve`` is synchronous with no await inside, so on the event loop it is atomic; a lock
also makes it safe from threads. Nothing is ever over-allocated: a whole GPU has one holder,
fractions on one GPU sum to at most 1 and never share with a whole-GPU holder, and CPU cores
and memory stay within what the machine (and the connector's own affinity) offers.

Placement of N > 1 GPUs prefers a set connected by NVLink, then GPUs on one NUMA node, then
the lowest contiguous indices. GPUs that foreign processes (not ours) use beyond a memory
threshold are skipped, and so are GPUs in MIG mode (their MIG instances are not handed out;
a whole-GPU UUID would show the process no device). GPUs go to the process as
``CUDA_VISIBLE_DEVICES`` with UUIDs, because CUDA's index order can differ from NVML's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from connector import defaults, procs, templates
from connector.errors import ResourcesExhausted
from connector.graph import PortSpec, ResourceRequest, SocketSpec
from connector.nvml import GpuBackend, GpuDevice, GpuSample, open_gpu_backend
from connector.quantities import approx_memory, format_memory

EPS = 1e-9
SOCKET_PATH_LIMIT = 100  # sun_path is 108 bytes; keep a margin
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Reservation:
    """Everything one replica holds. Persisted in the connector's state (``to_dict``) and
    re-installed on start (:meth:`ResourceManager.adopt`)."""

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
        """JSON-safe form, read back by :meth:`from_dict`."""
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
        """The reservation :meth:`to_dict` wrote (missing optional keys read as empty)."""
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

    def gpu_fields(self) -> dict[str, str]:
        """The ``{gpu.count}``, ``{gpu.fraction}`` and ``{gpu.uuids}`` template values."""
        return templates.gpu_fields(self.gpus, self.gpu_fraction)

    def env(self) -> dict[str, str]:
        """What the replica's process is told about its allocation.

        ``CUDA_VISIBLE_DEVICES`` is always set, to ``""`` when no GPU was asked for, so a
        replica never sees a GPU it does not hold. Ports and sockets go to the env var their
        spec names (``PortSpec.env`` / ``SocketSpec.env``).
        """
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


class ReservationAsk(NamedTuple):
    """One replica's request in :meth:`ResourceManager.reserve_many` (a plain 5-tuple in
    this order is accepted too)."""

    replica_id: str
    component: str
    request: ResourceRequest
    ports: Sequence[PortSpec] = ()
    sockets: Sequence[SocketSpec] = ()


@dataclass(frozen=True)
class Inventory:
    """What the connector may hand out: GPUs (NVML order), CPU cores, memory."""

    gpus: tuple[GpuDevice, ...]
    cpus: tuple[int, ...]
    memory_bytes: int
    gpu_reason: str | None = None  # why there are no GPUs, when there are none

    @classmethod
    def detect(
        cls,
        backend: GpuBackend | None,
        reason: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> Inventory:
        """GPUs from ``backend`` (limited by ``CUDA_VISIBLE_DEVICES`` in ``environ``, the
        process environment by default), CPU cores from the scheduler affinity, memory from
        psutil. ``reason`` says why ``backend`` is None. Blocking (NVML): call in a thread."""
        gpus: list[GpuDevice] = backend.devices() if backend is not None else []
        visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
        if visible is not None and gpus:
            gpus = visible_gpus(gpus, visible)
            if not gpus:
                reason = f"CUDA_VISIBLE_DEVICES={visible!r} leaves no GPU to hand out"
        return cls(
            gpus=tuple(gpus),
            cpus=tuple(sorted(os.sched_getaffinity(0))),
            memory_bytes=int(psutil.virtual_memory().total),
            gpu_reason=reason if not gpus else None,
        )


def visible_gpus(gpus: Sequence[GpuDevice], visible: str) -> list[GpuDevice]:
    """The GPUs a ``CUDA_VISIBLE_DEVICES`` value leaves, in NVML order, read as CUDA reads it.

    Entries are indices or UUIDs; a UUID may be shortened to a prefix that names one GPU
    ("GPU-3916acbf"). As in CUDA, an entry naming no GPU (e.g. ``-1``) hides it and every
    entry after it. Indices are NVML's, which are CUDA's only under
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``: UUIDs are exact. ``MIG-`` entries name MIG instances,
    which are not handed out: they are skipped.
    """
    chosen: list[str] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if entry.startswith("MIG-"):
            continue
        if entry.isdigit():
            match = [g for g in gpus if g.index == int(entry)]
        else:
            match = [g for g in gpus if entry and g.uuid.startswith(entry)]
        if len(match) != 1:
            break
        chosen.append(match[0].uuid)
    return [g for g in gpus if g.uuid in chosen]


@dataclass
class ReleaseResult:
    """How a release ended: whether the processes were gone within the timeout, and which
    GPUs still listed them after it (now ``leaked``)."""

    replica_id: str
    processes_gone: bool
    leaked_gpus: tuple[str, ...] = ()


LISTED = "listed"  # why a GPU is not free: NVML lists the replica's processes on it


class _Leak(NamedTuple):
    """A GPU not shown free after a release: whose processes, and why (``LISTED`` or what
    kept NVML from saying)."""

    component: str
    replica_id: str
    why: str
    pids: frozenset[int]  # the replica's process tree as released


class _Lingering(NamedTuple):
    """A stopped replica's reservation, held while its processes outlive the release."""

    reservation: Reservation
    identities: Mapping[int, float]  # pid -> start time (procs.identify) of the survivors
    pids: frozenset[int]  # the replica's process tree as released


def _short(uuid: str) -> str:
    return uuid[:12] + "…" if len(uuid) > 13 else uuid


def _plural(n: float, unit: str) -> str:
    return f"{n:g} {unit}" if n == 1 else f"{n:g} {unit}s"


def _gpu_amount(amount: float) -> str:
    return f"{amount:g} of a GPU" if amount < 1 else _plural(amount, "GPU")


def _ordinal(replica_id: str) -> str:
    return replica_id.rsplit("/", 1)[-1]


class ResourceManager:
    """Holds every replica's reservation; the only place resources are handed out.

    ``foreign_memory_threshold_bytes``: a GPU whose processes that are not ours use more
    GPU memory than this is skipped (known after :meth:`refresh`). ``release_timeout_s``:
    how long :meth:`release` waits for processes to exit and NVML to let go before marking
    a GPU leaked, polling NVML every ``release_poll_s``. ``on_event(kind, **fields)``
    receives ``leak`` and ``allocate`` events.
    """

    def __init__(
        self,
        inventory: Inventory,
        *,
        working_dir: Path,
        port_range: tuple[int, int] = defaults.PORT_RANGE,
        foreign_memory_threshold_bytes: int = defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES,
        release_timeout_s: float = defaults.RELEASE_TIMEOUT_S,
        gpu_backend: GpuBackend | None = None,
        on_event: Callable[..., Any] | None = None,
        release_poll_s: float = 0.1,
        leak_poll_s: float = 1.0,
    ) -> None:
        self.inventory = inventory
        self.working_dir = working_dir
        self.port_range = port_range
        self.foreign_threshold = foreign_memory_threshold_bytes
        self.release_timeout_s = release_timeout_s
        self.release_poll_s = release_poll_s
        self.leak_poll_s = leak_poll_s
        self.gpu_backend = gpu_backend
        self.on_event = on_event
        self._lock = threading.RLock()
        self._held: dict[str, Reservation] = {}
        self._leaked: dict[str, _Leak] = {}  # uuid -> whose processes hold it, and why
        # Reservations of stopped replicas whose processes outlived the release timeout,
        # by id() of the reservation (a new replica may reuse the replica id meanwhile).
        self._lingering: dict[int, _Lingering] = {}
        self._lists_processes: set[str] = set()  # GPUs NVML has listed processes for
        self._foreign_busy: dict[str, int] = {}  # uuid -> bytes used by processes not ours
        self._last_sample: list[GpuSample] = []
        self._next_port = port_range[0]
        self._leak_tasks: set[asyncio.Task[None]] = set()
        self._releases: dict[str, asyncio.Task[ReleaseResult]] = {}

    @classmethod
    async def create(
        cls,
        gpu_backend: GpuBackend | None,
        *,
        working_dir: Path,
        gpu_reason: str | None = None,
        **kwargs: Any,
    ) -> ResourceManager:
        """A manager over the detected inventory (NVML read in a thread); ``gpu_reason``
        says why ``gpu_backend`` is None; ``kwargs`` go to the constructor."""
        inventory = await asyncio.to_thread(Inventory.detect, gpu_backend, gpu_reason)
        return cls(inventory, working_dir=working_dir, gpu_backend=gpu_backend, **kwargs)

    # ---------------------------------------------------------------- queries

    def reservation(self, replica_id: str) -> Reservation | None:
        """What ``replica_id`` holds, or None."""
        with self._lock:
            return self._held.get(replica_id)

    def reservations(self) -> list[Reservation]:
        """Every reservation held, in the order they were made or adopted."""
        with self._lock:
            return list(self._held.values())

    def _holds(self) -> list[tuple[str, Reservation]]:
        """Every reservation holding resources, with the holder's name: the replicas'
        (by replica id), then the lingering ones of stopped replicas (callers hold the
        lock)."""
        out = [(r.replica_id, r) for r in self._held.values()]
        out += [
            (f"{g.reservation.replica_id} (stopped; processes still running)", g.reservation)
            for g in self._lingering.values()
        ]
        return out

    def _whole_holder(self, uuid: str) -> str | None:
        for who, r in self._holds():
            if uuid in r.gpus and not r.gpu_fraction:
                return who
        return None

    def _fraction_used(self, uuid: str) -> float:
        return sum(r.gpu_fraction for _, r in self._holds() if r.gpu_fraction and uuid in r.gpus)

    def _holders(self, uuid: str) -> list[str]:
        return [who for who, r in self._holds() if uuid in r.gpus]

    # ------------------------------------------------------------ reservation

    def reserve(
        self,
        replica_id: str,
        component: str,
        request: ResourceRequest,
        ports: Sequence[PortSpec] = (),
        sockets: Sequence[SocketSpec] = (),
    ) -> Reservation:
        """Reserve everything one replica needs, or nothing.

        Raises :class:`ResourcesExhausted` naming what is missing and who holds it, with
        ``details`` (``needed``, ``free``, and ``holders`` for GPUs or ``kind`` for the
        rest). Synchronous with no await: atomic on the event loop, and locked for threads.
        A replica that already holds a reservation gets it back unchanged. Nothing is
        written to disk here: :meth:`prepare` does that before the process starts.
        """
        with self._lock:
            existing = self._held.get(replica_id)
            if existing is not None:
                return existing
            label = f"{component} replica {_ordinal(replica_id)}"
            gpus, fraction = self._pick_gpus(label, request.gpu)
            cores = self._check_cpu(label, request, gpus)
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
        return reservation

    def _usable(self, dev: GpuDevice) -> bool:
        return self._blocked_by(dev) is None

    def _blocked_by(self, dev: GpuDevice) -> str | None:
        """Why a GPU nobody of ours holds cannot be handed out, or None."""
        if dev.uuid in self._leaked:
            return "leaked"
        if dev.mig_mode:
            return "MIG mode"
        if self._foreign_busy.get(dev.uuid, 0) > self.foreign_threshold:
            return "foreign processes"
        return None

    def _exhausted(self, message: str, **details: Any) -> ResourcesExhausted:
        return ResourcesExhausted(message, **details)

    def _pick_gpus(self, label: str, amount: float) -> tuple[tuple[str, ...], float]:
        if amount <= 0:
            return (), 0.0
        if amount > 1 and amount != int(amount):
            # The graph loader refuses these; a caller building requests by hand may not.
            raise ValueError(f"gpu must be a fraction below 1 or a whole number, got {amount:g}")
        gpus = list(self.inventory.gpus)
        if not gpus:
            raise self._exhausted(
                f"{label} needs {_gpu_amount(amount)}, 0 on this machine"
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
        parts: list[str] = []
        for g in self.inventory.gpus:
            who = self._holders(g.uuid)
            blocked = self._blocked_by(g)
            if who:
                holders[g.uuid] = who
                parts.append(f"{_short(g.uuid)} held by {', '.join(who)}")
            elif blocked is not None:
                holders[g.uuid] = [blocked]
                parts.append(f"{_short(g.uuid)} {self._blocked_phrase(g.uuid, blocked)}")
        message = f"{label} needs {_gpu_amount(needed)}, {free} free"
        if parts:
            message += "; " + "; ".join(parts)
        return self._exhausted(message, needed=needed, free=free, holders=holders)

    def _blocked_phrase(self, uuid: str, blocked: str) -> str:
        if blocked == "leaked":
            leak = self._leaked[uuid]
            if leak.why == LISTED:
                return f"leaked by {leak.replica_id} (NVML still lists its processes)"
            return f"leaked by {leak.replica_id} (not shown free of its processes: {leak.why})"
        if blocked == "foreign processes":
            used = approx_memory(self._foreign_busy.get(uuid, 0))
            return f"busy with foreign processes ({used} of GPU memory)"
        return "in MIG mode (MIG instances are not handed out)"

    def _check_cpu(
        self, label: str, request: ResourceRequest, gpus: Sequence[str] = ()
    ) -> tuple[int, ...]:
        total = float(len(self.inventory.cpus))
        # Summed only when asked for: a scale of many replicas that request no CPU stays
        # linear instead of adding up every reservation once per replica.
        used = sum(r.cpu_cores for _, r in self._holds()) if request.cpu else 0.0
        if request.cpu and used + request.cpu > total + EPS:
            raise self._exhausted(
                f"{label} needs {_plural(request.cpu, 'CPU core')}, "
                f"{max(total - used, 0):g} of {total:g} unreserved",
                needed=request.cpu,
                free=max(total - used, 0),
                kind="cpu",
            )
        if not request.pin_cpus or not request.cpu:
            return ()
        pinned = {c for _, r in self._holds() for c in r.cpus}
        free = [c for c in self.inventory.cpus if c not in pinned]
        want = math.ceil(request.cpu)
        if len(free) < want:
            raise self._exhausted(
                f"{label} needs {_plural(want, 'pinned CPU core')}, {len(free)} not pinned",
                needed=want,
                free=len(free),
                kind="cpu",
            )
        # Cores close to the replica's GPUs first (NVML's CPU affinity), when NVML says.
        near = self._gpu_affinity(gpus)
        free.sort(key=lambda c: (c not in near, c))
        return tuple(sorted(free[:want]))

    def _gpu_affinity(self, gpus: Sequence[str]) -> set[int]:
        by_uuid = {g.uuid: g for g in self.inventory.gpus}
        near: set[int] = set()
        for uuid in gpus:
            dev = by_uuid.get(uuid)
            if dev is None or dev.cpu_affinity is None:
                return set()
            near.update(dev.cpu_affinity)
        return near

    def _check_memory(self, label: str, amount: int) -> None:
        if not amount:
            return
        used = sum(r.memory_bytes for _, r in self._holds())
        free = self.inventory.memory_bytes - used
        if amount > free:
            raise self._exhausted(
                f"{label} needs {format_memory(amount)} of memory, "
                f"{approx_memory(max(free, 0))} unreserved",
                needed=amount,
                free=max(free, 0),
                kind="memory",
            )

    def _pick_ports(self, label: str, specs: Sequence[PortSpec]) -> dict[str, int]:
        if not specs:
            return {}
        taken = {p for _, r in self._holds() for p in r.ports.values()}
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
            mine = sum(1 for p in taken if lo <= p <= hi)
            raise self._exhausted(
                f"{label} needs {_plural(len(specs), 'port')}, {len(out)} free in {lo}-{hi} "
                f"({mine} held by replicas, the rest bound by other processes)",
                needed=len(specs),
                free=len(out),
                kind="ports",
            )
        self._next_port = port
        return out

    def prepare(self, replica_id: str) -> tuple[Reservation | None, list[str]]:
        """Just before a replica's process (re)starts: its socket folder exists, no stale
        socket file sits at its paths (a process that died leaves its file behind, and
        binding an existing path fails), and its ports are still free
        (:meth:`recheck_ports`, whose result this returns). Blocking: call it in a thread.
        """
        held = self.reservation(replica_id)
        if held is not None and held.sockets:
            (self.working_dir / "sock").mkdir(parents=True, exist_ok=True)
            for path in held.sockets.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return self.recheck_ports(replica_id)

    def recheck_ports(self, replica_id: str) -> tuple[Reservation | None, list[str]]:
        """Before a replica's process (re)starts: are its reserved ports still free? A
        foreign process may have bound one since the reservation or the last exit. Each
        taken port moves to a free one in the range. Returns the reservation (a new one when
        a port moved; None for an unknown replica) and one line per move naming who holds
        the old port. Raises :class:`ResourcesExhausted` when no free port is left (the
        reservation is unchanged then). Blocking (binds, and psutil): call it in a thread.
        """
        with self._lock:
            held = self._held.get(replica_id)
            if held is None or not held.ports:
                return held, []
            # SO_REUSEADDR as servers bind: only a listener (or a binder) counts as taken,
            # not the TIME_WAIT connections the replica's previous process left behind.
            taken = [name for name, port in held.ports.items() if not _port_free(port, True)]
            if not taken:
                return held, []
            label = f"{held.component} replica {_ordinal(replica_id)}"
            moved = self._pick_ports(label, [PortSpec(name) for name in taken])
            updated = replace(held, ports={**held.ports, **moved})
            self._held[replica_id] = updated
        lines = [
            f"{replica_id}: port {name} {held.ports[name]} is taken by "
            f"{_port_holder(held.ports[name])}; moved to {moved[name]}"
            for name in taken
        ]
        return updated, lines

    def _socket_paths(
        self, component: str, replica_id: str, specs: Sequence[SocketSpec]
    ) -> dict[str, str]:
        if not specs:
            return {}
        base = self.working_dir / "sock"
        held = {p for _, r in self._holds() for p in r.sockets.values()}
        out: dict[str, str] = {}
        for spec in specs:
            name = f"{component.lower()}-{_ordinal(replica_id)}-{spec.name}"
            path = base / f"{_UNSAFE_IN_NAME.sub('_', name)}.sock"
            # Too long, or taken (components differing only in case): a hashed name.
            if len(os.fsencode(str(path))) >= SOCKET_PATH_LIMIT or str(path) in held:
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
        return out

    def reserve_many(
        self, asks: Sequence[ReservationAsk]
    ) -> tuple[list[Reservation], list[ResourcesExhausted]]:
        """Reserve for several replicas in order, each all-or-nothing: those that fit are
        kept (in order), the others reported, one error each; nothing is rolled back."""
        done: list[Reservation] = []
        failed: list[ResourcesExhausted] = []
        with self._lock:
            for ask in asks:
                replica_id, component, request, ports, sockets = ReservationAsk(*ask)
                try:
                    done.append(self.reserve(replica_id, component, request, ports, sockets))
                except ResourcesExhausted as exc:
                    failed.append(exc)
        return done, failed

    def reservation_from_dict(self, data: Mapping[str, Any]) -> Reservation:
        """:meth:`Reservation.from_dict` (for callers that only hold the manager)."""
        return Reservation.from_dict(data)

    def adopt(self, reservation: Reservation) -> Reservation:
        """Re-install a persisted reservation (connector restart) and return what is held.

        Idempotent: a replica already holding one keeps it. The reservation is installed
        even when it collides with another (its process holds those resources either way);
        the collision is reported as an ``allocate`` event so nothing passes silently.
        """
        with self._lock:
            held = self._held.get(reservation.replica_id)
            if held is not None:
                return held
            clash = self._collisions(reservation)
            self._held[reservation.replica_id] = reservation
        if clash:
            self._emit(
                "allocate",
                component=reservation.component,
                replica=reservation.replica_id,
                outcome="failed",
                reason=f"adopted {reservation.replica_id} overlaps: {'; '.join(clash)}",
                details={"collisions": clash},
            )
        return reservation

    def _collisions(self, r: Reservation) -> list[str]:
        """What ``r`` would share with the reservations held now (callers hold the lock)."""
        out = []
        for uuid in r.gpus:
            whole = self._whole_holder(uuid)
            fraction = self._fraction_used(uuid)
            if whole is not None:
                out.append(f"{_short(uuid)} is held whole by {whole}")
            elif fraction and (not r.gpu_fraction or fraction + r.gpu_fraction > 1 + EPS):
                out.append(f"{_short(uuid)} is {fraction:g} taken by fractions")
        ports = {p: who for who, o in self._holds() for p in o.ports.values()}
        out += [f"port {p} is held by {ports[p]}" for p in r.ports.values() if p in ports]
        cpus = {c: who for who, o in self._holds() for c in o.cpus}
        out += [f"CPU {c} is pinned by {cpus[c]}" for c in r.cpus if c in cpus]
        return out

    def adopt_dict(self, data: Mapping[str, Any]) -> Reservation:
        """:meth:`adopt` a reservation in its :meth:`Reservation.to_dict` form."""
        return self.adopt(Reservation.from_dict(data))

    # ---------------------------------------------------------------- release

    async def release(self, replica_id: str, pids: Collection[int]) -> ReleaseResult:
        """Give back a replica's resources once ``pids`` (its process tree) are gone (psutil)
        and, for GPUs, NVML lists none of them, both within ``release_timeout_s``.

        Until then the reservation stays held. Processes still running after the timeout
        (stuck in the driver, say) keep all of it held as *lingering*, reported by a
        ``leak`` event, until they exit. A GPU still listing them after the timeout, or one
        whose processes NVML cannot list, is marked ``leaked``, stays unallocatable, and
        becomes free again, with another event, once NVML shows it free. Empty ``pids``
        (the processes are known to be gone) release at once. Concurrent calls for one
        replica share one wait. An unknown replica is a no-op.
        """
        running = self._releases.get(replica_id)
        if running is not None:
            return await asyncio.shield(running)
        with self._lock:
            reservation = self._held.get(replica_id)
        if reservation is None:
            return ReleaseResult(replica_id, True)
        task = asyncio.get_running_loop().create_task(self._release(reservation, set(pids)))
        self._releases[replica_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._releases.pop(replica_id, None)
            else:  # we were cancelled; the release goes on and cleans up after itself
                task.add_done_callback(lambda _: self._releases.pop(replica_id, None))

    async def _release(self, reservation: Reservation, pid_set: set[int]) -> ReleaseResult:
        replica_id = reservation.replica_id
        deadline = time.monotonic() + self.release_timeout_s
        identities = await asyncio.to_thread(procs.identify, pid_set)
        gone = await asyncio.to_thread(procs.wait_gone, identities, self.release_timeout_s)
        if not gone:
            await self._linger(reservation, pid_set, identities)
            return ReleaseResult(replica_id, False)
        leaked = await self._free_gpus(reservation, pid_set, deadline)
        return ReleaseResult(replica_id, True, leaked)

    async def _free_gpus(
        self, reservation: Reservation, pid_set: set[int], deadline: float
    ) -> tuple[str, ...]:
        """The processes are gone: drop the reservation (wherever it is held), once NVML
        shows its GPUs free of them or ``deadline`` passes; the GPUs still busy then are
        marked leaked and watched. Returns those."""
        busy: dict[str, str] = {}
        if reservation.gpus and self.gpu_backend is not None and pid_set:
            busy = await self._wait_gpus_free(reservation.gpus, pid_set, deadline)
        with self._lock:
            if self._held.get(reservation.replica_id) is reservation:
                del self._held[reservation.replica_id]
            self._lingering.pop(id(reservation), None)
            self._leaked.update(
                {
                    u: _Leak(reservation.component, reservation.replica_id, why, frozenset(pid_set))
                    for u, why in busy.items()
                }
            )
        for uuid, why in busy.items():
            self._leak_event(
                reservation.component,
                reservation.replica_id,
                "failed",
                f"{_short(uuid)} {self._leak_phrase(uuid, why, reservation.replica_id)} "
                f"{self.release_timeout_s:g} s after release",
                gpu=uuid,
            )
            self._watch_leak(uuid)
        for path in reservation.sockets.values():
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, path)
        return tuple(busy)

    async def _linger(
        self, reservation: Reservation, pid_set: set[int], identities: Mapping[int, float]
    ) -> None:
        """Processes outlived the release timeout: they may still use the ports, cores and
        GPUs, so everything stays held (as lingering) until they exit, then the GPUs get
        the usual NVML check."""
        replica_id = reservation.replica_id
        alive = sorted(await asyncio.to_thread(procs.running, identities))
        self._leak_event(
            reservation.component,
            replica_id,
            "failed",
            f"{replica_id}'s processes {', '.join(map(str, alive))} still run "
            f"{self.release_timeout_s:g} s after release; its resources stay held until "
            "they exit",
            pids=alive,
        )
        self._hold_lingering(_Lingering(reservation, identities, frozenset(pid_set)))

    def _hold_lingering(self, lingering: _Lingering) -> None:
        """Hold a lingering reservation and watch its processes; once they are gone its
        GPUs get the usual NVML check and everything is released."""
        reservation = lingering.reservation
        with self._lock:
            # Held to lingering in one step: never held nowhere, so never handed out meanwhile.
            if self._held.get(reservation.replica_id) is reservation:
                del self._held[reservation.replica_id]
            self._lingering[id(reservation)] = lingering

        async def watch() -> None:
            while True:  # psutil has no exit notification for processes not our children
                if not await asyncio.to_thread(procs.running, lingering.identities):
                    break
                await asyncio.sleep(self.leak_poll_s)
            self._leak_event(
                reservation.component,
                reservation.replica_id,
                "ok",
                f"{reservation.replica_id}'s processes exited; its resources are released",
                pids=sorted(lingering.identities),
            )
            deadline = time.monotonic() + self.release_timeout_s
            await self._free_gpus(reservation, set(lingering.pids), deadline)

        self._track(watch())

    async def _wait_gpus_free(
        self, uuids: Sequence[str], pids: set[int], deadline: float
    ) -> dict[str, str]:
        """The GPUs of ``uuids`` not shown free of ``pids`` at ``deadline``, with why (NVML
        is read at least once)."""
        while True:
            busy = await asyncio.to_thread(self._gpus_not_free, uuids, pids)
            if not busy or time.monotonic() >= deadline:
                return busy
            await asyncio.sleep(self.release_poll_s)

    def _gpus_not_free(self, uuids: Sequence[str], pids: set[int]) -> dict[str, str]:
        """Of ``uuids``, those NVML does not show free of ``pids``, each with why:
        ``listed`` (NVML lists one of them) or what kept NVML from saying."""
        assert self.gpu_backend is not None
        try:
            samples = self.gpu_backend.sample()
        except Exception as exc:  # any backend failure is "unknown", never "free"
            return dict.fromkeys(uuids, f"NVML failed: {exc}")
        busy: dict[str, str] = {}
        with self._lock:
            for s in samples:
                if s.uuid not in uuids:
                    continue
                if s.processes_known:
                    self._lists_processes.add(s.uuid)
                    if any(p.pid in pids for p in s.processes):
                        busy[s.uuid] = LISTED
                # A GPU NVML has never listed processes for (some drivers in VMs) is judged
                # by psutil alone; one that did list them before is not trusted empty now.
                elif s.uuid in self._lists_processes:
                    busy[s.uuid] = "NVML could not list its processes"
        return busy

    def _leak_phrase(self, uuid: str, why: str, replica_id: str) -> str:
        if why == LISTED:
            return f"still lists {replica_id}'s processes"
        return f"is not shown free of {replica_id}'s processes ({why})"

    def _watch_leak(self, uuid: str) -> None:
        """Poll NVML until the leaked GPU ``uuid`` is free of its replica's processes."""
        leak = self._leaked[uuid]

        async def watch() -> None:
            while True:
                await asyncio.sleep(self.leak_poll_s)
                if not await asyncio.to_thread(self._gpus_not_free, [uuid], set(leak.pids)):
                    break
            with self._lock:
                self._leaked.pop(uuid, None)
            self._leak_event(
                leak.component, leak.replica_id, "ok", f"{_short(uuid)} is free again", gpu=uuid
            )

        self._track(watch())

    def _track(self, watcher: Coroutine[Any, Any, None]) -> None:
        """Run a leak watcher until it is done or :meth:`close` cancels it."""
        task = asyncio.get_running_loop().create_task(watcher)
        self._leak_tasks.add(task)
        task.add_done_callback(self._leak_tasks.discard)

    # ------------------------------------------------------------ persistence

    def held_after_stop(self) -> list[dict[str, Any]]:
        """What stopped replicas still hold, JSON-safe, for the connector's persisted state
        (read back by :meth:`restore_held_after_stop`): lingering reservations with their
        processes' start times, and leaked GPUs with the PIDs NVML was listing."""
        with self._lock:
            out: list[dict[str, Any]] = [
                {
                    "kind": "lingering",
                    "reservation": g.reservation.to_dict(),
                    "processes": {str(pid): t for pid, t in sorted(g.identities.items())},
                    "pids": sorted(g.pids),
                }
                for g in self._lingering.values()
            ]
            out += [
                {
                    "kind": "leaked",
                    "gpu": uuid,
                    "component": leak.component,
                    "replica": leak.replica_id,
                    "why": leak.why,
                    "pids": sorted(leak.pids),
                }
                for uuid, leak in self._leaked.items()
            ]
        return out

    def restore_held_after_stop(self, entries: Sequence[Mapping[str, Any]]) -> list[str]:
        """Hold again what :meth:`held_after_stop` persisted before a connector restart, and
        watch it as before: a lingering reservation is released once its processes are gone
        (at once if they already are), a leaked GPU once NVML shows it free. Call on the
        event loop. Returns a problem per entry that could not be read or names a GPU this
        machine no longer has (those are dropped)."""
        problems: list[str] = []
        known = {g.uuid for g in self.inventory.gpus}
        for n, entry in enumerate(entries):
            try:
                if entry["kind"] == "lingering":
                    identities = {int(p): float(t) for p, t in dict(entry["processes"]).items()}
                    self._hold_lingering(
                        _Lingering(
                            Reservation.from_dict(entry["reservation"]),
                            identities,
                            frozenset(int(p) for p in entry["pids"]),
                        )
                    )
                elif entry["kind"] == "leaked":
                    uuid = str(entry["gpu"])
                    if uuid not in known:
                        problems.append(f"entry {n}: leaked GPU {uuid} is not on this machine")
                        continue
                    leak = _Leak(
                        str(entry["component"]),
                        str(entry["replica"]),
                        str(entry["why"]),
                        frozenset(int(p) for p in entry["pids"]),
                    )
                    with self._lock:
                        self._leaked[uuid] = leak
                    self._watch_leak(uuid)
                else:
                    problems.append(f"entry {n}: unknown kind {entry['kind']!r}")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                problems.append(f"entry {n}: unreadable ({type(exc).__name__}: {exc})")
        return problems

    def _leak_event(
        self, component: str, replica: str, outcome: str, reason: str, **details: Any
    ) -> None:
        # "leak" is the event catalog's kind (exporter/catalog.py EVENT_KINDS): "failed"
        # when something stays held past a release, "ok" when it is free again.
        self._emit(
            "leak",
            component=component,
            replica=replica,
            outcome=outcome,
            reason=reason,
            details=details,
        )

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(kind, **fields)

    # --------------------------------------------------------------- sampling

    @property
    def samples_gpus(self) -> bool:
        """Whether :meth:`refresh` reads anything (there is a GPU backend)."""
        return self.gpu_backend is not None

    def refresh(self, our_pids: Collection[int]) -> None:
        """Re-read NVML: how much GPU memory processes outside ``our_pids`` (every replica's
        process tree) use on each GPU, for the foreign-use check and the machine view.
        Blocking: call it in a thread."""
        if self.gpu_backend is None:
            return
        samples = self.gpu_backend.sample()
        with self._lock:  # lingering processes are a stopped replica's: ours, not foreign
            ours = set(our_pids).union(*(g.identities for g in self._lingering.values()))
        foreign = {
            s.uuid: sum(p.used_memory_bytes or 0 for p in s.processes if p.pid not in ours)
            for s in samples
        }
        with self._lock:
            self._last_sample = samples
            self._foreign_busy = foreign
            self._lists_processes.update(s.uuid for s in samples if s.processes_known)

    async def close(self) -> None:
        """Stop the leak watchers and releases still waiting (their reservations stay
        held, as persisted), and close the GPU backend."""
        for task in [*self._leak_tasks, *self._releases.values()]:
            task.cancel()
        if self.gpu_backend is not None:
            await asyncio.to_thread(self.gpu_backend.close)

    # ------------------------------------------------------------------- view

    def machine_view(self) -> dict[str, Any]:
        """The whole machine for the API, the status page and the exporter: per GPU its
        state (``free``, ``allocated``, ``leaked``), owners, fraction used, memory (used as of
        the last :meth:`refresh`), foreign use and MIG mode; CPU and memory budgets (lingering
        reservations included); ports and sockets per replica; the lingering reservations
        of stopped replicas whose processes still run. JSON-safe."""
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
                        1.0 if self._whole_holder(g.uuid) else float(self._fraction_used(g.uuid)),
                        6,
                    ),
                    "memory_total_bytes": g.memory_total_bytes,
                    "foreign_memory_bytes": self._foreign_busy.get(g.uuid, 0),
                    "blocked_by_foreign": self._foreign_busy.get(g.uuid, 0)
                    > self.foreign_threshold,
                    "mig_mode": g.mig_mode,
                }
                sample = samples.get(g.uuid)
                if sample is not None and sample.memory_used_bytes is not None:
                    entry["memory_used_bytes"] = sample.memory_used_bytes
                gpus.append(entry)
            holds = [r for _, r in self._holds()]
            reserved_cores = sum(r.cpu_cores for r in holds)
            reserved_memory = sum(r.memory_bytes for r in holds)
            return {
                "gpus": gpus,
                # A GPU busy with foreign processes (or in MIG mode) is not allocated, but not
                # usable either.
                "free_gpus": sum(
                    1
                    for g, e in zip(self.inventory.gpus, gpus, strict=True)
                    if e["state"] == "free" and self._blocked_by(g) is None
                ),
                "gpu_backend": self.inventory.gpu_reason or "ok",
                "cpu": {
                    "allocatable_cores": float(len(self.inventory.cpus)),
                    "reserved_cores": reserved_cores,
                    "pinned": sorted(c for r in holds for c in r.cpus),
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
                # Stopped replicas whose processes outlived the release: still holding.
                "lingering": [
                    {
                        "replica": g.reservation.replica_id,
                        "pids": sorted(g.identities),
                        "reservation": g.reservation.to_dict(),
                    }
                    for g in self._lingering.values()
                ],
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


def _port_free(port: int, reuse_address: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_holder(port: int) -> str:
    """Who has ``port`` bound, as well as psutil can tell ("pid 4242 (nginx)")."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"pid {conn.pid}"
    return "another process"


async def open_resource_manager(
    gpu_backend_spec: str,
    *,
    working_dir: Path,
    namespace: str,
    port_range: tuple[int, int] = defaults.PORT_RANGE,
    on_event: Callable[..., Any] | None = None,
    foreign_memory_threshold_bytes: int = defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES,
    release_timeout_s: float = defaults.RELEASE_TIMEOUT_S,
) -> ResourceManager:
    """Open the GPU backend named by ``gpu_backend_spec`` (see
    :func:`connector.nvml.open_gpu_backend`) and build a manager over the detected
    inventory; without a GPU the manager has none, and says why in its machine view."""
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
