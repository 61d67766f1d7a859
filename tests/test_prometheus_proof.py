"""Proof on a real Prometheus: every dashboard and rule query works against a running graph.

The demo graph (``examples/demo.yaml``, mock Dynamo workers) runs under ``dynamo-local up``
with the NVML fake replaying a real H100 capture (GPU metrics without a GPU), plus two
components: ``Crasher``, whose command exits at once, and ``Greedy``, which asks for the one
GPU (held by the capture's own process, so its scale-up is refused). The demo's Frontend
sets ``limits.memory: 1Gi`` (far above its RSS), so the per-replica memory limit series has
data. A real Prometheus
scrapes the connector and the mock Dynamo processes using the repository's own
``deploy/prometheus/prometheus.yml`` (the connector's address, static and as the service
discovery URL, rewritten to this run's loopback port) and loads the repository's rules.
Decode is scaled 2 -> 3, Greedy 0 -> 1 (refused) and Crasher 0 -> 1, so scale counters,
the duration histogram, restarts and the crash-loop state all have samples. Then:

- every PromQL expression of every dashboard (panels, annotations, variables), with
  Grafana's variables substituted as Grafana would, must parse and return data;
- every rule must parse; a recording rule must return data; an alerting rule returns data
  only while it fires, so each series it reads must return data instead;
- or the query is in ``NO_DATA``, the one allow-list, with the reason it cannot have data
  against this graph (needs a GPU, traffic, a Planner...). The list is exact: an entry that
  does return data fails the test too, so it never goes stale.

With a crash-loop budget of 3 failures and a 0.1 s backoff, ``Crasher`` is in crash loop
within about a second of its scale-up, and ``DynamoLocalCrashLoop`` must go from inactive to
pending to firing in Prometheus (``/api/v1/alerts``, polled every 0.1 s).

Timing: the rule's ``for: 1m`` (and the 5 s intervals of the compose config) would make this
test take minutes, so it runs on a copy of the rules where only that alert's ``for`` is 3 s,
with scrape and evaluation intervals of 1 s. The expression is the repository's, unchanged;
the ``for`` duration itself is covered by the promtool unit tests
(``alerts/tests/components.test.yaml``). Prometheus' first scrape is queryable 5-6 s after
it starts, so the whole test takes about 16 s; every wait has a deadline and the test a
60 s timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from dashboards.lint import queries, substitute
from dashboards.promql import DYNAMO_FRONTEND_JOB, JOB, Selector, selectors
from dashboards.rules import RULES_FILE, load_rules
from tests.nvml_fakes import H100_CAPTURE, capture_path
from tests.servers import (
    PrometheusFactory,
    PrometheusServer,
    free_port,
    log_tail,
    stop_process_tree,
    wait_until_async,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.yaml"
DASHBOARD_JSON = ROOT / "dashboards" / "json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

CRASH_LOOP_ALERT = "DynamoLocalCrashLoop"
CRASH_LOOP_FOR = "3s"
# Grafana's $__rate_interval at a 1 s scrape interval: max(4 x scrape, interval + scrape).
RATE_INTERVAL = "4s"
# $__range: longer than this test's whole history.
RANGE = "5m"

CRASHER = {
    "dynamoNamespace": "demo",
    "componentType": "worker",
    "replicas": 0,
    "extraPodSpec": {"mainContainer": {"command": ["{python}", "-c", "raise SystemExit(3)"]}},
    "local": {
        "minReplicas": 0,
        "maxReplicas": 1,
        "readiness": {"process": {"startupGraceSeconds": 0.5}},
        "restart": {
            "backoffBaseSeconds": 0.1,
            "backoffMaxSeconds": 0.2,
            "crashLoopFailures": 3,
            "crashLoopWindowSeconds": 60,
        },
        "gracefulStopSeconds": 1,
    },
}

# Asks for a whole GPU; the NVML capture's only GPU is held by a foreign process (the
# capture's load process), so scaling it up is refused: a real allocation refusal.
GREEDY = {
    "dynamoNamespace": "demo",
    "componentType": "worker",
    "replicas": 0,
    "resources": {"requests": {"gpu": 1}},
    "extraPodSpec": {"mainContainer": {"command": ["sleep", "60"]}},
    "local": {"minReplicas": 0, "maxReplicas": 1},
}
# A real H100 capture replayed by the NVML fake: GPU metrics without a GPU.
NVML_CAPTURE = capture_path(H100_CAPTURE)

# --------------------------------------------------------------------------- allow-list

NEEDS_GPU_REPLICA = (
    "needs a replica holding a GPU: the capture's only GPU is held by a foreign process, so "
    "the connector allocates it to no replica"
)
NO_THROTTLE = "the captured GPU reports no active clock-event (throttle) reason"
NEEDS_NATS = "needs the NATS JetStream prefill queue (up --nats-url); the demo has none"
NEEDS_PLANNER = "needs a Planner decision (virtual-connector executor with etcd)"
NO_ITL = "the mock frontend exports no inter-token latency (it streams no tokens)"
NEEDS_POLICY = "needs a KEDA ScaledObject (up --scaledobject); the demo runs none"

# The ONE allow-list: query key (see _dashboard_key, _rule_key) -> why it has no data here.
NO_DATA: dict[str, str] = {
    # GPUs: device metrics come from the NVML capture; per-replica GPU use does not.
    "dynamo-local-component | panel 'GPU memory' target A": NEEDS_GPU_REPLICA,
    "dynamo-local-component | panel 'GPU SM utilization' target A": NEEDS_GPU_REPLICA,
    "dynamo-local-gpus | panel 'Who holds each GPU' target A": NEEDS_GPU_REPLICA,
    "dynamo-local-gpus | panel 'GPU memory by component' target A": NEEDS_GPU_REPLICA,
    "dynamo-local-gpus | panel 'Throttle reasons now' target A": NO_THROTTLE,
    # Prefill queue.
    "dynamo-local-scaling | panel 'Prefill queue vs prefill replicas' target A": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Pending per prefill replica' target A": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Prefill queue flow' target A": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Prefill queue flow' target B": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Prefill queue in progress' target A": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Prefill queue in progress' target B": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Oldest pending message' target A": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Prefill queue consumers' target A": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Prefill stream messages' target A": NEEDS_NATS,
    "dynamo-local-scaling | panel 'Prefill stream size' target A": NEEDS_NATS,
    "rule dynamo_namespace:dynamo_local_prefill_queue_pending_messages"
    ":per_ready_prefill_replica": NEEDS_NATS,
    "DynamoLocalPrefillQueueBacklog reads dynamo_namespace:dynamo_local_prefill_queue"
    "_pending_messages:per_ready_prefill_replica": NEEDS_NATS,
    # Planner and failed scales.
    "dynamo-local-scaling | panel 'Planner decisions' target A": NEEDS_PLANNER,
    "dynamo-local-scaling | panel 'Planner decision seen vs acknowledged' target A": NEEDS_PLANNER,
    "dynamo-local-scaling | panel 'Planner decision seen vs acknowledged' target B": NEEDS_PLANNER,
    "dynamo-local-scaling | panel 'Since the newest decision was seen' target A": NEEDS_PLANNER,
    "DynamoLocalPlannerDecisionNotAcknowledged reads dynamo_local_planner_decision_id": (
        NEEDS_PLANNER
    ),
    "DynamoLocalPlannerDecisionNotAcknowledged reads "
    "dynamo_local_planner_decision_acknowledged_id": NEEDS_PLANNER,
    # Dynamo's frontend.
    "dynamo-local-overview | panel 'Inter-token latency' target A": NO_ITL,
    "dynamo-local-overview | panel 'Inter-token latency' target B": NO_ITL,
    "dynamo-local-scaling | panel 'Inter-token latency' target A": NO_ITL,
    "dynamo-local-scaling | panel 'Inter-token latency' target B": NO_ITL,
    # Policies (tests/test_policy_e2e.py has them with data).
    "dynamo-local-scaling | panel 'Policy count vs replica target' target A": NEEDS_POLICY,
    "dynamo-local-scaling | panel 'Policy count vs replica target' target B": NEEDS_POLICY,
    "dynamo-local-scaling | panel 'Trigger query failures' target A": NEEDS_POLICY,
    "dynamo-local-scaling | panel 'Trigger query failures' target B": NEEDS_POLICY,
    "dynamo-local-scaling | panel 'Trigger values' target A": NEEDS_POLICY,
    "dynamo-local-scaling | panel 'Triggers active' target A": NEEDS_POLICY,
}


def _dashboard_key(uid: str, where: str) -> str:
    return f"{uid} | {where}"


def _selector_text(s: Selector) -> str:
    matchers = ", ".join(f'{m.label}{m.op}"{m.value}"' for m in s.matchers)
    return f"{s.name}{{{matchers}}}" if matchers else s.name


def _rule_key(rule: str, selector: Selector | None = None) -> str:
    return f"rule {rule}" if selector is None else f"{rule} reads {_selector_text(selector)}"


# --------------------------------------------------------------------------- the graph


@dataclass
class RunningGraph:
    url: str
    port: int
    log: Path


def _graph(tmp_path: Path) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["spec"]["services"]["Crasher"] = CRASHER
    data["spec"]["services"]["Greedy"] = GREEDY
    path = tmp_path / "proof.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def _up(tmp_path: Path) -> Iterator[RunningGraph]:
    """``dynamo-local up`` on the proof graph; SIGINT (then the process tree) at the end."""
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "connector",
                "up",
                str(_graph(tmp_path)),
                "--port",
                str(port),
                "--working-dir",
                str(tmp_path / "wd"),
                "--gpu-backend",
                f"fake:{NVML_CAPTURE}",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield RunningGraph(f"http://127.0.0.1:{port}", port, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stop_process_tree(proc)


async def _json(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    async with session.request(method, url, **kw) as resp:
        body = await resp.json()
        if resp.status >= 300:
            raise AssertionError(f"{method} {url}: {resp.status} {body}")
        return body


async def _ready(session: aiohttp.ClientSession, graph: RunningGraph, want: dict[str, int]) -> bool:
    body = await _json(session, "GET", f"{graph.url}/v1/components")
    have = {c["name"]: c["replicas"]["ready"] for c in body["components"]}
    return all(have.get(name) == n for name, n in want.items())


# --------------------------------------------------------------------------- Prometheus


def _rules_copy(tmp_path: Path) -> Path:
    """The repository's rules with only the crash-loop alert's ``for`` shortened."""
    data = yaml.safe_load(RULES_FILE.read_text())
    changed = 0
    for group in data["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == CRASH_LOOP_ALERT:
                rule["for"] = CRASH_LOOP_FOR
                changed += 1
    assert changed == 1
    path = tmp_path / "proof.rules.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _prometheus_config(graph: RunningGraph, rules: Path) -> str:
    """The repository's Prometheus config, with this run's loopback connector (its static
    target and its service discovery) and rules, 1 s intervals, and no Alertmanager (none
    runs here)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    config.pop("alerting")
    compose_host = "host.docker.internal:"
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "prometheus":
            continue  # Prometheus scraping itself: its port is picked when it starts
        for static in job.get("static_configs", []):
            assert [t.startswith(compose_host) for t in static["targets"]] == [True]
            static["targets"] = [f"127.0.0.1:{graph.port}"]
        for sd in job.get("http_sd_configs", []):
            assert sd["url"].startswith(f"http://{compose_host}")
            sd["url"] = f"{graph.url}/v1/prometheus/targets"
            sd["refresh_interval"] = "1s"
        # Here the replicas' loopback addresses are reachable as listed.
        job["relabel_configs"] = [
            r
            for r in job.get("relabel_configs", [])
            if compose_host not in r.get("replacement", "")
        ]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return json.dumps(config)


async def _has_data(prom: PrometheusServer, expr: str) -> bool:
    return bool(await prom.query(expr))


async def _alert_state(prom: PrometheusServer, name: str) -> str | None:
    data = await prom._api("/api/v1/alerts")
    states = {a["state"] for a in data["alerts"] if a["labels"]["alertname"] == name}
    assert len(states) <= 1, states
    return states.pop() if states else None


# --------------------------------------------------------------------------- the test


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def test_every_query_returns_data_and_a_crash_loop_fires(
    tmp_path: Path, prometheus_server: PrometheusFactory, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    with _up(tmp_path) as graph:
        try:
            await wait_until_async(
                lambda: _ready(http, graph, {"Frontend": 1, "Prefill": 1, "Decode": 2}),
                timeout=20,
            )
        except TimeoutError as exc:
            raise AssertionError(f"demo graph not ready: {exc}\n{log_tail(graph.log)}") from exc
        config = _prometheus_config(graph, _rules_copy(tmp_path))
        prom = prometheus_server([], config_text=config)
        await prom.wait_for(f'up{{job="{JOB}"}} == 1', timeout=15)
        await prom.wait_for(f'up{{job="{DYNAMO_FRONTEND_JOB}", dynamo_component="Frontend"}} == 1')
        assert await _alert_state(prom, CRASH_LOOP_ALERT) is None

        # A scale that finishes (duration histogram, operations counter) and a component
        # that crash-loops (restarts, crash-loop state and counter, the alert).
        await _json(http, "PUT", f"{graph.url}/v1/components/Decode/replicas", json={"replicas": 3})
        await _json(
            http, "PUT", f"{graph.url}/v1/components/Crasher/replicas", json={"replicas": 1}
        )
        async with http.put(
            f"{graph.url}/v1/components/Greedy/replicas", json={"replicas": 1}
        ) as resp:
            refusal = await resp.json()
        assert (resp.status, refusal["error"]["code"]) == (409, "resources_exhausted")

        seen: list[str] = []
        deadline = time.monotonic() + 20
        while "firing" not in seen:
            state = await _alert_state(prom, CRASH_LOOP_ALERT)
            if state is not None and (not seen or seen[-1] != state):
                seen.append(state)
            assert time.monotonic() < deadline, f"{CRASH_LOOP_ALERT} states seen: {seen}"
            await asyncio.sleep(0.1)
        assert seen == ["pending", "firing"]
        await wait_until_async(lambda: _ready(http, graph, {"Decode": 3}), timeout=10)
        await prom.wait_for(
            'dynamo_local_scale_operations_total{dynamo_component="Decode", outcome="ok"}',
            timeout=10,
        )

        # Every dashboard expression, as Grafana sends it.
        empty: dict[str, str] = {}
        evaluated: set[str] = set()
        for path in sorted(DASHBOARD_JSON.glob("*.json")):
            for q in queries(json.loads(path.read_text())):
                key = _dashboard_key(q.dashboard, q.where)
                evaluated.add(key)
                expr = substitute(q.expr, rate_interval=RATE_INTERVAL, range_=RANGE)
                if not await _has_data(prom, expr):
                    empty[key] = expr
        # Every rule: it parses; a recording rule has data; an alert's inputs have data.
        for rule in load_rules(RULES_FILE):
            await prom.query(rule.expr)  # raises with Prometheus' message if it does not parse
            if not rule.is_alert:
                key = _rule_key(rule.name)
                evaluated.add(key)
                if not await _has_data(prom, rule.name):
                    empty[key] = rule.name
                continue
            for selector in selectors(rule.expr):
                key = _rule_key(rule.name, selector)
                evaluated.add(key)
                if not await _has_data(prom, _selector_text(selector)):
                    empty[key] = _selector_text(selector)

        assert sorted(set(NO_DATA) - evaluated) == [], "NO_DATA names queries that do not exist"
        unexpected = {k: v for k, v in empty.items() if k not in NO_DATA}
        assert unexpected == {}, "these queries returned no data; fix them or add to NO_DATA"
        stale = sorted(k for k in NO_DATA if k not in empty)
        assert stale == [], "these queries in NO_DATA now return data: remove them from it"
    assert time.monotonic() - started < 60
