"""Chaos benchmark: hold under abuse, seeded and bounded, with figures.

Six scenarios, each on a real circusd and a real etcd (etcd discovery); where the scenario
kills or questions the connector itself, the connector is a real ``python -m connector up``
process, else a ``LocalConnector`` in this process:

1. Replica SIGKILLs under scale churn (library connector): ``--kills`` SIGKILLs of random
   replicas, by PID, while the target moves at random within 1..maxReplicas; about half
   of the kills wait (briefly) for a victim registered in etcd, the others hit whatever
   runs, mostly processes still starting. After every kill etcd is polled until the dead
   process's keys are gone. At the end, once converged:
   no orphan (every process carrying this run's marker is in the process group of a live
   replica record, whose leader's parent is the live circusd), no duplicate (one live
   process per replica id, one record per ordinal), no leaked reservation (the resource
   manager holds exactly what the live records hold, and each reserved port is listened on
   only by its own replica) and no stale instance in etcd.
2. Connector SIGKILLs (``up`` process): ``--restarts`` times, a scale call (0..maxReplicas),
   a random delay (landing wherever it lands; scenario 6 aims), SIGKILL of ``up``, then
   ``up`` again on the same working dir. state.json must parse after every kill; every
   replica alive at the kill is re-adopted with the same PID (or stopped, when the target
   it was killed under says so); no duplicate after any re-adoption; nothing orphaned.
3. circusd SIGKILLs (library connector): its replicas die with it (parent-death signal),
   the connector notices, starts a new circusd and brings the graph back to its target.
4. etcd stopped for ``--etcd-pause`` seconds under a running graph (``up`` process): every
   ``GET /healthz`` and ``GET /v1/components`` during the pause answers 200, no replica is
   stopped or restarted, and once etcd is back a scale-up gets ready (within
   READY_AFTER_OUTAGE_LIMIT_S) and a killed replica's key leaves etcd within a second. The
   benchmark issues both the moment etcd is back; the test suite kills after the scale-up.
5. An unwritable working dir while state is saved (library connector, ``sleep`` replicas,
   no discovery needed): the disk filling up or the dir turning read-only, during a
   scale-up and during a scale-down (the test suite runs two of the four). This runs as
   root in CI, where permission bits do not stop a write, and mounting a filesystem is
   not a test's business: the full disk is the kernel's own ENOSPC (the state store's
   temp file made a symlink to ``/dev/full``), the read-only dir is simulated at the
   store's write (it raises ``OSError(EROFS)`` as the real write would). The scale must
   fail with :class:`~connector.errors.StateWriteFailed` (503 ``state_unwritable`` over
   HTTP), naming state.json and the reason, the running replicas must keep running,
   state.json must still parse, and once writable the scale must complete.
6. Connector SIGKILLs at chosen points (``up`` process): ``--point-kills`` per point, in an
   order the seed shuffles, each followed by ``up`` again: mid scale-up (the new replica's
   record on disk as ``starting``, its process up, or, every other time, still
   ``spawning``), mid drain (the scale-down's victim on disk as ``stopping``, its keys out
   of etcd, its process still serving ``/health``: no SIGTERM yet) and mid state write (the
   state store's temp file created, not yet renamed over state.json; an inotify watch on
   the working dir, the SIGKILL from the watching thread). Each point is found by watching
   ``up`` from outside, no hook inside it, and checked after the kill (a kill that came too
   late, the phase over, is a try, not a kill, and the point is tried again). Per point:
   kills, re-adoptions (replicas running at the kill, the same pid after), stopped (a
   replica stopping at the kill, stopped by the next connector), duplicates, orphans and
   unreadable state.json files, all but the first two 0.

Replicas are the project's mock worker (``python -m connector.mockworker``), not Dynamo's
mocker: the mock registers in etcd exactly as ai-dynamo-runtime 1.6.1 does (one lease per
process, ``v1/instances/...`` keys bound to it, left behind on SIGKILL), which is what
dead-instance cleanup needs, for ~0.35 s of CPU and ~60 MB per start; hundreds of
kills and restarts of the real mocker (~100 MB and seconds of start-up each) are beyond a
2-core machine. Scenario 5 needs no discovery and runs ``sleep``.

The chaos graph differs from a production one in two deliberate ways: its crash-loop budget
is out of reach (every SIGKILL counts against it, by design, and the point is to test
restarts, not the crash-loop stop) and its workers' etcd lease TTL is 60 s: the mock
worker gives up (exits 1) once etcd has been unreachable for a whole TTL, so with the 30 s
default a 30 s outage would have it quit on its own, which is the worker's doing, not the
connector's. Ports come from 30000-32767, away from the default range other test runs on
the machine use.

The seed decides every choice (targets, victims, delays); what state each kill lands in
is up to the machine's timing, so one seed makes the same choices, not the same history.

    python -m bench.chaos [--seed N] [--kills 200] [--restarts 50] [--point-kills 5]
                          [--circusd-kills 3] [--etcd-pause 30] [--max-replicas 6]
                          [--only 1,2,3,4,5,6] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aiohttp
import psutil

from connector.dynamo.discovery.etcd import ETCD_CLIENT_OPTIONS, etcd_endpoint
from connector.dynamo.discovery.file import Inotify
from connector.dynamo.discovery.keys import V1_PREFIX, decode_value, parse_instance_key
from connector.graph.loader import load_graph
from connector.graph.model import Graph, Readiness, ReadinessKind, RestartPolicy, Role, Service
from connector.local import ConnectorOptions, LocalConnector
from connector.reconcile.state import ConnectorState
from connector.supervision import procs
from tests.servers import EtcdServer

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = "Decode"
# Every replica of one run carries this variable (and its children inherit it): how the
# audit finds the run's processes, whatever their parent or group.
MARKER_ENV = "CHAOS_RUN_ID"
CPU_MILLI = 10
MEMORY_MI = 16
LEASE_TTL_S = 60
PORT_RANGE = (30000, 32767)
LISTED_LIMIT_S = 1.0  # a dead process's instance may stay in etcd this long, no longer
# After an etcd outage, a replica that registers within a second should be ready long
# before this (and well inside its 30 s readiness timeout).
READY_AFTER_OUTAGE_LIMIT_S = 10.0
GONE_POLL_S = 0.02
CONVERGE_LIMIT_S = 60.0
AUDIT_SETTLE_S = 5.0  # a converged graph gets this long for its audit to come out clean
STARTUP_LIMIT_S = 60.0


# ------------------------------------------------------------------------ the graph


def graph_yaml(run_id: str, *, replicas: int, max_replicas: int) -> str:
    return f"""\
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {{name: chaos}}
spec:
  services:
    {COMPONENT}:
      componentType: worker
      subComponentType: decode
      replicas: {replicas}
      resources:
        requests: {{cpu: {CPU_MILLI}m, memory: {MEMORY_MI}Mi}}
      envs:
        - {{name: {MARKER_ENV}, value: "{run_id}"}}
        - {{name: ETCD_LEASE_TTL, value: "{LEASE_TTL_S}"}}
      extraPodSpec:
        mainContainer:
          command: ["{{python}}", "-m", "connector.mockworker"]
          args: ["--role", "worker", "--endpoint", "generate", "--grace", "2"]
      local:
        minReplicas: 0
        maxReplicas: {max_replicas}
        ports:
          - {{name: system, env: DYN_SYSTEM_PORT}}
          - {{name: rpc, env: DYN_TCP_RPC_PORT}}
        readiness:
          discovery: {{component: backend, endpoints: [generate]}}
          timeoutSeconds: 30
        gracefulStopSeconds: 3
        drainSeconds: 0.3
        restart:
          backoffBaseSeconds: 0.05
          backoffMaxSeconds: 0.25
          crashLoopFailures: 1000000
"""


def write_graph(folder: Path, run_id: str, *, replicas: int, max_replicas: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "graph.yaml"
    path.write_text(graph_yaml(run_id, replicas=replicas, max_replicas=max_replicas))
    return path


def new_run_id(namespace: str) -> str:
    return f"{namespace}-{uuid.uuid4().hex[:10]}"


def library_options(etcd_url: str, max_replicas: int) -> ConnectorOptions:
    return ConnectorOptions(
        discovery="etcd",
        etcd_url=etcd_url,
        gpu_backend="none",
        port_range=PORT_RANGE,
        max_replicas=max(max_replicas, 8),
    )


# ------------------------------------------------------------------------ etcd


class RestartableEtcd(EtcdServer):
    """etcd that comes back on the same ports and data after ``stop()``: an outage, not a
    new server (the connector and the workers know it by its URL)."""

    def pick_ports(self) -> None:
        if not self.port:
            super().pick_ports()


class EtcdView:
    """What this run's namespace has under ``v1/instances/``, read straight from etcd."""

    def __init__(self, url: str) -> None:
        host, port = etcd_endpoint(url)
        # Reconnecting as the connector's clients do: with gRPC's default backoff this view
        # came back up to 2 s after a short etcd outage, and a key the connector had removed
        # at once read as listed that long.
        self.client = aetcd.Client(host, port, timeout=2, options=dict(ETCD_CLIENT_OPTIONS))

    async def instances(self, namespace: str) -> dict[str, tuple[int | None, str]]:
        """key -> (the request-plane port it advertises, its instance id in hex)."""
        listing = await self.client.get_prefix(f"{V1_PREFIX}{namespace}/".encode())
        out: dict[str, tuple[int | None, str]] = {}
        for kv in listing:
            key = kv.key.decode(errors="replace")
            parsed = parse_instance_key(key)
            if parsed is None:
                continue
            out[key] = (_advertised_port(decode_value(kv.value)), f"{parsed.instance_id:x}")
        return out

    async def keys_on_port(self, namespace: str, port: int | None) -> set[str]:
        if port is None:
            return set()
        return {k for k, (p, _) in (await self.instances(namespace)).items() if p == port}

    async def listed_for(
        self, namespace: str, keys: set[str], since: float, limit_s: float = 5.0
    ) -> float:
        """Seconds from ``since`` until none of ``keys`` is listed (``limit_s`` at most)."""
        deadline = since + limit_s
        while keys and time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # etcd busy: poll again
                if not keys & set(await self.instances(namespace)):
                    break
            await asyncio.sleep(GONE_POLL_S)
        return 0.0 if not keys else min(time.monotonic(), deadline) - since

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()


def _advertised_port(value: dict[str, Any] | None) -> int | None:
    # "tcp": "127.0.0.1:30001/<instance>/<ns>/<component>/<endpoint>"
    if value is None:
        return None
    try:
        address = str(value["transport"]["tcp"]).split("/", 1)[0]
        return int(address.rsplit(":", 1)[1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------------ observing


@dataclass(frozen=True)
class Proc:
    """A live process of this run (it carries the run's marker)."""

    pid: int
    ppid: int
    pgid: int
    replica: str | None
    rpc_port: int | None

    @property
    def leader(self) -> bool:
        return self.pid == self.pgid


def scan(run_id: str) -> list[Proc]:
    """Every live (not zombie) process of this run, by its environment (blocking: /proc)."""
    found = []
    for p, info in procs.process_table(["ppid", "status"]):
        try:
            if info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = p.environ()
            if env.get(MARKER_ENV) != run_id:
                continue
            pgid = os.getpgid(p.pid)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or not ours to read
        rpc = env.get("DYN_TCP_RPC_PORT", "")
        found.append(
            Proc(
                pid=p.pid,
                ppid=info["ppid"],
                pgid=pgid,
                replica=env.get("DYNAMO_LOCAL_REPLICA"),
                rpc_port=int(rpc) if rpc.isdigit() else None,
            )
        )
    return sorted(found, key=lambda p: (p.replica or "", p.pid))


def leaders(processes: Iterable[Proc]) -> list[Proc]:
    return [p for p in processes if p.leader]


@dataclass(frozen=True)
class Rec:
    replica_id: str
    phase: str
    pid: int | None
    create_time: float | None
    ports: dict[str, int]
    reserved: bool


@dataclass
class Observed:
    """One look at a connector: its records, its target, its circusd, its resources."""

    records: list[Rec]
    target: int
    circusd_pid: int | None
    machine: dict[str, Any]


def records_of(state: ConnectorState) -> list[Rec]:
    return [
        Rec(
            replica_id=r.replica_id,
            phase=r.phase,
            pid=r.pid,
            create_time=r.create_time,
            ports={k: int(v) for k, v in ((r.reservation or {}).get("ports") or {}).items()},
            reserved=r.reservation is not None,
        )
        for r in state.replicas_of(COMPONENT)
    ]


def _observed(state: ConnectorState, machine: dict[str, Any]) -> Observed:
    comp = state.components.get(COMPONENT)
    return Observed(
        records=records_of(state),
        target=comp.target if comp is not None else 0,
        circusd_pid=(state.circusd or {}).get("pid"),
        machine=machine,
    )


async def observe_library(conn: LocalConnector) -> Observed:
    # A copy: the loop keeps changing the live state while the audit looks at it.
    state = conn.state.model_copy(deep=True)
    return _observed(state, await conn.get_machine_resources())


def load_state(working_dir: Path) -> ConnectorState:
    """state.json, parsed and validated as the connector itself reads it."""
    return ConnectorState.model_validate(json.loads((working_dir / "state.json").read_text()))


async def observe_process(working_dir: Path, http: aiohttp.ClientSession, url: str) -> Observed:
    state = await asyncio.to_thread(load_state, working_dir)
    async with http.get(f"{url}/v1/resources") as resp:
        resp.raise_for_status()
        machine = await resp.json()
    return _observed(state, machine)


def _alive(recs: Iterable[Rec]) -> dict[int, Rec]:
    return {r.pid: r for r in recs if r.pid and procs.same_process(r.pid, r.create_time)}


def _listeners() -> dict[int, set[int]]:
    """Loopback TCP port -> pids listening on it (blocking: reads /proc)."""
    out: dict[int, set[int]] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid is not None and c.laddr:
            out.setdefault(c.laddr.port, set()).add(c.pid)
    return out


async def _health_instance(http: aiohttp.ClientSession, port: int | None) -> str | None:
    """The instance id the mock worker on ``port`` says it registered as."""
    if port is None:
        return None
    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with http.get(f"http://127.0.0.1:{port}/health", timeout=timeout) as resp:
            body = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    value = body.get("instance_id")
    return str(value) if value is not None else None


# ------------------------------------------------------------------------ the audit


@dataclass
class Audit:
    orphans: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    leaked_reservations: list[str] = field(default_factory=list)
    stale_instances: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. it never converged

    @property
    def clean(self) -> bool:
        return not (
            self.orphans
            or self.duplicates
            or self.leaked_reservations
            or self.stale_instances
            or self.notes
        )

    def lines(self) -> list[str]:
        return [
            *(f"orphan: {x}" for x in self.orphans),
            *(f"duplicate: {x}" for x in self.duplicates),
            *(f"leaked reservation: {x}" for x in self.leaked_reservations),
            *(f"stale instance: {x}" for x in self.stale_instances),
            *self.notes,
        ]


def duplicates_of(processes: Iterable[Proc], records: Iterable[Rec] = ()) -> list[str]:
    found = []
    for rid, n in sorted(Counter(p.replica for p in leaders(processes)).items()):
        if n > 1:
            found.append(f"{rid}: {n} live processes")
    for rid, n in sorted(Counter(r.replica_id for r in records).items()):
        if n > 1:
            found.append(f"{rid}: {n} replica records")
    return found


async def audit(
    obs: Observed,
    run_id: str,
    namespace: str,
    etcd: EtcdView | None,
    http: aiohttp.ClientSession,
) -> Audit:
    """Orphans, duplicates, leaked reservations and stale instances of a settled graph."""
    processes = await asyncio.to_thread(scan, run_id)
    alive = await asyncio.to_thread(_alive, obs.records)
    result = Audit()
    circusd = obs.circusd_pid
    circusd_alive = await asyncio.to_thread(procs.same_process, circusd, None)
    for p in processes:
        owner = alive.get(p.pgid)
        if owner is None:
            result.orphans.append(
                f"pid {p.pid} ({p.replica}) in process group {p.pgid}, no live replica's"
            )
        elif p.replica != owner.replica_id:
            result.orphans.append(
                f"pid {p.pid} ({p.replica}) in the process group of {owner.replica_id}"
            )
        elif p.leader and (p.ppid != circusd or not circusd_alive):
            result.orphans.append(
                f"{p.replica} pid {p.pid}: parent {p.ppid} is not the live circusd {circusd}"
            )
    result.duplicates = duplicates_of(processes, obs.records)

    held: dict[str, dict[str, int]] = obs.machine.get("ports") or {}
    reserved = {r.replica_id for r in obs.records if r.reserved}
    for rid in sorted(set(held) - reserved):
        result.leaked_reservations.append(f"{rid} holds ports {held[rid]} with no record")
    for rid in sorted(reserved - set(held)):
        result.leaked_reservations.append(f"record {rid} has no reservation in the manager")
    for rec in obs.records:
        if rec.replica_id in held and held[rec.replica_id] != rec.ports:
            result.leaked_reservations.append(
                f"{rec.replica_id}: the manager holds {held[rec.replica_id]}, its record "
                f"says {rec.ports}"
            )
    for entry in obs.machine.get("lingering") or []:
        result.leaked_reservations.append(f"{entry.get('replica')} lingering {entry.get('pids')}")
    cores = float((obs.machine.get("cpu") or {}).get("reserved_cores", 0.0))
    if abs(cores - len(reserved) * CPU_MILLI / 1000) > 1e-6:
        result.leaked_reservations.append(f"{cores:g} cores reserved for {len(reserved)} records")
    memory = int((obs.machine.get("memory") or {}).get("reserved_bytes", 0))
    if memory != len(reserved) * MEMORY_MI * 2**20:
        result.leaked_reservations.append(f"{memory} bytes reserved for {len(reserved)} records")
    # Ports held only by live replicas: a listener of ours on a port must be on its own.
    port_owner = {port: rid for rid, ports in held.items() for port in ports.values()}
    ours = {p.pid: p for p in processes}
    for port, pids in sorted((await asyncio.to_thread(_listeners)).items()):
        for pid in sorted(pids):
            proc = ours.get(pid)
            if proc is not None and port_owner.get(port) != proc.replica:
                result.leaked_reservations.append(
                    f"{proc.replica} pid {pid} listens on {port}, reserved for "
                    f"{port_owner.get(port) or 'nobody'}"
                )

    if etcd is not None:
        by_rpc = {r.ports.get("rpc"): r for r in obs.records}
        for key, (advertised, instance) in sorted((await etcd.instances(namespace)).items()):
            owner = by_rpc.get(advertised)
            if owner is None or owner.pid not in alive:
                who = owner.replica_id if owner is not None else "no replica"
                result.stale_instances.append(
                    f"{key} advertises port {advertised} ({who}, not running)"
                )
                continue
            running = await _health_instance(http, owner.ports.get("system"))
            if running is not None and running != instance:
                result.stale_instances.append(
                    f"{key}: {owner.replica_id} now runs instance {running}, not {instance}"
                )
    return result


def converged(obs: Observed) -> bool:
    return len(obs.records) == obs.target and all(
        r.phase == "ready" and r.pid is not None for r in obs.records
    )


async def settle(
    observe: Callable[[], Awaitable[Observed]],
    run_id: str,
    namespace: str,
    etcd: EtcdView | None,
    http: aiohttp.ClientSession,
    limit_s: float = CONVERGE_LIMIT_S,
) -> tuple[float | None, Audit]:
    """Wait until the graph is at its target with every replica ready, then until its audit
    is clean (at most AUDIT_SETTLE_S more: cleanups run in the background). Returns the
    seconds until converged (None: not within ``limit_s``) and the last audit."""
    start = time.monotonic()
    deadline = start + limit_s
    converged_s: float | None = None
    last = Audit()
    while time.monotonic() < deadline:
        obs = await observe()
        if converged(obs) and len(await asyncio.to_thread(_alive, obs.records)) == obs.target:
            if converged_s is None:
                converged_s = time.monotonic() - start
                deadline = min(deadline, time.monotonic() + AUDIT_SETTLE_S)
            last = await audit(obs, run_id, namespace, etcd, http)
            if last.clean:
                return converged_s, last
        await asyncio.sleep(0.1)
    if converged_s is None:
        obs = await observe()
        last = await audit(obs, run_id, namespace, etcd, http)
        phases = dict(Counter(r.phase for r in obs.records))
        last.notes.append(f"not converged within {limit_s:g} s: target {obs.target}, {phases}")
    return converged_s, last


async def poll(predicate: Callable[[], Awaitable[bool]], limit_s: float) -> float | None:
    """Seconds until ``predicate`` holds, None if not within ``limit_s``."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if await predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    return None


def kill_leftovers(run_id: str, working_dir: Path) -> list[int]:
    """Safety net after a scenario: SIGKILL, by PID, what this run left running (a replica,
    or the circusd whose config lies in the working dir), so that a failed run never leaves
    processes on the machine. Returns their pids: after a clean shutdown, none."""
    left = {p.pid for p in scan(run_id)}
    for proc, info in procs.process_table(["cmdline", "status"]):
        if info["status"] != psutil.STATUS_ZOMBIE and str(working_dir) in " ".join(
            info["cmdline"] or []
        ):
            left.add(proc.pid)
    left.discard(os.getpid())
    for pid in sorted(left):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(left)


# ------------------------------------------------------------------------ up, as a process


class UpProcess:
    """``python -m connector up GRAPH --port 0 --working-dir DIR FLAGS``, started and
    SIGKILLed at will; its output goes to ``log_path``. Also what ``bench.api_fuzz`` runs."""

    def __init__(self, graph: Path, working_dir: Path, flags: list[str], log_path: Path) -> None:
        self.graph = graph
        self.working_dir = working_dir
        self.flags = flags
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        return [
            *(sys.executable, "-m", "connector", "up", str(self.graph), "--port", "0"),
            *("--working-dir", str(self.working_dir), *self.flags),
        ]

    async def start(self, limit_s: float = STARTUP_LIMIT_S) -> str:
        """Start it; return its URL once it says it serves (replicas adopted, loop running)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMO_LOCAL_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with self.log_path.open("ab") as log:
            # Its output goes to a file, never a pipe nobody reads (a full pipe would block it).
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        deadline = time.monotonic() + limit_s
        url = None
        while time.monotonic() < deadline:
            text = await asyncio.to_thread(self._read_from, offset)
            for line in text.splitlines():
                if line.strip().startswith("API"):
                    url = line.split()[1].removesuffix("/v1")
                if url and line.strip().startswith("Ctrl-C"):
                    self.url = url
                    return url
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        code = self.proc.poll()
        await self.kill()
        tail = "\n".join(self._read_from(offset).splitlines()[-20:])
        raise RuntimeError(f"up did not start (exit code {code}); its output:\n{tail}")

    def _read_from(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait, 10)

    async def interrupt(self, limit_s: float = 30.0) -> int | None:
        """Ctrl-C: stop every replica and circusd; SIGKILL if it takes longer than limit_s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return await asyncio.to_thread(self.proc.wait, limit_s)
        except subprocess.TimeoutExpired:
            await self.kill()
            return None


def chaos_up(
    graph: Path, working_dir: Path, etcd_url: str, namespace: str, max_replicas: int
) -> UpProcess:
    """The chaos graph's ``up``: etcd discovery, no GPUs, no exporter (nothing reads
    /metrics), a replica budget of at least 8."""
    low, high = PORT_RANGE
    flags = [
        *("--namespace", namespace, "--discovery", "etcd", "--etcd-url", etcd_url),
        *("--gpu-backend", "none", "--port-range", f"{low}-{high}"),
        *("--max-replicas", str(max(max_replicas, 8)), "--no-metrics", "--log-level", "warning"),
    ]
    log_path = working_dir.parent / f"{working_dir.name}-up.log"
    return UpProcess(graph, working_dir, flags, log_path)


async def scale(http: aiohttp.ClientSession, url: str, replicas: int, wait: bool = False) -> Any:
    body = {"replicas": replicas, "wait": wait, "timeout_s": 60}
    async with http.put(f"{url}/v1/components/{COMPONENT}/replicas", json=body) as resp:
        data = await resp.json()
        if resp.status >= 400:
            raise RuntimeError(f"scale to {replicas}: HTTP {resp.status} {data}")
        return data


# ------------------------------------------------------------------------ deployments


@dataclass
class Deployment:
    """One chaos graph under test, run by a library connector (``conn``) or by ``up``
    (``up``); scenarios take one, so that several can share it (the test suite does, to
    save start-ups). What its shutdown left running is known once it is closed."""

    namespace: str
    run_id: str
    working_dir: Path
    view: EtcdView
    http: aiohttp.ClientSession
    conn: LocalConnector | None = None
    up: UpProcess | None = None
    left_after_shutdown: list[int] = field(default_factory=list)
    shutdown_problems: list[str] = field(default_factory=list)

    async def observe(self) -> Observed:
        if self.conn is not None:
            return await observe_library(self.conn)
        assert self.up is not None
        return await observe_process(self.working_dir, self.http, self.up.url)

    async def settle(self, limit_s: float = CONVERGE_LIMIT_S) -> tuple[float | None, Audit]:
        return await settle(
            self.observe, self.run_id, self.namespace, self.view, self.http, limit_s
        )

    def closed_into(self, result: R) -> R:
        """``result`` with what the shutdown left behind."""
        result.left_after_shutdown = list(self.left_after_shutdown)
        result.problems += self.shutdown_problems
        return result


@contextlib.asynccontextmanager
async def library_deployment(
    tmp: Path, etcd_url: str, namespace: str, *, replicas: int, max_replicas: int
) -> AsyncIterator[Deployment]:
    """The chaos graph under a ``LocalConnector`` in this process."""
    run_id = new_run_id(namespace)
    folder = tmp / namespace
    graph = load_graph(write_graph(folder, run_id, replicas=replicas, max_replicas=max_replicas))
    conn = LocalConnector(
        namespace,
        graph.in_namespace(namespace),
        folder / "wd",
        library_options(etcd_url, max_replicas),
    )
    async with aiohttp.ClientSession() as http:
        dep = Deployment(namespace, run_id, folder / "wd", EtcdView(etcd_url), http, conn=conn)
        try:
            await conn.initialize()
            yield dep
        finally:
            await conn.shutdown()
            await dep.view.close()
            dep.left_after_shutdown = await asyncio.to_thread(
                kill_leftovers, run_id, dep.working_dir
            )


@contextlib.asynccontextmanager
async def up_deployment(
    tmp: Path, etcd_url: str, namespace: str, *, replicas: int, max_replicas: int
) -> AsyncIterator[Deployment]:
    """The chaos graph under ``python -m connector up``; Ctrl-C at the end."""
    run_id = new_run_id(namespace)
    folder = tmp / namespace
    graph = write_graph(folder, run_id, replicas=replicas, max_replicas=max_replicas)
    up = chaos_up(graph, folder / "wd", etcd_url, namespace, max_replicas)
    async with aiohttp.ClientSession() as http:
        dep = Deployment(namespace, run_id, folder / "wd", EtcdView(etcd_url), http, up=up)
        try:
            await up.start()
            yield dep
        finally:
            code = await up.interrupt()
            if code != 0:
                dep.shutdown_problems.append(f"up answered Ctrl-C with exit code {code}")
            await dep.view.close()
            dep.left_after_shutdown = await asyncio.to_thread(
                kill_leftovers, run_id, dep.working_dir
            )


# ------------------------------------------------------------------------ results


@dataclass
class Result:
    """What one scenario found; ``problems`` are invariant violations, in words."""

    scenario: str
    seed: int
    audit: Audit = field(default_factory=Audit)
    converge_s: float | None = None
    left_after_shutdown: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds by phase
    _last: float = field(default_factory=time.monotonic, repr=False)

    def lap(self, phase: str) -> None:
        """The wall time since the previous lap goes to ``phase``."""
        now = time.monotonic()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self._last
        self._last = now

    def violations(self) -> list[str]:
        left = [f"left running after shutdown: pids {self.left_after_shutdown}"]
        return [*self.problems, *self.audit.lines(), *(left if self.left_after_shutdown else [])]

    def figures(self) -> list[tuple[str, str]]:
        return []


R = TypeVar("R", bound=Result)


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _dist(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.3f} s, max {max(values):.3f} s"


def _audit_figures(result: Result) -> list[tuple[str, str]]:
    a = result.audit
    return [
        ("orphans", str(len(a.orphans))),
        ("duplicates", str(len(a.duplicates))),
        ("leaked reservations", str(len(a.leaked_reservations))),
        ("stale instances at the end", str(len(a.stale_instances))),
        ("convergence after the chaos", _s(result.converge_s)),
        ("left running after shutdown", str(len(result.left_after_shutdown))),
        ("wall time", ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())),
    ]


async def _ready(dep: Deployment, result: Result) -> bool:
    """The graph at its target, every replica ready and the audit clean, before the chaos."""
    ready_s, found = await dep.settle()
    if ready_s is None or not found.clean:
        result.problems.append(f"not settled before the chaos: {found.lines()}")
        result.audit = found
        return False
    result.lap("start")
    return True


# ------------------------------------------------------------------------ 1. replica kills


@dataclass
class KillsResult(Result):
    kills: int = 0
    registered_kills: int = 0  # of them, kills of a process whose instance was in etcd
    scale_calls: int = 0
    listed_s: list[float] = field(default_factory=list)

    @property
    def listed_over_limit(self) -> int:
        return sum(1 for s in self.listed_s if s > LISTED_LIMIT_S)

    def figures(self) -> list[tuple[str, str]]:
        return [
            ("replica SIGKILLs", str(self.kills)),
            ("  of a process registered in etcd", str(self.registered_kills)),
            ("scale calls (churn)", str(self.scale_calls)),
            *_audit_figures(self),
            ("dead instance listed, max", _s(max(self.listed_s, default=0.0))),
            (f"dead instances listed > {LISTED_LIMIT_S:g} s", str(self.listed_over_limit)),
        ]


async def replica_kills_on(
    dep: Deployment,
    *,
    seed: int,
    kills: int,
    max_replicas: int,
    gap_s: float = 0.25,
    churn: float = 0.5,
    registered_share: float = 0.5,
) -> KillsResult:
    """Scenario 1 on a library deployment: ``kills`` SIGKILLs of random replicas while
    ``churn`` of the steps also move the target to a random 1..max_replicas (never 0: each
    kill needs a victim)."""
    assert dep.conn is not None
    conn = dep.conn
    rng = random.Random(seed)
    result = KillsResult("replica kills", seed)
    if not await _ready(dep, result):
        return result
    watches: list[asyncio.Task[float]] = []
    try:
        for _ in range(kills * 4):  # bounded: a step may find no victim
            if result.kills >= kills:
                break
            if rng.random() < churn:
                target = rng.randint(1, max_replicas)
                await conn.scale_component(COMPONENT, target, blocking=False)
                result.scale_calls += 1
            # Kills come faster than restarts register, so most would hit a process still
            # starting: a share of them waits (briefly) for a registered one, so that
            # dead-instance cleanup is exercised as much as restarts are.
            want_registered = rng.random() < registered_share
            victims, instances = await _victims(dep, want_registered)
            if not victims:
                await asyncio.sleep(gap_s)
                continue
            victim = rng.choice(victims)
            keys = {k for k, (port, _) in instances.items() if port == victim.rpc_port}
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it exited on its own meanwhile (a scale-down): not a kill
            killed_at = time.monotonic()
            # Registered up to the kill: a restart cannot register this fast (backoff plus
            # start-up), so what advertises the victim's port now is the victim's.
            keys |= await dep.view.keys_on_port(dep.namespace, victim.rpc_port)
            result.registered_kills += bool(keys)
            watches.append(asyncio.create_task(dep.view.listed_for(dep.namespace, keys, killed_at)))
            result.kills += 1
            await asyncio.sleep(rng.uniform(0, gap_s))
        result.listed_s = list(await asyncio.gather(*watches))
        watches = []
        result.lap("chaos")
        result.converge_s, result.audit = await dep.settle()
        result.lap("settle")
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
    return result


async def _victims(
    dep: Deployment, registered: bool, wait_s: float = 1.0
) -> tuple[list[Proc], dict[str, tuple[int | None, str]]]:
    """The replicas' leaders to pick a victim from, with etcd's listing; ``registered``:
    only those whose instance is in etcd, waiting up to ``wait_s`` for one (else any)."""
    deadline = time.monotonic() + wait_s
    while True:
        victims = leaders(await asyncio.to_thread(scan, dep.run_id))
        instances = await dep.view.instances(dep.namespace)
        if not registered:
            return victims, instances
        ports = {port for port, _ in instances.values()}
        listed = [v for v in victims if v.rpc_port in ports]
        if listed or time.monotonic() > deadline:
            return listed or victims, instances
        await asyncio.sleep(0.05)


async def replica_kills(
    tmp: Path, etcd_url: str, *, seed: int, kills: int, max_replicas: int = 4, **kw: Any
) -> KillsResult:
    """Scenario 1 on a deployment of its own."""
    async with library_deployment(
        tmp, etcd_url, "chaos-kills", replicas=2, max_replicas=max_replicas
    ) as dep:
        result = await replica_kills_on(
            dep, seed=seed, kills=kills, max_replicas=max_replicas, **kw
        )
    result.lap("shutdown")
    return dep.closed_into(result)


# ------------------------------------------------------------------------ 2. connector kills


@dataclass
class RestartsResult(Result):
    restarts: int = 0
    state_parse_failures: int = 0
    spawning_at_kill: int = 0  # records made, process not recorded yet: mid scale-up
    stopping_at_kill: int = 0  # mid drain or stop
    alive_at_kill: int = 0
    readopted_same_pid: int = 0
    stopped_after_restart: int = 0  # scale-down victims of the target the kill cut short
    not_readopted: int = 0
    duplicates_seen: int = 0
    kill_delays_s: list[float] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)

    def figures(self) -> list[tuple[str, str]]:
        return [
            ("connector SIGKILLs", str(self.restarts)),
            ("kill delay after the scale call", _dist(self.kill_delays_s)),
            ("state.json unreadable after a kill", str(self.state_parse_failures)),
            (
                "records spawning / stopping at a kill",
                f"{self.spawning_at_kill} / {self.stopping_at_kill}",
            ),
            ("replicas alive at a kill", str(self.alive_at_kill)),
            ("  re-adopted with the same pid", str(self.readopted_same_pid)),
            ("  stopped by the target after", str(self.stopped_after_restart)),
            ("  not re-adopted (new pid)", str(self.not_readopted)),
            ("duplicates right after re-adoption", str(self.duplicates_seen)),
            ("kill -> up serving again", _dist(self.restart_s)),
            *_audit_figures(self),
        ]


async def connector_kills_on(
    dep: Deployment, *, seed: int, restarts: int, max_replicas: int, max_delay_s: float = 0.8
) -> RestartsResult:
    """Scenario 2 on an ``up`` deployment: scale, wait a random delay, SIGKILL ``up``,
    ``up`` again; ``restarts`` times."""
    assert dep.up is not None
    up, working_dir = dep.up, dep.working_dir
    rng = random.Random(seed)
    result = RestartsResult("connector kills", seed)
    if not await _ready(dep, result):
        return result
    for i in range(1, restarts + 1):
        current = load_state(working_dir).components[COMPONENT].target
        target = rng.choice([n for n in range(max_replicas + 1) if n != current])
        await scale(dep.http, up.url, target)
        # Half the kills land in the first 150 ms (records made, processes being added to
        # circusd, the first state writes), the rest anywhere up to max_delay_s
        # (readiness, drain, stop).
        early = rng.random() < 0.5
        delay = rng.uniform(0, 0.15 if early else max_delay_s)
        result.kill_delays_s.append(delay)
        await asyncio.sleep(delay)
        await up.kill()
        killed_at = time.monotonic()
        result.restarts += 1
        try:
            state: ConnectorState | None = await asyncio.to_thread(load_state, working_dir)
        except Exception as exc:  # any way it fails to parse is the finding
            result.state_parse_failures += 1
            result.problems.append(f"kill {i}: state.json did not parse: {exc!r}")
            state = None
        lived: dict[str, tuple[str, int]] = {}
        if state is not None:
            phases = Counter(r.phase for r in state.replicas.values())
            result.spawning_at_kill += phases["spawning"]
            result.stopping_at_kill += phases["stopping"]
            for rec in state.replicas.values():
                if rec.phase != "stopping" and procs.same_process(rec.pid, rec.create_time):
                    assert rec.pid is not None
                    lived[rec.watcher] = (rec.replica_id, rec.pid)
        result.alive_at_kill += len(lived)
        await up.start()
        result.restart_s.append(time.monotonic() - killed_at)
        after = await asyncio.to_thread(load_state, working_dir)
        for watcher, (rid, pid) in sorted(lived.items()):
            now = after.replicas.get(watcher)
            if now is None or now.phase == "stopping":
                result.stopped_after_restart += 1
            elif now.pid == pid:
                result.readopted_same_pid += 1
            else:
                result.not_readopted += 1
                result.problems.append(
                    f"kill {i} (target {target}, {delay:.3f} s after the scale call): {rid} "
                    f"was pid {pid} at the kill, {now.pid} ({now.phase}) after re-adoption"
                )
        await asyncio.sleep(0.2)  # the new connector's first passes
        dups = duplicates_of(await asyncio.to_thread(scan, dep.run_id))
        if dups:
            result.duplicates_seen += len(dups)
            result.problems.append(f"kill {i}: after re-adoption: {'; '.join(dups)}")
    result.lap("chaos")
    result.converge_s, result.audit = await dep.settle()
    result.lap("settle")
    return result


async def connector_kills(
    tmp: Path, etcd_url: str, *, seed: int, restarts: int, max_replicas: int = 4, **kw: Any
) -> RestartsResult:
    """Scenario 2 on a deployment of its own."""
    async with up_deployment(
        tmp, etcd_url, "chaos-restarts", replicas=2, max_replicas=max_replicas
    ) as dep:
        result = await connector_kills_on(
            dep, seed=seed, restarts=restarts, max_replicas=max_replicas, **kw
        )
    result.lap("shutdown")
    return dep.closed_into(result)


# ------------------------------------------------------------------------ 6. kills at chosen points

# Where scenario 6 SIGKILLs ``up``, each found by watching it from outside (state.json, the
# replica's own /health, the state store's temp file), never by a hook inside it:
# - mid scale-up: the new replica's record is on disk as spawning or starting;
# - mid drain: the scale-down's victim is on disk as stopping and its process still serves
#   /health (no SIGTERM yet: the connector was still draining it, its keys out of etcd);
# - mid state write: the temp file state.json is written through has been created and not
#   renamed yet (inotify on the working dir; the kill comes from the watching thread).
KILL_POINTS = ("mid scale-up", "mid drain", "mid state write")
KILL_POINT_POLL_S = 0.005  # state.json is read this often while a point is awaited
KILL_POINT_LIMIT_S = 15.0  # the phase must show up within this long after the scale call
# A kill that lands after its phase ended (the drain was over, the rename done) is no kill
# at that point: it is counted as a try and the point is tried again, at most this often.
KILL_POINT_TRIES = 6
_IN_CREATE, _IN_OPEN = 0x00000100, 0x00000020
TEMP_NAME = "state.json.tmp"  # connector.reconcile.state.StateStore.temp_path


@dataclass
class PointStats:
    kills: int = 0  # SIGKILLs that landed at the point
    tries: int = 0  # SIGKILLs made for it, landed or not
    seen: Counter[str] = field(default_factory=Counter)  # what the landed kills found
    alive_at_kill: int = 0  # replicas running (not stopping) at a landed kill
    readopted: int = 0  # of them, the same pid after `up` again
    not_readopted: int = 0
    stopped: int = 0  # replicas stopping at the kill, stopped by the next connector
    duplicates: int = 0  # right after re-adoption and once settled
    orphans: int = 0
    corrupt: int = 0  # state.json unreadable after a kill


@dataclass
class KillPointsResult(Result):
    points: dict[str, PointStats] = field(
        default_factory=lambda: {p: PointStats() for p in KILL_POINTS}
    )
    restart_s: list[float] = field(default_factory=list)

    def figures(self) -> list[tuple[str, str]]:
        head = (
            f"{'kills':>5} {'tries':>5} {'re-adopted':>10} {'stopped':>7} "
            f"{'duplicates':>10} {'orphans':>7} {'corrupt state.json':>18}"
        )
        rows = [("kill point", head)]
        for point, s in self.points.items():
            readopted = f"{s.readopted}/{s.alive_at_kill}"
            rows.append(
                (
                    f"  {point}",
                    f"{s.kills:>5} {s.tries:>5} {readopted:>10} {s.stopped:>7} "
                    f"{s.duplicates:>10} {s.orphans:>7} {s.corrupt:>18}",
                )
            )
        for point, s in self.points.items():
            found = ", ".join(f"{k} {v}" for k, v in sorted(s.seen.items())) or "n/a"
            rows.append((f"  {point}: at the kill", found))
        return [
            *rows,
            ("kill -> up serving again", _dist(self.restart_s)),
            *_audit_figures(self),
        ]


def _kill_when(
    pid: int | None, working_dir: Path, found: Callable[[dict[str, Any]], Any], limit_s: float
) -> Any:
    """Read state.json every KILL_POINT_POLL_S; SIGKILL ``pid`` (None: no one) the moment
    ``found`` (of the parsed file) is not None, and return that. None: not within
    ``limit_s``, no kill."""
    path = working_dir / "state.json"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None  # a corrupt file is counted after the kill
        hit = found(data) if data is not None else None
        if hit is not None:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            return hit
        time.sleep(KILL_POINT_POLL_S)
    return None


def _kill_on_write(pid: int, inotify: Inotify, limit_s: float) -> bool:
    """SIGKILL ``pid`` as soon as the state store opens its temp file (the watch is on the
    working dir already); False: no write within ``limit_s``, no kill."""
    deadline = time.monotonic() + limit_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([inotify.fd], [], [], left)
        if ready and any(name == TEMP_NAME for _, _, name in inotify.read_events()):
            os.kill(pid, signal.SIGKILL)
            return True
    return False


def _records(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w: r for w, r in (data.get("replicas") or {}).items() if r["component"] == COMPONENT}


def _temp_words(working_dir: Path) -> str:
    """What the write cut off held: the scale's new target, or what was on disk already."""
    try:
        cut = json.loads((working_dir / TEMP_NAME).read_text())
        target = cut["components"][COMPONENT]["target"]
    except (OSError, ValueError, KeyError, TypeError):
        return "partly written"
    if target != load_state(working_dir).components[COMPONENT].target:
        return "whole, with the new target"
    return "whole, the target unchanged"


def _process_word(started: bool) -> str:
    return "its process up" if started else "no process yet"


async def _healthy(http: aiohttp.ClientSession, port: int | None) -> bool:
    if port is None:
        return False
    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with http.get(f"http://127.0.0.1:{port}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _put_quietly(http: aiohttp.ClientSession, url: str, replicas: int) -> int | None:
    """A scale call that may lose its connector halfway: the status, or None."""
    body = {"replicas": replicas, "wait": False}
    try:
        async with http.put(f"{url}/v1/components/{COMPONENT}/replicas", json=body) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return None


async def _kill_at_point(
    dep: Deployment, point: str, max_replicas: int, nth: int = 0
) -> tuple[bool, str, dict[str, Any]]:
    """Set the graph up for ``point``, make the scale call that passes through it, SIGKILL
    ``up`` there (the ``nth`` kill at this point: mid scale-up alternates between a new
    replica starting, its process up, and one still spawning). Returns whether it was
    killed, what the kill found (in words: the point reached, or why it missed) and the
    records the connector had persisted before."""
    assert dep.up is not None and dep.up.proc is not None
    up, wd, http = dep.up, dep.working_dir, dep.http
    current = load_state(wd).components[COMPONENT].target
    if point == "mid drain" and current < 2:
        current = 2  # something left to serve, and a ready replica to drain
        await scale(http, up.url, current, wait=True)
    elif point != "mid drain" and current >= max_replicas:
        current -= 1  # room for one more
        await scale(http, up.url, current, wait=True)
    if current != load_state(wd).components[COMPONENT].target or not converged(await dep.observe()):
        await dep.settle()
    before = _records(json.loads((wd / "state.json").read_text()))
    assert up.proc is not None
    pid = up.proc.pid
    target = current - 1 if point == "mid drain" else current + 1
    if point == "mid state write":
        inotify = Inotify()
        try:
            inotify.add_watch(wd, _IN_CREATE | _IN_OPEN)
            watch = asyncio.create_task(
                asyncio.to_thread(_kill_on_write, pid, inotify, KILL_POINT_LIMIT_S)
            )
            call = asyncio.create_task(_put_quietly(http, up.url, target))
            killed = await watch
        finally:
            inotify.close()
        await call
        await up.kill()
        if not killed:
            return False, "no state write", before
        if not (wd / TEMP_NAME).exists():
            return True, "missed: the write was renamed first", before
        return True, f"temp file not renamed, {await asyncio.to_thread(_temp_words, wd)}", before

    ready = {w for w, r in before.items() if r["phase"] == "ready"}
    want = ("starting", "spawning")[nth % 2]

    def found(data: dict[str, Any]) -> dict[str, Any] | None:
        for watcher, rec in _records(data).items():
            if point == "mid scale-up" and watcher not in before:
                if rec["phase"] == want:
                    return rec
            elif point == "mid drain" and watcher in ready and rec["phase"] == "stopping":
                return rec
        return None

    # A drain's victim is killed once its keys are out of etcd too (the drain's first
    # step), inside the settle period the drain then waits at least (connector.dynamo.drain).
    kill_pid = pid if point == "mid scale-up" else None
    watch_task = asyncio.create_task(
        asyncio.to_thread(_kill_when, kill_pid, wd, found, KILL_POINT_LIMIT_S)
    )
    call = asyncio.create_task(_put_quietly(http, up.url, target))
    hit = await watch_task
    if hit is not None and kill_pid is None:
        rpc = ((hit.get("reservation") or {}).get("ports") or {}).get("rpc")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and await dep.view.keys_on_port(dep.namespace, rpc):
            await asyncio.sleep(KILL_POINT_POLL_S)
        os.kill(pid, signal.SIGKILL)
    await call
    await up.kill()
    if hit is None:
        return False, f"{point} never seen", before
    if point == "mid scale-up":
        now = _records(await asyncio.to_thread(lambda: json.loads((wd / "state.json").read_text())))
        rec = now.get(hit["watcher"])
        if rec is None or rec["phase"] not in ("spawning", "starting"):
            return True, "missed: the new replica was ready first", before
        rid = f"{rec['component']}/{rec['ordinal']}"
        started = any(p.replica == rid for p in await asyncio.to_thread(scan, dep.run_id))
        return True, f"new replica {rec['phase']}, {_process_word(started)}", before
    # mid drain: no connector is left to SIGTERM the victim, so if it still serves /health
    # now, it had not been sent SIGTERM yet: the kill landed in the drain.
    ports = (hit.get("reservation") or {}).get("ports") or {}
    if not await _healthy(http, ports.get("system")):
        return True, "missed: the victim had been sent SIGTERM", before
    keys = await dep.view.keys_on_port(dep.namespace, ports.get("rpc"))
    return (
        True,
        ("draining, keys out of etcd" if not keys else "draining, keys still in etcd"),
        before,
    )


async def connector_kill_points_on(
    dep: Deployment, *, seed: int, per_point: int, max_replicas: int
) -> KillPointsResult:
    """Scenario 6 on an ``up`` deployment: ``per_point`` SIGKILLs of ``up`` at each of
    :data:`KILL_POINTS`, ``up`` again after each; after each, state.json must parse, every
    replica running at the kill is re-adopted with its pid (or stopped, when it was being
    stopped), no duplicate right after, and once settled no orphan and a clean audit."""
    assert dep.up is not None
    up, wd = dep.up, dep.working_dir
    result = KillPointsResult("connector kills at chosen points", seed)
    if not await _ready(dep, result):
        return result
    # The seed orders the points; when each phase comes is the machine's doing.
    order = [p for p in KILL_POINTS for _ in range(per_point)]
    random.Random(seed).shuffle(order)
    for point in order:
        stats = result.points[point]
        for _ in range(KILL_POINT_TRIES):
            killed, what, _before = await _kill_at_point(dep, point, max_replicas, stats.kills)
            if not killed:
                result.problems.append(f"{point}: {what} within {KILL_POINT_LIMIT_S:g} s")
                await up.start()
                break
            killed_at = time.monotonic()
            stats.tries += 1
            landed = not what.startswith("missed")
            try:
                state: ConnectorState | None = await asyncio.to_thread(load_state, wd)
            except Exception as exc:  # any way it fails to parse is the finding
                stats.corrupt += 1
                result.problems.append(f"{point}: state.json did not parse: {exc!r}")
                state = None
            running: dict[str, int] = {}
            stopping: dict[str, tuple[int, float | None]] = {}
            if state is not None:
                for rec in state.replicas_of(COMPONENT):
                    if rec.pid is None or not procs.same_process(rec.pid, rec.create_time):
                        continue
                    if rec.phase == "stopping":
                        stopping[rec.watcher] = (rec.pid, rec.create_time)
                    else:
                        running[rec.watcher] = rec.pid
            await up.start()
            result.restart_s.append(time.monotonic() - killed_at)
            after = await asyncio.to_thread(load_state, wd)
            if landed:
                stats.kills += 1
                stats.seen[what] += 1
                stats.alive_at_kill += len(running)
            for watcher, pid in sorted(running.items()):
                now = after.replicas.get(watcher)
                if now is not None and now.pid == pid:
                    stats.readopted += landed
                elif now is None or now.phase == "stopping":
                    pass  # stopped: the target on disk at the kill says so
                else:
                    stats.not_readopted += landed
                    result.problems.append(
                        f"{point}: {now.replica_id} was pid {pid} at the kill, {now.pid} "
                        f"({now.phase}) after re-adoption"
                    )
            await asyncio.sleep(0.2)  # the new connector's first passes
            dups = duplicates_of(await asyncio.to_thread(scan, dep.run_id))
            stats.duplicates += len(dups)
            if dups:
                result.problems.append(f"{point}: after re-adoption: {'; '.join(dups)}")
            converge_s, audit = await dep.settle()
            stats.orphans += len(audit.orphans)
            stats.duplicates += len(audit.duplicates)
            if converge_s is None or not audit.clean:
                result.problems.append(f"{point}: after `up` again: {audit.lines()}")
            for watcher, (pid, create_time) in sorted(stopping.items()):
                if await asyncio.to_thread(procs.same_process, pid, create_time):
                    result.problems.append(
                        f"{point}: {watcher} (pid {pid}) was stopping at the kill and still "
                        "runs once settled"
                    )
                else:
                    stats.stopped += landed
            if landed:
                break
        else:
            result.problems.append(f"{point}: no kill landed in {KILL_POINT_TRIES} tries")
    result.lap("chaos")
    result.converge_s, result.audit = await dep.settle()
    result.lap("settle")
    return result


async def connector_kill_points(
    tmp: Path, etcd_url: str, *, seed: int, per_point: int, max_replicas: int = 4
) -> KillPointsResult:
    """Scenario 6 on a deployment of its own."""
    async with up_deployment(
        tmp, etcd_url, "chaos-points", replicas=2, max_replicas=max_replicas
    ) as dep:
        result = await connector_kill_points_on(
            dep, seed=seed, per_point=per_point, max_replicas=max_replicas
        )
    result.lap("shutdown")
    return dep.closed_into(result)


# ------------------------------------------------------------------------ 3. circusd kills


@dataclass
class CircusdResult(Result):
    kills: int = 0
    survivors: int = 0  # replica processes still alive when their circusd was gone 5 s
    died_s: list[float] = field(default_factory=list)
    noticed_s: list[float] = field(default_factory=list)
    recovered_s: list[float] = field(default_factory=list)
    listed_s: list[float] = field(default_factory=list)

    def figures(self) -> list[tuple[str, str]]:
        return [
            ("circusd SIGKILLs", str(self.kills)),
            ("replicas outliving their circusd", str(self.survivors)),
            ("SIGKILL -> last replica gone", _dist(self.died_s)),
            ("SIGKILL -> a new circusd", _dist(self.noticed_s)),
            ("SIGKILL -> back to target, ready", _dist(self.recovered_s)),
            ("dead instance listed, max", _s(max(self.listed_s, default=0.0))),
            *_audit_figures(self),
        ]


async def circusd_kills_on(dep: Deployment, *, seed: int, kills: int = 1) -> CircusdResult:
    """Scenario 3 on a library deployment: SIGKILL its circusd ``kills`` times, each time
    once the graph has settled."""
    assert dep.conn is not None
    conn = dep.conn
    rng = random.Random(seed)
    result = CircusdResult("circusd kills", seed)
    listed: asyncio.Task[float] | None = None
    try:
        for i in range(1, kills + 1):
            if not await _ready(dep, result):
                return result
            await asyncio.sleep(rng.uniform(0, 0.3))
            before = await asyncio.to_thread(scan, dep.run_id)
            identities = await asyncio.to_thread(procs.identify, [p.pid for p in before])
            keys = set(await dep.view.instances(dep.namespace))
            old = (conn.state.circusd or {}).get("pid")
            assert isinstance(old, int)
            os.kill(old, signal.SIGKILL)
            killed_at = time.monotonic()
            result.kills += 1
            listed = asyncio.create_task(dep.view.listed_for(dep.namespace, keys, killed_at))
            died = await poll(functools.partial(_all_gone, identities), 5.0)
            if died is None:
                survivors = await asyncio.to_thread(procs.running, identities)
                result.survivors += len(survivors)
                result.problems.append(f"kill {i}: pids {sorted(survivors)} outlived circusd")
            else:
                result.died_s.append(died)
            noticed = await poll(functools.partial(_new_circusd, conn, old), 15.0)
            if noticed is None:
                result.problems.append(f"kill {i}: no new circusd within 15 s")
                return result
            result.noticed_s.append(noticed)
            result.lap("chaos")
            recovered, result.audit = await dep.settle()
            if recovered is None:
                result.problems.append(f"kill {i}: the graph did not come back")
                return result
            result.recovered_s.append(time.monotonic() - killed_at)
            result.converge_s = recovered
            result.listed_s.append(await listed)
            listed = None
            again = {p.pid for p in leaders(await asyncio.to_thread(scan, dep.run_id))}
            if again & {p.pid for p in before}:
                result.problems.append(f"kill {i}: old pids {again} still serve")
            result.lap("settle")
    finally:
        if listed is not None:
            listed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listed
    return result


async def _all_gone(identities: dict[int, float]) -> bool:
    return not await asyncio.to_thread(procs.running, identities)


async def _new_circusd(conn: LocalConnector, old: int) -> bool:
    pid = (conn.state.circusd or {}).get("pid")
    return pid not in (None, old) and await asyncio.to_thread(procs.same_process, pid, None)


async def circusd_kills(
    tmp: Path, etcd_url: str, *, seed: int, kills: int = 1, replicas: int = 3
) -> CircusdResult:
    """Scenario 3 on a deployment of its own."""
    async with library_deployment(
        tmp, etcd_url, "chaos-circusd", replicas=replicas, max_replicas=6
    ) as dep:
        result = await circusd_kills_on(dep, seed=seed, kills=kills)
    result.lap("shutdown")
    return dep.closed_into(result)


# ------------------------------------------------------------------------ 4. etcd outage


@dataclass
class EtcdOutageResult(Result):
    pause_s: float = 0.0
    api_calls: int = 0
    api_failures: int = 0
    api_max_s: float = 0.0
    stopped_during_pause: int = 0
    ready_after_s: float | None = None
    listed_after_kill_s: float | None = None

    def figures(self) -> list[tuple[str, str]]:
        return [
            ("etcd stopped for", f"{self.pause_s:g} s"),
            ("API calls during the pause", str(self.api_calls)),
            ("  not answered 200", str(self.api_failures)),
            ("  slowest answer", _s(self.api_max_s)),
            ("replicas stopped or restarted", str(self.stopped_during_pause)),
            ("etcd back -> scale-up ready", _s(self.ready_after_s)),
            ("etcd back, kill -> key gone", _s(self.listed_after_kill_s)),
            *_audit_figures(self),
        ]


async def etcd_outage_on(
    dep: Deployment,
    etcd: RestartableEtcd,
    *,
    seed: int,
    pause_s: float,
    max_replicas: int,
    kill_at_once: bool = False,
) -> EtcdOutageResult:
    """Scenario 4 on an ``up`` deployment: stop etcd for ``pause_s`` under at least two
    ready replicas, then check it all works again: a scale-up by one gets ready, then a
    killed replica's key leaves etcd; with ``kill_at_once`` the kill goes with the
    scale-up, the moment etcd is back."""
    assert dep.up is not None
    up, working_dir, http = dep.up, dep.working_dir, dep.http
    rng = random.Random(seed)
    result = EtcdOutageResult("etcd outage", seed, pause_s=pause_s)
    # Replicas to keep through the outage, and room for one more after it.
    current = load_state(working_dir).components[COMPONENT].target
    wanted = max(2, min(current, max_replicas - 1))
    if wanted != current:
        await scale(http, up.url, wanted, wait=True)
    if not await _ready(dep, result):
        return result
    before = {r.replica_id: r.pid for r in load_state(working_dir).replicas.values()}
    target = len(before) + 1
    async with http.get(f"{up.url}/v1/events") as resp:
        last_seq = (await resp.json())["last_seq"]
    await asyncio.to_thread(etcd.stop)
    try:
        stopped_at = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=5)
        while time.monotonic() - stopped_at < pause_s:
            for path in ("/healthz", "/v1/components"):
                t0 = time.monotonic()
                try:
                    async with http.get(f"{up.url}{path}", timeout=timeout) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                result.api_calls += 1
                result.api_max_s = max(result.api_max_s, time.monotonic() - t0)
                if not ok:
                    result.api_failures += 1
                    result.problems.append(f"GET {path} failed during the etcd pause")
            await asyncio.sleep(0.2)
    finally:  # whatever happened meanwhile, etcd comes back
        await asyncio.to_thread(etcd.start)
    async with http.get(f"{up.url}/v1/events", params={"since": last_seq}) as resp:
        events = (await resp.json())["events"]
    gone = [e for e in events if e["kind"] in ("stop", "exit", "restart", "spawn")]
    now = {r.replica_id: r.pid for r in load_state(working_dir).replicas.values()}
    changed = {rid for rid, pid in before.items() if now.get(rid) != pid} | {
        e.get("replica") for e in gone
    }
    result.stopped_during_pause = len(changed)
    if changed:
        result.problems.append(
            f"replicas stopped or replaced while etcd was away: {sorted(map(str, changed))} "
            f"({[(e['kind'], e.get('replica'), e.get('reason')) for e in gone]})"
        )
    back = time.monotonic()
    if kill_at_once:
        # Both land the moment etcd is back: how soon the connector's discovery works
        # again is what they measure.
        await scale(http, up.url, target)
        result.listed_after_kill_s = await _kill_registered(dep, rng)
        if await poll(functools.partial(_converged, dep.observe), CONVERGE_LIMIT_S):
            result.ready_after_s = time.monotonic() - back
    else:
        try:
            await scale(http, up.url, target, wait=True)
        except RuntimeError as exc:
            result.problems.append(f"the scale-up after etcd came back failed: {exc}")
        else:
            result.ready_after_s = time.monotonic() - back
        result.listed_after_kill_s = await _kill_registered(dep, rng)
    if result.ready_after_s is None:
        result.problems.append("the scale-up after etcd came back did not get ready")
    elif result.ready_after_s > READY_AFTER_OUTAGE_LIMIT_S:
        result.problems.append(
            f"the scale-up got ready only {result.ready_after_s:.1f} s after etcd came back "
            "(its replica registers within a second)"
        )
    if result.listed_after_kill_s is None:
        result.problems.append("no replica registered in etcd to kill after the outage")
    elif result.listed_after_kill_s > LISTED_LIMIT_S:
        result.problems.append(
            f"a replica killed after etcd came back stayed listed "
            f"{result.listed_after_kill_s:.1f} s"
        )
    result.lap("chaos")
    result.converge_s, result.audit = await dep.settle()
    result.lap("settle")
    return result


async def _kill_registered(dep: Deployment, rng: random.Random) -> float | None:
    """SIGKILL a random replica whose instance is in etcd; seconds until its keys are gone
    (None: no replica was registered)."""
    victims, instances = await _victims(dep, registered=True, wait_s=0)
    ports = {port for port, _ in instances.values()}
    registered = [v for v in victims if v.rpc_port in ports]
    if not registered:
        return None
    victim = rng.choice(registered)
    keys = {k for k, (port, _) in instances.items() if port == victim.rpc_port}
    os.kill(victim.pid, signal.SIGKILL)
    # Long enough to see how long it really stays (a lease outlives this only at its TTL).
    return await dep.view.listed_for(dep.namespace, keys, time.monotonic(), limit_s=LEASE_TTL_S)


async def _converged(observe: Callable[[], Awaitable[Observed]]) -> bool:
    obs = await observe()
    return converged(obs) and len(await asyncio.to_thread(_alive, obs.records)) == obs.target


async def etcd_outage(
    tmp: Path,
    etcd: RestartableEtcd,
    *,
    seed: int,
    pause_s: float,
    replicas: int = 2,
    kill_at_once: bool = False,
) -> EtcdOutageResult:
    """Scenario 4 on a deployment of its own."""
    async with up_deployment(tmp, etcd.url, "chaos-etcd", replicas=replicas, max_replicas=4) as dep:
        result = await etcd_outage_on(
            dep, etcd, seed=seed, pause_s=pause_s, max_replicas=4, kill_at_once=kill_at_once
        )
    result.lap("shutdown")
    return dep.closed_into(result)


# ------------------------------------------------------------------------ 5. unwritable state


@dataclass
class StateWriteResult(Result):
    case: str = ""
    error: str = ""  # what the scale call raised
    clear_error: bool = False
    running_kept: bool = False
    disk_state_ok: bool = False
    completed_after_s: float | None = None  # once writable again (None: not within the limit)
    waited: bool = True

    def figures(self) -> list[tuple[str, str]]:
        return [
            ("case", self.case),
            ("the scale call raised", self.error or "nothing"),
            ("  names state.json and the reason", "yes" if self.clear_error else "NO"),
            ("running replicas kept", "yes" if self.running_kept else "NO"),
            ("state.json still parses", "yes" if self.disk_state_ok else "NO"),
            (
                "writable again -> scale completed",
                _s(self.completed_after_s) if self.waited else "not waited for",
            ),
        ]


STATE_WRITE_CASES = {
    # case -> (errno, replicas before, target while unwritable)
    "disk full during a scale-up": (errno.ENOSPC, 2, 4),
    "read-only during a scale-down": (errno.EROFS, 3, 1),
    "disk full during a scale-down": (errno.ENOSPC, 3, 1),
    "read-only during a scale-up": (errno.EROFS, 2, 4),
}


def _sleep_graph(run_id: str) -> Graph:
    svc = Service(
        name=COMPONENT,
        role=Role.WORKER,
        command=("sleep", "600"),
        envs=((MARKER_ENV, run_id),),
        replicas=0,
        max_replicas=6,
        readiness=Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.1),
        restart=RestartPolicy(backoff_base_s=0.05, backoff_max_s=0.2),
        graceful_stop_s=2.0,
    )
    return Graph(name="chaos", namespace="chaos-state", services={COMPONENT: svc})


@contextlib.contextmanager
def unwritable(conn: LocalConnector, code: int) -> Iterator[None]:
    """The state store's write fails as a full disk (ENOSPC) or a read-only dir (EROFS)
    makes it fail. A full disk is the kernel's own: the temp file every write goes through
    is made a symlink to ``/dev/full``, whose writes fail with ENOSPC, root or not. A
    read-only dir needs a read-only mount, so EROFS is raised at the store's write, an
    OSError naming the temp file as the real one would."""
    store = conn.store
    tmp = store.temp_path
    if code == errno.ENOSPC:
        os.symlink("/dev/full", tmp)
        try:
            yield
        finally:
            tmp.unlink()
        return

    def refuse(text: str) -> None:
        raise OSError(code, os.strerror(code), str(tmp))

    store._write = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        del store._write  # the class's own write again


async def unwritable_state(
    tmp: Path, *, seed: int, case: str, limit_s: float | None = 5.0
) -> StateWriteResult:
    """Scenario 5: a scale while state.json cannot be written; then writable again, for
    ``limit_s`` for the scale to complete (None: not waited for, not checked)."""
    code, before_n, target = STATE_WRITE_CASES[case]
    run_id = new_run_id("chaos-state")
    result = StateWriteResult("unwritable state", seed, case=case, waited=limit_s is not None)
    working_dir = tmp / "state" / uuid.uuid4().hex[:6]
    options = ConnectorOptions(discovery="none", gpu_backend="none", port_range=PORT_RANGE)
    conn = LocalConnector("chaos-state", _sleep_graph(run_id), working_dir, options)
    try:
        await conn.initialize()
        if not await conn.scale_component(COMPONENT, before_n, timeout_s=30):
            result.problems.append(f"the initial {before_n} replicas did not get ready")
            return result
        running = {r.replica_id: r.pid for r in conn.state.replicas_of(COMPONENT)}
        with unwritable(conn, code):
            try:
                await conn.scale_component(COMPONENT, target, timeout_s=limit_s or 1.0)
            except Exception as exc:  # what it raises is the finding
                result.error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.3)  # passes, exits, saves with the disk still unwritable
        reason = os.strerror(code)
        result.clear_error = (
            result.error.startswith("StateWriteFailed: ")
            and "state.json" in result.error
            and reason in result.error
        )
        if not result.clear_error:
            result.problems.append(f"{case}: the scale raised {result.error or 'nothing'}")
        try:
            on_disk = load_state(working_dir)
            listed = {r.replica_id for r in on_disk.replicas.values()}
            result.disk_state_ok = set(running) <= listed
        except Exception as exc:
            result.problems.append(f"{case}: state.json unreadable: {exc!r}")
        if not result.disk_state_ok:
            result.problems.append(f"{case}: state.json lost replicas that ran")
        kept = {r.replica_id: r.pid for r in conn.state.replicas_of(COMPONENT)}
        # A scale-down may stop what runs, as asked; nothing else may go.
        survivors = {rid: pid for rid, pid in running.items() if rid in kept}
        result.running_kept = all(
            kept[rid] == pid and procs.same_process(pid, None) for rid, pid in survivors.items()
        ) and len(survivors) >= min(before_n, target)
        if not result.running_kept:
            result.problems.append(f"{case}: running replicas were lost: {running} -> {kept}")

        async def completed() -> bool:
            recs = conn.state.replicas_of(COMPONENT)
            return len(recs) == target and all(r.phase == "ready" for r in recs)

        if limit_s is not None:
            result.completed_after_s = await poll(completed, limit_s)
            if result.completed_after_s is None:
                phases = {r.replica_id: r.phase for r in conn.state.replicas_of(COMPONENT)}
                result.problems.append(
                    f"{case}: not at {target} ready replicas {limit_s:g} s after the dir "
                    f"became writable again: {phases}"
                )
        # The next save (a pass: at most a resync period away) carries the target.
        if await poll(functools.partial(_state_says, working_dir, target), 3.0) is None:
            result.problems.append(f"{case}: state.json does not say target {target}")
    finally:
        await conn.shutdown()
        result.left_after_shutdown = await asyncio.to_thread(kill_leftovers, run_id, working_dir)
    return result


async def _state_says(working_dir: Path, target: int) -> bool:
    state = await asyncio.to_thread(load_state, working_dir)
    return state.components[COMPONENT].target == target


# ------------------------------------------------------------------------ the benchmark


def print_result(index: int, title: str, result: Result) -> None:
    print(f"{index}. {title}")
    for label, value in result.figures():
        print(f"  {label:<40} {value}")
    violations = result.violations()
    print(f"  {'invariants':<40} {'OK' if not violations else f'VIOLATED ({len(violations)})'}")
    for line in violations[:20]:
        print(f"    - {line}")
    if len(violations) > 20:
        print(f"    ... and {len(violations) - 20} more")
    sys.stdout.flush()


def _etcd_version() -> str:
    try:
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.removeprefix("etcd Version: ").strip() or "unknown"


async def run(args: argparse.Namespace) -> int:
    cores = len(os.sched_getaffinity(0))
    print(
        f"chaos: seed {args.seed} (replay: --seed {args.seed}), {cores} cores, "
        f"etcd {_etcd_version()}, Python {sys.version.split()[0]}"
    )
    only = {int(x) for x in args.only.split(",")}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dl-chaos-") as d:
        tmp = Path(d)
        etcd = RestartableEtcd(tmp / "etcd")
        etcd.start()
        try:
            results: list[tuple[int, str, Result]] = []
            if 1 in only:
                r1 = await replica_kills(
                    tmp, etcd.url, seed=args.seed, kills=args.kills, max_replicas=args.max_replicas
                )
                results.append((1, "replica SIGKILLs under scale churn (library)", r1))
                print_result(*results[-1])
            if 2 in only:
                r2 = await connector_kills(
                    tmp,
                    etcd.url,
                    seed=args.seed,
                    restarts=args.restarts,
                    max_replicas=args.max_replicas,
                )
                results.append((2, "connector (up) SIGKILLs, up again", r2))
                print_result(*results[-1])
            if 6 in only:
                r6 = await connector_kill_points(
                    tmp,
                    etcd.url,
                    seed=args.seed,
                    per_point=args.point_kills,
                    max_replicas=args.max_replicas,
                )
                results.append((6, "connector (up) SIGKILLs at chosen points, up again", r6))
                print_result(*results[-1])
            if 3 in only:
                r3 = await circusd_kills(tmp, etcd.url, seed=args.seed, kills=args.circusd_kills)
                results.append((3, "circusd SIGKILLs (library)", r3))
                print_result(*results[-1])
            if 4 in only:
                r4 = await etcd_outage(
                    tmp, etcd, seed=args.seed, pause_s=args.etcd_pause, kill_at_once=True
                )
                results.append((4, "etcd stopped under a running graph (up)", r4))
                print_result(*results[-1])
            if 5 in only:
                for case in STATE_WRITE_CASES:
                    r5 = await unwritable_state(tmp, seed=args.seed, case=case)
                    results.append((5, f"unwritable state.json: {case} (library)", r5))
                    print_result(*results[-1])
            failed = sum(1 for _, _, r in results if r.violations())
        finally:
            etcd.stop()
    print(f"scenarios with violations: {failed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    ap.add_argument("--kills", type=int, default=200, help="replica SIGKILLs (scenario 1)")
    ap.add_argument("--restarts", type=int, default=50, help="connector SIGKILLs (scenario 2)")
    ap.add_argument(
        "--point-kills", type=int, default=5, help="connector SIGKILLs per point (scenario 6)"
    )
    ap.add_argument("--circusd-kills", type=int, default=3, help="circusd SIGKILLs (scenario 3)")
    ap.add_argument("--etcd-pause", type=float, default=30.0, help="seconds (scenario 4)")
    ap.add_argument("--max-replicas", type=int, default=6, help="churn bound (scenarios 1, 2)")
    ap.add_argument("--only", default="1,2,3,4,5,6", help="scenarios to run, e.g. 1,3")
    ap.add_argument("--verbose", action="store_true", help="show the connector's own log")
    args = ap.parse_args(argv)
    # The connector logs every failure the chaos provokes (with tracebacks); the figures
    # say what matters, so its log is shown only when asked for.
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.CRITICAL,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
