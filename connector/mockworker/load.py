"""Load that shows up in process metrics: a duty-cycled CPU burner and touched memory."""

from __future__ import annotations

import hashlib
import threading
import time

PAGE = 4096
BURN_PERIOD_S = 0.1
# Hashing a large buffer releases the GIL, so the burner does not starve the event loop.
_CHUNK = bytes(256 * 1024)


class CpuBurner:
    """Keeps one core busy for ``ratio`` of every 100 ms, in a daemon thread."""

    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"CPU burn ratio must be within 0..1, got {ratio}")
        self.ratio = ratio
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-burn", daemon=True)

    def start(self) -> None:
        if self.ratio > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        busy = BURN_PERIOD_S * self.ratio
        while not self._stop.is_set():
            period_start = time.monotonic()
            while time.monotonic() - period_start < busy:
                hashlib.sha256(_CHUNK).digest()
            rest = BURN_PERIOD_S - (time.monotonic() - period_start)
            if rest > 0:
                self._stop.wait(rest)


def allocate_ballast(megabytes: int) -> bytearray:
    """``megabytes`` MiB, every page written so it is resident (RSS), not just reserved.

    Blocking (a few ms per 100 MiB): call it in a thread.
    """
    size = megabytes * 1024 * 1024
    ballast = bytearray(size)
    # One byte per page, in one C-level slice assignment.
    ballast[::PAGE] = b"\x01" * len(range(0, size, PAGE))
    return ballast
