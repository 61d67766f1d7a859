"""The policy driver over a real connector (circusd, ``sleep`` replicas), fed by a querier
the test controls: it scales with ``source="policy"``, says why in ``autoscale`` events,
overwrites a manual scale at its next evaluation, records without scaling in a dry run,
reports trigger failures and fallback, and publishes its status. Also the Prometheus client
against a small HTTP server (parameters, headers, errors, timeout), and ``up`` refusing a
ScaledObject on a component the Planner executor scales."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from connector.events import Event
from connector.local import LocalConnector
from connector.policy.binding import bind
from connector.policy.driver import PolicyDriver
from connector.policy.keda import Reading, Step
from connector.policy.prometheus import PrometheusClient
from connector.policy.scaledobject import ScaledObject, parse_scaled_object_text
from exporter.sources import (
    AutoscalerReading,
    ScaledObjectReading,
    TriggerReading,
    parse_autoscaler,
)
from tests.core_helpers import make_graph, running, svc
from tests.test_cli import cli

pytestmark = [pytest.mark.integration]

SO = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: work-scaler}}
spec:
  scaleTargetRef: {{name: Work}}
  pollingInterval: 1
  cooldownPeriod: 2
  minReplicaCount: 0
  maxReplicaCount: 4
{extra}
  triggers:
  - type: prometheus
    metadata:
      serverAddress: http://127.0.0.1:9
      query: sum(queue_depth)
      threshold: "5"
"""
SCALE_UP_ONE = """\
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleUp:
          policies: [{type: Pods, value: 1, periodSeconds: 15}]
"""


class Script:
    """A querier answering with the readings the test sets."""

    def __init__(self) -> None:
        self.reading = Reading(0.0)
        self.queries = 0

    async def query(self, trigger: Any) -> Reading:
        self.queries += 1
        return self.reading


def _so(extra: str = "") -> ScaledObject:
    return parse_scaled_object_text(SO.format(extra=extra), "work.yaml")


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[LocalConnector]:
    graph = make_graph(svc("Work", max_replicas=4), svc("Other", replicas=1))
    async with running(graph, tmp_path / "wd", max_replicas=64) as c:
        yield c


def _driver(conn: LocalConnector, so: ScaledObject, script: Script, **kw: Any) -> PolicyDriver:
    (bound,) = bind(conn.graph, [so])
    return PolicyDriver(conn, bound, script, **kw)


def _autoscale(conn: LocalConnector) -> list[Event]:
    return [e for e in conn.events.since(0) if e.kind == "autoscale"]


def _target(conn: LocalConnector) -> int:
    comp = conn.view().component("Work")
    assert comp is not None
    return comp.desired


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_it_scales_with_source_policy_and_says_why(conn: LocalConnector) -> None:
    script, clock = Script(), Clock()
    driver = _driver(conn, _so(SCALE_UP_ONE), script, clock=clock)
    script.reading = Reading(12.0)
    ev = await driver.evaluate_once()
    assert (ev.step, ev.current, ev.desired) == (Step.ACTIVATE, 0, 1)
    clock.now += 1
    ev = await driver.evaluate_once()
    assert (ev.step, ev.current, ev.desired) == (Step.HPA, 1, 2)
    assert _target(conn) == 2
    events = _autoscale(conn)
    assert [(e.from_replicas, e.to_replicas, e.outcome, e.source) for e in events] == [
        (0, 1, "ok", "policy"),
        (1, 2, "ok", "policy"),
    ]
    assert events[0].reason == (
        "Work 0 -> 1: activated: a trigger is above its activationThreshold; trigger 0 "
        "query=sum(queue_depth) value 12.0, target 5 per replica, active (above "
        "activationThreshold 0)"
    )
    assert events[1].reason == (
        "Work 1 -> 2: trigger 0 query=sum(queue_depth) value 12.0, target 5 per replica, "
        "ratio 2.4, active (above activationThreshold 0); scale-up policy Pods 1 per 15 s"
    )
    assert events[1].details["triggers"][0]["proposal"] == 3
    # The scale operation itself is recorded with the policy as its source.
    scales = [e for e in conn.events.since(0) if e.kind == "scale" and e.component == "Work"]
    assert {e.source for e in scales} == {"policy"}
    # The policy counts its own change against the Pods 1 per 15 s policy.
    clock.now += 1
    assert (await driver.evaluate_once()).desired == 2
    clock.now += 15
    assert (await driver.evaluate_once()).desired == 3


async def test_a_manual_scale_is_overwritten_at_the_next_evaluation(conn: LocalConnector) -> None:
    """As the HPA with a ``kubectl scale``: the policy owns the component; the next
    evaluation starts from the manual count and sets the count from the triggers again."""
    script, clock = Script(), Clock()
    driver = _driver(conn, _so(), script, clock=clock)
    script.reading = Reading(10.0)
    await driver.evaluate_once()  # 0 -> 1 (activation)
    clock.now += 1
    await driver.evaluate_once()  # 1 -> 2 (10 / 5 per replica)
    assert _target(conn) == 2
    await conn.scale_component("Work", 4, blocking=False, source="api")
    clock.now += 1
    ev = await driver.evaluate_once()
    assert (ev.current, ev.desired) == (4, 2)
    assert _target(conn) == 2
    noticed, back = _autoscale(conn)[-2:]
    assert (noticed.from_replicas, noticed.to_replicas, noticed.outcome) == (2, 4, None)
    assert noticed.reason == (
        "Work was set to 4 outside the policy (it had set 2); ScaledObject 'work-scaler' "
        "drives Work and sets its count from its triggers again at each evaluation, as KEDA's "
        "HPA does after a manual scale"
    )
    assert (back.from_replicas, back.to_replicas, back.outcome) == (4, 2, "ok")


async def test_a_dry_run_records_what_it_would_do_and_never_scales(
    conn: LocalConnector,
) -> None:
    script, clock = Script(), Clock()
    driver = _driver(conn, _so(), script, clock=clock, dry_run=True)
    script.reading = Reading(12.0)
    for _ in range(3):
        ev = await driver.evaluate_once()
        clock.now += 1
        assert (ev.current, ev.desired) == (0, 1)
    assert _target(conn) == 0
    (event,) = _autoscale(conn)  # the same decision is recorded once
    assert (event.from_replicas, event.to_replicas, event.outcome) == (0, 1, None)
    assert event.reason is not None and event.reason.startswith("dry run: Work 0 -> 1: ")
    assert event.details["dry_run"] is True
    assert driver.status()["desired_replicas"] == 1
    assert not [e for e in conn.events.since(0) if e.kind == "scale" and e.component == "Work"]


async def test_a_refused_scale_is_an_event_once_not_at_every_evaluation(
    tmp_path: Path,
) -> None:
    graph = make_graph(svc("Work", max_replicas=4), svc("Other", replicas=1))
    async with running(graph, tmp_path / "wd", max_replicas=2) as conn:
        script, clock = Script(), Clock()
        driver = _driver(conn, _so(), script, clock=clock)
        script.reading = Reading(1.0)
        await driver.evaluate_once()  # 0 -> 1
        script.reading = Reading(20.0)  # asks for 4; the machine's budget leaves 1
        for _ in range(3):
            clock.now += 1
            ev = await driver.evaluate_once()
        assert ev.desired == 4
        refused = [e for e in _autoscale(conn) if e.outcome == "refused"]
        assert len(refused) == 1
        assert refused[0].reason is not None and "replica budget of 2" in refused[0].reason
        assert _target(conn) == 1


async def test_failures_hold_then_fall_back_and_recovery_is_said(conn: LocalConnector) -> None:
    extra = "  fallback: {failureThreshold: 2, replicas: 3}\n"
    script, clock = Script(), Clock()
    driver = _driver(conn, _so(extra), script, clock=clock)
    script.reading = Reading(5.0)
    await driver.evaluate_once()  # 0 -> 1
    script.reading = Reading(None, "HTTP 400: bad_data: parse error")
    targets = []
    for _ in range(3):
        clock.now += 10  # well past the cooldown: a failure is still never zero demand
        await driver.evaluate_once()
        targets.append(_target(conn))
    assert targets == [1, 1, 3]
    assert driver.errors_total == [3]
    script.reading = Reading(5.0)
    clock.now += 1
    await driver.evaluate_once()
    health = [e for e in _autoscale(conn) if e.details.get("trigger") == "0"]
    assert [(e.outcome, e.details["failures"]) for e in health] == [
        ("failed", 1),
        ("failed", 3),
        ("ok", 0),
    ]
    assert health[0].reason == (
        "Work: trigger 0 query=sum(queue_depth) failed (HTTP 400: bad_data: parse error): it "
        "gives no metric, so the count does not go down for it and never to zero while it "
        "fails; fallback to 3 replicas once it has failed more than 2 times in a row"
    )
    assert health[1].reason == (
        "Work: trigger 0 query=sum(queue_depth) failed 3 times in a row, past "
        "failureThreshold 2: fallback to 3 replicas (HTTP 400: bad_data: parse error)"
    )
    assert health[2].reason == (
        "Work: trigger 0 query=sum(queue_depth) answers again (value 5.0) after 3 failed queries"
    )


async def test_the_status_is_what_the_exporter_reads(conn: LocalConnector) -> None:
    script = Script()
    driver = _driver(conn, _so(), script)
    status = driver.status()
    assert parse_autoscaler({"scaled_objects": [status]}) == AutoscalerReading(
        (ScaledObjectReading("work-scaler", "Work", None, (TriggerReading("0", None, None, 0),)),)
    )
    script.reading = Reading(None, "timeout")
    await driver.evaluate_once()
    status = driver.status()
    assert status["triggers"][0] | {"query": None} == {
        "trigger": "0",
        "query": None,
        "value": None,
        "active": False,
        "failures": 1,
        "fallback": False,
        "errors_total": 1,
        "last_error": "timeout",
    }
    assert parse_autoscaler({"scaled_objects": [status]}) == AutoscalerReading(
        (ScaledObjectReading("work-scaler", "Work", 0, (TriggerReading("0", None, False, 1),)),)
    )


async def test_the_connector_runs_the_policies_it_is_given(tmp_path: Path) -> None:
    """``ConnectorOptions.scaled_objects``: interop starts a driver per ScaledObject once
    the connector runs, and ``autoscaler_status`` reports it (``{}`` without policies)."""
    graph = make_graph(svc("Work", max_replicas=4))
    so = _so()
    async with running(graph, tmp_path / "wd", scaled_objects=(so,)) as conn:
        deadline = asyncio.get_running_loop().time() + 10
        while conn.autoscaler_status()["scaled_objects"][0]["evaluated_at"] is None:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        status = conn.autoscaler_status()
        assert status["dry_run"] is False
        (entry,) = status["scaled_objects"]
        # The server at 127.0.0.1:9 refuses: a failure, never a zero.
        assert entry["triggers"][0]["value"] is None
        assert entry["triggers"][0]["last_error"].startswith("ClientConnectorError")
    async with running(graph, tmp_path / "wd2") as conn:
        assert conn.autoscaler_status() == {}


# --------------------------------------------------------------------------- Prometheus client


async def test_the_client_sends_keda_s_parameters_and_reads_errors(tmp_path: Path) -> None:
    seen: list[tuple[dict[str, str], dict[str, str]]] = []

    async def query(request: web.Request) -> web.Response:
        seen.append(
            (dict(request.query), {"X-Scope-OrgID": request.headers.get("X-Scope-OrgID", "")})
        )
        q = request.query["query"]
        if q == "slow":
            await asyncio.sleep(2)
        if q == "bad(":
            return web.json_response(
                {"status": "error", "errorType": "bad_data", "error": "parse error at char 5"},
                status=400,
            )
        if q == "html":
            return web.Response(text="<html>proxy</html>")
        return web.json_response(
            {
                "status": "success",
                "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "7.5"]}]},
            }
        )

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    client = PrometheusClient(timeout_s=0.5)
    text = SO.format(extra="").replace("http://127.0.0.1:9", base)

    def trigger(query: str, **meta: str) -> Any:
        extra = "".join(f"\n      {k}: {v}" for k, v in meta.items())
        so = parse_scaled_object_text(
            text.replace("query: sum(queue_depth)", f"query: '{query}'{extra}"), "t.yaml"
        )
        return so.triggers[0]

    try:
        got = await client.query(
            trigger(
                "up",
                namespace="team-a",
                customHeaders="X-Scope-OrgID=t1",
                queryParameters="dedup=true",
            )
        )
        assert got == Reading(7.5)
        assert seen[-1] == (
            {"query": "up", "namespace": "team-a", "dedup": "true"},
            {"X-Scope-OrgID": "t1"},
        )
        assert await client.query(trigger("bad(")) == Reading(
            None, "HTTP 400: bad_data: parse error at char 5"
        )
        assert await client.query(trigger("html")) == Reading(
            None, "not Prometheus' JSON: <html>proxy</html>"
        )
        slow = await client.query(trigger("slow"))
        assert slow.value is None and slow.error is not None
        assert slow.error.startswith("no answer within 0.5 s from ")
    finally:
        await client.close()
        await runner.cleanup()


# --------------------------------------------------------------------------- up


PLANNED = """\
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {name: planned}
spec:
  services:
    Decode:
      componentType: worker
      subComponentType: decode
      replicas: 1
      extraPodSpec: {mainContainer: {command: [sleep, "60"]}}
    Planner:
      componentType: planner
      replicas: 1
      extraPodSpec: {mainContainer: {command: [sleep, "60"]}}
"""


async def test_up_refuses_a_scaledobject_on_a_planner_component_before_starting(
    tmp_path: Path,
) -> None:
    graph = tmp_path / "graph.yaml"
    graph.write_text(PLANNED)
    so = tmp_path / "so.yaml"
    so.write_text(SO.format(extra="").replace("{name: Work}", "{name: Decode}"))
    result = await cli(
        "up",
        str(graph),
        "--scaledobject",
        str(so),
        "--working-dir",
        str(tmp_path / "wd"),
        "--port",
        "0",
    )
    assert result.code == 1
    assert result.err.strip() == (
        f"dynamo-local: error: {so}: spec.scaleTargetRef.name: Decode is also scaled by the "
        "Planner executor (always on for the graph's Planner service Planner); one driver "
        "per component: drop ScaledObject 'work-scaler' or the Planner"
    )
    assert not (tmp_path / "wd").exists()  # nothing started, not even a private etcd
    result = await cli("up", str(graph), "--dry-run", "--port", "0")
    assert (result.code, result.err.strip()) == (
        2,
        "dynamo-local: error: --dry-run applies to the policies: give them with "
        "--scaledobject FILE",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(SO.format(extra="").replace("type: prometheus", "type: cpu"))
    result = await cli("up", str(graph), "--scaledobject", str(bad), "--port", "0")
    assert (result.code, result.err.strip()) == (
        1,
        f"dynamo-local: error: {bad}: spec.triggers[0].type: 'cpu' is not supported here "
        "(only prometheus)",
    )
