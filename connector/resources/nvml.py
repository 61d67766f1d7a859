"""NVML behind a small interface: the real backend, and a fake that replays captures.

Every method is synchronous (NVML calls take up to ~20 ms): callers run them in a thread.
A value the driver does not give (``NVMLError_NotSupported`` is normal in a VM) is ``None``,
field by field, never a sentinel number and never a crash. The resource manager reads the
inventory (``devices``); the exporter reads ``sample``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class GpuProcess:
    """A compute process NVML lists on a GPU (``None`` = the driver does not say)."""

    pid: int
    used_memory_bytes: int | None
    sm_util_ratio: float | None = None


@dataclass(frozen=True)
class GpuDevice:
    """Static inventory of one GPU."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    mig_mode: bool | None = None
    numa_node: int | None = None
    cpu_affinity: tuple[int, ...] | None = None
    nvlink_peers: frozenset[str] | None = None  # peer UUIDs; None = unknown


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU. ``None`` = not available."""

    uuid: str
    index: int
    utilization_ratio: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None
    energy_joules: float | None
    throttle_reasons: int | None
    ecc_uncorrected_volatile: int | None
    processes: tuple[GpuProcess, ...] = ()
    # False when the driver failed to list the compute processes: an empty ``processes``
    # then means "unknown", not "nobody", and a release must not read it as the GPU free.
    processes_known: bool = True


class GpuBackend(Protocol):
    """Where GPU facts come from. Every method blocks: call it in a thread."""

    def devices(self) -> list[GpuDevice]:
        """The static inventory, in NVML index order."""
        ...

    def sample(self) -> list[GpuSample]:
        """One reading of every GPU, in NVML index order."""
        ...

    def close(self) -> None:
        """Release the backend (NVML shutdown); safe to call twice."""
        ...


def _mask_to_cpus(words: Sequence[int] | None, word_bits: int = 64) -> tuple[int, ...] | None:
    """NVML's CPU affinity bitmask (a list of words) as CPU indices."""
    if not words:
        return None
    cpus = [
        w * word_bits + b for w, word in enumerate(words) for b in range(word_bits) if word >> b & 1
    ]
    return tuple(cpus) or None


def _ratio(percent: Any) -> float | None:
    return None if percent is None else float(percent) / 100.0


def _div(value: Any, by: float) -> float | None:
    return None if value is None else float(value) / by


# --------------------------------------------------------------------------- fake


class FakeGpuBackend:
    """Replays real NVML captures (``tests/fixtures/nvml/*.json`` in the repository).

    ``pid_map`` rewrites the capture's PIDs to those of test processes (a mapping, or a
    callable returning one at each sample). ``copies`` repeats the captured devices to make a
    multi-GPU machine with distinct UUIDs; ``nvlink_pairs`` (index pairs) and ``numa_nodes``
    (index -> node) synthesize topology; processes can be set per GPU at run time.
    """

    def __init__(
        self,
        captures: Path | str | Sequence[Path | str],
        *,
        pid_map: Mapping[int, int] | Callable[[], Mapping[int, int]] | None = None,
        copies: int = 1,
        nvlink_pairs: Iterable[tuple[int, int]] = (),
        numa_nodes: Mapping[int, int] | None = None,
        keep_captured_processes: bool = True,
    ) -> None:
        paths = [captures] if isinstance(captures, (str, Path)) else list(captures)
        raw: list[dict[str, Any]] = []
        for path in paths:
            data = json.loads(Path(path).read_text())
            raw.extend(data["devices"])
        self._raw: list[dict[str, Any]] = []
        for copy in range(copies):
            for dev in raw:
                d = dict(dev)
                if copy:
                    d["uuid"] = _derived_uuid(dev["uuid"], len(self._raw))
                self._raw.append(d)
        self._pid_map = pid_map
        self._lock = threading.Lock()
        self._procs: dict[int, list[GpuProcess]] = {}
        self._unlisted: set[int] = set()  # GPUs whose process listing fails
        self._sample_error: Exception | None = None
        for i, dev in enumerate(self._raw):
            if keep_captured_processes:
                util = {p["pid"]: p.get("smUtil") for p in dev.get("process_utilization") or []}
                self._procs[i] = [
                    GpuProcess(p["pid"], p.get("usedGpuMemory"), _ratio(util.get(p["pid"])))
                    for p in dev.get("compute_procs") or []
                ]
            else:
                self._procs[i] = []
        peers: dict[int, set[int]] = {}
        for a, b in nvlink_pairs:
            peers.setdefault(a, set()).add(b)
            peers.setdefault(b, set()).add(a)
        self._nvlink = peers
        self._has_nvlink = bool(peers)
        self._numa = dict(numa_nodes or {})

    # test controls (thread-safe: tests change them while a sampler runs) -------
    def set_processes(self, index: int, processes: Iterable[GpuProcess]) -> None:
        """Replace what GPU ``index`` lists (PIDs as given: ``pid_map`` is not applied to
        PIDs that are not in it)."""
        with self._lock:
            self._procs[index] = list(processes)

    def add_process(
        self, index: int, pid: int, used_memory_bytes: int, sm_util: float = 0.0
    ) -> None:
        """List one more process on GPU ``index`` (``sm_util`` is a ratio, 0..1)."""
        with self._lock:
            self._procs[index].append(GpuProcess(pid, used_memory_bytes, sm_util))

    def remove_pid(self, pid: int) -> None:
        """Stop listing ``pid`` on every GPU, as the driver does once it lets go."""
        with self._lock:
            for i, procs in self._procs.items():
                self._procs[i] = [p for p in procs if p.pid != pid]

    def fail_process_listing(self, index: int, failing: bool = True) -> None:
        """Make GPU ``index``'s process listing fail (as ``GPU_IS_LOST`` does), or work
        again: its samples then say ``processes_known=False``."""
        with self._lock:
            (self._unlisted.add if failing else self._unlisted.discard)(index)

    def fail_sampling(self, error: Exception | None) -> None:
        """Make every :meth:`sample` raise ``error`` (NVML gone), or work again (None)."""
        with self._lock:
            self._sample_error = error

    # backend --------------------------------------------------------------
    def devices(self) -> list[GpuDevice]:
        """The captured devices (and their synthesized copies and topology)."""
        out = []
        uuids = [d["uuid"] for d in self._raw]
        for i, d in enumerate(self._raw):
            mig = d.get("mig_mode")
            out.append(
                GpuDevice(
                    index=i,
                    uuid=d["uuid"],
                    name=d["name"],
                    memory_total_bytes=int(d["memory"]["total"]),
                    mig_mode=bool(mig[0]) if mig else None,
                    numa_node=self._numa.get(i, d.get("numa_node")),
                    cpu_affinity=_mask_to_cpus(d.get("cpu_affinity")),
                    nvlink_peers=frozenset(uuids[p] for p in self._nvlink.get(i, ()))
                    if self._has_nvlink
                    else None,
                )
            )
        return out

    def sample(self) -> list[GpuSample]:
        """The captured readings with the current processes; memory used is the capture's
        minus its own processes plus the ones listed now."""
        mapping = self._pid_map() if callable(self._pid_map) else (self._pid_map or {})
        out = []
        with self._lock:
            if self._sample_error is not None:
                raise self._sample_error
            procs = {i: list(p) for i, p in self._procs.items()}
            unlisted = set(self._unlisted)
        for i, d in enumerate(self._raw):
            listed = () if i in unlisted else procs[i]
            gprocs = tuple(replace(p, pid=mapping.get(p.pid, p.pid)) for p in listed)
            used_by_procs = sum(p.used_memory_bytes or 0 for p in procs[i])
            captured_procs = sum(p.get("usedGpuMemory") or 0 for p in d.get("compute_procs") or [])
            base_used = int(d["memory"]["used"]) - captured_procs
            util = d.get("utilization") or {}
            ecc = d.get("ecc_volatile_uncorrected")
            out.append(
                GpuSample(
                    uuid=d["uuid"],
                    index=i,
                    utilization_ratio=_ratio(util.get("gpu")),
                    memory_used_bytes=max(base_used, 0) + used_by_procs,
                    memory_total_bytes=int(d["memory"]["total"]),
                    temperature_celsius=None
                    if d.get("temperature") is None
                    else float(d["temperature"]),
                    power_watts=_div(d.get("power_mw"), 1000.0),
                    energy_joules=_div(d.get("energy_mj"), 1000.0),
                    throttle_reasons=d.get("throttle"),
                    ecc_uncorrected_volatile=ecc,
                    processes=gprocs,
                    processes_known=i not in unlisted,
                )
            )
        return out

    def close(self) -> None:
        """Nothing to release."""
        return None


def _derived_uuid(uuid: str, n: int) -> str:
    """A distinct, stable UUID for the n-th synthesized copy of a captured GPU.

    The first group changes, so the short forms in messages ("GPU-3916acc0…") tell the
    copies apart.
    """
    prefix, _, rest = uuid.partition("-")
    first, _, tail = rest.partition("-")
    try:
        shifted = (int(first, 16) + n) % (1 << 32)
    except ValueError:  # not NVML's hex form: vary the end instead
        return f"{uuid}-{n}"
    return f"{prefix}-{shifted:08x}-{tail}"


# --------------------------------------------------------------------------- real


class NvmlBackend:
    """The real NVML (``pynvml`` from nvidia-ml-py), NotSupported-tolerant per field.

    Constructing it initializes NVML (raises ``pynvml.NVMLError`` when that fails, e.g.
    ``NVMLError_LibraryNotFound`` without a driver); :func:`open_gpu_backend` turns those
    into a reason instead.
    """

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self._handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            # UUIDs never change while NVML is up: read them once, not on every sample.
            self._uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in self._handles]
        except pynvml.NVMLError:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
            raise
        self._last_seen: dict[int, int] = {}

    def _get(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def devices(self) -> list[GpuDevice]:
        """The static inventory; fields the driver does not answer are ``None``."""
        n = self._nvml
        out = []
        bus_to_uuid: dict[str, str] = {}
        for uuid, h in zip(self._uuids, self._handles, strict=True):
            pci = self._get(n.nvmlDeviceGetPciInfo, h)
            if pci is not None:
                bus_to_uuid[_text(pci.busId).lower()] = uuid
        p2p = self._nvlink_p2p()
        for i, h in enumerate(self._handles):
            mem = n.nvmlDeviceGetMemoryInfo(h)
            mig = self._get(n.nvmlDeviceGetMigMode, h)
            affinity = self._get(
                n.nvmlDeviceGetCpuAffinity, h, max(1, (os.cpu_count() or 64) // 64 + 1)
            )
            out.append(
                GpuDevice(
                    index=i,
                    uuid=self._uuids[i],
                    name=_text(n.nvmlDeviceGetName(h)),
                    memory_total_bytes=int(mem.total),
                    mig_mode=bool(mig[0]) if mig else None,
                    numa_node=self._get(n.nvmlDeviceGetNumaNodeId, h),
                    cpu_affinity=_mask_to_cpus(list(affinity) if affinity else None),
                    nvlink_peers=self._nvlink_peers(i, h, bus_to_uuid, p2p.get(i)),
                )
            )
        return out

    def _nvlink_p2p(self) -> dict[int, set[str]]:
        """Per device index, the GPUs it reaches over NVLink by NVML's P2P status.

        This is what sees peers behind an NVSwitch (where a link's remote end is the switch,
        not a GPU). A device missing from the result: the driver answered no pair.
        """
        n = self._nvml
        index = getattr(n, "NVML_P2P_CAPS_INDEX_NVLINK", None)
        get_status = getattr(n, "nvmlDeviceGetP2PStatus", None)
        out: dict[int, set[str]] = {}
        if index is None or get_status is None:
            return out
        for a in range(len(self._handles)):
            for b in range(a + 1, len(self._handles)):
                status = self._get(get_status, self._handles[a], self._handles[b], index)
                if status is None:
                    continue
                out.setdefault(a, set())
                out.setdefault(b, set())
                if status == getattr(n, "NVML_P2P_STATUS_OK", 0):
                    out[a].add(self._uuids[b])
                    out[b].add(self._uuids[a])
        return out

    def _nvlink_peers(
        self,
        index: int,
        handle: Any,
        bus_to_uuid: Mapping[str, str],
        p2p_peers: set[str] | None,
    ) -> frozenset[str] | None:
        """Peer UUIDs from P2P status and from each active link's remote PCI address;
        ``None`` when the driver answers neither (NotSupported in a VM)."""
        n = self._nvml
        peers: set[str] = set(p2p_peers or ())
        answered = p2p_peers is not None
        for link in range(getattr(n, "NVML_NVLINK_MAX_LINKS", 18)):
            state = self._get(n.nvmlDeviceGetNvLinkState, handle, link)
            if state is None:
                continue
            answered = True
            if not state:
                continue
            remote = self._get(n.nvmlDeviceGetNvLinkRemotePciInfo, handle, link)
            if remote is not None:
                uuid = bus_to_uuid.get(_text(remote.busId).lower())
                if uuid and uuid != self._uuids[index]:
                    peers.add(uuid)
        return frozenset(peers) if answered else None

    def sample(self) -> list[GpuSample]:
        """One reading per GPU; each field on its own, ``None`` where the driver fails it."""
        n = self._nvml
        out = []
        for i, h in enumerate(self._handles):
            mem = self._get(n.nvmlDeviceGetMemoryInfo, h)
            util = self._get(n.nvmlDeviceGetUtilizationRates, h)
            procs = self._get(n.nvmlDeviceGetComputeRunningProcesses, h)
            sm: dict[int, float] = {}
            samples = self._get(n.nvmlDeviceGetProcessUtilization, h, self._last_seen.get(i, 0))
            for s in samples or []:
                sm[int(s.pid)] = float(s.smUtil) / 100.0
                self._last_seen[i] = max(self._last_seen.get(i, 0), int(s.timeStamp))
            out.append(
                GpuSample(
                    uuid=self._uuids[i],
                    index=i,
                    utilization_ratio=_ratio(util.gpu) if util is not None else None,
                    memory_used_bytes=int(mem.used) if mem is not None else None,
                    memory_total_bytes=int(mem.total) if mem is not None else None,
                    temperature_celsius=_float(
                        self._get(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
                    ),
                    power_watts=_div(self._get(n.nvmlDeviceGetPowerUsage, h), 1000.0),
                    energy_joules=_div(self._get(n.nvmlDeviceGetTotalEnergyConsumption, h), 1000.0),
                    throttle_reasons=self._get(n.nvmlDeviceGetCurrentClocksThrottleReasons, h),
                    ecc_uncorrected_volatile=self._get(
                        n.nvmlDeviceGetTotalEccErrors,
                        h,
                        n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                        n.NVML_VOLATILE_ECC,
                    ),
                    processes=tuple(
                        GpuProcess(int(p.pid), _mem(p.usedGpuMemory), sm.get(int(p.pid)))
                        for p in procs or ()
                    ),
                    processes_known=procs is not None,
                )
            )
        return out

    def close(self) -> None:
        """Shut NVML down (errors, e.g. already shut down, are ignored)."""
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _mem(value: Any) -> int | None:
    # NVML reports "not available" per-process memory as a huge sentinel; that is None here.
    if value is None or value >= (1 << 63):
        return None
    return int(value)


def open_gpu_backend(spec: str = "auto") -> tuple[GpuBackend | None, str | None]:
    """``auto`` | ``nvml`` | ``none`` | ``fake:<capture.json>[,<capture.json>...]``.

    Returns (backend, None) or (None, a readable reason); never raises for "no GPU".
    """
    if spec == "none":
        return None, "GPU backend disabled (gpu backend 'none')"
    if spec.startswith("fake:"):
        paths = [Path(p) for p in spec[len("fake:") :].split(",") if p]
        if not paths:
            return None, "GPU backend 'fake:' names no capture file (fake:<capture.json>)"
        try:
            return FakeGpuBackend(paths), None
        except (OSError, ValueError, KeyError) as exc:
            return None, f"cannot read NVML capture {', '.join(map(str, paths))}: {exc}"
    if spec not in ("auto", "nvml"):
        return None, f"unknown GPU backend {spec!r} (auto, nvml, none or fake:<capture.json>)"
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        backend = NvmlBackend()
    except pynvml.NVMLError_LibraryNotFound:
        return None, "NVML library not found (no NVIDIA driver)"
    except pynvml.NVMLError as exc:
        return None, f"NVML failed to start: {exc}"
    try:
        found = backend.devices()
    except pynvml.NVMLError as exc:
        backend.close()
        return None, f"NVML failed to list the GPUs: {exc}"
    if not found:
        backend.close()
        return None, "NVML found no GPU"
    return backend, None
