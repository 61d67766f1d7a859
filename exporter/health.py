"""Per-source health of the exporter: is each source answering, and since when.

Sources are named after their data, not the transport: ``processes`` (connector state and
process trees), ``nvml`` (GPUs), ``discovery`` (discovery instances, etcd or file backend),
``prefill_queue`` (the prefill queue, NATS JetStream or a ``/metrics`` gauge), ``resources``
(allocation), ``planner`` (the Planner executor's decisions), ``autoscaler`` (the
ScaledObject policies); the names are ``exporter.catalog.HEALTH_SOURCES``. A failing
source does not stop the others; its values are left out of the snapshot and its health
says why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceHealth:
    source: str
    up: bool
    last_success: float | None  # Unix time of the last successful read
    duration_s: float  # wall time of the last read
    errors_total: int
    last_error: str | None  # why the last failed read failed (kept until the next success)


@dataclass
class _State:
    up: bool = False
    last_success: float | None = None
    duration_s: float = 0.0
    errors_total: int = 0
    last_error: str | None = None
    seen: bool = False


class HealthTracker:
    """Records the outcome of each read; logs only when a source goes down or comes back."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}

    def success(self, source: str, duration_s: float) -> None:
        with self._lock:
            state = self._states.setdefault(source, _State())
            if state.seen and not state.up:
                log.info("exporter source %s is back", source)
            state.up, state.seen = True, True
            state.last_success = self._clock()
            state.duration_s = duration_s
            state.last_error = None

    def failure(self, source: str, duration_s: float, error: str) -> None:
        with self._lock:
            state = self._states.setdefault(source, _State())
            if state.up or not state.seen:
                log.warning("exporter source %s failed: %s", source, error)
            state.up, state.seen = False, True
            state.duration_s = duration_s
            state.errors_total += 1
            state.last_error = error

    def snapshot(self) -> tuple[SourceHealth, ...]:
        with self._lock:
            return tuple(
                SourceHealth(name, s.up, s.last_success, s.duration_s, s.errors_total, s.last_error)
                for name, s in sorted(self._states.items())
            )


def describe(error: BaseException) -> str:
    """A one-line reason for a failed read: the exception type and its message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
