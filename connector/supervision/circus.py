"""Everything Circus: the circusd process the connector owns, and one serialized command channel.

Why our own client (docs/ARCHITECTURE.md, "Why not Circus's own features"): Circus runs one
state-changing command at a time and answers concurrent ones with errno 5 ("arbiter is
already running ... command"); its async client applies no timeout and hangs on overlapping
calls. So every command goes through :class:`CircusChannel`: one call at a time over a zmq
DEALER socket, a deadline on each call, retry with jitter on "busy", and
:class:`SupervisorUnavailable` instead of a hang when circusd is gone.

circusd runs as a separate process in its own session (an in-process arbiter would take over
the host's signal handlers). It outlives a SIGKILLed connector on purpose: the next connector
re-attaches to it from the persisted state and re-adopts the replicas. Replicas, in turn, die
with circusd (see :mod:`connector.supervision.launcher`), so killing circusd leaves no orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

from connector.errors import SupervisorUnavailable
from connector.supervision import procs

log = logging.getLogger(__name__)

BUSY_ERRNO = 5  # circus.commands.errors.COMMAND_ERROR, used for "already running"


class CircusCommandError(Exception):
    """circusd answered with an error that is not "busy"."""

    def __init__(self, command: str, reason: str, errno: int | None) -> None:
        super().__init__(f"circus {command}: {reason}")
        self.command = command
        self.reason = reason
        self.errno = errno


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CircusChannel:
    """One serialized request/reply channel to circusd with deadlines and busy-retry."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        busy_retry_s: float = 10.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.busy_retry_s = busy_retry_s
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()
        # Message ids only tell this channel's replies apart: a counter under a random
        # prefix, not a uuid4 a call (os.urandom each, on the path of every add).
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:12]
        self.calls = 0
        self.errors = 0

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, uuid.uuid4().hex.encode())
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        # After a timeout a late reply may still arrive; a fresh socket (new identity) can
        # never read it as the answer to a later call.
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def call(
        self, command: str, timeout_s: float | None = None, **properties: Any
    ) -> dict[str, Any]:
        """Run one command; retries while circusd is busy, raises on anything else."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s) + self.busy_retry_s
        # circusd is busy mostly with its own periodic check of every watcher (a few ms with
        # hundreds of them): retry soon, then back off, so a scale-up does not sit idle
        # for longer than circusd was busy.
        delay = 0.001
        while True:
            reply = await self._call_once(command, timeout_s or self.timeout_s, properties)
            if reply.get("status") == "ok":
                return reply
            errno = reply.get("errno")
            reason = str(reply.get("reason", "unknown error"))
            if errno == BUSY_ERRNO and "already running" in reason:
                if time.monotonic() + delay > deadline:
                    self.errors += 1
                    raise SupervisorUnavailable(
                        f"circusd stayed busy for {self.busy_retry_s:.0f} s ({reason})",
                        endpoint=self.endpoint,
                        command=command,
                    )
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)
                continue
            self.errors += 1
            raise CircusCommandError(command, reason, errno)

    async def _call_once(
        self, command: str, timeout_s: float, properties: dict[str, Any]
    ) -> dict[str, Any]:
        msg_id = f"{self._id_prefix}-{next(self._ids)}"
        payload = json.dumps({"id": msg_id, "command": command, "properties": properties})
        async with self._lock:
            self.calls += 1
            sock = self._socket()
            try:
                await asyncio.wait_for(sock.send(payload.encode()), timeout_s)
                end = time.monotonic() + timeout_s
                while True:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    raw = await asyncio.wait_for(sock.recv(), remaining)
                    reply = json.loads(raw)
                    if reply.get("id") == msg_id:
                        return dict(reply)
            except (TimeoutError, zmq.ZMQError) as exc:
                self._reset()
                self.errors += 1
                raise SupervisorUnavailable(
                    f"circusd did not answer {command!r} within {timeout_s:g} s at {self.endpoint}",
                    endpoint=self.endpoint,
                    command=command,
                ) from exc

    def close(self) -> None:
        self._reset()


@dataclass(frozen=True)
class CircusdInfo:
    """How to reach a circusd, persisted so a restarted connector can re-attach."""

    endpoint: str
    pubsub_endpoint: str
    pid: int | None = None
    create_time: float | None = None
    owned: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "pubsub_endpoint": self.pubsub_endpoint,
            "pid": self.pid,
            "create_time": self.create_time,
            "owned": self.owned,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CircusdInfo:
        return cls(
            endpoint=str(d["endpoint"]),
            pubsub_endpoint=str(d["pubsub_endpoint"]),
            pid=d.get("pid"),
            create_time=d.get("create_time"),
            owned=bool(d.get("owned", True)),
        )

    def process_alive(self) -> bool:
        """True when the recorded circusd process still runs (pid *and* create time match)."""
        return procs.same_process(self.pid, self.create_time)


def circusd_program() -> list[str]:
    """The argv (less the config path) of the circusd the connector runs: Circus's daemon
    with a spawn that needs no fork (:mod:`connector.supervision.circusd_program`)."""
    return [sys.executable, "-m", "connector.supervision.circusd_program"]


def stock_circusd_program() -> list[str]:
    """Circus's own ``circusd`` script, unchanged (benchmarks compare with it)."""
    beside = Path(sys.executable).with_name("circusd")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("circusd")
    if not found:
        raise SupervisorUnavailable("circusd not found next to the Python interpreter or on PATH")
    return [found]


def write_circus_config(path: Path, endpoint: str, pubsub: str, check_delay: float) -> None:
    path.write_text(
        "[circus]\n"
        f"endpoint = {endpoint}\n"
        f"pubsub_endpoint = {pubsub}\n"
        f"check_delay = {check_delay}\n"
        "statsd = False\n"
        "httpd = False\n"
        "warmup_delay = 0\n"
        "loglevel = WARNING\n"
        f"logoutput = {path.parent / 'circusd.log'}\n"
    )


def _spawn_circusd(
    run_dir: Path, check_delay: float, program: list[str]
) -> tuple[subprocess.Popen[bytes], str, str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    endpoint = f"tcp://127.0.0.1:{free_loopback_port()}"
    pubsub = f"tcp://127.0.0.1:{free_loopback_port()}"
    config = run_dir / "circus.ini"
    write_circus_config(config, endpoint, pubsub, check_delay)
    with (run_dir / "circusd.out").open("ab") as out:
        proc = subprocess.Popen(
            [*program, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal must not reach it directly
            close_fds=True,
        )
    return proc, endpoint, pubsub


async def start_circusd(
    run_dir: Path,
    *,
    check_delay: float = 0.25,
    attempts: int = 3,
    program: list[str] | None = None,
) -> CircusdInfo:
    """Start a circusd we own on loopback ports and wait until it answers (``program``:
    the argv before the config path, :func:`circusd_program` unless given).

    Ports are picked free just before circusd binds them; if another process takes one in
    between, circusd exits at once and we try again on fresh ports.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await _start_circusd_once(run_dir, check_delay, program or circusd_program())
        except _EarlyExit as exc:
            if attempt == attempts:
                raise SupervisorUnavailable(str(exc)) from None
    raise AssertionError("unreachable")


class _EarlyExit(Exception):
    pass


async def _start_circusd_once(run_dir: Path, check_delay: float, program: list[str]) -> CircusdInfo:
    proc, endpoint, pubsub = await asyncio.to_thread(_spawn_circusd, run_dir, check_delay, program)
    created = await asyncio.to_thread(lambda: psutil.Process(proc.pid).create_time())
    info = CircusdInfo(endpoint, pubsub, proc.pid, created)
    channel = CircusChannel(endpoint, timeout_s=0.5, busy_retry_s=0)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                tail = await asyncio.to_thread(
                    lambda: _tail(run_dir / "circusd.out") + _tail(run_dir / "circusd.log")
                )
                raise _EarlyExit(f"circusd exited with code {proc.returncode} at start-up: {tail}")
            try:
                await channel.call("list")
                break
            except SupervisorUnavailable:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise
    finally:
        channel.close()
    # From here on circusd is tracked by pid + create time (it may outlive this process).
    proc.returncode = 0
    return info


def _tail(path: Path, limit: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


async def stop_circusd(
    info: CircusdInfo, channel: CircusChannel | None, timeout_s: float = 10
) -> None:
    """Ask circusd to quit, then make sure the process is gone."""
    if channel is not None:
        with contextlib.suppress(Exception):
            await channel.call("quit", timeout_s=2.0, waiting=True)
    if info.pid is None or not await asyncio.to_thread(info.process_alive):
        return
    await asyncio.to_thread(_terminate, info.pid, timeout_s)


def _terminate(pid: int, timeout_s: float) -> None:
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    except psutil.Error:
        pass
    # circusd is not our child when we re-attached to it; reap if it is.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


EventHandler = Callable[[str, str, dict[str, Any]], None]
EVENTS_PER_TURN = 32


class CircusEvents:
    """Subscribes to circusd's pub/sub stream: ``watcher.<name>.<event>`` topics.

    Only the ``events`` asked for are parsed and handed on: circusd publishes some five per
    replica it adds or removes (spawn, start, stop, remove, reap), and a subscription can
    filter topics only by prefix, so the rest arrive and are dropped unread. Messages that
    queued up while the loop was busy are all ready at once, and a ready ``recv`` does not
    give the loop a turn: one is given every :data:`EVENTS_PER_TURN` messages, or a mass
    stop's burst held the loop for ~100 ms."""

    def __init__(
        self,
        pubsub_endpoint: str,
        prefix: str,
        handler: EventHandler,
        events: frozenset[str] | None = None,
    ) -> None:
        self._endpoint = pubsub_endpoint
        self._prefix = prefix
        self._handler = handler
        self._events = events
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, f"watcher.{self._prefix}".encode())
        sock.connect(self._endpoint)
        received = 0
        try:
            while True:
                topic, raw = await sock.recv_multipart()
                received += 1
                if received % EVENTS_PER_TURN == 0:
                    await asyncio.sleep(0)
                self._deliver(topic, raw)
        finally:
            sock.close(linger=0)

    def _deliver(self, topic: bytes, raw: bytes) -> None:
        watcher, _, event = topic.decode().removeprefix("watcher.").rpartition(".")
        if not watcher or (self._events is not None and event not in self._events):
            return
        try:
            data = json.loads(raw)
        except ValueError:
            return
        try:
            self._handler(watcher, event, data if isinstance(data, dict) else {})
        except Exception:  # a handler bug must not kill the subscription
            log.exception("circus event handler failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
