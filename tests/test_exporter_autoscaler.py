"""The ScaledObject policies' status as an exporter source: parsing, rows, health, and no
series while no policy runs."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from exporter.collector import snapshot_rows
from exporter.process_tree import ProcessTreeSampler
from exporter.service import Exporter, build_exporter
from exporter.sources import (
    AutoscalerReading,
    ScaledObjectReading,
    SourceFormatError,
    TriggerReading,
    parse_autoscaler,
)
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


def _status(**trigger: Any) -> dict[str, Any]:
    """What ``Policies.status()`` returns (keys the exporter does not read included)."""
    first = {
        "trigger": "queue",
        "query": "sum(q)",
        "value": 12.0,
        "active": True,
        "failures": 0,
        "fallback": False,
        "errors_total": 2,
        "last_error": None,
    }
    first.update(trigger)
    return {
        "dry_run": False,
        "scaled_objects": [
            {
                "scaled_object": "decode-scaler",
                "component": "decode",
                "file": "so.yaml",
                "dry_run": False,
                "polling_interval_s": 15,
                "evaluated_at": 1.0,
                "current_replicas": 1,
                "desired_replicas": 3,
                "step": "hpa",
                "triggers": [
                    first,
                    {"trigger": "1", "value": None, "active": False, "errors_total": 5},
                ],
            }
        ],
    }


def test_the_status_is_read_into_a_typed_reading() -> None:
    assert parse_autoscaler(_status()) == AutoscalerReading(
        (
            ScaledObjectReading(
                "decode-scaler",
                "decode",
                3,
                (TriggerReading("queue", 12.0, True, 2), TriggerReading("1", None, False, 5)),
            ),
        )
    )
    assert parse_autoscaler({}) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "autoscaler status must be a mapping, got list"),
        ({"scaled_objects": {}}, "autoscaler status: 'scaled_objects' must be a list, got dict"),
        (_status(trigger=""), "autoscaler status: scaled_objects[0]: triggers[0]: 'trigger' "
         "must be a non-empty string, got ''"),
        (_status(value="12"), "autoscaler status: scaled_objects[0]: triggers[0]: 'value' "
         "must be a number, got '12'"),
        (_status(active=1), "autoscaler status: scaled_objects[0]: triggers[0]: 'active' "
         "must be true, false or null, got 1"),
        (_status(errors_total=-1), "autoscaler status: scaled_objects[0]: triggers[0]: "
         "'errors_total' must be a non-negative integer, got -1.0"),
    ],
)  # fmt: skip
def test_a_wrong_shape_names_the_key(value: Any, message: str) -> None:
    with pytest.raises(SourceFormatError) as info:
        parse_autoscaler(value)
    assert str(info.value) == message


def _exporter(autoscaler_status: Any) -> Exporter:
    reader = FakeReader(view_of((component("decode", sub="decode"),), (), taken_at=1.0))
    clock = Clock()
    return build_exporter(
        reader,
        autoscaler_status=autoscaler_status,
        interval_s=3600.0,
        processes=ProcessTreeSampler(FakeProcessTable({}), clock=clock),
        clock=clock,
    )


async def test_the_series_carry_component_scaled_object_and_trigger() -> None:
    exporter = _exporter(_status)
    snapshot = await exporter.sample_once()
    rows = {spec.name: r for spec, r in snapshot_rows(snapshot) if "autoscaler" in spec.name}
    ns = rows[P + "autoscaler_desired_replicas"][0][0][0]
    base = (ns, "decode", "decode-scaler")
    assert rows == {
        P + "autoscaler_metric_value": [((*base, "queue"), 12.0)],
        P + "autoscaler_desired_replicas": [(base, 3.0)],
        P + "autoscaler_active": [((*base, "queue"), 1.0), ((*base, "1"), 0.0)],
        P + "autoscaler_errors_total": [((*base, "queue"), 2.0), ((*base, "1"), 5.0)],
    }
    text = generate_latest(exporter.registry).decode()
    values = samples(text)
    key = f'dynamo_component="decode",dynamo_namespace="{ns}",scaled_object="decode-scaler"'
    assert values[P + f'autoscaler_errors_total{{{key},trigger="1"}}'] == 5
    # A failed query has no value series: never a 0 that reads as no demand.
    assert not series_with(
        text,
        'autoscaler_metric_value{dynamo_component="decode",'
        f'dynamo_namespace="{ns}",scaled_object="decode-scaler",'
        'trigger="1"}',
    )
    assert values[P + 'exporter_source_up{source="autoscaler"}'] == 1


async def test_no_policy_no_series() -> None:
    exporter = _exporter(dict)
    await exporter.sample_once()
    text = generate_latest(exporter.registry).decode()
    assert not series_with(text, "autoscaler_")
    assert samples(text)[P + 'exporter_source_up{source="autoscaler"}'] == 1
    exporter = _exporter(None)
    await exporter.sample_once()
    text = generate_latest(exporter.registry).decode()
    assert not series_with(text, 'source="autoscaler"')
