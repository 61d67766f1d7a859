"""Per-replica process-tree sums: exact numbers from a fake table, then real processes."""

from __future__ import annotations

import os

import psutil
import pytest

from exporter.process_tree import ProcessTreeSampler, PsutilProcessTable, ReplicaRoot
from tests.exporter_helpers import Clock, FakeProc, FakeProcessTable, spawn_tree


def _table() -> FakeProcessTable:
    # replica A: 100 -> 101 -> 102 ; replica B: 200 ; 300 is someone else's process.
    return FakeProcessTable(
        {
            1: FakeProc(0, 1.0, 0.0, 0),
            100: FakeProc(1, 10.0, 1.0, 1000, pss=600, uss=500, cpus=2),
            101: FakeProc(100, 11.0, 2.0, 2000, pss=1500, uss=1200),
            102: FakeProc(101, 12.0, 0.5, 4000, pss=3000, uss=2500),
            200: FakeProc(1, 20.0, 3.0, 8000, pss=None, uss=None, cpus=4),
            300: FakeProc(1, 30.0, 99.0, 99999),
        }
    )


ROOTS = [ReplicaRoot("prefill", "0", 100, 10.0), ReplicaRoot("decode", "0", 200, None)]


def test_sums_cover_the_whole_tree_and_nothing_else() -> None:
    table = _table()
    sampler = ProcessTreeSampler(table, clock=Clock(0.0))
    a, b = sampler.sample(ROOTS)
    assert (a.component, a.replica, a.pid, a.pids) == ("prefill", "0", 100, (100, 101, 102))
    assert a.cpu_seconds_total == 3.5
    assert a.memory_rss_bytes == 7000
    assert (a.memory_pss_bytes, a.memory_uss_bytes) == (5100, 4200)
    assert a.cpu_utilization_ratio is None  # first sample: no delta yet
    assert a.command == "python -m worker"
    assert (b.pids, b.cpu_seconds_total, b.memory_rss_bytes) == ((200,), 3.0, 8000)
    assert (b.memory_pss_bytes, b.memory_uss_bytes) == (None, None)  # unavailable: omitted


def test_utilization_is_the_cpu_delta_over_time_and_available_cpus() -> None:
    table, clock = _table(), Clock(0.0)
    sampler = ProcessTreeSampler(table, clock=clock)
    sampler.sample(ROOTS)
    clock.advance(2.0)
    table.bump(101, cpu_seconds=3.0)  # +1.0 s
    table.bump(102, cpu_seconds=1.5)  # +1.0 s
    table.bump(200, cpu_seconds=5.0)  # +2.0 s
    a, b = sampler.sample(ROOTS)
    assert a.cpu_seconds_total == 5.5
    assert a.cpu_utilization_ratio == pytest.approx(2.0 / 2.0 / 2)  # 2 cpu-s in 2 s on 2 CPUs
    assert b.cpu_utilization_ratio == pytest.approx(2.0 / 2.0 / 4)


def test_cpu_counter_never_goes_back_when_a_child_vanishes_unreaped() -> None:
    table, clock = _table(), Clock(0.0)
    sampler = ProcessTreeSampler(table, clock=clock)
    sampler.sample(ROOTS)
    del table.procs[102]  # exited and was reaped by someone outside the tree
    clock.advance(1.0)
    a, _ = sampler.sample(ROOTS)
    assert a.pids == (100, 101)
    assert a.cpu_seconds_total == 3.5
    assert a.cpu_utilization_ratio == 0.0


def test_recycled_or_dead_roots_are_left_out() -> None:
    table = _table()
    sampler = ProcessTreeSampler(table, clock=Clock(0.0))
    recycled = ReplicaRoot("prefill", "0", 100, 9.0)  # recorded start differs: another process
    gone = ReplicaRoot("prefill", "1", 4242, None)
    assert sampler.sample([recycled, gone]) == ()
    table.bump(200, zombie=True)
    assert sampler.sample([ROOTS[1]]) == ()


def test_pss_uss_are_reread_only_every_detail_interval() -> None:
    table, clock = _table(), Clock(0.0)
    sampler = ProcessTreeSampler(table, detail_interval_s=10.0, clock=clock)
    sampler.sample(ROOTS)
    assert table.detail_reads == 4
    table.bump(100, pss=700)
    clock.advance(5.0)
    (a, _) = sampler.sample(ROOTS)
    assert table.detail_reads == 4
    assert a.memory_pss_bytes == 5100  # carried from the last detailed read
    clock.advance(5.0)
    (a, _) = sampler.sample(ROOTS)
    assert table.detail_reads == 8
    assert a.memory_pss_bytes == 5200


def test_real_tree_with_psutil() -> None:
    tree = spawn_tree(2)
    try:
        sampler = ProcessTreeSampler(PsutilProcessTable())
        root = ReplicaRoot("worker", "0", tree.pid, tree.create_time())
        (usage,) = sampler.sample([root])
        assert usage.pids[0] == tree.pid
        assert sorted(usage.pids[1:]) == tree.child_pids()
        expected_rss = sum(psutil.Process(p).memory_info().rss for p in usage.pids)
        assert usage.memory_rss_bytes == pytest.approx(expected_rss, rel=0.2)
        assert usage.command is not None and usage.command.startswith("sh -c sleep 600 &")
        if os.path.exists("/proc/self/smaps_rollup"):
            assert usage.memory_pss_bytes is not None and usage.memory_pss_bytes > 0
            assert usage.memory_uss_bytes is not None and usage.memory_uss_bytes > 0
        (again,) = sampler.sample([root])
        assert again.cpu_utilization_ratio is not None and 0.0 <= again.cpu_utilization_ratio <= 1
    finally:
        tree.kill()
    assert sampler.sample([root]) == ()
