"""A Circus file stream that timestamps whole lines.

Loaded *inside circusd* (watcher option ``stdout_stream.class``). Circus's own FileStream
prefixes every chunk it reads from a pipe, so a line a process writes in two ``write``
calls becomes two log lines. This subclass keeps the unfinished tail of each chunk until its
newline arrives (or the stream closes), so every log line is exactly one line of output with
one timestamp, which is what merging replicas' logs by time relies on.
"""

from __future__ import annotations

from typing import Any

from circus.stream import FileStream

MAX_PENDING = 64 * 1024  # a "line" longer than this is written in pieces


class LineFileStream(FileStream):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[Any, bytes] = {}

    def __call__(self, data: dict[str, Any]) -> None:
        raw = data.get("data", b"")
        if isinstance(raw, str):
            raw = raw.encode("utf-8", errors="replace")
        pid = data.get("pid")
        buffered = self._pending.pop(pid, b"") + raw
        complete, sep, tail = buffered.rpartition(b"\n")
        if len(tail) > MAX_PENDING:
            complete, sep, tail = buffered, b"\n", b""
        if tail:
            self._pending[pid] = tail
        if sep:
            super().__call__({**data, "data": complete + b"\n"})

    def close(self) -> None:
        for pid, tail in list(self._pending.items()):
            super().__call__({"data": tail + b"\n", "pid": pid})
        self._pending.clear()
        super().close()
