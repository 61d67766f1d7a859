"""Dynamo benchmark: what dynamo-local adds around a real Dynamo 1.6.1 mocker, and how fast
it answers the Planner, against a real etcd.

1. Start-up. A decode mocker replica of a plain graph (no ``local:`` block) under
   dynamo-local with etcd discovery: spawn (the scale call) -> registered (its instance key,
   seen by an independent watch) -> ready (the connector's ``ready`` event), against the
   same mocker command started directly (``subprocess``, same environment and kinds of
   ports) and waited for until its key appears. The two alternate, sample by sample, so
   both see the same machine load.
2. Planner decision -> acknowledgement. The bench writes a decision exactly as the
   Planner's ``VirtualConnectorCoordinator`` does (``num_decode_workers``, then
   ``decision_id``, decimal strings on its own lease, under ``v1/{ns}/planner/``) and
   measures until ``scaled_decision_id`` equals it: decode 1 -> 2 and 2 -> 1, against what
   the bare mocker needs for the same step in this run: start -> registered for the
   scale-up; for the scale-down, SIGTERM -> exited plus the drain's settle period (a
   replica leaving is drained first, on purpose).

    python -m bench.dynamo_bench [--samples 10] [--decisions 5]

Needs the real Dynamo (``scripts/setup.sh`` installs it on x86_64); elsewhere it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aetcd

from connector import defaults
from connector.dynamo.discovery.etcd import etcd_endpoint
from connector.dynamo.drain import SETTLE_S
from connector.dynamo.tiny_model import write_tiny_model
from connector.graph.loader import load_graph
from connector.local import ConnectorOptions, LocalConnector
from tests.dynamo_helpers import SYSTEM_PORT_BELOW, TINY_MODEL_NAME, dynamo_env, dynamo_missing
from tests.servers import EtcdServer, free_port

NS = "dynbench"
BARE_NS = "dynbenchbare"  # the bare mocker's namespace: its keys never mix with ours
# How often the Planner itself looks for the acknowledgement (SCALING_CHECK_INTERVAL in
# dynamo.planner.connectors.virtual, 1.6.1): anything faster is invisible to it.
PLANNER_CHECK_S = 10.0
STEP_TIMEOUT_S = 60.0

GRAPH = """\
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {{name: {ns}}}
spec:
  envs:
    - {{name: HF_HUB_OFFLINE, value: "1"}}
    - {{name: TRANSFORMERS_OFFLINE, value: "1"}}
  services:
    Decode:
      componentType: worker
      subComponentType: decode
      replicas: {replicas}
      extraPodSpec:
        mainContainer:
          command: ["{{python}}", -m, dynamo.mocker]
          args: [{args}]
"""


def _mocker_args(model: Path) -> list[str]:
    return [
        "--model-path",
        str(model),
        "--model-name",
        TINY_MODEL_NAME,
        "--disaggregation-mode",
        "decode",
        "--speedup-ratio",
        "10",
    ]


def _port_window(size: int = 200) -> tuple[int, int]:
    """A random window of the default port range: a connector hands ports out from the
    bottom of its range, and another connector on the machine doing the same would make a
    replica restart on a moved port now and then, which is not what this measures."""
    lo, hi = defaults.PORT_RANGE
    first = random.randrange(lo, hi - size)
    return first, first + size - 1


@dataclass
class KeyTimes:
    """Wall times a watch on ``v1/`` saw each key put (first) and deleted (last)."""

    put: dict[str, float] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)
    values: dict[str, list[tuple[float, bytes]]] = field(default_factory=dict)

    async def watch(self, client: aetcd.Client) -> None:
        async for event in await client.watch_prefix(b"v1/"):
            now = time.time()
            key = event.kv.key.decode()
            if event.kind == aetcd.EventKind.PUT:
                self.put.setdefault(key, now)
                self.values.setdefault(key, []).append((now, bytes(event.kv.value)))
            else:
                self.deleted[key] = now

    def new_instances(self, prefix: str, since: float) -> list[str]:
        return [k for k, t in self.put.items() if k.startswith(prefix) and t >= since]

    def value_at(self, key: str, value: bytes, since: float) -> float | None:
        return next((t for t, v in self.values.get(key, []) if v == value and t >= since), None)


async def _until(cond: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {STEP_TIMEOUT_S} s")
        await asyncio.sleep(0.002)


def _stats(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest rank
    return f"median {statistics.median(values) * 1000:7.1f} ms  p90 {p90 * 1000:7.1f} ms"


def _ratio(ours: list[float], base: list[float]) -> str:
    return f"{statistics.median(ours) / statistics.median(base):.2f}x"


@dataclass
class Figures:
    ours_registered: list[float] = field(default_factory=list)  # spawn -> key
    ours_ready: list[float] = field(default_factory=list)  # key -> ready event
    ours_total: list[float] = field(default_factory=list)  # spawn -> ready event
    bare_registered: list[float] = field(default_factory=list)  # Popen -> key
    bare_gone: list[float] = field(default_factory=list)  # SIGTERM -> key deleted
    bare_exit: list[float] = field(default_factory=list)  # SIGTERM -> process exited
    up_ack: list[float] = field(default_factory=list)  # decision -> ack
    up_registered: list[float] = field(default_factory=list)  # decision -> new key
    down_ack: list[float] = field(default_factory=list)
    down_gone: list[float] = field(default_factory=list)  # decision -> key deleted


async def _ours_once(conn: LocalConnector, keys: KeyTimes, fig: Figures) -> None:
    prefix = f"v1/instances/{NS}/backend/generate/"
    mark = conn.events.last_seq
    spawn = time.time()
    assert await conn.scale_component("Decode", 1, timeout_s=STEP_TIMEOUT_S)
    ready = next(
        e for e in conn.events.since(mark) if e.kind == "ready" and e.component == "Decode"
    )
    (key,) = keys.new_instances(prefix, spawn)
    fig.ours_registered.append(keys.put[key] - spawn)
    fig.ours_ready.append(ready.time - keys.put[key])
    fig.ours_total.append(ready.time - spawn)
    assert await conn.scale_component("Decode", 0, timeout_s=STEP_TIMEOUT_S)
    await _until(lambda: key in keys.deleted, "our replica's key gone")


async def _bare_once(model: Path, etcd_url: str, tmp: Path, keys: KeyTimes, fig: Figures) -> None:
    """The same mocker, started by hand: its own system and request-plane ports, as
    dynamo-local gives a replica, and the same loopback, offline environment."""
    prefix = f"v1/instances/{BARE_NS}/backend/generate/"
    env = dynamo_env(
        BARE_NS,
        etcd_url,
        system_port=free_port(below=SYSTEM_PORT_BELOW),
        extra={"DYN_TCP_RPC_PORT": str(free_port(below=SYSTEM_PORT_BELOW))},
    )
    argv = [sys.executable, "-m", "dynamo.mocker", *_mocker_args(model)]
    with (tmp / "bare.log").open("ab") as log:
        spawn = time.time()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        await _until(lambda: keys.new_instances(prefix, spawn), "the bare mocker registered")
        (key,) = keys.new_instances(prefix, spawn)
        fig.bare_registered.append(keys.put[key] - spawn)
        stop = time.time()
        proc.terminate()
        await asyncio.to_thread(proc.wait, STEP_TIMEOUT_S)
        fig.bare_exit.append(time.time() - stop)
        await _until(lambda: key in keys.deleted, "the bare mocker's key gone")
        fig.bare_gone.append(keys.deleted[key] - stop)
    finally:
        if proc.poll() is None:
            proc.terminate()
        await asyncio.to_thread(proc.wait, 10)


class Planner:
    """Writes decisions as Dynamo's ``VirtualConnectorCoordinator`` does."""

    def __init__(self, client: aetcd.Client) -> None:
        self.client = client
        self.prefix = f"v1/{NS}/planner/"
        self.lease: aetcd.Lease | None = None
        self.next_id = 0

    async def decide(self, num_decode: int) -> tuple[int, float]:
        if self.lease is None:
            self.lease = await self.client.lease(60)
        decision_id, self.next_id = self.next_id, self.next_id + 1
        put = time.time()
        await self.client.put(
            (self.prefix + "num_decode_workers").encode(),
            str(num_decode).encode(),
            lease=self.lease,
        )
        await self.client.put(
            (self.prefix + "decision_id").encode(), str(decision_id).encode(), lease=self.lease
        )
        return decision_id, put


async def _decision_once(planner: Planner, keys: KeyTimes, fig: Figures) -> None:
    prefix = f"v1/instances/{NS}/backend/generate/"
    ack_key = planner.prefix + "scaled_decision_id"
    before = set(keys.new_instances(prefix, 0.0)) - set(keys.deleted)

    up_id, asked = await planner.decide(2)
    await _until(
        lambda: keys.value_at(ack_key, str(up_id).encode(), asked), f"decision {up_id} acked"
    )
    ack = keys.value_at(ack_key, str(up_id).encode(), asked)
    assert ack is not None
    (new,) = keys.new_instances(prefix, asked)
    fig.up_ack.append(ack - asked)
    fig.up_registered.append(keys.put[new] - asked)

    down_id, asked = await planner.decide(1)
    await _until(
        lambda: keys.value_at(ack_key, str(down_id).encode(), asked), f"decision {down_id} acked"
    )
    ack = keys.value_at(ack_key, str(down_id).encode(), asked)
    assert ack is not None
    gone = [keys.deleted[k] for k in (*before, new) if keys.deleted.get(k, 0.0) >= asked]
    assert len(gone) == 1, f"scale-down removed {len(gone)} instances"
    fig.down_ack.append(ack - asked)
    fig.down_gone.append(gone[0] - asked)


async def run(samples: int, decisions: int) -> Figures:
    fig = Figures()
    with tempfile.TemporaryDirectory(prefix="dl-dynamo-bench-") as d:
        tmp = Path(d)
        model = write_tiny_model(tmp / "models", TINY_MODEL_NAME)
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        try:
            host, port = etcd_endpoint(etcd.url)
            client = aetcd.Client(host=host, port=port)
            keys = KeyTimes()
            watcher = asyncio.create_task(keys.watch(client))
            await asyncio.sleep(0.2)
            args = ", ".join(f'"{a}"' for a in _mocker_args(model))
            graph_path = tmp / "graph.yaml"
            graph_path.write_text(GRAPH.format(ns=NS, replicas=0, args=args))
            options = ConnectorOptions(
                discovery="etcd", etcd_url=etcd.url, gpu_backend="none", port_range=_port_window()
            )
            async with LocalConnector(NS, load_graph(graph_path), tmp / "wd", options) as conn:
                for _ in range(samples):
                    await _ours_once(conn, keys, fig)
                    await _bare_once(model, etcd.url, tmp, keys, fig)

            graph_path.write_text(GRAPH.format(ns=NS, replicas=1, args=args))
            options.planner_executor = True
            async with LocalConnector(NS, load_graph(graph_path), tmp / "wd2", options) as conn:
                assert await conn.scale_component("Decode", 1, timeout_s=STEP_TIMEOUT_S)
                planner = Planner(client)
                for _ in range(decisions):
                    await _decision_once(planner, keys, fig)
                if planner.lease is not None:
                    await planner.lease.revoke()
            watcher.cancel()
            await client.close()
        finally:
            etcd.stop()
    return fig


def _line(label: str, value: str) -> None:
    print(f"  {label:<40}: {value}")


def report(fig: Figures, samples: int, decisions: int) -> None:
    med = statistics.median
    print(f"start-up of a real decode mocker, {samples} samples each (wall clock)")
    _line("bare  Popen -> key in etcd", _stats(fig.bare_registered))
    _line("ours  spawn -> key in etcd", _stats(fig.ours_registered))
    _line("ours  key in etcd -> ready event", _stats(fig.ours_ready))
    _line("ours  spawn -> ready event", _stats(fig.ours_total))
    overhead = med(fig.ours_total) - med(fig.bare_registered)
    _line("overhead (median, ready vs bare key)", f"{overhead * 1000:7.1f} ms")
    _line("ratio ours spawn->ready / bare", _ratio(fig.ours_total, fig.bare_registered))
    print(f"Planner decision -> scaled_decision_id, {decisions} of each")
    _line("decode 1 -> 2  decision -> new key", _stats(fig.up_registered))
    _line("decode 1 -> 2  decision -> ack", _stats(fig.up_ack))
    _line("  ratio to the bare mocker's start", _ratio(fig.up_ack, fig.bare_registered))
    _line("decode 2 -> 1  decision -> key gone", _stats(fig.down_gone))
    _line("decode 2 -> 1  decision -> ack", _stats(fig.down_ack))
    _line("bare  SIGTERM -> key gone", _stats(fig.bare_gone))
    _line("bare  SIGTERM -> exited", _stats(fig.bare_exit))
    # A scale-down drains: out of discovery, then at least SETTLE_S for requests routed
    # just before the delete, then until the worker's /metrics shows none in flight, and
    # only then SIGTERM; the bare stop plus that settle period is the floor.
    floor = SETTLE_S + med(fig.bare_exit)
    _line(f"  floor: settle {SETTLE_S * 1000:.0f} ms + bare stop", f"{floor * 1000:7.1f} ms")
    _line("  ratio ack / floor", f"{med(fig.down_ack) / floor:.2f}x")
    worst = max(fig.up_ack + fig.down_ack)
    verdict = "within one check: OK" if worst < PLANNER_CHECK_S else "MISSED one check"
    _line(
        "slowest ack", f"{worst:.2f} s (the Planner looks every {PLANNER_CHECK_S:g} s: {verdict})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--decisions", type=int, default=5)
    args = ap.parse_args(argv)
    missing = dynamo_missing()
    if missing:
        print(f"skipped: {missing}")
        return 0
    fig = asyncio.run(run(args.samples, args.decisions))
    report(fig, args.samples, args.decisions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
