"""Exporter benchmark: /metrics latency and collection CPU at 8, 64 and 512 replicas.

Each replica is one cheap sleeping process (``sleep 6000.<i>``). In the same run, Debian's
``prometheus-process-exporter`` watches the same processes, grouped one group per replica
(so both do the same per-replica work), and is scraped by the same client with the same
headers as Prometheus sends. Printed per size: our scrape latency (p50/p99, scraped every 20 ms for
5 s while the sampler runs at its 1 s interval), our CPU per sampling cycle (alone, and with
the pre-rendering a scraped exporter does), process-exporter's latency and CPU per scrape,
the ratios, and the per-replica slope of each.

Targets (issue 6): /metrics p99 <= 25 ms at 512 replicas; collection CPU per cycle no more
than process-exporter's CPU per scrape.

    python -m bench.exporter_bench [--sizes 8,64,512] [--seconds 5] [--pace-ms 20] [--cycles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from connector.events import Event, EventLog, Subscriber
from connector.view import ComponentView, ConnectorView, ReplicaView
from exporter.service import build_exporter

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The load generator runs in its own process so it does not share our interpreter's CPU.
# It scrapes at a fixed pace for a fixed time (at least ``min`` scrapes), so the scrapes
# overlap our sampler's cycles the way real ones do.
CLIENT = r"""
import http.client, json, sys, time
port, duration, pace, least, accept = sys.argv[1:]
port, duration, pace, least = int(port), float(duration), float(pace), int(least)
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
headers = {"Accept": accept, "Accept-Encoding": "gzip"}
lat, size, i = [], 0, 0
end = time.perf_counter() + duration
while i < least + 3 or time.perf_counter() < end:
    t = time.perf_counter()
    conn.request("GET", "/metrics", headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, resp.status
    took = time.perf_counter() - t
    if i >= 3:
        lat.append(took)
    size, i = len(body), i + 1
    time.sleep(max(0.0, pace - took))
print(json.dumps({"lat": lat, "bytes": size}))
"""


class BenchReader:
    """A connector view of one component with one replica per sleeping process."""

    def __init__(self, procs: Sequence[psutil.Process]) -> None:
        replicas = tuple(
            ReplicaView(
                component="worker",
                replica=str(i),
                watcher=f"bench.worker.{i}",
                state="ready",
                ready=True,
                pid=p.pid,
                create_time=p.create_time(),
                started_at=p.create_time(),
                restarts=0,
                last_exit_code=None,
            )
            for i, p in enumerate(procs)
        )
        comp = ComponentView(
            name="worker",
            role="worker",
            sub_component_type="decode",
            dynamo_namespace="bench",
            status="running",
            desired=len(procs),
            running=len(procs),
            ready=len(procs),
            restarts=0,
            crashloops=0,
            scale_in_flight=False,
            min_replicas=0,
            max_replicas=None,
        )
        self._view = ConnectorView("bench", time.time(), (comp,), replicas)
        self.events = EventLog()

    def view(self) -> ConnectorView:
        return self._view

    def recent_events(self, since: int = 0) -> list[Event]:
        return self.events.since(since)

    def subscribe_events(self, fn: Subscriber) -> Callable[[], None]:
        return self.events.subscribe(fn)


@dataclass
class Result:
    replicas: int
    scrapes: int
    p50_ms: float
    p99_ms: float
    bytes: int
    cycle_cpu_ms: float  # ours: CPU per sampling cycle; baseline: CPU per scrape
    served_cycle_cpu_ms: float = 0.0  # ours, while scraped: sampling + pre-rendering


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Pace:
    duration_s: float
    interval_s: float
    least: int


def _scrape(port: int, pace: Pace) -> tuple[list[float], int]:
    args = [str(port), str(pace.duration_s), str(pace.interval_s), str(pace.least)]
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, *args, PROMETHEUS_ACCEPT],
        capture_output=True,
        text=True,
        check=True,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data["lat"], data["bytes"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _cycle_cpu(sample: Callable[[], Any], cycles: int) -> float:
    """Whole-process CPU time per back-to-back cycle (sampling threads and the loop)."""
    cpu0 = time.process_time()
    for _ in range(cycles):
        await sample()
    return (time.process_time() - cpu0) / cycles


async def bench_ours(
    procs: list[psutil.Process], pace: Pace, cycles: int, nvml_capture: str | None
) -> Result:
    reader = BenchReader(procs)
    gpu: Any = None
    if nvml_capture:
        from connector.resources.nvml import FakeGpuBackend

        # The capture's GPU process becomes the first replica's, so attribution runs too.
        captured = json.loads(Path(nvml_capture).read_text())["devices"][0]["compute_procs"]
        gpu = FakeGpuBackend(nvml_capture, pid_map={p["pid"]: procs[0].pid for p in captured})
    exporter = build_exporter(reader, gpu_backend=gpu, interval_s=1.0)
    await exporter.sample_once()
    await exporter.sample_once()
    cycle_cpu = await _cycle_cpu(exporter.sample_once, cycles)
    snapshot = exporter.latest_snapshot()
    assert snapshot is not None and len(snapshot.replicas) == len(procs), "not all sampled"

    app = web.Application()
    app.router.add_get("/metrics", exporter.handle_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await exporter.start()  # the sampler keeps running at 1 s while we are scraped
    try:
        lat, size = await asyncio.to_thread(_scrape, port, pace)
    finally:
        await exporter.stop()
        await runner.cleanup()
    # Now that a scraper asked for OpenMetrics, each cycle also pre-renders it.
    served_cpu = await _cycle_cpu(exporter.sample_once, cycles)
    return Result(
        len(procs), len(lat), _pct(lat, 0.5) * 1e3, _pct(lat, 0.99) * 1e3, size,
        cycle_cpu * 1e3, served_cpu * 1e3,
    )  # fmt: skip


def bench_process_exporter(binary: str, n: int, pace: Pace) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "process-exporter.yml"
        # One group per replica, named by the replica's ordinal in its command line.
        config.write_text(
            'process_names:\n  - name: "r{{.Matches.r}}"\n'
            "    cmdline:\n    - 'sleep 6000\\.(?P<r>\\d+)'\n"
        )
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "-config.path", str(config), "-web.listen-address", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("process-exporter did not listen within 10 s") from None
                    time.sleep(0.05)
            _scrape(port, Pace(0.0, 0.0, 2))
            cpu0 = _cpu_seconds(proc.pid)
            lat, size = _scrape(port, pace)
            per_scrape = (_cpu_seconds(proc.pid) - cpu0) / (len(lat) + 3)
        finally:
            proc.kill()
            proc.wait()
    p50, p99 = _pct(lat, 0.5) * 1e3, _pct(lat, 0.99) * 1e3
    return Result(n, len(lat), p50, p99, size, per_scrape * 1e3)


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope (per replica)."""
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _spawn(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", f"6000.{i}"]) for i in range(n)]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


async def main_async(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    binary = shutil.which("prometheus-process-exporter")
    if binary is None and not args.no_baseline:
        print(
            "prometheus-process-exporter is not installed (apt-get install "
            "prometheus-process-exporter); running without the baseline",
            file=sys.stderr,
        )
    ours: list[Result] = []
    base: list[Result] = []
    for n in sizes:
        children = _spawn(n)
        try:
            procs = [psutil.Process(c.pid) for c in children]
            pace = Pace(args.seconds, args.pace_ms / 1e3, args.min_scrapes)
            ours.append(await bench_ours(procs, pace, args.cycles, args.nvml_fake))
            if binary and not args.no_baseline:
                base.append(bench_process_exporter(binary, n, pace))
        finally:
            for c in children:
                c.kill()
            for c in children:
                c.wait()

    print(
        f"cpu: {os.cpu_count()} cores; scraping for {args.seconds} s every {args.pace_ms} ms "
        f"(at least {args.min_scrapes}) per size; our sampler at 1 s meanwhile"
    )
    header = f"{'replicas':>8} | {'ours p50':>9} {'p99':>8} {'cpu/cycle':>10} {'+render':>9} "
    header += f"{'bytes':>8}"
    if base:
        header += f" | {'p-e p50':>9} {'p99':>8} {'cpu/scrape':>10} {'bytes':>8}"
        header += f" | {'p99 ratio':>9} {'cpu ratio':>9}"
    print(header)
    print("-" * len(header))
    for i, r in enumerate(ours):
        line = (
            f"{r.replicas:>8} | {r.p50_ms:>7.2f}ms {r.p99_ms:>6.2f}ms {r.cycle_cpu_ms:>8.2f}ms "
            f"{r.served_cycle_cpu_ms:>7.2f}ms {r.bytes:>8}"
        )
        if base:
            b = base[i]
            line += (
                f" | {b.p50_ms:>7.2f}ms {b.p99_ms:>6.2f}ms {b.cycle_cpu_ms:>8.2f}ms {b.bytes:>8}"
                f" | {_ratio(r.p99_ms, b.p99_ms):>9} {_ratio(r.cycle_cpu_ms, b.cycle_cpu_ms):>9}"
            )
        print(line)
    print()
    print("per-replica slope (least squares over sizes):")
    print(
        f"  ours: scrape p50 {_slope([(r.replicas, r.p50_ms) for r in ours]) * 1e3:.1f} us, "
        f"collection cpu {_slope([(r.replicas, r.cycle_cpu_ms) for r in ours]) * 1e3:.1f} us, "
        "with pre-render "
        f"{_slope([(r.replicas, r.served_cycle_cpu_ms) for r in ours]) * 1e3:.1f} us"
    )
    if base:
        print(
            "  process-exporter: scrape p50 "
            f"{_slope([(r.replicas, r.p50_ms) for r in base]) * 1e3:.1f} us, cpu per scrape "
            f"{_slope([(r.replicas, r.cycle_cpu_ms) for r in base]) * 1e3:.1f} us"
        )
    failures: list[str] = []
    biggest = ours[-1]
    if biggest.replicas >= 512 and biggest.p99_ms > 25.0:
        failures.append(f"/metrics p99 {biggest.p99_ms:.1f} ms > 25 ms at {biggest.replicas}")
    for r, b in zip(ours, base, strict=False):
        if r.served_cycle_cpu_ms > b.cycle_cpu_ms:
            failures.append(
                f"collection CPU {r.served_cycle_cpu_ms:.2f} ms/cycle > process-exporter "
                f"{b.cycle_cpu_ms:.2f} ms/scrape at {r.replicas} replicas"
            )
    print()
    print("targets: " + ("met" if not failures else "MISSED: " + "; ".join(failures)))
    return 1 if failures and args.strict else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exporter_bench", description=__doc__)
    parser.add_argument("--sizes", default="8,64,512", help="replica counts (comma-separated)")
    parser.add_argument("--seconds", type=float, default=5.0, help="scraping time per size")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="time between scrapes")
    parser.add_argument("--min-scrapes", type=int, default=30, help="scrapes at least")
    parser.add_argument("--cycles", type=int, default=20, help="sampling cycles timed per size")
    parser.add_argument("--no-baseline", action="store_true", help="skip process-exporter")
    parser.add_argument(
        "--nvml-fake",
        metavar="CAPTURE",
        help="also sample GPUs from an NVML capture (tests/fixtures/nvml/*.json)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
