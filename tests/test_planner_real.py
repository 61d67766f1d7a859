"""The real Dynamo Planner drives dynamo-local: a plain disaggregated graph (no ``local:``
block on the frontend or the workers) of the real frontend, a real prefill and a real decode
mocker, and the real Planner (load-based, ``environment: virtual``) as a service of the
graph, under a :class:`LocalConnector` with etcd discovery and the Planner executor, against
a real etcd.

What the issue "Real Dynamo in the loop" asks of the Planner part, observed from outside:

* a chat completion is answered through the disaggregated pair;
* under load (16 concurrent long requests on a 64-block KV cache) the Planner raises
  ``num_decode_workers``; dynamo-local starts the replica and writes ``scaled_decision_id``
  only once the new replica's instance is listed in etcd (an independent observer polls
  etcd every 20 ms, reading the Planner's keys before the instances, so an acknowledgement
  it sees before the instance would be one written first);
* once the load stops, the Planner scales decode back down and dynamo-local applies that
  too, draining the replica it stops;
* no request fails over the whole run: a light client keeps sending through the scale-up
  and the scale-down.

And, separately, that eight decode mockers run side by side with nothing shared: each its
own ports, each registered with its own, none exiting.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import pytest
import yaml

from connector import defaults
from connector.dynamo.discovery.etcd import etcd_endpoint
from connector.graph.loader import load_graph
from connector.local import ConnectorOptions, LocalConnector
from tests.dynamo_helpers import (
    TINY_MODEL_NAME,
    chat,
    instances,
    require_dynamo,
    until_the_model_is_listed,
)
from tests.servers import EtcdServer

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

NS = "preal"
PLANNER_PREFIX = f"v1/{NS}/planner/"
# Decode mockers register as Dynamo's component ``backend`` (prefill ones as ``prefill``).
DECODE_INSTANCES = f"v1/instances/{NS}/backend/generate/"

# The Planner's whole configuration (pydantic ``PlannerConfig``), load-based:
# * max_gpu_budget 3 with one GPU per engine and min_endpoint 1 leaves room for exactly one
#   more replica, so the only scale-up possible is decode 1 -> 2 (prefill cannot grow: its
#   queue-token threshold is above anything 16 requests of this prompt can queue) and the
#   decisions the test expects are exact;
# * decisions every 2 s (load_adjustment_interval_seconds) so the test stays short;
# * live_dashboard_port 0: no dashboard on every interface; report_interval_hours null: no
#   HTML reports in the working directory;
# * control_api_port: a port dynamo-local allocates to the replica (``local.ports``).
PLANNER_CONFIG: dict[str, Any] = {
    "environment": "virtual",
    "backend": "mocker",
    "mode": "disagg",
    "model_name": TINY_MODEL_NAME,
    "optimization_target": "load",
    "prefill_engine_num_gpu": 1,
    "decode_engine_num_gpu": 1,
    "min_endpoint": 1,
    "max_gpu_budget": 3,
    "load_adjustment_interval_seconds": 2,
    "prefill_scale_up_queue_tokens": 100_000,
    "prefill_scale_down_queue_tokens": 200,
    "decode_scale_up_kv_rate": 60,
    "decode_scale_down_kv_rate": 20,
    "live_dashboard_port": 0,
    "report_interval_hours": None,
    "control_api_port": "CONTROL_PORT",  # replaced by the template below
}

# Each mocker's simulated engine: a 64-block KV cache (4096 tokens) that 16 long requests
# overfill, the context length the Planner needs to consider prefill at all, and simulated
# time at a real engine's pace (faster would drain the cache before the Planner looks).
MOCKER_ARGS = [
    "--model-path",
    "{model}",
    "--model-name",
    TINY_MODEL_NAME,
    "--max-model-len",
    "4096",
    "--num-gpu-blocks-override",
    "64",
    "--speedup-ratio",
    "1.0",
]

LOAD_CONCURRENCY = 16
LOAD_PROMPT = "tell me a long story about " + "the quiet sea and " * 60
LOAD_TOKENS = 200
# The Planner waits ~20 s at start (10 s per role for a get_perf_metrics endpoint mockers
# do not serve) before its first decision; the load runs until the scale-up is acknowledged,
# and never longer than this.
LOAD_LIMIT_S = 60.0
# Reported elsewhere as about a minute from the load's end to decode back at 1; here it
# takes 1-3 s (the Planner looks every 2 s and the cache empties with the last request).
SCALE_DOWN_LIMIT_S = 90.0
POLL_S = 0.02


def _port_window(size: int = 400) -> tuple[int, int]:
    """A random window of dynamo-local's default port range. Every connector hands out
    ports from the bottom of its range; another connector on this machine (a parallel test
    run, a demo) does the same, and a port it binds between our reservation and our
    replica's bind makes the replica exit and restart on a moved port (seen once while
    writing this test). For the Planner that restart costs its ~20 s start-up and restarts
    its decision ids, which this test counts exactly."""
    lo, hi = defaults.PORT_RANGE
    first = random.randrange(lo, hi - size)
    return first, first + size - 1


def _worker(mode: str, model: Path) -> dict[str, Any]:
    """A prefill or decode mocker service, as the Kubernetes graph has it."""
    args = [a.replace("{model}", str(model)) for a in MOCKER_ARGS]
    return {
        "componentType": "worker",
        "subComponentType": mode,
        "replicas": 1,
        "extraPodSpec": {
            "mainContainer": {
                "command": ["{python}", "-m", "dynamo.mocker"],
                "args": [*args, "--disaggregation-mode", mode],
            }
        },
    }


def _graph_file(path: Path, services: dict[str, Any]) -> Path:
    """A ``DynamoGraphDeployment`` as a user writes it: graph-wide offline env, services."""
    doc = {
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoGraphDeployment",
        "metadata": {"name": NS},
        "spec": {
            "envs": [
                {"name": "HF_HUB_OFFLINE", "value": "1"},
                {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
            ],
            "services": services,
        },
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _planner_graph(path: Path, model: Path) -> Path:
    config = json.dumps(PLANNER_CONFIG).replace('"CONTROL_PORT"', "{port.control}")
    return _graph_file(
        path,
        {
            "Frontend": {
                "componentType": "frontend",
                "replicas": 1,
                "extraPodSpec": {
                    "mainContainer": {"command": ["{python}", "-m", "dynamo.frontend"]}
                },
            },
            "Prefill": _worker("prefill", model),
            "Decode": _worker("decode", model),
            "Planner": {
                "componentType": "planner",
                "replicas": 1,
                "extraPodSpec": {
                    "mainContainer": {
                        "command": ["{python}", "-m", "dynamo.planner"],
                        "args": ["--config", config],
                    }
                },
                # The one thing with no Kubernetes counterpart: the Planner's control API
                # (localhost-only) needs a port nothing else holds.
                "local": {"ports": [{"name": "control"}]},
            },
        },
    )


async def _started(
    graph_path: Path, tmp_path: Path, etcd: EtcdServer, planner_executor: bool
) -> LocalConnector:
    graph = load_graph(graph_path)
    options = ConnectorOptions(
        discovery="etcd",
        etcd_url=etcd.url,
        gpu_backend="none",
        planner_executor=planner_executor,
        port_range=_port_window(),
    )
    conn = LocalConnector(NS, graph, tmp_path / "wd", options)
    await conn.initialize()
    return conn


# --------------------------------------------------------------------- the observer


@dataclass(frozen=True)
class Snapshot:
    """One poll of etcd: the Planner's keys first, then the decode instances."""

    t: float  # monotonic, taken before the first read
    decision_id: int | None
    num_decode: int | None
    ack: int | None
    ack_mod_revision: int | None
    decode: dict[str, int]  # instance key -> its create revision


def _snapshot(t: float, planner: dict[str, Any], decode: dict[str, int]) -> Snapshot:
    def num(name: str) -> int | None:
        kv = planner.get(name)
        return int(kv.value) if kv is not None else None

    ack = planner.get("scaled_decision_id")
    return Snapshot(
        t,
        num("decision_id"),
        num("num_decode_workers"),
        num("scaled_decision_id"),
        int(ack.mod_revision) if ack is not None else None,
        decode,
    )


@dataclass
class Observer:
    """Polls etcd every :data:`POLL_S` in a background task; keeps every snapshot."""

    url: str
    snapshots: list[Snapshot] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def run(self) -> None:
        host, port = etcd_endpoint(self.url)
        client = aetcd.Client(host, port, timeout=2)
        try:
            while True:
                t = time.monotonic()
                try:
                    planner = {
                        kv.key.decode().removeprefix(PLANNER_PREFIX): kv
                        for kv in await client.get_prefix(PLANNER_PREFIX.encode())
                    }
                    decode = {
                        kv.key.decode(): int(kv.create_revision)
                        for kv in await client.get_prefix(DECODE_INSTANCES.encode())
                    }
                except Exception as exc:  # recorded, and the test fails on it
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    self.snapshots.append(_snapshot(t, planner, decode))
                await asyncio.sleep(POLL_S)
        finally:
            await client.close()

    def first(self, cond: Callable[[Snapshot], bool], after: float = 0.0) -> Snapshot | None:
        return next((s for s in self.snapshots if s.t >= after and cond(s)), None)


@pytest.fixture
async def observer(etcd_server: EtcdServer) -> AsyncIterator[Observer]:
    obs = Observer(etcd_server.url)
    task = asyncio.create_task(obs.run())
    try:
        yield obs
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------------- clients


@dataclass
class Results:
    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    load_durations: list[float] = field(default_factory=list)

    def add(self, status: int, body: str) -> None:
        self.statuses.append(status)
        if status != 200:
            self.failures.append(f"{status}: {body[:300]}")


async def _control_api(http: aiohttp.ClientSession, port: int) -> Any:
    """The Planner's ``GET /v1/min-endpoints``; it answers 503 while a decision is being
    made (asking to retry), which a client does."""
    for _ in range(50):
        async with http.get(f"http://127.0.0.1:{port}/v1/min-endpoints") as resp:
            if resp.status != 503:
                assert resp.status == 200, await resp.text()
                return await resp.json()
        await asyncio.sleep(0.1)
    raise AssertionError("the Planner's control API kept answering 503")


def _port(conn: LocalConnector, replica: str, name: str) -> int:
    rep = next(r for r in conn.view().replicas if f"{r.component}/{r.replica}" == replica)
    return rep.ports[name]


def _decisions(conn: LocalConnector) -> list[Any]:
    return [e for e in conn.events.since(0) if e.kind == "decision"]


async def _until(cond: Callable[[], Any], limit_s: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + limit_s
    while not (found := cond()):
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.1)
    return found


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(300)
async def test_the_real_planner_scales_decode_up_under_load_and_back_down(
    tmp_path: Path, tiny_model: Path, etcd_server: EtcdServer, observer: Observer
) -> None:
    require_dynamo()
    graph_path = _planner_graph(tmp_path / "graph.yaml", tiny_model)
    services = yaml.safe_load(graph_path.read_text())["spec"]["services"]
    assert [n for n, s in services.items() if "local" in s] == ["Planner"]
    t0, t0_wall = time.monotonic(), time.time()
    conn = await _started(graph_path, tmp_path, etcd_server, planner_executor=True)
    results = Results()
    timeline: dict[str, float] = {}
    try:
        for name in ("Frontend", "Prefill", "Decode", "Planner"):
            assert await conn.scale_component(name, 1, timeout_s=90) is True
        timeline["graph ready"] = time.monotonic() - t0
        port = _port(conn, "Frontend/1", "http")
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await until_the_model_is_listed(http, port)
            status, content = await chat(http, port, "hello", 8)
            assert status == 200, content
            assert content.strip()
            results.add(status, content)

            # A light client all along: one short request at a time, through the scale-up
            # and the scale-down (the replica stopped is drained while it sends).
            trickle_stop = asyncio.Event()

            async def trickle() -> None:
                while not trickle_stop.is_set():
                    results.add(*await chat(http, port, "hello", 8))
                    await asyncio.sleep(0.2)

            load_stop = asyncio.Event()

            async def long_requests() -> None:
                while not load_stop.is_set():
                    started = time.monotonic()
                    results.add(*await chat(http, port, LOAD_PROMPT, LOAD_TOKENS))
                    results.load_durations.append(time.monotonic() - started)

            trickler = asyncio.create_task(trickle())
            load_started = time.monotonic()
            timeline["load starts"] = load_started - t0
            loaders = [asyncio.create_task(long_requests()) for _ in range(LOAD_CONCURRENCY)]

            def scaled_up() -> Any:
                return next(
                    (e for e in _decisions(conn) if e.details["num_decode_workers"] == 2), None
                )

            try:
                up = await _until(
                    scaled_up,
                    LOAD_LIMIT_S,
                    lambda: (
                        f"no scale-up within {LOAD_LIMIT_S} s of load; "
                        f"decisions: {[e.details for e in _decisions(conn)]}"
                    ),
                )
            finally:
                load_stop.set()
                load_stopped = time.monotonic()
                await asyncio.gather(*loaders)
            timeline["scale-up applied"] = up.time - t0_wall
            load_ended = time.monotonic()
            timeline["load ends (in-flight done)"] = load_ended - t0
            # {port.control} in the Planner's --config became the port dynamo-local gave
            # the replica: the Planner's control API answers there, with our budget.
            control = await _control_api(http, _port(conn, "Planner/1", "control"))

            def scaled_down() -> Any:
                return next(
                    (
                        e
                        for e in _decisions(conn)
                        if e.seq > up.seq and e.details["num_decode_workers"] == 1
                    ),
                    None,
                )

            down = await _until(
                scaled_down,
                SCALE_DOWN_LIMIT_S,
                lambda: (
                    f"no scale-down within {SCALE_DOWN_LIMIT_S} s of the load's end; "
                    f"decisions: {[e.details for e in _decisions(conn)]}"
                ),
            )
            timeline["scale-down applied"] = down.time - t0_wall
            # The acknowledgement lands in etcd right after the event; give the observer
            # and the trickle a moment past it.
            ack_down = await _until(
                lambda: observer.first(lambda s: s.ack == down.details["decision_id"]),
                10,
                lambda: "the scale-down acknowledgement never reached etcd",
            )
            await asyncio.sleep(1.0)
            trickle_stop.set()
            await trickler
        decode_left = [r for r in conn.view().replicas if r.component == "Decode"]
        drains = [e for e in conn.events.since(0) if e.kind == "drain"]
        exits = [e for e in conn.events.since(0) if e.kind == "exit"]
    finally:
        await conn.shutdown()
    timeline["shut down"] = time.monotonic() - t0

    print(
        "\ntimeline (s from start): "
        + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items())
        + f"\nrequests: {len(results.statuses)} ({len(results.load_durations)} long, "
        f"median {sorted(results.load_durations)[len(results.load_durations) // 2]:.1f} s)"
    )
    assert observer.errors == []
    assert results.failures == []
    assert len(results.load_durations) >= LOAD_CONCURRENCY
    assert set(results.statuses) == {200}

    # Exactly two decisions, in order: decode 1 -> 2 under load, 2 -> 1 after it; prefill
    # stays at 1 in both; each applied in full.
    assert [(e.outcome, e.reason) for e in _decisions(conn)] == [("ok", None), ("ok", None)]
    assert [e.details for e in _decisions(conn)] == [
        {
            "decision_id": 0,
            "num_prefill_workers": 1,
            "num_decode_workers": 2,
            "applied": {"prefill": 1, "decode": 2},
        },
        {
            "decision_id": 1,
            "num_prefill_workers": 1,
            "num_decode_workers": 1,
            "applied": {"prefill": 1, "decode": 1},
        },
    ]
    assert (up.source, down.source) == ("planner", "planner")
    assert control == {
        "mode": "disagg",
        "prefill_min_endpoint": 1,
        "decode_min_endpoint": 1,
        "min_gpu_budget": -1,
        "max_gpu_budget": 3,
    }

    # The scale-up was acknowledged only once the second decode instance was listed: the
    # observer read the Planner's keys before the instances, so a poll that saw the ack saw
    # every instance registered before it, and etcd's own order says the same.
    second = observer.first(lambda s: len(s.decode) >= 2)
    ack_up = observer.first(lambda s: s.ack == 0)
    assert second is not None and ack_up is not None
    assert ack_up.t >= second.t, (ack_up, second)
    assert len(ack_up.decode) == 2
    assert ack_up.ack_mod_revision is not None
    assert max(ack_up.decode.values()) < ack_up.ack_mod_revision
    # The Planner asked only after the load built up, and dynamo-local answered after.
    asked_up = observer.first(lambda s: s.decision_id == 0)
    assert asked_up is not None and load_started <= asked_up.t <= second.t

    # The scale-down: acknowledged once one decode instance was left, never before.
    asked_down = observer.first(lambda s: s.decision_id == 1)
    assert asked_down is not None and asked_down.t >= load_stopped
    one_left = observer.first(lambda s: len(s.decode) == 1, after=asked_down.t)
    assert one_left is not None and ack_down.t >= one_left.t, (ack_down, one_left)
    assert len(ack_down.decode) == 1
    # The replica stopped was drained (out of discovery, nothing in flight) first, and no
    # replica exited on its own over the whole run.
    assert [(e.component, e.outcome) for e in drains] == [("Decode", "ok")]
    assert drains[0].details["inflight"] == 0.0
    assert exits == []
    assert len(decode_left) == 1 and decode_left[0].ready
    assert [i.port for i in instances(etcd_server.url, NS, "backend")] == []  # all shut down
    assert time.monotonic() - t0 < 240


@pytest.mark.timeout(180)
async def test_eight_decode_mockers_run_side_by_side(
    tmp_path: Path, tiny_model: Path, etcd_server: EtcdServer
) -> None:
    require_dynamo()
    graph_path = _graph_file(tmp_path / "graph.yaml", {"Decode": _worker("decode", tiny_model)})
    conn = await _started(graph_path, tmp_path, etcd_server, planner_executor=False)
    try:
        started = time.monotonic()
        assert await conn.scale_component("Decode", 8, timeout_s=120) is True
        took = time.monotonic() - started
        replicas = [r for r in conn.view().replicas if r.component == "Decode"]
        listed = instances(etcd_server.url, NS, "backend")
        events = conn.events.since(0)
    finally:
        await conn.shutdown()
    print(f"\n0 -> 8 decode mockers ready in {took:.1f} s")
    assert sorted(int(r.replica) for r in replicas) == list(range(1, 9))
    assert all(r.ready and r.state == "ready" and r.restarts == 0 for r in replicas)
    assert len({r.pid for r in replicas}) == 8
    # Every replica has its own system, request-plane and forward-pass-metrics ports, and
    # no two replicas share one.
    assert all(set(r.ports) == {"system", "rpc", "fpm", "nixl"} for r in replicas)
    ports = [p for r in replicas for p in r.ports.values()]
    assert len(set(ports)) == len(ports) == 32
    # Each is registered once, advertising its own request-plane port.
    assert sorted(i.port for i in listed) == sorted(r.ports["rpc"] for r in replicas)
    assert {i.host for i in listed} == {"127.0.0.1"}
    # One ready event each, none failed.
    ready = sorted(str(e.replica) for e in events if e.kind == "ready")
    assert ready == sorted(f"Decode/{i}" for i in range(1, 9))
    assert {e.outcome for e in events if e.kind == "ready"} == {None}
    assert [e for e in events if e.kind in ("exit", "restart", "crashloop")] == []
