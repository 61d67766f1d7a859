"""Scale benchmark: many replicas up and down, against bare circusd in the same run.

For ``sleep`` replicas (readiness ``none``, exit on SIGTERM at once):

1. ``0 -> N`` through ``scale_component`` against bare circusd ``add`` (with start) of N
   watchers one after the other through Circus's own client: Circus's own ``circusd``,
   as installed, adding plain ``sleep`` watchers. Target: <= 1.5x.
2. ``N -> 0``. Target: <= 3 s for N = 512.
3. ``shutdown()`` with N running (what Ctrl-C does). Target: <= 5 s for N = 512.
4. State writes during ``N -> 0`` (coalesced: far fewer than N) and the connector's RSS
   with N running. Target: <= 100 MB at 512.
5. The event loop never blocks, through the HTTP API of a connector with M workers of
   4 ports each (Dynamo's implicit ports): ``PUT .../replicas {"replicas": M, "wait":
   false}`` and back to 0 answer within 50 ms, and ``/healthz``, asked at a fixed rate
   from another process all along (open loop: latency counts from when each request was
   due), has p99 <= 50 ms while the M replicas are planned, spawned and stopped.
   Default M = 1000.

The connector runs as ``up`` runs it: its start-up heap frozen out of the garbage
collector's full passes (``connector.cli.heap``).

For reference, the circusd the connector runs (``connector.supervision.circusd_program``:
Circus's, spawning with vfork) adds N watchers twice: the same plain ones as the baseline
(what the faster spawn alone gives), and as the connector adds them (its
argv through ``setpriv``, its env, its log streams, the log files made beforehand as the
connector makes them): what circusd itself costs per replica, the floor of the
connector's scale-up with one circusd.

    python -m bench.scale_bench [--replicas 512] [--rounds 3] [--api-replicas 1000]
        [--healthz-rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from circus.client import CircusClient

from connector.api.server import create_app, start_server
from connector.cli.heap import freeze_startup_heap
from connector.graph import dynamo_defaults
from connector.graph.model import Graph, Readiness, ReadinessKind, Role, Service
from connector.local import ConnectorOptions, LocalConnector
from connector.supervision.circus import start_circusd, stock_circusd_program, stop_circusd
from connector.supervision.launcher import launcher_prefix
from connector.supervision.logs import (
    LogPolicy,
    circus_stream_options,
    create_log_files,
    log_paths,
)

UP_RATIO_GOAL = 1.5
PUT_GOAL_MS = 50.0
HEALTHZ_P99_GOAL_MS = 50.0


def _graph(n: int, ports: bool = False) -> Graph:
    svc = Service(
        name="Sleep",
        role=Role.WORKER,
        command=("sleep", "600"),
        replicas=0,
        readiness=Readiness(kind=ReadinessKind.NONE),
        graceful_stop_s=2.0,
        # What a Dynamo worker gets when it declares none (system, rpc, fpm, nixl).
        ports=dynamo_defaults.ROLE_PORTS[Role.WORKER] if ports else (),
    )
    return Graph(name="bench", namespace="bench", services={"Sleep": svc})


def _watcher(i: int, log_dir: Path | None) -> dict[str, Any]:
    """The ``add`` properties of bare watcher ``i``: plain ``sleep``, or (with ``log_dir``)
    as the connector adds one (launcher prefix, whole env, log streams)."""
    if log_dir is None:
        return {"cmd": "sleep", "args": ["600"], "options": {"respawn": False}}
    argv = [*launcher_prefix(), "sleep", "600"]
    options = {
        "respawn": False,
        "env": dict(os.environ),
        "copy_env": False,
        "close_child_stdin": True,
        **circus_stream_options(log_paths(log_dir, f"bare.w.{i}"), LogPolicy()),
    }
    return {"cmd": argv[0], "args": argv[1:], "options": options}


async def bare_circus_adds(
    tmp: Path, n: int, as_connector: bool = False, ours: bool = False
) -> float:
    """Seconds for ``n`` adds one after the other: plain ``sleep`` watchers to Circus's own
    circusd (the baseline; with ``ours``, to the circusd the connector runs), or
    (``as_connector``) the connector's watchers to the circusd the connector runs (its
    floor)."""
    ours = ours or as_connector
    run_dir = tmp / ("bare-as-connector" if as_connector else "bare-ours" if ours else "bare")
    info = await start_circusd(run_dir, program=None if ours else stock_circusd_program())
    client = CircusClient(endpoint=info.endpoint, timeout=30)
    log_dir = run_dir / "logs" if as_connector else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)

    def add_all() -> float:
        if log_dir is not None:  # the connector creates them in its own thread first
            for i in range(n):
                create_log_files(log_paths(log_dir, f"bare.w.{i}"))
        t0 = time.perf_counter()
        for i in range(n):
            command = {
                "command": "add",
                "properties": {
                    "name": f"bare.w.{i}",
                    "start": True,
                    "waiting": True,  # until the process runs, as the connector waits
                    **_watcher(i, log_dir),
                },
            }
            # circusd runs one state-changing command at a time and answers errno 5 to the
            # next one meanwhile: retried, as any client must (the connector does too).
            while (reply := client.call(command)).get("status") != "ok":
                if reply.get("errno") != 5:
                    raise RuntimeError(f"circusd refused add: {reply}")
                time.sleep(0.001)
        return time.perf_counter() - t0

    try:
        return await asyncio.to_thread(add_all)
    finally:
        client.stop()
        await stop_circusd(info, None)


async def connector_round(tmp: Path, n: int) -> dict[str, float]:
    options = ConnectorOptions(discovery="none", gpu_backend="none", max_replicas=max(n, 64))
    conn = LocalConnector("bench", _graph(n), tmp / "wd", options)
    await conn.initialize()
    freeze_startup_heap()  # as `up` does once started
    me = psutil.Process()
    try:
        writes = conn.store.writes_total
        t0 = time.perf_counter()
        assert await conn.scale_component("Sleep", n, timeout_s=600)
        up = time.perf_counter() - t0
        rss = me.memory_info().rss
        up_writes = conn.store.writes_total - writes
        writes = conn.store.writes_total
        t0 = time.perf_counter()
        assert await conn.scale_component("Sleep", 0, timeout_s=600)
        down = time.perf_counter() - t0
        down_writes = conn.store.writes_total - writes
        assert await conn.scale_component("Sleep", n, timeout_s=600)
        t0 = time.perf_counter()
    finally:
        await conn.shutdown()
    shutdown = time.perf_counter() - t0
    return {
        "up": up,
        "down": down,
        "shutdown": shutdown,
        "rss_mb": rss / 2**20,
        "up_writes": float(up_writes),
        "down_writes": float(down_writes),
    }


# /healthz at a fixed rate from its own interpreter, until its stdin closes: each line
# out is [due (wall clock), latency s or null on error].
HEALTHZ_LOAD = r"""
import asyncio, json, sys, time
import aiohttp

async def main(url, rate):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # EOF: the benchmark is done
    out = []
    async with aiohttp.ClientSession() as session:
        async def one(due):
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            out.append([due, time.time() - due if ok else None])

        tasks = []
        start = time.time() + 0.05
        i = 0
        print("started", flush=True)
        while not stop.is_set():
            due = start + i / rate
            i += 1
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)
    print(json.dumps(out), flush=True)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _put(session: aiohttp.ClientSession, url: str, n: int) -> tuple[float, int, Any]:
    t0 = time.perf_counter()
    async with session.put(url, json={"replicas": n, "wait": False}) as resp:
        body = await resp.json()
        return time.perf_counter() - t0, resp.status, body


async def api_round(tmp: Path, m: int, rate: float) -> dict[str, Any]:
    """PUT m (wait false) and back to 0 through the HTTP API, /healthz load all along."""
    options = ConnectorOptions(discovery="none", gpu_backend="none", max_replicas=max(m, 64))
    conn = LocalConnector("bench", _graph(m, ports=True), tmp / "wd-api", options)
    await conn.initialize()
    freeze_startup_heap()  # as `up` does once started
    server = await start_server(create_app(conn), "127.0.0.1", 0)
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HEALTHZ_LOAD,
        f"{server.url}/healthz",
        str(rate),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    phases: dict[str, tuple[float, float]] = {}
    out: dict[str, Any] = {}
    url = f"{server.url}/v1/components/Sleep/replicas"
    try:
        assert load.stdout is not None and load.stdin is not None
        await load.stdout.readline()
        await asyncio.sleep(1.0)  # a quiet baseline first
        rec = conn.reconciler
        assert rec is not None
        async with aiohttp.ClientSession() as session:
            for name, target in (("up", m), ("down", 0)):
                start = time.time()
                took, status, body = await _put(session, url, target)
                if status != 202 or body.get("target") != target or body.get("waited"):
                    raise RuntimeError(f"PUT {target} answered {status}: {body}")
                out[f"put_{name}_ms"] = took * 1000
                while not (rec.converged("Sleep") and "Sleep" not in rec.ops):
                    await asyncio.sleep(0.05)
                phases[name] = (start, time.time())
        load.stdin.close()
        raw = await load.stdout.read()
        await load.wait()
    finally:
        if load.returncode is None:
            load.kill()
            await load.wait()
        await server.stop()
        await conn.shutdown()
    samples = json.loads(raw.decode().strip().splitlines()[-1])
    for name, (start, end) in phases.items():
        inside = [lat for due, lat in samples if start <= due <= end]
        good = [lat * 1000 for lat in inside if lat is not None]
        out[f"{name}_s"] = end - start
        out[f"{name}_healthz"] = {
            "n": len(inside),
            "errors": len(inside) - len(good),
            "p50": _quantile(good, 0.5),
            "p99": _quantile(good, 0.99),
            "max": max(good, default=float("nan")),
        }
    return out


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


async def up_rounds(tmp: Path, n: int, rounds: int) -> tuple[list[float], list[dict[str, float]]]:
    """Bare circusd and the connector in turn, ``rounds`` times: bare, connector, bare, ...
    bare. Each connector round's baseline is the mean of the bare runs right before and
    right after it: on a shared machine the load drifts within a minute (bare runs of the
    same 512 adds minutes apart differ by up to 2x here), so only a neighbouring baseline
    makes a fair ratio, and the median of the rounds a figure that one hiccup cannot move."""
    bare = [await bare_circus_adds(tmp / "bare-0", n)]
    got = []
    for i in range(1, rounds + 1):
        got.append(await connector_round(tmp / f"round-{i}", n))
        bare.append(await bare_circus_adds(tmp / f"bare-{i}", n))
    return bare, got


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=512)
    parser.add_argument("--api-replicas", type=int, default=1000)
    parser.add_argument("--healthz-rate", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3, help="connector rounds (median)")
    args = parser.parse_args(argv)
    n, m = args.replicas, args.api_replicas
    with tempfile.TemporaryDirectory(prefix="dl-scale-") as tmp:
        bare_runs, rounds = await up_rounds(Path(tmp), n, max(1, args.rounds))
        plain_ours = await bare_circus_adds(Path(tmp), n, ours=True)
        like = await bare_circus_adds(Path(tmp), n, as_connector=True)
        api = await api_round(Path(tmp), m, args.healthz_rate) if m > 0 else None
    baselines = [(a + b) / 2 for a, b in itertools.pairwise(bare_runs)]
    ratios = [r["up"] / b for r, b in zip(rounds, baselines, strict=True)]
    ratio = statistics.median(ratios)
    bare = statistics.median(baselines)
    got = {key: statistics.median([r[key] for r in rounds]) for key in rounds[0]}
    cores = len(psutil.Process().cpu_affinity() or [])
    each = ", ".join(f"{r:.2f}x" for r in ratios)
    print(f"scale bench, {n} sleep replicas, {cores} cores, medians of {len(rounds)} rounds")
    print(
        f"  bare circusd add x{n}:        {bare:7.2f} s  (runs: "
        + ", ".join(f"{b:.2f}" for b in bare_runs)
        + " s, one before and after each round)"
    )
    print(
        f"  connector 0 -> {n}:            {got['up']:7.2f} s  ({ratio:.2f}x bare, rounds "
        f"{each}; goal <= {UP_RATIO_GOAL}x: {_verdict(ratio <= UP_RATIO_GOAL)})"
    )
    print(
        f"  bare add x{n}, connector's circusd: {plain_ours:5.2f} s  ({plain_ours / bare:.2f}x "
        "bare: the same plain watchers, spawned with vfork)"
    )
    print(
        f"  bare add x{n} as the connector: {like:6.2f} s  ({like / bare:.2f}x bare; the "
        f"connector at {got['up'] / like:.2f}x this)"
    )
    print(f"  connector {n} -> 0:            {got['down']:7.2f} s")
    print(f"  shutdown with {n} running:     {got['shutdown']:7.2f} s")
    print(f"  state writes during 0 -> {n}:  {got['up_writes']:7.0f}")
    print(f"  state writes during {n} -> 0:  {got['down_writes']:7.0f}")
    # The first round's: later rounds run in a heap the earlier ones have grown.
    print(f"  connector RSS with {n}:        {rounds[0]['rss_mb']:7.1f} MB")
    if api is not None:
        rate = f"{args.healthz_rate:g}/s"
        print(f"event loop, {m} workers x 4 ports via the HTTP API, /healthz at {rate}")
        for name, target in (("up", m), ("down", 0)):
            put = api[f"put_{name}_ms"]
            print(
                f"  PUT replicas {target} (wait false): {put:7.1f} ms  (goal <= "
                f"{PUT_GOAL_MS:g} ms: {_verdict(put <= PUT_GOAL_MS)})"
            )
        for name, what in (("up", f"0 -> {m}"), ("down", f"{m} -> 0")):
            h = api[f"{name}_healthz"]
            print(
                f"  /healthz during {what} ({api[f'{name}_s']:.1f} s, {h['n']} requests, "
                f"{h['errors']} failed): p50 {h['p50']:.1f} ms, p99 {h['p99']:.1f} ms, max "
                f"{h['max']:.1f} ms  (goal p99 <= {HEALTHZ_P99_GOAL_MS:g} ms: "
                f"{_verdict(h['p99'] <= HEALTHZ_P99_GOAL_MS and not h['errors'])})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
