"""Persistence of desired/observed state and the namespace lock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from connector.errors import NamespaceLocked
from connector.state import ComponentRecord, ConnectorState, ReplicaRecord, StateStore


async def test_state_round_trips_exactly(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = ConnectorState(namespace="ns", graph_source="g.yaml")
    state.components["Decode"] = ComponentRecord(target=2, next_ordinal=3, restarts_total=1)
    state.replicas["ns.decode.1"] = ReplicaRecord(
        component="Decode",
        ordinal=1,
        watcher="ns.decode.1",
        phase="ready",
        pid=42,
        create_time=1.5,
        reservation={"gpus": ["GPU-1"], "ports": {"system": 20001}},
    )
    await store.save(state)
    loaded = store.load()
    assert loaded == state
    assert loaded is not None and loaded.replicas["ns.decode.1"].replica_id == "Decode/1"
    # The write is atomic: no temp file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


async def test_missing_state_is_none_and_wrong_version_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() is None
    (tmp_path / "state.json").write_text(json.dumps({"version": 99, "namespace": "x"}))
    with pytest.raises(ValueError, match="state version 99 is not 1"):
        store.load()


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    first.acquire()
    second = StateStore(tmp_path)
    with pytest.raises(NamespaceLocked) as err:
        second.acquire()
    assert err.value.details["holder_pid"] == str(os.getpid())
    first.release()
    second.acquire()  # free again once released
    second.release()
