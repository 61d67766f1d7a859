"""NVML test material: where the real captures are, machines built from them, and a scripted
``pynvml`` module that drives :class:`connector.resources.nvml.NvmlBackend` without a GPU.

The captures live in the repository, in ``tests/fixtures/nvml``, so a fresh clone runs every
NVML test without anything beside it.
"""

from __future__ import annotations

import copy
import json
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connector.resources.nvml import FakeGpuBackend

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nvml"  # the real captures

H100_CAPTURE = "h100_snapshot.json"
H200_CAPTURE = "h200_snapshot.json"
H100_UUID = "GPU-3916acbf-4032-fd78-3a4f-848162f95acf"
H100_NAME = "NVIDIA H100 80GB HBM3"
H100_MEMORY_TOTAL = 85520809984
H100_CAPTURED_PID = 476
H100_CAPTURED_PID_MEMORY = 3282042880
# 8 GPUs: NVLink pairs (0,1), (2,3), (4,5), (6,7); GPUs 0-3 on NUMA node 0, 4-7 on node 1.
NVLINK_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7))
NUMA_NODES = {i: i // 4 for i in range(8)}


def capture_path(name: str = H100_CAPTURE) -> Path:
    """A capture's path in ``tests/fixtures/nvml``; a missing one fails the test (the
    captures are part of the repository, so there is nothing to skip over)."""
    path = FIXTURES / name
    if not path.is_file():
        raise FileNotFoundError(f"NVML capture {name} is not in {FIXTURES}")
    return path


def load_capture(name: str = H100_CAPTURE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(capture_path(name).read_text())
    return data


def idle_capture(dest: Path, name: str = H100_CAPTURE) -> Path:
    """The capture with its load process removed: the same GPU, used by nobody.

    The captured process (PID 476, 3.3 GB) is not ours, so a manager replaying the capture
    as is sees the GPU busy with a foreign process and hands it to nobody.
    """
    data = load_capture(name)
    for dev in data["devices"]:
        dev["compute_procs"] = []
        dev["process_utilization"] = []
    path = dest / f"idle-{name}"
    path.write_text(json.dumps(data))
    return path


def h100_backend(**kw: Any) -> FakeGpuBackend:
    return FakeGpuBackend(capture_path(H100_CAPTURE), **kw)


def eight_gpu_backend(
    *,
    nvlink_pairs: Sequence[tuple[int, int]] = NVLINK_PAIRS,
    numa_nodes: Mapping[int, int] | None = None,
    keep_captured_processes: bool = False,
) -> FakeGpuBackend:
    """Eight copies of the H100 capture with synthetic NVLink pairs and NUMA nodes, idle."""
    return FakeGpuBackend(
        capture_path(H100_CAPTURE),
        copies=8,
        nvlink_pairs=nvlink_pairs,
        numa_nodes=NUMA_NODES if numa_nodes is None else numa_nodes,
        keep_captured_processes=keep_captured_processes,
    )


# --------------------------------------------------------------------------- scripted pynvml


class NVMLError(Exception):
    """Stands in for ``pynvml.NVMLError``."""


class NVMLError_NotSupported(NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


class NVMLError_LibraryNotFound(NVMLError):
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


@dataclass
class ScriptedNvml:
    """A ``pynvml`` stand-in answering from capture-shaped device dicts.

    A ``None`` value in a device dict answers ``NVMLError_NotSupported``, as the capture's
    ``errors`` say the driver did. ``nvlinks`` maps a device index to {link: remote index,
    or ``None`` for an NVSwitch}; a device missing from it answers NotSupported for its
    links. ``p2p`` is the set of index pairs whose NVLink P2P status is OK (others answer
    "not supported" as a status); ``None`` makes every P2P query raise NotSupported, as in
    the single-GPU VMs of the captures. ``calls`` records calls by name with their
    arguments after the handle.
    """

    devices: list[dict[str, Any]]
    nvlinks: dict[int, dict[int, int | None]] = field(default_factory=dict)
    p2p: set[frozenset[int]] | None = None
    init_error: NVMLError | None = None
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        for name in dir(self):
            if name.startswith("nvml") or name.startswith("NVML"):
                setattr(mod, name, getattr(self, name))
        mod.NVMLError = NVMLError  # type: ignore[attr-defined]
        mod.NVMLError_NotSupported = NVMLError_NotSupported  # type: ignore[attr-defined]
        mod.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound  # type: ignore[attr-defined]
        return mod

    NVML_NVLINK_MAX_LINKS = 4
    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0
    NVML_P2P_STATUS_NOT_SUPPORTED = 5
    NVSWITCH_BUS_ID = "00000000:C5:00.0"
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def _dev(self, handle: int, key: str) -> Any:
        value = self.devices[handle].get(key)
        if value is None:
            raise NVMLError_NotSupported()
        return value

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def nvmlInit(self) -> None:
        self._record("nvmlInit")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self._record("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return str(self._dev(h, "uuid"))

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return str(self._dev(h, "name")).encode()  # older drivers' bindings give bytes

    def nvmlDeviceGetPciInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(busId=self._dev(h, "pci")["busId"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        mem = self._dev(h, "memory")
        return types.SimpleNamespace(total=mem["total"], used=mem["used"], free=mem["free"])

    def nvmlDeviceGetMigMode(self, h: int) -> list[int]:
        return list(self._dev(h, "mig_mode"))

    def nvmlDeviceGetCpuAffinity(self, h: int, words: int) -> list[int]:
        self._record("nvmlDeviceGetCpuAffinity", words)
        return list(self._dev(h, "cpu_affinity"))[:words]

    def nvmlDeviceGetNumaNodeId(self, h: int) -> int:
        return int(self._dev(h, "numa_node"))

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        links = self.nvlinks.get(h)
        if links is None:
            raise NVMLError_NotSupported()
        return 1 if link in links else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> types.SimpleNamespace:
        remote = self.nvlinks[h][link]
        if remote is None:  # the link ends at an NVSwitch, not at a GPU
            return types.SimpleNamespace(busId=self.NVSWITCH_BUS_ID)
        # Remote bus ids come back upper-case on some drivers: matching ignores case.
        return types.SimpleNamespace(busId=self.devices[remote]["pci"]["busId"].upper())

    def nvmlDeviceGetP2PStatus(self, h1: int, h2: int, index: int) -> int:
        self._record("nvmlDeviceGetP2PStatus", h1, h2, index)
        if self.p2p is None or index != self.NVML_P2P_CAPS_INDEX_NVLINK:
            raise NVMLError_NotSupported()
        if frozenset((h1, h2)) in self.p2p:
            return self.NVML_P2P_STATUS_OK
        return self.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        util = self._dev(h, "utilization")
        return types.SimpleNamespace(gpu=util["gpu"], memory=util["memory"])

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[types.SimpleNamespace]:
        return [
            types.SimpleNamespace(pid=p["pid"], usedGpuMemory=p["usedGpuMemory"])
            for p in self._dev(h, "compute_procs")
        ]

    def nvmlDeviceGetProcessUtilization(
        self, h: int, last_seen: int
    ) -> list[types.SimpleNamespace]:
        self._record("nvmlDeviceGetProcessUtilization", last_seen)
        samples = [s for s in self._dev(h, "process_utilization") if s["timeStamp"] > last_seen]
        if not samples:
            raise NVMLError("Not Found")  # what NVML answers when nothing is newer
        return [
            types.SimpleNamespace(pid=s["pid"], smUtil=s["smUtil"], timeStamp=s["timeStamp"])
            for s in samples
        ]

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return int(self._dev(h, "temperature"))

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return int(self._dev(h, "power_mw"))

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return int(self._dev(h, "energy_mj"))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: int) -> int:
        return int(self._dev(h, "throttle"))

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        return int(self._dev(h, "ecc_volatile_uncorrected"))


def scripted_devices(count: int = 1, name: str = H100_CAPTURE) -> list[dict[str, Any]]:
    """``count`` copies of a capture's device, with distinct UUIDs and PCI bus ids."""
    (dev,) = load_capture(name)["devices"]
    out = []
    for i in range(count):
        d = copy.deepcopy(dev)
        if i:
            d["uuid"] = f"GPU-{int(dev['uuid'][4:12], 16) + i:08x}{dev['uuid'][12:]}"
        d["pci"]["busId"] = f"00000000:{i + 6:02x}:00.0"
        out.append(d)
    return out
