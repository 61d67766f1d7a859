"""Golden exposition: the whole /metrics output, diffed against files in tests/golden/.

Two scenes, both with the NVML fake replaying real captures:

- ``fake``: a deterministic process table, fixed clock, every optional source and a few
  events; text and OpenMetrics (with exemplars). Only values no injection can pin (thread
  CPU time, read durations, event timestamps) are normalized.
- ``live``: real process trees (sleeping ``sh`` and ``sleep``) read through psutil, with the
  capture's PID rewritten to a child process of one replica; values that change from run
  to run (CPU, memory, pids) are normalized, everything else is exact.

Regenerate after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_exporter_golden.py``
and review the diff.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from exporter.exposition import Format
from exporter.process_tree import ProcessTreeSampler
from exporter.service import Exporter, build_exporter
from tests.exporter_helpers import (
    Clock,
    FakeProc,
    FakeProcessTable,
    FakeReader,
    component,
    gpu_backend,
    key,
    replica,
    samples,
    series_with,
    spawn_tree,
    view_of,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
H100 = "GPU-3916acbf-4032-fd78-3a4f-848162f95acf"
H200 = "GPU-ab37c448-7aae-b3a1-6cf5-679804eb2b53"
TRACE_UP = "0af7651916cd43dd8448eb211c80319c"
TRACE_DOWN = "4bf92f3577b34da6a3ce929d0e0e4736"

_LINE = re.compile(r"^(?P<series>(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*?\})?) (?P<rest>.*)$")
_EXEMPLAR_TS = re.compile(r"( # \{[^}]*\} \S+) \d+(\.\d+)?$")


def normalize(text: str, volatile: Iterable[str], replace: dict[str, str] | None = None) -> str:
    """Replace the values of ``volatile`` series (by sample name) with ``<v>``, exemplar
    timestamps with ``<t>``, and each ``replace`` key with its value."""
    volatile = set(volatile)
    out: list[str] = []
    for line in text.splitlines():
        for old, new in (replace or {}).items():
            line = line.replace(old, new)
        line = _EXEMPLAR_TS.sub(r"\1 <t>", line)
        m = _LINE.match(line)
        if m and not line.startswith("#") and m.group("name") in volatile:
            exemplar = m.group("rest").partition(" # ")[2]
            line = f"{m.group('series')} <v>" + (f" # {exemplar}" if exemplar else "")
        out.append(line)
    return "\n".join(out) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"golden/{name}",
                "live output",
            )
        )
        raise AssertionError(
            f"exposition differs from golden/{name} (UPDATE_GOLDEN=1 to accept):\n{diff}"
        )


P = "dynamo_local_"
ALWAYS_VOLATILE = (
    P + "exporter_source_collection_duration_seconds",
    P + "exporter_collection_cpu_seconds_total",
)


def _emit_events(reader: FakeReader) -> None:
    log = reader.events
    log.emit(
        "scale", component="decode", source="planner", from_replicas=1, to_replicas=2,
        outcome="ok", duration_s=0.42, trace_id=TRACE_UP,
    )  # fmt: skip
    log.emit(
        "scale", component="prefill", source="api", from_replicas=2, to_replicas=1,
        outcome="timeout", duration_s=31.0, trace_id=TRACE_DOWN,
    )  # fmt: skip
    log.emit("crashloop", component="prefill", replica="1")
    log.emit("decision", source="planner")


async def _fake_scene() -> tuple[Exporter, FakeReader]:
    # prefill/0: 100 -> 101 ; decode/0: 200 -> 201 (201 runs the CUDA work) ; decode/1: 300
    table = FakeProcessTable(
        {
            100: FakeProc(1, 10.0, 2.0, 100 << 20, pss=80 << 20, uss=60 << 20, cpus=8),
            101: FakeProc(100, 10.5, 1.0, 50 << 20, pss=40 << 20, uss=30 << 20),
            200: FakeProc(1, 20.0, 4.0, 200 << 20, pss=150 << 20, uss=120 << 20, cpus=8),
            201: FakeProc(200, 20.5, 8.0, 900 << 20, pss=850 << 20, uss=800 << 20),
            300: FakeProc(1, 30.0, 0.5, 10 << 20, pss=None, uss=None, cpus=8, command="sleep 9"),
        }
    )
    components = (
        component("frontend", role="frontend", desired=0, max_replicas=None),
        component("prefill", sub="prefill", desired=1, restarts=4, status="degraded"),
        component("decode", sub="decode", desired=2, ready=1, scale_in_flight=True),
    )
    replicas = (
        replica(
            "prefill",
            0,
            100,
            create_time=10.0,
            cpu_cores=2.0,
            memory_bytes=4 << 30,
            memory_limit_bytes=6 << 30,
        ),
        replica("decode", 0, 200, create_time=20.0, gpus=(H100,), restarts=1),
        replica("decode", 1, 300, create_time=30.0, state="starting"),
    )
    reader = FakeReader(view_of(components, replicas, taken_at=1.0))
    clock = Clock()

    async def queue() -> dict[str, Any]:
        return {
            "status": "ok", "pending": 12, "ack_pending": 3, "redelivered": 1, "consumers": 2,
            "stream_messages": 15, "stream_bytes": 30720, "enqueue_rate": 4.5,
            "dequeue_rate": 3.25, "oldest_pending_age_s": 1.5,
        }  # fmt: skip

    exporter = build_exporter(
        reader,
        gpu_backend=gpu_backend("h100_snapshot.json", {476: 201}),
        machine_view=lambda: {
            "gpus": [{"uuid": H100, "owners": ["decode/0"]}],
            "cpu": {"allocatable_cores": 16, "reserved_cores": 2},
            "memory": {"allocatable_bytes": 64 << 30, "reserved_bytes": 4 << 30},
            "lingering": [{"replica": "decode/1", "pids": [202]}],
        },
        queue_reader=queue,
        discovery_stats=lambda: {"instances": {"decode": 1, "prefill": 1}, "stale_reaped_total": 2},
        # Decision 5 seen 40 s before the snapshot, still being applied; 4 acknowledged.
        planner_status=lambda: {
            "namespace": "demo",
            "decision_id": 5,
            "decision_seen_at": clock.now - 40.0,
            "acknowledged": 4,
            "applying": 5,
        },
        interval_s=3600.0,
        processes=ProcessTreeSampler(table, clock=clock),
        clock=clock,
    )
    await exporter.start()
    clock.advance(2.0)
    table.bump(201, cpu_seconds=9.0)  # decode/0: 1 cpu-s in 2 s on 8 CPUs
    await exporter.sample_once()
    clock.advance(0.25)
    _emit_events(reader)
    return exporter, reader


async def test_golden_exposition_from_the_nvml_fake_and_a_fake_process_table() -> None:
    exporter, _ = await _fake_scene()
    try:
        text = exporter.exposition.render(Format.TEXT)
        om = exporter.exposition.render(Format.OPENMETRICS)
    finally:
        await exporter.stop()
    check_golden("exposition_fake.prom", normalize(text, ALWAYS_VOLATILE))
    check_golden("exposition_fake.openmetrics", normalize(om, ALWAYS_VOLATILE))
    values = samples(text)
    decode0 = {"dynamo_namespace": "demo", "dynamo_component": "decode", "replica": "0"}
    assert values[key(P + "replica_gpu_memory_used_bytes", **decode0, gpu=H100)] == 3282042880
    assert values[key(P + "replica_gpu_sm_utilization_ratio", **decode0, gpu=H100)] == 0.96
    assert values[key(P + "replica_cpu_utilization_ratio", **decode0)] == 1.0 / 2.0 / 8
    assert values[key(P + "gpu_memory_total_bytes", gpu=H100)] == 85520809984
    assert values[P + "exporter_snapshot_age_seconds"] == 0.25
    # The limit only where the service sets one: prefill/0, not decode/0 or decode/1.
    prefill0 = {"dynamo_namespace": "demo", "dynamo_component": "prefill", "replica": "0"}
    assert values[key(P + "replica_memory_limit_bytes", **prefill0)] == 6 << 30
    assert values[key(P + "replica_memory_reserved_bytes", **prefill0)] == 4 << 30
    assert list(series_with(text, P + "replica_memory_limit_bytes{")) == [
        key(P + "replica_memory_limit_bytes", **prefill0)
    ]
    assert values[key(P + "planner_decision_id", dynamo_namespace="demo")] == 5
    assert values[key(P + "planner_decision_acknowledged_id", dynamo_namespace="demo")] == 4
    seen = key(P + "planner_decision_seen_timestamp_seconds", dynamo_namespace="demo")
    assert values[seen] == values[P + "exporter_snapshot_timestamp_seconds"] - 40.0
    assert f'trace_id="{TRACE_UP}"' in om


async def test_golden_exposition_from_the_nvml_fake_and_real_processes() -> None:
    trees = [spawn_tree(2), spawn_tree(0), spawn_tree(1)]
    try:
        gpu_child = trees[0].child_pids()[0]
        replicas = (
            replica("prefill", 0, trees[0].pid, create_time=trees[0].create_time(), gpus=(H200,)),
            replica("decode", 0, trees[1].pid, create_time=trees[1].create_time()),
            replica("decode", 1, trees[2].pid, create_time=trees[2].create_time()),
        )
        components = (component("prefill", sub="prefill"), component("decode", desired=2))
        reader = FakeReader(view_of(components, replicas, taken_at=1.0))
        clock = Clock()
        exporter = build_exporter(
            reader,
            gpu_backend=gpu_backend("h200_snapshot.json", {418: gpu_child}),
            interval_s=3600.0,
            processes=ProcessTreeSampler(clock=clock),
            clock=clock,
        )
        await exporter.start()
        clock.advance(1.0)
        await exporter.sample_once()
        text = exporter.exposition.render(Format.TEXT)
        await exporter.stop()
    finally:
        for tree in trees:
            tree.kill()
    pids = {str(t.pid): f"PID{i}" for i, t in enumerate(trees)}
    volatile = (
        *ALWAYS_VOLATILE,
        P + "replica_cpu_seconds_total",
        P + "replica_cpu_utilization_ratio",
        P + "replica_memory_rss_bytes",
        P + "replica_memory_pss_bytes",
        P + "replica_memory_uss_bytes",
    )
    check_golden(
        "exposition_live.prom",
        normalize(text, volatile, {f'pid="{p}"': f'pid="{n}"' for p, n in pids.items()}),
    )
    prefill0 = {"dynamo_namespace": "demo", "dynamo_component": "prefill", "replica": "0"}
    values = samples(text)
    assert values[key(P + "replica_processes", **prefill0)] == 3
    # NVML saw the capture's process as a child of prefill/0: attributed to that replica.
    assert values[key(P + "replica_gpu_memory_used_bytes", **prefill0, gpu=H200)] == 3282042880
    assert values[key(P + "replica_gpu_sm_utilization_ratio", **prefill0, gpu=H200)] == 0.84
