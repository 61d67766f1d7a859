"""Structured events: every scale, restart, crash, crash loop, reap and planner decision.

Kept in a bounded ring for the API (``GET /v1/events?since=``), appended to a JSONL file
for later reading, and pushed to subscribers (the SSE stream, the exporter's counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

Subscriber = Callable[["Event"], None]

# The file is appended to at most this often: a scale of hundreds of replicas emits two
# events each, and one thread hop (and one open) per event cost more than writing them.
FLUSH_EVERY_S = 0.05


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``seq`` is monotonic per connector run (for ``since=``)."""

    seq: int
    time: float
    kind: str  # scale | spawn | stop | exit | restart | crashloop | reap | decision | ...
    component: str | None = None
    replica: str | None = None
    source: str | None = None  # api | planner | cli | reconcile | user
    from_replicas: int | None = None
    to_replicas: int | None = None
    outcome: str | None = None  # ok | partial | failed | timeout | refused
    reason: str | None = None
    duration_s: float | None = None
    trace_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies field by field (~80 us an event, two
        # events a replica in a scale); the one nested value, ``details``, is copied.
        d = {name: getattr(self, name) for name in _FIELDS}
        d["details"] = dict(self.details)
        return {k: v for k, v in d.items() if v is not None and v != {}}


_FIELDS = tuple(f.name for f in fields(Event))


class EventLog:
    """Bounded in-memory ring + JSONL file + synchronous subscribers.

    The file is written from a background task so emitting never blocks the event loop.
    """

    def __init__(self, path: Path | None = None, capacity: int = 2000) -> None:
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._path = path
        self._subscribers: list[Subscriber] = []
        self._pending: list[str] = []
        self._flush_task: asyncio.Task[None] | None = None

    def emit(self, kind: str, **fields: Any) -> Event:
        event = Event(seq=next(self._seq), time=time.time(), kind=kind, **fields)
        self._ring.append(event)
        for sub in list(self._subscribers):
            # A broken subscriber must not break the connector.
            with contextlib.suppress(Exception):
                sub(event)
        if self._path is not None:
            self._pending.append(json.dumps(event.to_dict(), default=str))
            self._schedule_flush()
        return event

    def since(self, seq: int = 0, limit: int | None = None) -> list[Event]:
        events = [e for e in self._ring if e.seq > seq]
        return events[-limit:] if limit else events

    @property
    def last_seq(self) -> int:
        return self._ring[-1].seq if self._ring else 0

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(fn)

        return unsubscribe

    def _schedule_flush(self) -> None:
        if self._flush_task is not None and not self._flush_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(self._take())
            return
        self._flush_task = loop.create_task(self._flush())

    def _take(self) -> list[str]:
        lines, self._pending = self._pending, []
        return lines

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(FLUSH_EVERY_S)  # this moment's other events join the write
            await asyncio.to_thread(self._write, self._take())

    def _write(self, lines: list[str]) -> None:
        if not lines or self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    async def aclose(self) -> None:
        if self._flush_task is not None:
            await self._flush_task
        self._write(self._take())
