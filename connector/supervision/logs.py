"""Per-replica log files: where they live, how Circus writes them, how we read them back.

Circus writes each replica's stdout and stderr to its own file with size-based rotation and
a timestamp prefix on every line; the prefix lets us merge lines of several replicas in time
order. Reading never follows a path that is not inside the log folder.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connector import defaults
from connector.supervision.batched import Batched, Outcome

MAX_LINES = 10_000
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"  # sortable as text
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class LogPolicy:
    # Each stream's file rotates at max_bytes (0: never), keeping backup_count old files.
    max_bytes: int = defaults.LOG_MAX_BYTES
    backup_count: int = defaults.LOG_BACKUPS
    # Replicas that stopped whose log files stay, per component: the newest (the highest
    # ordinals; ordinals are never reused). Older ones are deleted, so a graph the Planner
    # scales up and down all day does not leave two files (and their rotations) per
    # replica it ever started.
    stopped_kept: int = defaults.STOPPED_LOGS_KEPT


# "<watcher>.<stream>.log", or a rotation of it: "<watcher>.<stream>.log.<n>".
_LOG_FILE = re.compile(r"^(?P<watcher>.+)\.(?:stdout|stderr)\.log(?:\.\d+)?$")


def log_paths(log_dir: Path, watcher: str) -> dict[str, str]:
    # os.path.join, not Path's "/": called for every replica a plan creates, and pathlib
    # costs ~25 us a path (50 ms of a 1,000-replica plan on the event loop).
    base = os.fspath(log_dir)
    return {stream: os.path.join(base, f"{watcher}.{stream}.log") for stream in STREAMS}


def create_log_files(paths: dict[str, str]) -> None:
    """Create a replica's log files before circusd opens them (blocking: call it in a
    thread). circusd opens each stream's file on its one command path, and creating a file
    costs ~0.2 ms on ext4 against ~6 us to open one that exists: made here, in the
    connector's thread, a scale-up's files are made beside the serialized ``add`` commands
    rather than inside them (about a sixth of circusd's time per replica)."""
    for path in paths.values():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644))


class LogFileMaker:
    """Makes replicas' log files (and their folder when it is missing) in one thread at a
    time, every request of a moment in one thread hop (:class:`Batched`).

    Each spawn used to make its files (and the folder, ``mkdir`` every time) in a thread of
    its own, so a scale-up had up to six pool threads creating files in one folder at once,
    each taking the folder's lock. Made one after the other, four alternating runs of
    0 -> 512 on 2 cores took the connector 0.91-1.08 s of system CPU against 1.00-1.41 s,
    in about as long. Creating a file costs from 20 us to over 0.4 ms on the same ext4
    disk (more while it discards the blocks of files just deleted), so it is done beside
    circusd's adds, not inside them (:func:`create_log_files`)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._make = Batched(self._make_all, "log-files")

    @property
    def hops(self) -> int:
        """Thread hops so far (tests count them)."""
        return self._make.runs

    async def make(self, paths: dict[str, str]) -> None:
        """Create ``paths``' files; raises the ``OSError`` that refused one of them."""
        await self._make(paths)

    def _make_all(self, batch: list[dict[str, str]]) -> list[Outcome[None]]:
        outcomes: list[Outcome[None]] = []
        for paths in batch:
            try:
                try:
                    create_log_files(paths)
                except FileNotFoundError:  # the folder is missing (first spawn, or removed)
                    os.makedirs(self.log_dir, exist_ok=True)
                    create_log_files(paths)
            except OSError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes


def stopped_log_files(
    names: Iterable[str], prefix: str, live: Collection[str], keep: int
) -> list[str]:
    """Which of ``names`` (files in the log folder) to delete: those of watchers under
    ``prefix`` (a namespace's ``ns.``) that are not ``live``, beyond the ``keep`` highest
    ordinals of each component. Anything that is not a replica's log file is left alone."""
    files: dict[str, list[str]] = {}
    for name in names:
        match = _LOG_FILE.match(name)
        if match is None:
            continue
        watcher = match["watcher"]
        if watcher.startswith(prefix) and watcher not in live:
            files.setdefault(watcher, []).append(name)
    by_component: dict[str, list[tuple[int, str]]] = {}
    for watcher in files:
        component, _, ordinal = watcher.rpartition(".")
        if component and ordinal.isdigit():
            by_component.setdefault(component, []).append((int(ordinal), watcher))
    doomed: list[str] = []
    for stopped in by_component.values():
        stopped.sort(reverse=True)
        for _, watcher in stopped[keep:]:
            doomed.extend(files[watcher])
    return sorted(doomed)


def list_log_folder(log_dir: Path) -> list[str]:
    """The names in the log folder (blocking); none when it does not exist yet."""
    try:
        return os.listdir(log_dir)
    except FileNotFoundError:
        return []


def delete_log_files(log_dir: Path, names: Iterable[str]) -> int:
    """Delete ``names`` from the log folder (blocking); returns how many went."""
    deleted = 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(log_dir, name))
            deleted += 1
    return deleted


def circus_stream_options(paths: dict[str, str], policy: LogPolicy) -> dict[str, Any]:
    """Watcher options that make Circus write (and rotate) the replica's log files."""
    options: dict[str, Any] = {}
    for stream in STREAMS:
        options[f"{stream}_stream"] = {
            "class": "connector.supervision.circus_stream.LineFileStream",
            "filename": paths[stream],
            "max_bytes": policy.max_bytes,
            "backup_count": policy.backup_count,
            "time_format": TIME_FORMAT,
        }
    return options


def tail_lines(path: Path, lines: int, block: int = 65536) -> list[str]:
    """The last ``lines`` lines of a file, reading backwards from the end (blocking)."""
    if lines <= 0:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= lines:
                step = min(block, end)
                end -= step
                f.seek(end)
                data = f.read(step) + data
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    return text[-lines:]


def _with_rotated(path: Path) -> list[Path]:
    # Newest last: path.3, path.2, path.1, path
    rotated = sorted(
        (p for p in path.parent.glob(path.name + ".*") if p.suffix.lstrip(".").isdigit()),
        key=lambda p: -int(p.suffix.lstrip(".")),
    )
    return [*rotated, path]


def inside(log_dir: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(log_dir.resolve())
    except ValueError:
        return False
    return True


def read_replica_lines(log_dir: Path, path: Path, lines: int) -> list[str]:
    """Newest ``lines`` lines of one stream, including rotated files when needed."""
    if not inside(log_dir, path):
        return []
    out: list[str] = []
    for p in reversed(_with_rotated(path)):
        need = lines - len(out)
        if need <= 0:
            break
        out = tail_lines(p, need) + out
    return out


def merge_newest(sources: Iterable[tuple[str, list[str]]], lines: int) -> list[str]:
    """Merge per-replica line lists by their timestamp prefix; keep the newest ``lines``.

    Each output line is ``[<replica>] <line>``. Lines are sorted stably by timestamp text.
    """
    keyed: list[list[tuple[str, int, str]]] = []
    for label, src in sources:
        keyed.append([(line[:26], i, f"[{label}] {line}") for i, line in enumerate(src)])
    merged = [item[2] for item in heapq.merge(*keyed, key=lambda t: (t[0], t[1]))]
    return merged[-lines:] if lines else []
