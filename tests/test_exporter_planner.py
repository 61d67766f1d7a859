"""The Planner executor's status as an exporter source: parsing, rows, health, no series
without an executor."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from exporter.collector import snapshot_rows
from exporter.process_tree import ProcessTreeSampler
from exporter.service import Exporter, build_exporter
from exporter.sources import PlannerReading, SourceFormatError, parse_planner
from tests.exporter_helpers import (
    Clock,
    FakeProcessTable,
    FakeReader,
    component,
    samples,
    series_with,
    view_of,
)

P = "dynamo_local_"
SEEN_AT = 1_700_000_042.5


def _status(**changes: Any) -> dict[str, Any]:
    """What ``VirtualConnectorExecutor.status()`` returns while decision 7 is applied."""
    status: dict[str, Any] = {
        "namespace": "dyn",
        "prefix": "v1/dyn/planner/",
        "lease_id": 7587883,
        "decision_id": 7,
        "decision_seen_at": SEEN_AT,
        "acknowledged": 6,
        "applying": 7,
        "last_decision": {"decision_id": 7, "num_prefill_workers": 2, "num_decode_workers": 1},
    }
    status.update(changes)
    return status


# --------------------------------------------------------------------------- parsing


def test_the_status_is_read_into_a_typed_reading() -> None:
    assert parse_planner(_status()) == PlannerReading(
        namespace="dyn", decision_id=7, decision_seen_at=SEEN_AT, acknowledged_id=6
    )


def test_no_decision_and_none_acknowledged_are_absent_values() -> None:
    status = _status(decision_id=None, decision_seen_at=None, acknowledged=None)
    assert parse_planner(status) == PlannerReading("dyn", None, None, None)
    # Only the namespace is required.
    assert parse_planner({"namespace": "dyn"}) == PlannerReading("dyn", None, None, None)
    # A time without a decision is dropped with it.
    assert parse_planner({"namespace": "dyn", "decision_seen_at": SEEN_AT}) == PlannerReading(
        "dyn", None, None, None
    )


def test_an_empty_status_means_no_executor() -> None:
    assert parse_planner({}) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["dyn"], "Planner executor status must be a mapping, got list"),
        (_status(namespace=None), "Planner executor status: 'namespace' must be a non-empty "
         "string, got None"),
        (_status(namespace=""), "Planner executor status: 'namespace' must be a non-empty "
         "string, got ''"),
        (_status(decision_id="7"), "Planner executor status: 'decision_id' must be a number, "
         "got '7'"),
        (_status(decision_id=-1), "Planner executor status: 'decision_id' must be a "
         "non-negative integer, got -1.0"),
        (_status(decision_id=1.5), "Planner executor status: 'decision_id' must be a "
         "non-negative integer, got 1.5"),
        (_status(decision_id=True), "Planner executor status: 'decision_id' must be a number, "
         "got True"),
        (_status(acknowledged="6"), "Planner executor status: 'acknowledged' must be a "
         "number, got '6'"),
        (_status(decision_seen_at="now"), "Planner executor status: 'decision_seen_at' must "
         "be a number, got 'now'"),
        (_status(decision_seen_at=None), "Planner executor status: 'decision_seen_at' is "
         "missing for decision_id 7"),
    ],
)  # fmt: skip
def test_a_wrong_shape_names_the_key(value: Any, message: str) -> None:
    with pytest.raises(SourceFormatError) as info:
        parse_planner(value)
    assert str(info.value) == message


# --------------------------------------------------------------------------- exporter


def _exporter(planner_status: Any) -> Exporter:
    reader = FakeReader(view_of((component("decode", sub="decode"),), (), taken_at=1.0))
    clock = Clock()
    return build_exporter(
        reader,
        planner_status=planner_status,
        interval_s=3600.0,
        processes=ProcessTreeSampler(FakeProcessTable({}), clock=clock),
        clock=clock,
    )


def _text(exporter: Exporter) -> str:
    return generate_latest(exporter.registry).decode()


async def test_the_gauges_carry_the_executors_namespace_and_exact_values() -> None:
    exporter = _exporter(_status)
    snapshot = await exporter.sample_once()
    rows = {spec.name: r for spec, r in snapshot_rows(snapshot) if "planner" in spec.name}
    assert rows == {
        P + "planner_decision_id": [(("dyn",), 7.0)],
        P + "planner_decision_acknowledged_id": [(("dyn",), 6.0)],
        P + "planner_decision_seen_timestamp_seconds": [(("dyn",), SEEN_AT)],
    }
    values = samples(_text(exporter))
    assert values[P + 'planner_decision_id{dynamo_namespace="dyn"}'] == 7
    assert values[P + 'planner_decision_acknowledged_id{dynamo_namespace="dyn"}'] == 6
    assert values[P + 'planner_decision_seen_timestamp_seconds{dynamo_namespace="dyn"}'] == (
        SEEN_AT
    )
    assert values[P + 'exporter_source_up{source="planner"}'] == 1
    assert values[P + 'exporter_source_errors_total{source="planner"}'] == 0


async def test_a_decision_not_acknowledged_yet_has_no_acknowledged_series() -> None:
    exporter = _exporter(lambda: _status(decision_id=0, acknowledged=None))
    await exporter.sample_once()
    text = _text(exporter)
    assert samples(text)[P + 'planner_decision_id{dynamo_namespace="dyn"}'] == 0
    assert not series_with(text, "planner_decision_acknowledged_id")


async def test_no_executor_no_series_and_no_zeros() -> None:
    exporter = _exporter(dict)  # the connector's answer while no executor runs: {}
    await exporter.sample_once()
    text = _text(exporter)
    assert not series_with(text, "planner_decision")
    assert samples(text)[P + 'exporter_source_up{source="planner"}'] == 1
    # Not given at all: no series, and no health series for the source either.
    exporter = _exporter(None)
    await exporter.sample_once()
    text = _text(exporter)
    assert not series_with(text, "planner_decision")
    assert not series_with(text, 'source="planner"')


async def test_a_wrong_shape_is_a_failed_read_not_a_number() -> None:
    exporter = _exporter(lambda: _status(acknowledged=-3))
    snapshot = await exporter.sample_once()
    assert snapshot.planner is None
    (health,) = [h for h in snapshot.health if h.source == "planner"]
    assert (health.up, health.errors_total) == (False, 1)
    assert health.last_error == (
        "SourceFormatError: Planner executor status: 'acknowledged' must be a non-negative "
        "integer, got -3.0"
    )
    text = _text(exporter)
    assert not series_with(text, "planner_decision")
    assert samples(text)[P + 'exporter_source_up{source="planner"}'] == 0
