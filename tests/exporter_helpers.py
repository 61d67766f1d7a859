"""Helpers for the exporter tests: a connector reader double, views, processes, fakes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from connector.events import Event, EventLog, Subscriber
from connector.view import ComponentView, ConnectorView, ReplicaView
from exporter.process_tree import ProcReading

NAMESPACE = "demo"


class FakeReader:
    """A ConnectorReader over a view the test sets, with a real EventLog."""

    def __init__(self, view: ConnectorView) -> None:
        self._view = view
        self.events = EventLog()
        self.view_calls = 0
        self.fail_with: Exception | None = None

    def set_view(self, view: ConnectorView) -> None:
        self._view = view

    def view(self) -> ConnectorView:
        self.view_calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        return self._view

    def recent_events(self, since: int = 0) -> list[Event]:
        return self.events.since(since)

    def subscribe_events(self, fn: Subscriber) -> Callable[[], None]:
        return self.events.subscribe(fn)


def component(
    name: str,
    *,
    role: str = "worker",
    sub: str | None = None,
    status: str = "running",
    desired: int = 1,
    running: int | None = None,
    ready: int | None = None,
    restarts: int = 0,
    max_replicas: int | None = 8,
    scale_in_flight: bool = False,
) -> ComponentView:
    return ComponentView(
        name=name,
        role=role,
        sub_component_type=sub,
        dynamo_namespace=NAMESPACE,
        status=status,
        desired=desired,
        running=desired if running is None else running,
        ready=desired if ready is None else ready,
        restarts=restarts,
        crashloops=0,
        scale_in_flight=scale_in_flight,
        min_replicas=0,
        max_replicas=max_replicas,
    )


def replica(
    comp: str,
    ordinal: int,
    pid: int | None,
    *,
    state: str = "ready",
    create_time: float | None = None,
    gpus: tuple[str, ...] = (),
    **kw: Any,
) -> ReplicaView:
    return ReplicaView(
        component=comp,
        replica=str(ordinal),
        watcher=f"{NAMESPACE}.{comp}.{ordinal}",
        state=state,
        ready=state == "ready",
        pid=pid,
        create_time=create_time,
        started_at=kw.pop("started_at", 1_700_000_000.0 + ordinal),
        restarts=kw.pop("restarts", 0),
        last_exit_code=None,
        gpus=gpus,
        **kw,
    )


def view_of(
    components: tuple[ComponentView, ...], replicas: tuple[ReplicaView, ...], taken_at: float
) -> ConnectorView:
    return ConnectorView(NAMESPACE, taken_at, components, replicas)


# --- a deterministic process table ----------------------------------------------------------


@dataclass
class FakeProc:
    ppid: int
    create_time: float
    cpu_seconds: float
    rss: int
    pss: int | None = None
    uss: int | None = None
    zombie: bool = False
    command: str = "python -m worker"
    cpus: int = 4


@dataclass
class FakeProcessTable:
    """A ProcessTable over a dict the test edits between cycles; counts every call."""

    procs: dict[int, FakeProc] = field(default_factory=dict)
    calls: int = 0
    detail_reads: int = 0

    def parents(self) -> Mapping[int, int]:
        self.calls += 1
        return {pid: p.ppid for pid, p in self.procs.items()}

    def create_time(self, pid: int) -> float | None:
        self.calls += 1
        proc = self.procs.get(pid)
        return proc.create_time if proc else None

    def read(self, pid: int, *, detail: bool) -> ProcReading | None:
        self.calls += 1
        proc = self.procs.get(pid)
        if proc is None:
            return None
        if detail:
            self.detail_reads += 1
        return ProcReading(
            proc.cpu_seconds,
            proc.rss,
            proc.zombie,
            proc.pss if detail else None,
            proc.uss if detail else None,
        )

    def command(self, pid: int) -> str | None:
        proc = self.procs.get(pid)
        return proc.command if proc else None

    def cpus_available(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return proc.cpus if proc else None

    def bump(self, pid: int, **changes: Any) -> None:
        self.procs[pid] = replace(self.procs[pid], **changes)


class Clock:
    """A settable clock (Unix seconds), shared by the sampler and the process sampler."""

    def __init__(self, now: float = 1_700_000_100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- real processes ---------------------------------------------------------------------------


@dataclass
class Tree:
    """A real process tree: ``sh`` with ``children`` sleeping children."""

    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def child_pids(self) -> list[int]:
        return sorted(c.pid for c in psutil.Process(self.pid).children(recursive=True))

    def create_time(self) -> float:
        return psutil.Process(self.pid).create_time()

    def kill(self) -> None:
        for pid in self.child_pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(timeout=10)


def spawn_tree(children: int) -> Tree:
    """``sh`` whose ``children`` sleeping children all exist when this returns (a lone
    ``sleep`` for 0)."""
    if children == 0:
        return Tree(subprocess.Popen(["sleep", "600"]))
    script = " ".join(["sleep 600 &"] * children) + " wait"
    tree = Tree(subprocess.Popen(["sh", "-c", script]))
    deadline = time.monotonic() + 10
    while len(tree.child_pids()) < children:
        if time.monotonic() > deadline:
            tree.kill()
            raise AssertionError(f"sh did not start {children} children within 10 s")
        time.sleep(0.01)
    return tree


# --- exposition parsing ----------------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)")


def samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of every sample line (labels as exposed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        out[m.group("name") + (m.group("labels") or "")] = float(m.group("value"))
    return out


def series_with(text: str, *fragments: str) -> dict[str, float]:
    return {k: v for k, v in samples(text).items() if all(f in k for f in fragments)}


def key(name: str, **labels: str) -> str:
    """The exposed series name for ``labels`` (prometheus_client sorts label names)."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


# --- NVML captures ----------------------------------------------------------------------------

# The captures are in the repository (the same folder as ``tests.nvml_fakes.FIXTURES``).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nvml"


def gpu_backend(capture: str, pids: Mapping[int, int]) -> Any:
    """The NVML fake replaying ``capture`` (e.g. ``h100_snapshot.json``) with the capture's
    PIDs rewritten by ``pids`` (capture pid -> test process pid)."""
    import pytest

    nvml = pytest.importorskip(
        "connector.resources.nvml", reason="connector.resources.nvml (NVML fake) not there"
    )
    return nvml.FakeGpuBackend(FIXTURES / capture, pid_map=dict(pids))
