"""What the exporter reads from a GPU backend, as structural types.

``connector.resources.nvml`` provides the backends (real NVML, and a fake replaying captures); the
exporter only needs these read-only fields, so it depends on their shape, not on the module
(which imports pynvml). Any ``connector.resources.nvml.GpuBackend`` satisfies :class:`GpuSource`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class GpuProcessReading(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def used_memory_bytes(self) -> int | None: ...

    @property
    def sm_util_ratio(self) -> float | None: ...


class GpuDeviceFacts(Protocol):
    @property
    def index(self) -> int: ...

    @property
    def uuid(self) -> str: ...

    @property
    def name(self) -> str: ...


class GpuReading(Protocol):
    """One device at one moment; ``None`` means the driver could not say."""

    @property
    def uuid(self) -> str: ...

    @property
    def index(self) -> int: ...

    @property
    def utilization_ratio(self) -> float | None: ...

    @property
    def memory_used_bytes(self) -> int | None: ...

    @property
    def memory_total_bytes(self) -> int | None: ...

    @property
    def temperature_celsius(self) -> float | None: ...

    @property
    def power_watts(self) -> float | None: ...

    @property
    def energy_joules(self) -> float | None: ...

    @property
    def throttle_reasons(self) -> object: ...  # NVML bit mask or reason names

    @property
    def ecc_uncorrected_volatile(self) -> int | None: ...

    @property
    def processes(self) -> Sequence[GpuProcessReading]: ...


class GpuSource(Protocol):
    """A GPU backend. Blocking: the sampler calls it in a worker thread only."""

    def devices(self) -> Sequence[GpuDeviceFacts]: ...

    def sample(self) -> Sequence[GpuReading]: ...
