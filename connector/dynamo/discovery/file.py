"""Dynamo's file discovery backend (``DYN_DISCOVERY_BACKEND=file``, ``DYN_FILE_KV=<root>``).

Dynamo keeps one file per instance under ``<root>/v1/instances/``, named by the key after
``v1/instances/`` percent-encoded (:func:`connector.dynamo.discovery.keys.file_path`). This module
watches that directory with Linux inotify (through ctypes on libc: ``inotify_init1`` and
``inotify_add_watch``, the descriptor registered with ``loop.add_reader``), so a new or
removed file is seen within milliseconds. A slow poll of file stats is the backstop for
whatever inotify cannot report (queue overflow, a directory removed and re-created, a
filesystem without inotify); where inotify is unavailable the poll runs fast instead.

All reads happen in one task, one batch at a time, in worker threads: the loop is never
blocked and a late read can never overtake a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import struct
from pathlib import Path

from connector.dynamo.discovery.cache import Instance, InstanceCache
from connector.dynamo.discovery.keys import file_path, key_from_file

log = logging.getLogger(__name__)

# inotify(7) event bits.
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

# Not IN_MODIFY: a file is read once it is complete (closed or renamed into place), never
# half-way through a write.
WATCH_MASK = (
    IN_CLOSE_WRITE
    | IN_CREATE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then ``len`` bytes of name


class Inotify:
    """A non-blocking inotify descriptor (Linux), through libc with ctypes."""

    def __init__(self) -> None:
        libname = ctypes.util.find_library("c") or "libc.so.6"
        libc = ctypes.CDLL(libname, use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add_watch.restype = ctypes.c_int
        self._rm_watch = libc.inotify_rm_watch
        self._rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self._rm_watch.restype = ctypes.c_int
        init1 = libc.inotify_init1
        init1.argtypes = [ctypes.c_int]
        init1.restype = ctypes.c_int
        fd = init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1 failed: {os.strerror(err)}")
        self.fd: int = fd

    def add_watch(self, path: Path, mask: int) -> int:
        wd = int(self._add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path} failed: {os.strerror(err)}")
        return wd

    def rm_watch(self, wd: int) -> None:
        """Drop a watch; a watch the kernel already dropped is fine."""
        self._rm_watch(self.fd, wd)

    def read_events(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); never blocks."""
        out: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return out
            if not buf:
                return out
            offset = 0
            while offset + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                offset += _EVENT.size
                raw_name = buf[offset : offset + length].split(b"\0", 1)[0]
                offset += length
                out.append((wd, mask, os.fsdecode(raw_name)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


_Signature = tuple[int, int, int]  # (mtime_ns, size, inode)
_Read = tuple[_Signature, bytes] | None  # None: the file is gone
_DirId = tuple[int, int]  # (device, inode) of a directory


def _dir_id(path: Path) -> _DirId | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FileDiscovery(InstanceCache):
    """Discovery over Dynamo's ``DYN_FILE_KV`` directory."""

    def __init__(self, root: Path, *, poll_s: float = 2.0, poll_without_inotify_s: float = 0.2):
        super().__init__("file")
        self.root = Path(root)
        self.dir = self.root / "v1" / "instances"
        self.poll_s = poll_s
        self.poll_without_inotify_s = poll_without_inotify_s
        self._inotify: Inotify | None = None
        self._wd: int | None = None
        self._dirty: set[str] = set()
        self._rescan = True
        self._watched: _DirId | None = None  # the directory inode being watched / scanned
        self._wake = asyncio.Event()
        self._sigs: dict[str, _Signature] = {}  # file name -> stat signature last read
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def inotify_active(self) -> bool:
        return self._wd is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._inotify = Inotify()
        except (OSError, AttributeError) as exc:  # not Linux, or no inotify in this libc
            log.warning("file discovery: inotify unavailable (%s); polling %s", exc, self.dir)
        else:
            self._loop.add_reader(self._inotify.fd, self._on_inotify)
        await self._add_watch()
        self._rescan = True
        await self._sync_once()
        self._tasks = [
            self._loop.create_task(self._sync_loop(), name="file-discovery-sync"),
            self._loop.create_task(self._poll_loop(), name="file-discovery-poll"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
            self._wd = None
            self._watched = None

    async def remove(self, instance: Instance, *, revoke: bool = True) -> None:
        """Delete the instance's file (``revoke`` has no meaning here: files have no lease)."""
        path = file_path(self.root, instance.key)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        self._sigs.pop(path.name, None)
        self._delete(instance.key)

    def registered_at(self, key: str) -> float | None:
        """The file's modification time: written at registration, refreshed every few
        seconds while its process lives, frozen once it is dead."""
        sig = self._sigs.get(file_path(self.root, key).name)
        return sig[0] / 1e9 if sig is not None else super().registered_at(key)

    async def healthy(self) -> bool:
        is_dir = await asyncio.to_thread(self.dir.is_dir)
        return is_dir and bool(self._tasks) and not any(t.done() for t in self._tasks)

    def replica_env(self) -> dict[str, str]:
        return {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(self.root)}

    # ------------------------------------------------------------------ watching

    async def _add_watch(self) -> None:
        """(Re-)create the directory and watch it; the watch follows this inode from now on."""
        inotify = self._inotify
        old_wd, self._wd, self._watched = self._wd, None, None

        def watch() -> tuple[int | None, _DirId | None]:
            if inotify is not None and old_wd is not None:
                inotify.rm_watch(old_wd)
            self.dir.mkdir(parents=True, exist_ok=True)
            wd = inotify.add_watch(self.dir, WATCH_MASK) if inotify is not None else None
            return wd, _dir_id(self.dir)

        try:
            self._wd, self._watched = await asyncio.to_thread(watch)
        except OSError as exc:
            log.warning("file discovery: cannot watch %s (%s); polling", self.dir, exc)

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        for wd, mask, name in self._inotify.read_events():
            if mask & IN_Q_OVERFLOW:
                self._rescan = True
            elif wd != self._wd:
                continue  # a watch we already dropped
            elif mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                # The directory went away (or moved, taking the watch along): the rescan
                # sees it is not the watched inode any more and re-creates and re-watches.
                self._rescan = True
            elif name:
                self._dirty.add(name)
        self._wake.set()

    async def _poll_loop(self) -> None:
        while True:
            interval = self.poll_s if self.inotify_active else self.poll_without_inotify_s
            await asyncio.sleep(interval)
            self._rescan = True
            self._wake.set()

    async def _sync_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync_once()
            except Exception:  # keep watching; the next poll retries
                log.exception("file discovery: reading %s failed", self.dir)

    async def _sync_once(self) -> None:
        if self._rescan:
            self._rescan = False
            self._dirty.clear()
            dir_id, present, reads = await asyncio.to_thread(self._scan, dict(self._sigs))
            if dir_id is None or dir_id != self._watched:
                # Gone, or replaced by another directory: forget what it held, then watch
                # the (re-created) directory and read what is already in it.
                for name in list(self._sigs):
                    self._forget(name)
                await self._add_watch()
                dir_id, present, reads = await asyncio.to_thread(self._scan, {})
            for name in [n for n in self._sigs if n not in present]:
                self._forget(name)
            self._apply(reads)
        elif self._dirty:
            names, self._dirty = self._dirty, set()
            self._apply(await asyncio.to_thread(self._read_names, names))

    def _scan(
        self, known: dict[str, _Signature]
    ) -> tuple[_DirId | None, set[str], dict[str, _Read]]:
        """(the directory's identity, every file name in it, reads of the files new or
        changed since ``known``)."""
        present: set[str] = set()
        reads: dict[str, _Read] = {}
        dir_id = _dir_id(self.dir)
        if dir_id is None:
            return None, present, reads
        try:
            entries = list(os.scandir(self.dir))
        except (FileNotFoundError, NotADirectoryError):
            return None, present, reads
        for entry in entries:
            try:
                sig = _signature(entry.stat())
            except FileNotFoundError:
                continue
            present.add(entry.name)
            if known.get(entry.name) != sig:
                reads[entry.name] = self._read(entry.name)
        return dir_id, present, reads

    def _read_names(self, names: set[str]) -> dict[str, _Read]:
        return {name: self._read(name) for name in names}

    def _read(self, name: str) -> _Read:
        path = self.dir / name
        try:
            with path.open("rb") as f:
                sig = _signature(os.fstat(f.fileno()))
                return sig, f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _apply(self, reads: dict[str, _Read]) -> None:
        for name, read in sorted(reads.items()):
            if read is None:
                self._forget(name)
                continue
            sig, raw = read
            self._sigs[name] = sig
            key = key_from_file(self.root, self.dir / name)
            if key is not None:
                self._put(key, raw)

    def _forget(self, name: str) -> None:
        self._sigs.pop(name, None)
        key = key_from_file(self.root, self.dir / name)
        if key is not None:
            self._delete(key)
