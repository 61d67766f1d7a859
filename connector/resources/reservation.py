"""The resource model: reservations, the machine inventory, release results, what a
stopped replica may still hold (lingering processes, leaked GPUs), GPU placement and port
probing, and :class:`ResourceState`, what the manager holds. :mod:`connector.resources.manager`
hands resources out; :mod:`connector.resources.release` takes them back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psutil

from connector import defaults
from connector.graph import templates
from connector.graph.model import PortSpec, ResourceRequest, SocketSpec
from connector.resources.nvml import GpuBackend, GpuDevice, GpuSample

EPS = 1e-9
SOCKET_PATH_LIMIT = 100  # sun_path is 108 bytes; keep a margin
UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]")


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


class Leak(NamedTuple):
    """A GPU not shown free after a release: whose processes, and why (``LISTED`` or what
    kept NVML from saying)."""

    component: str
    replica_id: str
    why: str
    pids: frozenset[int]  # the replica's process tree as released


class Lingering(NamedTuple):
    """A stopped replica's reservation, held while its processes outlive the release."""

    reservation: Reservation
    identities: Mapping[int, float]  # pid -> start time (procs.identify) of the survivors
    pids: frozenset[int]  # the replica's process tree as released


def short_uuid(uuid: str) -> str:
    return uuid[:12] + "…" if len(uuid) > 13 else uuid


def plural(n: float, unit: str) -> str:
    return f"{n:g} {unit}" if n == 1 else f"{n:g} {unit}s"


def gpu_amount(amount: float) -> str:
    return f"{amount:g} of a GPU" if amount < 1 else plural(amount, "GPU")


def ordinal_of(replica_id: str) -> str:
    return replica_id.rsplit("/", 1)[-1]


def place_gpus(free: list[GpuDevice], n: int) -> list[GpuDevice]:
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
            return contiguous_gpus(nodes[node], n)
    return contiguous_gpus(free, n)


def contiguous_gpus(free: list[GpuDevice], n: int) -> list[GpuDevice]:
    ordered = sorted(free, key=lambda g: g.index)
    for i in range(len(ordered) - n + 1):
        run = ordered[i : i + n]
        if run[-1].index - run[0].index == n - 1:
            return run
    return ordered[:n]


def port_free(port: int, reuse_address: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str:
    """Who has ``port`` bound, as well as psutil can tell ("pid 4242 (nginx)")."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"pid {conn.pid}"
    return "another process"


def probe_free_ports(
    port_range: tuple[int, int], start: int, count: int, taken: Iterable[int]
) -> frozenset[int]:
    """Up to ``count`` ports of ``port_range`` that bind now, scanning from ``start`` the
    way a reservation does and skipping ``taken``. Blocking (binds): call it in a thread.
    What a reservation of many replicas is given, so its bind checks stay off the loop."""
    lo, hi = port_range
    span = hi - lo + 1
    skip = set(taken)
    found: set[int] = set()
    port = lo + (start - lo) % span
    for _ in range(span):
        if len(found) >= count:
            break
        if port not in skip and port_free(port):
            found.add(port)
        port = lo + (port - lo + 1) % span
    return frozenset(found)


class HoldIndex:
    """What every hold uses together (ports, socket paths, pinned cores, CPU, memory), kept
    up to date with each change to the holds. A reservation then checks a port or sums
    the CPU in O(1) instead of walking every hold, which made a scale of N replicas
    quadratic (1,000 replicas with 4 ports each spent ~0.4 s building the set of taken
    ports alone). CPU is summed as exact fractions, so adding and removing holds never
    drifts from the plain sum."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}  # port -> number of holds (normally 1)
        self.sockets: dict[str, int] = {}
        self.pinned: dict[int, int] = {}
        self.cpu = Fraction(0)
        self.memory = 0

    @staticmethod
    def _count(counts: dict[Any, int], keys: Iterable[Any], by: int) -> None:
        for key in keys:
            left = counts.get(key, 0) + by
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def change(self, r: Reservation, by: int) -> None:
        """Count ``r`` in (``by`` 1) or out (-1)."""
        self._count(self.ports, r.ports.values(), by)
        if r.sockets:
            self._count(self.sockets, r.sockets.values(), by)
        if r.cpus:
            self._count(self.pinned, r.cpus, by)
        if r.cpu_cores:
            self.cpu += by * Fraction(r.cpu_cores)
        self.memory += by * r.memory_bytes


_K = TypeVar("_K")
_V = TypeVar("_V")


class IndexedHolds(dict[_K, _V]):
    """A dict of holds that keeps a :class:`HoldIndex` in step with every insert, replace
    and removal (``reservation_of`` says which reservation an entry holds)."""

    def __init__(self, index: HoldIndex, reservation_of: Callable[[_V], Reservation]) -> None:
        super().__init__()
        self._index = index
        self._of = reservation_of

    def __setitem__(self, key: _K, value: _V) -> None:
        if key in self:
            self._index.change(self._of(self[key]), -1)
        super().__setitem__(key, value)
        self._index.change(self._of(value), 1)

    def __delitem__(self, key: _K) -> None:
        self._index.change(self._of(self[key]), -1)
        super().__delitem__(key)

    def pop(self, key: _K, *default: Any) -> Any:
        if key in self:
            self._index.change(self._of(self[key]), -1)
        return super().pop(key, *default)

    def clear(self) -> None:
        for value in self.values():
            self._index.change(self._of(value), -1)
        super().clear()

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("IndexedHolds supports [k] = v, del, pop and clear only")

    update = setdefault = popitem = __ior__ = _unsupported


class ResourceState:
    """What a resource manager holds (reservations, lingering holds, leaked GPUs, the
    last NVML sample) and the queries every part of it asks."""

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
        # Every hold (replicas' and lingering ones) counted together, so reservations check
        # what is taken in O(1).
        self._index = HoldIndex()
        self._held: dict[str, Reservation] = IndexedHolds(self._index, lambda r: r)
        self._leaked: dict[str, Leak] = {}  # uuid -> whose processes hold it, and why
        # Reservations of stopped replicas whose processes outlived the release timeout,
        # by id() of the reservation (a new replica may reuse the replica id meanwhile).
        self._lingering: dict[int, Lingering] = IndexedHolds(self._index, lambda g: g.reservation)
        self._lists_processes: set[str] = set()  # GPUs NVML has listed processes for
        self._foreign_busy: dict[str, int] = {}  # uuid -> bytes used by processes not ours
        self._last_sample: list[GpuSample] = []
        self._next_port = port_range[0]
        self._leak_tasks: set[asyncio.Task[None]] = set()
        self._releases: dict[str, asyncio.Task[ReleaseResult]] = {}

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

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(kind, **fields)
