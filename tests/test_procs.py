"""Process helpers read the process table from several threads at once (tree walks of
stops, group kills, the exporter's sampler): what each reads must be its own."""

from __future__ import annotations

import os

import psutil

from connector.supervision import procs


def test_process_table_shares_no_object_with_psutil_process_iter() -> None:
    """psutil.process_iter keeps one global map of Process objects and sets their ``info`` on
    every call, so two threads iterating at once read each other's attributes (psutil
    #1991); process_table must hand out objects and dicts of its own."""
    cached = {proc.pid: proc for proc in psutil.process_iter(["ppid"])}
    rows = {proc.pid: (proc, info) for proc, info in procs.process_table(["ppid", "status"])}
    common = cached.keys() & rows.keys()
    assert os.getpid() in common
    assert all(rows[pid][0] is not cached[pid] for pid in common)
    assert all(rows[pid][1] is not cached[pid].info for pid in common)
    assert all(set(info) == {"ppid", "status"} for _, info in rows.values())
    assert rows[os.getpid()][1]["ppid"] == os.getppid()
