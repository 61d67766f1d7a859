"""KEDA ScaledObjects run by ``dynamo-local up --scaledobject`` against a real Prometheus.

The graph holds a gauge replica (``tests/fixtures/policy_gauge.py``: ``demo_queue_depth``,
set by the test) and ``sleep`` components the policies drive. A real Prometheus finds the
gauge through ``/v1/prometheus/targets`` (http_sd) and the policies query it over
``/api/v1/query``, as KEDA's prometheus scaler does:

- WorkA (``sum(demo_queue_depth)``, 5 per replica, scale-up Pods 1 per 1 s, scale-down
  stabilization 5 s, cooldown 5 s): raising the gauge scales it from 0 up to 4 one replica
  at a time; a manual ``PUT .../replicas`` is overwritten at the next evaluation; lowering
  the gauge scales it down once the stabilization window has passed, and to 0 only once the
  cooldown has;
- WorkB (a broken query, fallback 2 replicas after 3 failures): stays at 1, never 0, while
  the failures count, then falls back to 2;
- WorkC (a query with no series, ``ignoreNullValues: "false"``, no fallback): stays at 2;
- with ``--dry-run``: the events say what would be done, the metrics carry the count, and
  nothing is scaled.

Short intervals (1 s polls, 1 s scrapes) keep it around half a minute per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.exporter_helpers import samples
from tests.servers import PrometheusFactory, PrometheusServer, free_port
from tests.test_cli import cli_env

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
GAUGE = ROOT / "tests" / "fixtures" / "policy_gauge.py"
GAUGE_QUERY = 'sum(demo_queue_depth{dynamo_component="Gauge"})'

GRAPH = """\
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {{name: policies}}
spec:
  services:
    Gauge:
      componentType: worker
      replicas: 1
      extraPodSpec: {{mainContainer: {{command: ["{{python}}", "{gauge}"]}}}}
      local:
        maxReplicas: 1
        ports: [{{name: system, env: DYN_SYSTEM_PORT}}]
        readiness: {{http: "http://127.0.0.1:{{port.system}}/metrics", timeoutSeconds: 30}}
        gracefulStopSeconds: 2
{sleepers}
"""
SLEEPER = """\
    {name}:
      componentType: worker
      replicas: {replicas}
      extraPodSpec: {{mainContainer: {{command: [sleep, "300"]}}}}
      local:
        maxReplicas: 4
        readiness: {{process: {{startupGraceSeconds: 0.1}}}}
        gracefulStopSeconds: 1
"""


def _scaled_object(
    name: str, target: str, prometheus: str, query: str, **spec: Any
) -> dict[str, Any]:
    metadata = {"serverAddress": prometheus, "query": query, "threshold": "5"}
    metadata.update(spec.pop("metadata", {}))
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "scaleTargetRef": {"name": target},
            "pollingInterval": 1,
            "minReplicaCount": 0,
            "maxReplicaCount": 4,
            **spec,
            "triggers": [{"type": "prometheus", "name": "queue", "metadata": metadata}],
        },
    }


def _work_a(prometheus: str) -> dict[str, Any]:
    behavior = {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 1}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 5,
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}],
        },
    }
    return _scaled_object(
        "work-a",
        "WorkA",
        prometheus,
        GAUGE_QUERY,
        cooldownPeriod=5,
        advanced={"horizontalPodAutoscalerConfig": {"behavior": behavior}},
    )


def _work_b(prometheus: str) -> dict[str, Any]:
    return _scaled_object(
        "work-b",
        "WorkB",
        prometheus,
        "sum(rate(demo_queue_depth[1m]",  # unclosed: Prometheus answers 400
        cooldownPeriod=1,
        maxReplicaCount=3,
        fallback={"failureThreshold": 3, "replicas": 2},
    )


def _work_c(prometheus: str) -> dict[str, Any]:
    return _scaled_object(
        "work-c",
        "WorkC",
        prometheus,
        "sum(no_such_series_anywhere)",
        cooldownPeriod=1,
        metadata={"ignoreNullValues": "false"},
    )


@dataclass
class Up:
    proc: asyncio.subprocess.Process
    url: str
    http: aiohttp.ClientSession
    lines: list[str] = field(default_factory=list)

    async def get(self, path: str) -> Any:
        async with self.http.get(self.url + path) as resp:
            assert resp.status == 200, (path, resp.status, await resp.text())
            return await resp.json()

    async def target(self, component: str) -> int:
        body = await self.get(f"/v1/components/{component}/replicas")
        desired: int = body["desired"]
        return desired

    async def events(self, kind: str, component: str | None = None) -> list[dict[str, Any]]:
        body = await self.get("/v1/events")
        return [
            e
            for e in body["events"]
            if e["kind"] == kind and (component is None or e.get("component") == component)
        ]

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(self.url + "/metrics") as resp:
            return samples(await resp.text())


def http_sd_prometheus(factory: PrometheusFactory, port: int) -> PrometheusServer:
    """A real Prometheus scraping every target the connector on ``port`` lists at
    ``/v1/prometheus/targets`` (http_sd), every second."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "dynamo-local",
                "http_sd_configs": [
                    {
                        "url": f"http://127.0.0.1:{port}/v1/prometheus/targets",
                        "refresh_interval": "1s",
                    }
                ],
            }
        ],
    }
    return factory([], config_text=yaml.safe_dump(config))


@contextlib.asynccontextmanager
async def up_running(
    tmp_path: Path, port: int, scaled_objects: list[dict[str, Any]], *extra: str
) -> AsyncIterator[Up]:
    sleepers = "".join(
        SLEEPER.format(name=n, replicas=r) for n, r in (("WorkA", 0), ("WorkB", 1), ("WorkC", 2))
    )
    graph = tmp_path / "graph.yaml"
    graph.write_text(GRAPH.format(gauge=GAUGE, sleepers=sleepers))
    flags: list[str] = []
    for so in scaled_objects:
        path = tmp_path / f"{so['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(so))
        flags += ["--scaledobject", str(path)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "up",
        str(graph),
        "--port",
        str(port),
        "--working-dir",
        str(tmp_path / "wd"),
        "--discovery",
        "none",
        "--gpu-backend",
        "none",
        "--log-level",
        "warning",
        *flags,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    while not lines or not lines[-1].strip().startswith("Ctrl-C"):
        raw = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not raw:
            err = (await proc.stderr.read()).decode()
            raise AssertionError(f"up exited early: {lines} {err}")
        lines.append(raw.decode().rstrip("\n"))
    async with aiohttp.ClientSession() as http:
        up = Up(proc, f"http://127.0.0.1:{port}", http, lines)
        try:
            yield up
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(proc.wait(), 60)
    assert code == 0


async def _until(what: str, predicate: Any, limit_s: float = 30.0) -> float:
    """Poll the async ``predicate`` until true; the monotonic time it became true."""
    deadline = time.monotonic() + limit_s
    while True:
        if await predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit_s} s")
        await asyncio.sleep(0.1)


async def _moved(
    up: Up, component: str, before: int, after: int, since: int = 0
) -> list[dict[str, Any]]:
    """The component's ``autoscale`` events after seq ``since``, once one records
    ``before -> after`` (the target changes a moment before the driver records it)."""

    async def recorded() -> bool:
        return any(
            (e.get("from_replicas"), e.get("to_replicas")) == (before, after)
            for e in await up.events("autoscale", component)
            if e["seq"] > since
        )

    await _until(f"{component} {before} -> {after} is recorded", recorded, 10.0)
    return [e for e in await up.events("autoscale", component) if e["seq"] > since]


def _decisions(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scale decisions only (not a trigger's failure or recovery, which a slow query on a
    loaded machine may add)."""
    return [e for e in events if e.get("to_replicas") is not None]


async def _gauge(up: Up, prom: PrometheusServer) -> str:
    """The gauge's URL, once Prometheus has scraped it (its value 0)."""
    await _until("the gauge is ready", lambda: _ready(up, "Gauge"))
    groups = await up.get("/v1/prometheus/targets")
    (group,) = [g for g in groups if g["labels"].get("dynamo_component") == "Gauge"]
    await prom.wait_for(GAUGE_QUERY, timeout=30)
    return f"http://{group['targets'][0]}"


async def _ready(up: Up, component: str) -> bool:
    body = await up.get(f"/v1/components/{component}/replicas")
    return bool(body["ready"] >= 1)


async def _set(up: Up, gauge: str, value: float) -> float:
    async with up.http.post(f"{gauge}/set", params={"value": str(value)}) as resp:
        assert resp.status == 200
    return time.monotonic()


class Timeline:
    """Every component target seen, sampled every 0.1 s in the background."""

    def __init__(self, up: Up, components: tuple[str, ...]) -> None:
        self.up = up
        self.components = components
        self.seen: dict[str, list[tuple[float, int]]] = {c: [] for c in components}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for c in self.components:
                with contextlib.suppress(aiohttp.ClientError, AssertionError):
                    self.seen[c].append((time.monotonic(), await self.up.target(c)))
            await asyncio.sleep(0.1)

    def __enter__(self) -> Timeline:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def values(self, component: str) -> list[int]:
        return [n for _, n in self.seen[component]]


@pytest.mark.timeout(240)
async def test_policies_drive_components_from_a_real_prometheus(
    tmp_path: Path, prometheus_server: PrometheusFactory
) -> None:
    port = free_port()
    prom = http_sd_prometheus(prometheus_server, port)
    objects = [_work_a(prom.url), _work_b(prom.url), _work_c(prom.url)]
    async with up_running(tmp_path, port, objects) as up:
        assert [line.split()[:2] for line in up.lines if "policy" in line.split()[:1]] == [
            ["policy", "work-a"],
            ["policy", "work-b"],
            ["policy", "work-c"],
        ]
        with Timeline(up, ("WorkA", "WorkB", "WorkC")) as timeline:
            gauge = await _gauge(up, prom)

            # WorkB: a broken query holds the count (never 0) until the fallback.
            async def at(component: str, n: int) -> bool:
                return await up.target(component) == n

            await _until("WorkB falls back to 2", lambda: at("WorkB", 2))
            await _moved(up, "WorkB", 1, 2)
            (fell_back,) = [n for n in timeline.values("WorkB") if n != 1][:1]
            assert fell_back == 2
            assert 0 not in timeline.values("WorkB")
            health = [e for e in await up.events("autoscale", "WorkB") if "trigger" in e["details"]]
            assert [(e["outcome"], e["details"]["failures"]) for e in health[:2]] == [
                ("failed", 1),
                ("failed", 4),
            ]
            assert health[0]["reason"].startswith(
                "WorkB: trigger queue query=sum(rate(demo_queue_depth[1m] failed (HTTP 400: "
                "bad_data: "
            )
            assert "fallback to 2 replicas" in health[1]["reason"]

            # WorkA: up from 0 to 4, one replica per period.
            await _set(up, gauge, 20)
            await _until("WorkA reaches 4", lambda: at("WorkA", 4))
            scale_ups = _decisions(await _moved(up, "WorkA", 3, 4))
            steps = [(e["from_replicas"], e["to_replicas"]) for e in scale_ups]
            assert steps == [(0, 1), (1, 2), (2, 3), (3, 4)], scale_ups
            assert scale_ups[0]["reason"].startswith(
                "WorkA 0 -> 1: activated: a trigger is above its activationThreshold; "
                f"trigger queue query={GAUGE_QUERY} value 20.0, target 5 per replica"
            )
            assert scale_ups[1]["reason"] == (
                f"WorkA 1 -> 2: trigger queue query={GAUGE_QUERY} value 20.0, target 5 per "
                "replica, ratio 4, active (above activationThreshold 0); scale-up policy Pods "
                "1 per 1 s"
            )

            # A manual scale is overwritten at the next evaluation.
            async with up.http.put(
                f"{up.url}/v1/components/WorkA/replicas", json={"replicas": 1}
            ) as resp:
                assert resp.status == 202
            (noticed,) = [
                e
                for e in await _moved(up, "WorkA", 4, 1)
                if "outside the policy" in (e.get("reason") or "")
            ]
            assert noticed["reason"] == (
                "WorkA was set to 1 outside the policy (it had set 4); ScaledObject 'work-a' "
                "drives WorkA and sets its count from its triggers again at each evaluation, "
                "as KEDA's HPA does after a manual scale"
            )
            await _until("WorkA is back at 4", lambda: at("WorkA", 4))
            back = _decisions(await _moved(up, "WorkA", 3, 4, since=noticed["seq"]))
            assert [(e["from_replicas"], e["to_replicas"]) for e in back] == [
                (1, 2),
                (2, 3),
                (3, 4),
            ], back

            # Down to 1 once the 5 s stabilization window has no higher recommendation: the
            # last 4 was recommended at most a poll before the new value was scraped.
            lowered = await _set(up, gauge, 5)
            down = await _until("WorkA scales down to 1", lambda: at("WorkA", 1))
            assert down - lowered >= 4.0
            assert 2 not in [n for t, n in timeline.seen["WorkA"] if t > lowered]

            # To 0 only once no trigger has been active for the 5 s cooldown.
            idle = await _set(up, gauge, 0)
            zero = await _until("WorkA scales to 0", lambda: at("WorkA", 0))
            assert zero - idle >= 4.0
            last = _decisions(await _moved(up, "WorkA", 1, 0))[-1]
            assert (last["from_replicas"], last["to_replicas"]) == (1, 0)
            assert last["reason"].startswith(
                "WorkA 1 -> 0: no trigger active for cooldownPeriod 5 s: to minReplicaCount; "
            )

            # WorkC: a query with no series (ignoreNullValues false) is no zero: it stays.
            assert set(timeline.values("WorkC")) == {2}
            assert await up.target("WorkC") == 2

        def series(name: str, so: str, component: str, trigger: str | None = "queue") -> str:
            labels = f'dynamo_component="{component}",dynamo_namespace="policies",'
            labels += f'scaled_object="{so}"'
            if trigger is not None:
                labels += f',trigger="{trigger}"'
            return f"dynamo_local_autoscaler_{name}{{{labels}}}"

        # The exporter samples once a second: wait for a snapshot after the last scale.
        a_desired = series("desired_replicas", "work-a", "WorkA", None)

        async def settled() -> bool:
            return (await up.metrics()).get(a_desired) == 0

        await _until("the exporter shows WorkA's last evaluation", settled, 10.0)
        metrics = await up.metrics()
        assert metrics[series("metric_value", "work-a", "WorkA")] == 0
        assert metrics[series("active", "work-a", "WorkA")] == 0
        assert metrics[series("desired_replicas", "work-a", "WorkA", None)] == 0
        assert metrics[series("errors_total", "work-a", "WorkA")] == 0
        assert metrics[series("errors_total", "work-b", "WorkB")] >= 4
        assert metrics[series("errors_total", "work-c", "WorkC")] >= 4
        assert series("metric_value", "work-c", "WorkC") not in metrics  # never a 0
        assert metrics[series("desired_replicas", "work-c", "WorkC", None)] == 2
        scale_sources = {e["source"] for e in await up.events("scale") if e["component"] != "Gauge"}
        assert scale_sources >= {"policy", "api"}


@pytest.mark.timeout(180)
async def test_a_dry_run_records_what_it_would_do_and_scales_nothing(
    tmp_path: Path, prometheus_server: PrometheusFactory
) -> None:
    port = free_port()
    prom = http_sd_prometheus(prometheus_server, port)
    async with up_running(tmp_path, port, [_work_a(prom.url)], "--dry-run") as up:
        assert any(
            line.strip().startswith("policy       work-a") and "dry run" in line
            for line in up.lines
        )
        gauge = await _gauge(up, prom)
        await _set(up, gauge, 20)

        async def would_scale() -> bool:
            return bool(_decisions(await up.events("autoscale", "WorkA")))

        await _until("a dry-run decision is recorded", would_scale)
        await asyncio.sleep(3)  # several more evaluations
        # Recorded once, not at every evaluation.
        (event,) = _decisions(await up.events("autoscale", "WorkA"))
        assert (event["from_replicas"], event["to_replicas"]) == (0, 1)
        assert event["reason"].startswith("dry run: WorkA 0 -> 1: activated")
        assert event["details"]["dry_run"] is True
        assert "outcome" not in event
        assert await up.target("WorkA") == 0
        assert not await up.events("scale", "WorkA")
        metrics = await up.metrics()
        labels = 'dynamo_component="WorkA",dynamo_namespace="policies",scaled_object="work-a"'
        assert metrics[f"dynamo_local_autoscaler_desired_replicas{{{labels}}}"] == 1
        assert metrics[f'dynamo_local_autoscaler_metric_value{{{labels},trigger="queue"}}'] == 20
        assert metrics[f'dynamo_local_autoscaler_active{{{labels},trigger="queue"}}'] == 1
