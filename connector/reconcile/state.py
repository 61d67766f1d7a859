"""Desired and observed state of one namespace, persisted atomically under the working dir.

What is persisted is what a restarted connector needs to re-adopt its replicas without
orphaning or duplicating anything: replica targets, every replica's watcher, pid and process
create time, reservation, log paths and restart history, how to reach circusd, and what
stopped replicas still hold (processes that outlived their release, leaked GPUs).

Writes go to a temp file that is fsynced and renamed over ``state.json``, so a crash at any
point leaves either the old or the new state. A write the OS refuses (disk full, read-only
dir) raises :class:`~connector.errors.StateWriteFailed` (HTTP 503 ``state_unwritable``) in
every caller waiting on it; the state stays in memory and the next write that succeeds
carries all of it. A ``flock`` on ``connector.lock`` (released by
the kernel when the holder dies, even on SIGKILL) keeps two connectors off one namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from connector.errors import NamespaceLocked, StateWriteFailed

STATE_VERSION = 1

# spawning: record made, process not confirmed yet; starting: running, readiness pending;
# ready: passed readiness; stopping: drain/stop in progress; backoff: exited, restart
# scheduled; exited: exited and not restarted (policy, or component in crashloop).
Phase = Literal["spawning", "starting", "ready", "stopping", "backoff", "exited"]
ACTIVE_PHASES: frozenset[str] = frozenset({"spawning", "starting", "ready", "backoff"})


class ExitRecord(BaseModel):
    at: float
    code: int | None = None  # exit status, or -signal when killed by a signal (Circus style)
    reason: str | None = None


class ReplicaRecord(BaseModel):
    component: str
    ordinal: int
    watcher: str
    phase: Phase = "spawning"
    pid: int | None = None
    create_time: float | None = None
    spawned_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    consecutive_failures: int = 0
    restart_at: float | None = None
    last_exit: ExitRecord | None = None
    reservation: dict[str, Any] | None = None
    log_paths: dict[str, str] = Field(default_factory=dict)

    @property
    def replica_id(self) -> str:
        return f"{self.component}/{self.ordinal}"

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES


class ComponentRecord(BaseModel):
    target: int
    next_ordinal: int = 1
    failures: list[float] = Field(default_factory=list)  # exit times inside the budget window
    crashloop: bool = False
    crashloop_reason: str | None = None
    # Service.spec_digest() of the spec that crash-looped: a different one clears it.
    crashloop_spec: str | None = None
    crashloops_total: int = 0
    restarts_total: int = 0


class ConnectorState(BaseModel):
    version: int = STATE_VERSION
    namespace: str
    graph_source: str | None = None
    circusd: dict[str, Any] | None = None
    components: dict[str, ComponentRecord] = Field(default_factory=dict)
    replicas: dict[str, ReplicaRecord] = Field(default_factory=dict)  # by watcher name
    # What stopped replicas still hold: reservations of processes that outlived their
    # release, and leaked GPUs (ResourceManager.held_after_stop).
    held_after_stop: list[dict[str, Any]] = Field(default_factory=list)

    def replicas_of(self, component: str) -> list[ReplicaRecord]:
        return sorted(
            (r for r in self.replicas.values() if r.component == component),
            key=lambda r: r.ordinal,
        )


# Saves asked for within this window share one serialization and write.
SAVE_DEBOUNCE_S = 0.02


class StateStore:
    """Atomic JSON persistence of :class:`ConnectorState` plus the namespace lock."""

    def __init__(self, working_dir: Path) -> None:
        self.working_dir = working_dir
        self.path = working_dir / "state.json"
        self._lock_path = working_dir / "connector.lock"
        self._lock_fd: int | None = None
        # One writer thread: saves land in the order they were asked for, and a cancelled
        # caller can never let a second write race the first over the temp file.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._next: asyncio.Future[None] | None = None  # the write the next callers wait on
        self._next_state: ConnectorState | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.writes_total = 0  # serializations so far (benchmarks and tests count them)
        # The last write's failure, while no write has succeeded since (raise_if_failing).
        self.failure: StateWriteFailed | None = None

    def acquire(self) -> None:
        """Take the namespace lock or raise :class:`NamespaceLocked` naming the holder."""
        self.working_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NamespaceLocked(
                f"another dynamo-local connector (pid {holder}) already manages "
                f"{self.working_dir}; stop it first or use another namespace/working dir",
                working_dir=str(self.working_dir),
                holder_pid=holder,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> ConnectorState | None:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        data = json.loads(raw)
        if data.get("version") != STATE_VERSION:
            raise ValueError(
                f"{self.path}: state version {data.get('version')} is not {STATE_VERSION}"
            )
        return ConnectorState.model_validate(data)

    @property
    def temp_path(self) -> Path:
        """Where a write goes before it is renamed over :attr:`path`: always this one name
        (one writer thread), so a crash leaves at most this file behind, and the next
        write truncates it."""
        return self.path.with_suffix(".json.tmp")

    def _write(self, text: str) -> None:
        tmp = self.temp_path
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def save(self, state: ConnectorState) -> None:
        """Persist ``state`` as it is now, or later: saves are coalesced.

        Every caller waits for a write that serialized the state *after* it called, so its
        change is on disk when this returns; callers that ask while one write is pending
        share it. So stopping N replicas (each saving) costs a few serializations per
        :data:`SAVE_DEBOUNCE_S`, not N of the whole state. The state is serialized on the
        loop (a consistent snapshot: the loop is the only writer) and written in a thread,
        atomically. A failed write (disk full, read-only dir) raises
        :class:`StateWriteFailed` in every waiter; the state stays as it is in memory, and
        the next save writes all of it."""
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
        self._next_state = state
        waiter = self._next
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="state-writer")
        await asyncio.shield(waiter)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next is not None:
            await asyncio.sleep(SAVE_DEBOUNCE_S)  # let this moment's other saves join
            waiter, state = self._next, self._next_state
            self._next, self._next_state = None, None
            assert state is not None
            try:
                text = state.model_dump_json(indent=1)
                try:
                    await loop.run_in_executor(self._writer, self._write, text)
                except OSError as exc:
                    self.failure = StateWriteFailed.from_os_error(str(self.path), exc)
                    raise self.failure from exc
                self.failure = None
            except Exception as exc:
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: a waiter that went away logs nothing
            else:
                waiter.set_result(None)
            self.writes_total += 1

    def raise_if_failing(self) -> None:
        """Raise :class:`StateWriteFailed` when the last write failed and none has succeeded
        since: for a caller that does not wait for its own write (a scale without ``wait``),
        so that it hears of a working dir known to be unwritable."""
        failed = self.failure
        if failed is not None:
            raise StateWriteFailed(failed.message, os_errno=failed.errno, **failed.details)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.release()
