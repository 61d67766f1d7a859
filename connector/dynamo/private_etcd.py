"""A private etcd for ``dynamo-local up``, when a graph needs one and none was named.

Dynamo's Planner in virtual mode dials etcd whatever discovery backend the runtime uses,
and dynamo-local's Planner executor reads its decisions from etcd, so a graph with a
Planner cannot run without one. Rather than ask a newcomer to start a server first, ``up``
runs Debian's ``etcd`` (package ``etcd-server``) itself: single member, on two free
loopback ports, its data and log under ``<working dir>/etcd/``, tuned (heartbeat 10 ms,
election 100 ms) to be ready in about 100 ms.

Lifecycle, mirroring circusd's:

* The server runs in a session of its own, so a Ctrl-C in the terminal (which signals the
  whole foreground process group) does not stop it before ``up`` has stopped the replicas
  that still talk to it; ``up`` stops it afterwards, by PID (SIGTERM, then SIGKILL).
* It has no parent-death signal: when ``up`` itself is killed, circusd and the replicas
  live on, still pointed at this etcd, so it lives on too. Its PID, start time and URL are
  recorded in ``etcd.json``; the next ``up`` with the same working dir finds it still
  serving and uses it again, so the replicas it re-adopts keep their etcd.
* A server that is not running any more is never restarted on its old data: the data dir
  is emptied first. A private etcd holds only what this run's processes write, so nothing
  stale (instances of dead processes, an old Planner's ``decision_id``, which would make a
  new Planner wait forever) outlives a run.

Every blocking step (spawning, the health check, waiting for the exit) runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from connector.supervision.procs import same_process

BINARY = "etcd"
PACKAGE = "etcd-server"  # the Debian package that ships BINARY
HOST = "127.0.0.1"
RECORD = "etcd.json"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
# Two free ports are picked and then bound by etcd; someone may take one in between.
START_ATTEMPTS = 3


def etcd_argv(program: str, name: str, data_dir: Path, client_url: str, peer_url: str) -> list[str]:
    """A single-member etcd serving ``client_url``, its one peer on ``peer_url``: what the
    private etcd runs, and what the tests' etcd runs too."""
    return [
        program,
        *("--name", name),
        *("--data-dir", str(data_dir)),
        *("--listen-client-urls", client_url),
        *("--advertise-client-urls", client_url),
        *("--listen-peer-urls", peer_url),
        *("--initial-advertise-peer-urls", peer_url),
        *("--initial-cluster", f"{name}={peer_url}"),
        # One member on loopback: elect itself leader at once instead of after ~1 s.
        *("--heartbeat-interval", "10"),
        *("--election-timeout", "100"),
        *("--log-level", "warn"),
    ]


class PrivateEtcdError(Exception):
    """The private etcd could not be started; the message is one line."""


class EtcdNotInstalled(PrivateEtcdError):
    """No ``etcd`` program on PATH."""


@dataclass(frozen=True)
class _Record:
    pid: int
    create_time: float
    url: str


def _free_port() -> int:
    # Port 0 gives an ephemeral port, outside the range dynamo-local hands to replicas.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


class PrivateEtcd:
    """One etcd server under ``root`` (``root/data``, ``root/etcd.log``, ``root/etcd.json``).

    :meth:`start` starts it, or adopts the one a killed ``up`` left serving there
    (:attr:`reused`); :meth:`stop` stops it and removes its data.
    """

    def __init__(
        self,
        root: Path,
        *,
        binary: str = BINARY,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.root = root
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.url: str | None = None
        self.pid: int | None = None
        self.reused = False
        self._create_time: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None  # only when started here

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "etcd.log"

    @property
    def record_path(self) -> Path:
        return self.root / RECORD

    async def start(self) -> str:
        """Start (or adopt) the server and return its client URL. Raises
        :class:`EtcdNotInstalled` or :class:`PrivateEtcdError`."""
        return await asyncio.to_thread(self._start)

    async def stop(self) -> None:
        """Stop the server by PID (SIGTERM, SIGKILL after the stop timeout) and remove its
        data and record. Idempotent."""
        await asyncio.to_thread(self._stop)

    # ------------------------------------------------------------------ blocking parts

    def _start(self) -> str:
        program = shutil.which(self.binary)
        if program is None:
            raise EtcdNotInstalled(
                f"etcd is not installed (no {self.binary!r} on PATH; Debian package {PACKAGE})"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        left = self._read_record()
        if left is not None and same_process(left.pid, left.create_time) and _healthy(left.url):
            self.pid, self._create_time, self.url = left.pid, left.create_time, left.url
            self.reused = True
            return left.url
        # Not running any more: start afresh (see the module docstring).
        shutil.rmtree(self.data_dir, ignore_errors=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                url = self._spawn(program)
            except PrivateEtcdError as exc:
                if attempt == START_ATTEMPTS or "address already in use" not in str(exc):
                    raise
                shutil.rmtree(self.data_dir, ignore_errors=True)
                continue
            self._write_record()
            return url
        raise AssertionError("unreachable")

    def _spawn(self, program: str) -> str:
        client = f"http://{HOST}:{_free_port()}"
        peer = f"http://{HOST}:{_free_port()}"
        argv = etcd_argv(program, "dynamo-local", self.data_dir, client, peer)
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # out of reach of a terminal's Ctrl-C
            )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                raise PrivateEtcdError(
                    f"etcd exited with code {code} while starting: {_last_line(self.log_path)} "
                    f"(log: {self.log_path})"
                )
            if _healthy(client, timeout=0.5):
                break
            if time.monotonic() >= deadline:
                self._terminate(proc.pid, None, proc)
                raise PrivateEtcdError(
                    f"etcd did not answer within {self.start_timeout_s:g} s (log: {self.log_path})"
                )
            time.sleep(0.02)
        self._proc = proc
        self.pid, self.url = proc.pid, client
        self._create_time = psutil.Process(proc.pid).create_time()
        return client

    def _stop(self) -> None:
        if self.pid is not None:
            self._terminate(self.pid, self._create_time, self._proc)
        self.pid = self._proc = self._create_time = None
        with contextlib.suppress(OSError):
            self.record_path.unlink()
        # etcd preallocates 64 MB WAL segments: do not leave them behind in ~/.dynamo.
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _terminate(
        self, pid: int, create_time: float | None, proc: subprocess.Popen[bytes] | None
    ) -> None:
        if proc is not None:  # our child: signal it through Popen, which also reaps it
            proc.terminate()
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_timeout_s)
            return
        if not same_process(pid, create_time):
            return  # gone already, or the PID now belongs to someone else
        with contextlib.suppress(psutil.NoSuchProcess):
            target = psutil.Process(pid)
            target.terminate()
            try:
                target.wait(self.stop_timeout_s)
            except psutil.TimeoutExpired:
                target.kill()
                target.wait(self.stop_timeout_s)

    def _read_record(self) -> _Record | None:
        try:
            raw = json.loads(self.record_path.read_text())
            return _Record(int(raw["pid"]), float(raw["create_time"]), str(raw["url"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_record(self) -> None:
        assert self.pid is not None and self._create_time is not None and self.url is not None
        record = _Record(self.pid, self._create_time, self.url)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, self.record_path)  # never a half-written record
