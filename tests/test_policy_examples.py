"""The policy examples: ``examples/dynamo-no-planner.yaml`` is the demo graph
(``examples/dynamo.yaml``) without its Planner and nothing else, and
``examples/scaledobject-decode.yaml`` drives its Decode service, while the demo with its
Planner refuses it (one driver per component). ``tests/test_experiment_e2e.py`` runs the two
together on the real Dynamo; this keeps them in step without running anything.

Also how a policy's decision reads in a timeline cell (the experiment's timeline.csv and the
report's hover text): with the reason that says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.errors import ScaledObjectError
from connector.experiment.timeline import describe_event
from connector.graph.loader import load_graph
from connector.policy.binding import bind
from connector.policy.scaledobject import load_scaled_object

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO = EXAMPLES / "dynamo.yaml"
NO_PLANNER = EXAMPLES / "dynamo-no-planner.yaml"
DECODE_SO = EXAMPLES / "scaledobject-decode.yaml"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_the_planner_less_demo_is_the_demo_without_its_planner() -> None:
    demo, no_planner = _yaml(DEMO), _yaml(NO_PLANNER)
    planner = demo["spec"]["services"].pop("Planner")
    assert planner["componentType"] == "planner"
    assert no_planner == demo
    assert list(load_graph(NO_PLANNER).services) == ["Frontend", "Prefill", "Decode"]


def test_the_example_scaledobject_drives_decode_of_the_planner_less_demo() -> None:
    so = load_scaled_object(DECODE_SO)
    assert so.warnings == ()
    (bound,) = bind(load_graph(NO_PLANNER), [so])
    assert (bound.scaled_object.name, bound.component) == ("dynamo-demo-decode", "Decode")
    (trigger,) = so.triggers
    assert trigger.query == 'sum(dynamo_frontend_inflight_requests{model="tiny-llama"})'
    assert (trigger.threshold, so.min_replicas, so.max_replicas) == (4.0, 1, 4)


def test_the_demo_with_its_planner_refuses_the_example_scaledobject() -> None:
    so = load_scaled_object(DECODE_SO, display="scaledobject-decode.yaml")
    with pytest.raises(ScaledObjectError) as caught:
        bind(load_graph(DEMO), [so], "the Planner executor")
    assert str(caught.value) == (
        "scaledobject-decode.yaml: spec.scaleTargetRef.name: Decode is also scaled by the "
        "Planner executor; one driver per component: drop ScaledObject 'dynamo-demo-decode' "
        "or the Planner"
    )


def test_a_policy_decision_in_a_timeline_cell_says_why() -> None:
    reason = (
        'Decode 1 -> 2: trigger inflight query=sum(dynamo_frontend_inflight_requests{model="m"})'
        " value 8.0, target 4 per replica, ratio 2, active (above activationThreshold 0)"
    )
    event = {
        "kind": "autoscale",
        "component": "Decode",
        "source": "policy",
        "from_replicas": 1,
        "to_replicas": 2,
        "outcome": "ok",
        "reason": reason,
    }
    assert describe_event(event) == f"autoscale Decode 1→2 (policy) ok — {reason}"
    failing = {
        "kind": "autoscale",
        "component": "Decode",
        "source": "policy",
        "outcome": "failed",
        "reason": "Decode: trigger inflight query=up failed (HTTP 400: bad_data: parse error)",
    }
    assert describe_event(failing) == (
        "autoscale Decode (policy) failed — Decode: trigger inflight query=up failed "
        "(HTTP 400: bad_data: parse error)"
    )
