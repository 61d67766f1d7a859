"""The sampler: snapshots, optional sources, per-source health, and event counters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from exporter.process_tree import ProcessTreeSampler
from exporter.service import Exporter, build_exporter
from exporter.sources import SourceFormatError, parse_machine_view
from tests.exporter_helpers import (
    Clock,
    FakeProc,
    FakeProcessTable,
    FakeReader,
    component,
    key,
    replica,
    samples,
    series_with,
    view_of,
)


def _setup(**kw: Any) -> tuple[FakeReader, FakeProcessTable, Clock, Exporter]:
    table = FakeProcessTable(
        {
            100: FakeProc(1, 10.0, 4.0, 5000, cpus=2),
            101: FakeProc(100, 11.0, 1.0, 1000),
            200: FakeProc(1, 20.0, 2.0, 3000, cpus=2),
        }
    )
    reader = FakeReader(
        view_of(
            (component("decode", desired=2),),
            (
                replica("decode", 0, 100, create_time=10.0),
                replica("decode", 1, 200, create_time=20.0),
            ),
            taken_at=1.0,
        )
    )
    clock = Clock()
    exporter = build_exporter(
        reader, processes=ProcessTreeSampler(table, clock=clock), clock=clock, **kw
    )
    return reader, table, clock, exporter


def _text(exporter: Exporter) -> str:
    return generate_latest(exporter.registry).decode()


async def test_snapshot_sums_trees_and_usage_dict_matches_the_exposition() -> None:
    _, table, clock, exporter = _setup()
    await exporter.sample_once()
    clock.advance(1.0)
    table.bump(101, cpu_seconds=2.0)  # +1 cpu-second in 1 s on 2 CPUs
    snap = await exporter.sample_once()
    assert snap.seq == 2
    text = _text(exporter)
    decode0 = 'dynamo_component="decode",dynamo_namespace="demo",replica="0"'
    values = samples(text)
    assert values[f"dynamo_local_replica_cpu_seconds_total{{{decode0}}}"] == 6.0
    assert values[f"dynamo_local_replica_cpu_utilization_ratio{{{decode0}}}"] == 0.5
    assert values[f"dynamo_local_replica_memory_rss_bytes{{{decode0}}}"] == 6000.0
    assert values[f"dynamo_local_replica_processes{{{decode0}}}"] == 2.0
    usage = exporter.component_metrics("decode")
    assert usage["component"] == "decode" and usage["namespace"] == "demo"
    r0 = usage["replicas"][0]
    assert (r0["replica"], r0["pid"], r0["processes"]) == ("0", 100, 2)
    assert (r0["cpu_seconds_total"], r0["cpu_utilization_ratio"]) == (6.0, 0.5)
    assert r0["memory_rss_bytes"] == 6000
    assert "memory_pss_bytes" not in r0  # unavailable: left out
    assert usage["totals"] == {
        "replicas": 2,
        "sampled_replicas": 2,
        "processes": 3,
        "cpu_seconds_total": 8.0,
        "memory_rss_bytes": 9000,
    }
    assert usage["snapshot_time"] == clock.now and usage["snapshot_age_s"] == 0.0
    assert exporter.component_metrics("unknown")["replicas"] == []


async def test_dead_replica_series_vanish_at_the_next_snapshot() -> None:
    _, table, _, exporter = _setup()
    await exporter.sample_once()
    assert series_with(_text(exporter), "replica_cpu_seconds_total", 'replica="1"')
    del table.procs[200]
    await exporter.sample_once()
    text = _text(exporter)
    assert not series_with(text, "replica_cpu_seconds_total", 'replica="1"')
    assert not series_with(text, "replica_info", 'replica="1"')
    assert series_with(text, "replica_cpu_seconds_total", 'replica="0"')


async def test_scrapes_never_sample() -> None:
    reader, table, clock, exporter = _setup()
    await exporter.sample_once()
    calls, view_calls = table.calls, reader.view_calls
    clock.advance(3.5)
    for _ in range(5):
        text = _text(exporter)
    assert table.calls == calls
    assert reader.view_calls == view_calls
    assert samples(text)["dynamo_local_exporter_snapshot_age_seconds"] == 3.5


async def test_optional_sources_are_parsed_and_published() -> None:
    machine = {
        "gpus": [
            {"uuid": "GPU-b", "owners": []},
            {"uuid": "GPU-a", "owners": ["decode/0"]},
            {"uuid": "GPU-c", "state": "leaked"},
        ],
        "cpu": {"allocatable_cores": 16, "reserved_cores": 2.5},
        "memory": {"allocatable_bytes": 1 << 30, "reserved_bytes": 1 << 20},
    }

    async def queue() -> dict[str, Any]:
        return {"status": "ok", "pending": 7, "ack_pending": 2, "enqueue_rate": 1.5}

    discovery = {"instances": {"decode": 2, "prefill": 0}, "stale_reaped_total": 3}
    _, _, _, exporter = _setup(
        machine_view=lambda: machine, queue_reader=queue, discovery_stats=lambda: discovery
    )
    await exporter.sample_once()
    values = samples(_text(exporter))
    assert values["dynamo_local_gpus_allocatable"] == 3
    assert values["dynamo_local_gpus_free"] == 1
    assert values["dynamo_local_cpu_reserved_cores"] == 2.5
    assert values["dynamo_local_memory_allocatable_bytes"] == 1 << 30
    assert values['dynamo_local_gpu_allocation_state{gpu="GPU-a",state="allocated"}'] == 1
    assert values['dynamo_local_gpu_allocation_state{gpu="GPU-c",state="leaked"}'] == 1
    assert values['dynamo_local_gpu_allocation_state{gpu="GPU-c",state="free"}'] == 0
    assert values['dynamo_local_prefill_queue_pending_messages{dynamo_namespace="demo"}'] == 7
    assert values['dynamo_local_prefill_queue_enqueued_per_second{dynamo_namespace="demo"}'] == 1.5
    assert not series_with(_text(exporter), "prefill_queue_dequeued")  # not given: omitted
    assert (
        values[
            'dynamo_local_discovery_instances{dynamo_component="decode",dynamo_namespace="demo"}'
        ]
        == 2
    )
    assert values['dynamo_local_discovery_stale_reaped_total{dynamo_namespace="demo"}'] == 3
    for source in ("processes", "resources", "prefill_queue", "discovery"):
        assert values[f'dynamo_local_exporter_source_up{{source="{source}"}}'] == 1
        assert values[f'dynamo_local_exporter_source_errors_total{{source="{source}"}}'] == 0
    assert not series_with(_text(exporter), 'source="nvml"')  # no GPU backend given


async def test_failing_sources_are_isolated_and_reported() -> None:
    async def nats_down() -> dict[str, Any]:
        return {"status": "unavailable", "reason": "nats: no servers available for connection"}

    async def hangs() -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    _, _, clock, exporter = _setup(
        queue_reader=nats_down,
        discovery_stats=hangs,
        machine_view=lambda: {"gpus": [{"state": "free"}]},
        source_timeout_s=0.05,
    )
    await exporter.sample_once()
    await exporter.sample_once()
    snap = exporter.latest_snapshot()
    assert snap is not None and snap.queue is None and snap.discovery is None
    health = {h.source: h for h in snap.health}
    assert health["prefill_queue"].last_error == (
        "SourceUnavailable: prefill queue is unavailable: nats: no servers available for connection"
    )
    assert health["discovery"].last_error == "timed out after 0.05 s"
    assert (
        health["resources"].last_error == "SourceFormatError: machine view: gpus[0] has no 'uuid'"
    )
    values = samples(_text(exporter))
    for source in ("prefill_queue", "discovery", "resources"):
        assert values[f'dynamo_local_exporter_source_up{{source="{source}"}}'] == 0
        assert values[f'dynamo_local_exporter_source_errors_total{{source="{source}"}}'] == 2
        assert (
            f'dynamo_local_exporter_source_last_success_timestamp_seconds{{source="{source}"}}'
            not in values
        )
    assert values['dynamo_local_exporter_source_up{source="processes"}'] == 1
    assert (
        values['dynamo_local_exporter_source_last_success_timestamp_seconds{source="processes"}']
        == clock.now
    )
    assert series_with(_text(exporter), "replica_cpu_seconds_total")  # the rest still works


async def test_broken_connector_view_is_reported_as_processes_down() -> None:
    reader, _, _, exporter = _setup()
    await exporter.sample_once()
    reader.fail_with = RuntimeError("state lock poisoned")
    snap = await exporter.sample_once()
    (processes,) = [h for h in snap.health if h.source == "processes"]
    assert (processes.up, processes.errors_total) == (False, 1)
    assert processes.last_error == "RuntimeError: state lock poisoned"
    assert snap.replicas == ()


async def test_scale_events_count_with_direction_outcome_and_exemplar() -> None:
    reader, _, _, exporter = _setup()
    log = reader.events
    log.emit("scale", component="decode", source="planner", from_replicas=1, to_replicas=2)
    await exporter.start()  # replays the ring: the event above has no outcome, not counted
    try:
        log.emit(
            "scale", component="decode", source="planner", from_replicas=1, to_replicas=2,
            outcome="ok", duration_s=0.3, trace_id="0af7651916cd43dd8448eb211c80319c",
        )  # fmt: skip
        log.emit(
            "scale", component="decode", source="bogus", from_replicas=2, to_replicas=0,
            outcome="timeout", duration_s=42.0,
        )  # fmt: skip
        log.emit("crashloop", component="decode", replica="1")
        log.emit("weird-kind")
        values = samples(_text(exporter))
    finally:
        await exporter.stop()
    base = {"dynamo_namespace": "demo", "dynamo_component": "decode"}
    ops = "dynamo_local_scale_operations_total"
    up = {**base, "direction": "up", "outcome": "ok"}
    down = {**base, "direction": "down", "outcome": "timeout"}
    assert values[key(ops, **up, source="planner")] == 1
    assert values[key(ops, **down, source="other")] == 1
    bucket = "dynamo_local_scale_duration_seconds_bucket"
    assert values[key(bucket, **up, le="0.25")] == 0
    assert values[key(bucket, **up, le="0.5")] == 1
    assert values[key(bucket, **up, le="+Inf")] == 1
    assert values[key("dynamo_local_scale_duration_seconds_sum", **down)] == 42.0
    assert values[key("dynamo_local_crashloops_total", **base)] == 1
    events = "dynamo_local_events_total"
    assert values[key(events, dynamo_namespace="demo", kind="scale")] == 3
    assert values[key(events, dynamo_namespace="demo", kind="other")] == 1
    # Unsubscribed after stop: nothing more is counted.
    log.emit("crashloop", component="decode", replica="1")
    assert samples(_text(exporter))[key("dynamo_local_crashloops_total", **base)] == 1


async def test_start_runs_the_loop_and_stop_is_idempotent() -> None:
    _, _, _, exporter = _setup(interval_s=0.02)
    await exporter.start()
    first = exporter.latest_snapshot()
    assert first is not None and first.seq == 1
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while (exporter.latest_snapshot() or first).seq < 4:
            assert asyncio.get_running_loop().time() < deadline, "sampler did not run"
            await asyncio.sleep(0.01)
    finally:
        await exporter.stop()
    await exporter.stop()
    seq = exporter.latest_snapshot().seq  # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    assert exporter.latest_snapshot().seq == seq  # type: ignore[union-attr]


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sampling interval must be positive, got 0 s"):
        _setup(interval_s=0)


def test_the_machine_view_counts_lingering_replicas_and_names_a_wrong_shape() -> None:
    view = {"gpus": [], "lingering": [{"replica": "Decode/1", "pids": [7]}, {"replica": "P/2"}]}
    assert parse_machine_view(view).lingering_replicas == 2
    assert parse_machine_view({"gpus": []}).lingering_replicas is None  # not reported
    with pytest.raises(SourceFormatError) as info:
        parse_machine_view({"gpus": [], "lingering": {"Decode/1": [7]}})
    assert str(info.value) == "machine view: 'lingering' must be a list, got dict"
