"""The event log's JSONL file: every event written once, in order, a burst in one write."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from connector.events import Event, EventLog


async def test_a_burst_of_events_is_appended_in_one_write_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    writes: list[int] = []
    real_write = log._write

    def counting(lines: list[str]) -> None:
        if lines:
            writes.append(len(lines))
        real_write(lines)

    monkeypatch.setattr(log, "_write", counting)
    for i in range(300):  # what a scale of 150 replicas emits (spawn + ready each)
        log.emit("spawn", component="Worker", replica=f"Worker/{i}", details={"pid": 1000 + i})
    await asyncio.sleep(0.3)
    assert writes == [300]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["replica"] for r in rows] == [f"Worker/{i}" for i in range(300)]
    assert rows[7] == {
        "seq": 8,
        "time": rows[7]["time"],
        "kind": "spawn",
        "component": "Worker",
        "replica": "Worker/7",
        "details": {"pid": 1007},
    }
    log.emit("ready", component="Worker", replica="Worker/0", duration_s=0.5)
    await log.aclose()  # what is pending is written before close returns
    assert json.loads(path.read_text().splitlines()[-1])["duration_s"] == 0.5


def test_to_dict_leaves_out_empty_fields_and_copies_details() -> None:
    details = {"pid": 5}
    event = Event(seq=1, time=2.0, kind="exit", component="A", details=details)
    out = event.to_dict()
    assert out == {"seq": 1, "time": 2.0, "kind": "exit", "component": "A", "details": {"pid": 5}}
    out["details"]["pid"] = 6
    assert details == {"pid": 5}
    bare = Event(seq=3, time=4.0, kind="scale")
    assert bare.to_dict() == {"seq": 3, "time": 4.0, "kind": "scale"}
