"""Desired and observed state of one namespace, persisted atomically under the working dir.

What is persisted is what a restarted connector needs to re-adopt its replicas without
orphaning or duplicating anything: replica targets, every replica's watcher, pid and process
create time, reservation, log paths and restart history, how to reach circusd, and what
stopped replicas still hold (processes that outlived their release, leaked GPUs).

Writes go to a temp file that is fsynced and renamed over ``state.json``, so a crash at any
point leaves either the old or the new state. A write the OS refuses (disk full, read-only
dir) raises :class:`~connector.errors.StateWriteFailed` (HTTP 503 ``state_unwritable``) in
every caller waiting on it; the state stays in memory and the next write that succeeds
carries all of it. The store logs a refused write once when writes start failing, at most
once a minute while they keep failing, and once when one succeeds again: callers that know
this error need not log it. A ``flock`` on ``connector.lock`` (released by
the kernel when the holder dies, even on SIGKILL) keeps two connectors off one namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, Field

from connector.errors import NamespaceLocked, StateWriteFailed

STATE_VERSION = 1

log = logging.getLogger(__name__)

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
# At most WRITES_PER_WINDOW writes start within any WRITE_WINDOW_S (10 a second): a few
# saves in a row (one replica's start) are written at once, a burst (a scale of hundreds,
# each replica saving as it is recorded and again once its process runs) waits its turn.
# Each write cost the connector ~8 ms of CPU with 500 records (the document made, ~0.5 MB
# written, fsynced and renamed): back to back they were 175-264 writes in a 0 -> 512, about
# a core's worth taken from circusd's adds on two cores.
WRITES_PER_WINDOW = 5
WRITE_WINDOW_S = 0.5
# Callers of a write resumed per loop turn once it is done. A write a scale's replica tasks
# all waited on woke them in one turn: at 1,000 replicas 360-640 task steps, 50-65 ms of the
# loop that no request could cut into (/healthz p99 60-100 ms while 1,000 start).
WAKE_PER_TURN = 32
# While writes keep failing, the store says so again at most this often (the loop saves
# every pass, about once a second).
FAILURE_LOG_EVERY_S = 60.0

# A save with more than 1/MOSTLY_CHANGED of the records changed is a whole dump, and then
# makes the pieces of 1/PIECES_AFTER_DUMP of the records at most (see _Fragments.render).
MOSTLY_CHANGED = 3
PIECES_AFTER_DUMP = 16
# A save that runs beside other work makes at most this many pieces a loop turn, for at most
# PIECE_TURNS turns (see _Fragments.render_async): ~2-4 ms of the loop a turn.
PIECES_PER_TURN = 128
PIECE_TURNS = 16

# Where the replica records go in the document the rest of the state makes with no
# replicas: the top-level key is the only one indented by exactly one space.
_NO_REPLICAS = '\n "replicas": {}'


_IMMUTABLE = (str, int, float, bool)


def _copy(value: Any) -> Any:
    """A copy of a record's field that no later in-place change reaches. Records hold
    JSON-like values (scalars, dicts, lists, an :class:`ExitRecord`); plain dicts and lists
    are copied here because :func:`copy.deepcopy` costs several times more."""
    kind = type(value)
    if kind is dict:
        return {k: _copy(v) for k, v in value.items()}
    if kind is list:
        return [_copy(v) for v in value]
    if value is None or kind in _IMMUTABLE:
        return value
    return copy.deepcopy(value)


def _snapshot(fields: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """What a record's piece is made from, compared with the live fields at the next save:
    scalars as they are, every container (reservation, log paths, last exit) a copy of its
    own, so that a change made in place shows. A container equal to the previous
    snapshot's copy keeps that copy: a record whose phase or pid changed (most changes)
    copies nothing deep."""
    snap = dict(fields)
    for name, value in fields.items():
        if value is None or type(value) in _IMMUTABLE:
            continue
        if previous is not None:
            kept = previous.get(name)
            if type(kept) is type(value) and kept == value:
                snap[name] = kept
                continue
        snap[name] = _copy(value)
    return snap


class _Fragments:
    """Each replica record's piece of ``state.json``, made again only when the record changed.

    Records are changed in place by many modules (attributes set, a dict updated), so
    nothing marks them dirty; instead each piece is kept with a copy of the fields it was
    made from (:func:`_snapshot`), and a save compares every record's fields with that copy
    (a C-level dict comparison, several times cheaper than serializing the record). The
    document is then the rest of the state, serialized whole (a few components), with the
    pieces spliced in: the same bytes as ``ConnectorState.model_dump_json(indent=1)``. One
    approximation: a field replaced by an equal value of another type (``1`` by ``1.0``)
    keeps its old spelling, which reads back as the same value."""

    def __init__(self) -> None:
        # dict key -> (the fields the piece was made from, the piece)
        self._pieces: dict[str, tuple[dict[str, Any], str]] = {}
        self.made_total = 0  # records serialized so far (benchmarks and tests count them)

    def _changed(self, replicas: dict[str, ReplicaRecord]) -> list[tuple[str, ReplicaRecord]]:
        pieces = self._pieces
        return [
            (key, rec)
            for key, rec in replicas.items()
            if (kept := pieces.get(key)) is None or kept[0] != rec.__dict__
        ]

    async def render_async(self, state: ConnectorState) -> str:
        """:meth:`render`, with the event loop free in between: while more than
        :data:`PIECES_PER_TURN` records changed, that many pieces are made a loop turn; the
        document is then made in one turn by :meth:`render`, which checks every record
        against its piece again, so it is the state as it is in that turn. A thousand new
        records (a scale-up's first saves) cost 10-20 ms of the loop at once otherwise.
        After :data:`PIECE_TURNS` turns the rest is made at once, so records that keep
        changing cannot put the write off."""
        for _ in range(PIECE_TURNS):
            changed = self._changed(state.replicas)
            if len(changed) <= PIECES_PER_TURN:
                break
            for key, rec in changed[:PIECES_PER_TURN]:
                self._keep(key, rec)
            await asyncio.sleep(0)
        return self.render(state)

    def render(self, state: ConnectorState) -> str:
        replicas = state.replicas
        pieces = self._pieces
        changed = self._changed(replicas)
        if len(pieces) > len(replicas) - len(changed):  # records removed: forget them
            for key in pieces.keys() - replicas.keys():
                del pieces[key]
        if len(changed) * MOSTLY_CHANGED > len(replicas):
            # Making a piece costs more than a record's share of the whole dump (a call of
            # its own, and the copy): with this many changed (a scale's mass stop, the first
            # save after adoption), dump the whole state as before and make the pieces a
            # share at a time, so no save costs much more than the whole dump did.
            for key, rec in changed[: max(1, len(replicas) // PIECES_AFTER_DUMP)]:
                self._keep(key, rec)
            return state.model_dump_json(indent=1)
        for key, rec in changed:
            self._keep(key, rec)
        rest = state.model_copy(update={"replicas": {}}).model_dump_json(indent=1)
        if not replicas:
            return rest
        head, found, tail = rest.partition(_NO_REPLICAS)
        if not found:  # cannot be: the key is a field of ConnectorState
            raise RuntimeError("the state's JSON has no top-level replicas")
        body = ",\n".join([pieces[key][1] for key in replicas])
        return f'{head}\n "replicas": {{\n{body}\n }}{tail}'

    def _keep(self, key: str, rec: ReplicaRecord) -> None:
        kept = self._pieces.get(key)
        self._pieces[key] = (
            _snapshot(rec.__dict__, kept[0] if kept is not None else None),
            self._piece(key, rec),
        )
        self.made_total += 1

    @staticmethod
    def _piece(key: str, rec: ReplicaRecord) -> str:
        """``"key": {record}`` as it reads inside ``replicas``, two levels deep: a record
        serialized alone, every line indented two more spaces (JSON strings hold no raw
        newline, so every newline is between tokens)."""
        name = pydantic_core.to_json(key).decode()
        body = rec.model_dump_json(indent=1).replace("\n", "\n  ")
        return f"  {name}: {body}"


class WriteRate:
    """How long a write must wait so that at most ``writes`` start within any ``window_s``
    (a sliding window over the last writes' start times)."""

    def __init__(self, writes: int = WRITES_PER_WINDOW, window_s: float = WRITE_WINDOW_S) -> None:
        self.window_s = window_s
        self._starts: deque[float] = deque(maxlen=writes)

    def wait_s(self, now: float) -> float:
        """Seconds from ``now`` until a write may start (0: at once)."""
        if len(self._starts) < (self._starts.maxlen or 0):
            return 0.0
        return max(0.0, self._starts[0] + self.window_s - now)

    def started(self, at: float) -> None:
        self._starts.append(at)


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
        self._next: list[asyncio.Future[None]] | None = None  # callers of the next write
        self._next_state: ConnectorState | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.writes_total = 0  # serializations so far (benchmarks and tests count them)
        self.rate = WriteRate()
        self.fragments = _Fragments()
        # The last write's failure, while no write has succeeded since (raise_if_failing),
        # and the same as an event, for waits that must end when writes start failing.
        self.failure: StateWriteFailed | None = None
        self.failing = asyncio.Event()
        # Since when writes fail, how many did, and when that was last logged.
        self._clock: Callable[[], float] = time.monotonic
        self._failing_since = 0.0
        self._failed_writes = 0
        self._failure_logged_at = 0.0

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
        share it. So stopping N replicas (each saving) costs at most
        :data:`WRITES_PER_WINDOW` serializations per :data:`WRITE_WINDOW_S`, not N of the
        whole state, and each serialization makes again only the records that changed
        (:class:`_Fragments`). The state is serialized on the
        loop (a consistent snapshot: the loop is the only writer) and written in a thread,
        atomically. A failed write (disk full, read-only dir) raises
        :class:`StateWriteFailed` in every waiter; the state stays as it is in memory, and
        the next save writes all of it."""
        loop = asyncio.get_running_loop()
        # One future per caller (a cancelled caller cancels only its own, not the write),
        # resumed at most WAKE_PER_TURN a loop turn (_wake).
        waiter: asyncio.Future[None] = loop.create_future()
        if self._next is None:
            self._next = []
        self._next.append(waiter)
        self._next_state = state
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="state-writer")
        await waiter

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next is not None:
            await asyncio.sleep(SAVE_DEBOUNCE_S)  # let this moment's other saves join
            if wait := self.rate.wait_s(time.monotonic()):
                await asyncio.sleep(wait)  # a burst: saves asked meanwhile join this write
            self.rate.started(time.monotonic())
            waiters, state = self._next, self._next_state
            self._next, self._next_state = None, None
            assert state is not None
            try:
                text = await self.fragments.render_async(state)
                try:
                    await loop.run_in_executor(self._writer, self._write, text)
                except OSError as exc:
                    failure = StateWriteFailed.from_os_error(str(self.path), exc)
                    self._log_failure(failure)
                    self.failure = failure
                    self.failing.set()
                    raise failure from exc
                if self.failure is not None:
                    self._log_recovery()
                self.failure = None
                self.failing.clear()
            except Exception as exc:
                self._wake(waiters, exc)
            else:
                self._wake(waiters, None)
            self.writes_total += 1

    def _wake(
        self, waiters: list[asyncio.Future[None]], exc: Exception | None, at: int = 0
    ) -> None:
        """Resume the callers of a finished write, WAKE_PER_TURN now and the rest in later
        loop turns, so that requests and other work get the loop in between."""
        end = at + WAKE_PER_TURN
        for waiter in waiters[at:end]:
            if waiter.done():  # its caller was cancelled
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
        if end < len(waiters):
            asyncio.get_running_loop().call_soon(self._wake, waiters, exc, end)

    def _log_failure(self, failure: StateWriteFailed) -> None:
        """One line when writes start failing (or fail for another reason), then at most one
        per :data:`FAILURE_LOG_EVERY_S`: the loop saves every pass, and a traceback a second
        for a known condition buries everything else."""
        now = self._clock()
        previous = self.failure
        self._failed_writes += 1
        if previous is None:
            self._failing_since, self._failed_writes = now, 1
        elif (
            previous.errno == failure.errno and now - self._failure_logged_at < FAILURE_LOG_EVERY_S
        ):
            return
        self._failure_logged_at = now
        if previous is None or previous.errno != failure.errno:
            log.error("%s", failure.message)
        else:
            log.error(
                "still cannot write the connector's state to %s: %s (%s); %d writes failed "
                "in %.0f s",
                self.path,
                failure.details.get("reason"),
                failure.details.get("errno"),
                self._failed_writes,
                now - self._failing_since,
            )

    def _log_recovery(self) -> None:
        log.warning(
            "the connector's state is written to %s again, after %d failed writes in %.0f s",
            self.path,
            self._failed_writes,
            self._clock() - self._failing_since,
        )

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
