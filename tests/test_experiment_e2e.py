"""A scaling experiment end to end, with a KEDA ScaledObject as Decode's only driver: the real
demo graph without its Planner (``examples/dynamo-no-planner.yaml``: the real frontend and
mocker Prefill and Decode) under ``python -m connector up --scaledobject``, running
``examples/scaledobject-decode.yaml`` (the frontend's ``dynamo_frontend_inflight_requests``,
4 per Decode replica) against a real Prometheus that finds the replicas through
``/v1/prometheus/targets``; then ``python -m connector experiment`` with two short phases
driven by the real aiperf (from ``.venv-aiperf``), reading the frontend's figures from that
Prometheus.

A burst of 8 concurrent requests must scale Decode from 1 to 2 and the calm after it (1 in
flight) back to 1 once the scale-down stabilization window has passed; the run folder must
show it: a summary whose time to scale up and down are set and within the run, with no
failed request; a timeline with a row per second, every component's columns and the
policy's ``autoscale`` decisions; events with the decisions, their reasons and the scale
operations; and a report that headless Chromium renders into charts with data in them
(Decode's desired and ready replicas above 1), loading nothing from anywhere. The screenshot
lands in ``test-artifacts/experiment-report.png``.

This replaced the experiment e2e on the demo with its Planner, whose load-based Planner
takes 30-40 s to its first decision and so rarely scaled within a short run (that test
accepted a run without any scale-up): the experiment's handling of a graph with a Planner is
the same code as for any other component (the Planner's own e2e is
``tests/test_planner_real.py``), while a scale-up and -down are now required. What only the
direct scrape of the frontend (no ``prometheus:`` in the plan) covered is checked here on the
same real frontend after the run.

The graph is copied next to a tiny model folder in the test's temporary directory, as
``tests/test_demo_real.py`` does, so nothing is written into the repository. Short windows
(1 s polls and scrapes, a 3 s scale-down stabilization) keep it around a minute; most of
that is aiperf starting (15-45 s, with the machine's load).
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from connector.client import Client
from connector.dynamo.tiny_model import write_tiny_model
from connector.experiment import metrics
from connector.experiment.aiperf import AiperfMissing, find_aiperf
from connector.experiment.sampler import ScrapeSource
from tests.dynamo_helpers import TINY_MODEL_NAME, require_dynamo
from tests.servers import PrometheusFactory, free_port
from tests.test_demo_real import _env
from tests.test_policy_e2e import http_sd_prometheus

ROOT = Path(__file__).resolve().parent.parent
GRAPH = ROOT / "examples" / "dynamo-no-planner.yaml"
SCALED_OBJECT = ROOT / "examples" / "scaledobject-decode.yaml"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
COMPONENTS = ("Frontend", "Prefill", "Decode")
QUERY = f'sum(dynamo_frontend_inflight_requests{{model="{TINY_MODEL_NAME}"}})'
SERVING_DEADLINE_S = 60.0
EXPERIMENT_DEADLINE_S = 150.0
STABILIZATION_S = 3
SUMMARY_KEYS = {
    "time_to_scale_up_s",
    "time_to_scale_down_s",
    "seconds_over_slo",
    "replica_seconds",
    "replica_seconds_by_component",
    "requests_total",
    "requests_failed",
    "requests_by_phase",
    "load_rise",
    "samples",
}
PLAN = """
name: e2e
seed: 7
tokenizer: models/{model}
prometheus: {prometheus}
gracePeriod: 15
cooldown: 8
slo: {{ttftP99Seconds: 0.001, itlP99Seconds: 10}}  # always over, never over
phases:
  - {{name: burst, concurrency: 8, inputTokens: 100, outputTokens: 100, duration: 10}}
  - {{name: calm, concurrency: 1, inputTokens: 100, outputTokens: 100, duration: 8}}
"""

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus"),
]


def _aiperf() -> Path:
    try:
        return find_aiperf()
    except AiperfMissing as exc:
        pytest.skip(str(exc))


def _scaled_object(prometheus: str) -> dict[str, Any]:
    """The example file with this Prometheus and short windows; its target, trigger and
    threshold as they are."""
    so: dict[str, Any] = yaml.safe_load(SCALED_OBJECT.read_text())
    spec = so["spec"]
    spec["pollingInterval"] = 1
    spec["cooldownPeriod"] = 3
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior["scaleDown"]["stabilizationWindowSeconds"] = STABILIZATION_S
    # One replica a second, not per 15 s: should a scrape catch the seam between the phases
    # (8 burst requests finishing, the calm one started: 9 in flight, 3 replicas), the way
    # back to 1 still fits in the run.
    (step,) = behavior["scaleDown"]["policies"]
    step["periodSeconds"] = 1
    (trigger,) = spec["triggers"]
    assert trigger["metadata"]["query"] == QUERY
    trigger["metadata"]["serverAddress"] = prometheus
    return so


async def _rendered(report: Path) -> dict[str, Any]:
    """What Chromium drew: per plotly chart, its data traces (names and the y values plotly
    holds after rendering) and how many have a drawn line; plus every request the page made
    and every console error."""
    playwright_api = pytest.importorskip("playwright.async_api")
    from tests.test_status_page import ARGS

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            await page.goto(report.as_uri())
            await page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20000)
            charts = await page.eval_on_selector_all(
                ".js-plotly-plot",
                """plots => plots.map(p => ({
                    svgs: p.querySelectorAll('.main-svg').length,
                    traces: p.querySelectorAll('.scatterlayer .trace').length,
                    drawn: [...p.querySelectorAll('.scatterlayer .trace path.js-line')]
                        .filter(l => (l.getAttribute('d') || '').length > 10).length,
                    title: (p.querySelector('.gtitle') || {}).textContent || '',
                    data: (p._fullData || []).map(t => ({
                        name: t.name,
                        y: Array.from(t.y || []),
                        text: Array.from(t.hovertext || []),
                    })),
                    top: ((p._fullLayout || {}).yaxis || {}).range || [],
                }))""",
            )
            headline = await page.inner_text("table.summary")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "experiment-report.png"))
        finally:
            await browser.close()
    return {"charts": charts, "errors": errors, "requests": requests, "headline": headline}


async def _frontend_counts(api: str) -> tuple[metrics.Totals, metrics.Figures]:
    """The frontend's counters as the experiment's direct scrape reads them (the source a
    plan without ``prometheus:`` uses), from the real frontend."""
    async with Client(api) as client:
        source = ScrapeSource(client, ["Frontend"], window_s=10.0)
        try:
            (url,) = await source.urls()
            figures = await source.figures(time.time())
        finally:
            await source.close()
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return metrics.parse_totals(await resp.text()), figures


def _decisions(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["kind"] == kind and e.get("component") == "Decode" and e.get("to_replicas")
    ]


@pytest.mark.timeout(300)
async def test_a_scaledobject_scales_decode_through_an_experiment_on_the_real_graph(
    tmp_path: Path, prometheus_server: PrometheusFactory
) -> None:
    require_dynamo()
    executable = _aiperf()
    write_tiny_model(tmp_path / "models", TINY_MODEL_NAME)
    graph = tmp_path / "dynamo.yaml"
    shutil.copyfile(GRAPH, graph)
    port = free_port()
    prom = http_sd_prometheus(prometheus_server, port)
    scaled_object = tmp_path / "scaledobject.yaml"
    scaled_object.write_text(yaml.safe_dump(_scaled_object(prom.url)))
    plan_text = PLAN.format(model=TINY_MODEL_NAME, prometheus=prom.url)
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    run = tmp_path / "run"
    up_stderr = tmp_path / "up.stderr"
    api = f"http://127.0.0.1:{port}"

    with up_stderr.open("wb") as stderr:
        up = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "connector", "up", str(graph), "--port", str(port)),
            *("--scaledobject", str(scaled_object)),
            *("--working-dir", str(tmp_path / "wd"), "--log-level", "warning"),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=_env(),
            cwd=tmp_path,
        )
    assert up.stdout is not None
    lines: list[str] = []
    started = time.monotonic()
    try:
        while not any(line.strip().startswith("curl -s ") for line in lines):
            left = SERVING_DEADLINE_S - (time.monotonic() - started)
            assert left > 0, f"not serving within {SERVING_DEADLINE_S:g} s: {lines}"
            raw = await asyncio.wait_for(up.stdout.readline(), left)
            assert raw, f"up exited: {lines}\n{up_stderr.read_text()[-3000:]}"
            lines.append(raw.decode().rstrip("\n"))
        assert [line.split()[:2] for line in lines if line.split()[:1] == ["policy"]] == [
            ["policy", "dynamo-demo-decode"]
        ], lines

        began = time.monotonic()
        experiment = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "connector", "experiment", str(plan), "--url", api, "--out", str(run)),
            *("--aiperf", str(executable)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=_env(),
            cwd=tmp_path,
        )
        try:
            output, _ = await asyncio.wait_for(experiment.communicate(), EXPERIMENT_DEADLINE_S)
        except TimeoutError:
            experiment.send_signal(signal.SIGINT)
            output, _ = await asyncio.wait_for(experiment.communicate(), 30)
            raise AssertionError(f"the experiment ran past {EXPERIMENT_DEADLINE_S:g} s") from None
        took = time.monotonic() - began
        text = output.decode(errors="replace")
        assert experiment.returncode == 0, text[-4000:]
        totals, scraped = await _frontend_counts(api)
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(up.wait(), 60) == 0

    assert "dynamo-local: phase burst started" in text, text
    assert f"run folder: {run}" in text, text
    summary = json.loads((run / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS, summary.keys()
    assert summary["errors"] == [], summary
    assert summary["target"]["prometheus"] == prom.url
    assert summary["requests_failed"] == 0, summary
    assert summary["requests_total"] > 8, summary  # a burst of 8 in flight for 10 s, and more
    assert set(summary["requests_by_phase"]) == {"burst", "calm"}
    # The direct scrape reads the real frontend: it counted what aiperf sent, all answered.
    assert totals.requests_ok == summary["requests_succeeded"] == summary["requests_total"]
    assert totals.requests_failed == 0 and totals.inflight == 0
    assert scraped.inflight == 0 and totals.ttft and totals.itl
    assert set(summary["replica_seconds_by_component"]) == set(COMPONENTS)
    # Three components, one replica each at least, for the whole run; Decode more.
    duration = summary["duration_s"]
    assert summary["replica_seconds"] >= 3 * 0.9 * duration, summary
    by_component = summary["replica_seconds_by_component"]
    assert by_component["Decode"] >= by_component["Prefill"] + 5, summary
    assert summary["load_rise"]["phase"] == "burst"
    assert summary["scaled_up_component"] == "Decode", summary
    assert 0 <= summary["time_to_scale_up_s"] < duration, summary
    assert summary["load_fall_at_s"] is not None
    assert 0 <= summary["time_to_scale_down_s"] < duration - summary["load_fall_at_s"], summary
    assert summary["seconds_over_slo_by_bound"]["itlP99Seconds"] == 0

    # The policy's decisions and the scale operations that carried them out.
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    decided = _decisions(events, "autoscale")
    moves = [(e["from_replicas"], e["to_replicas"]) for e in decided]
    assert moves[0] == (1, 2) and moves[-1][1] == 1 and max(to for _, to in moves) >= 2, moves
    assert {e["source"] for e in decided} == {"policy"}
    assert {e["outcome"] for e in decided} == {"ok"}
    assert decided[0]["reason"].startswith(f"Decode 1 -> 2: trigger inflight query={QUERY} value ")
    assert "target 4 per replica" in decided[0]["reason"], decided[0]
    assert decided[0]["details"]["scaled_object"] == "dynamo-demo-decode"
    scaled = _decisions(events, "scale")
    assert [(e["from_replicas"], e["to_replicas"]) for e in scaled] == moves
    assert {e["source"] for e in scaled} == {"policy"}
    assert not [
        e for e in events if e["kind"] in ("autoscale", "scale") and e["component"] != "Decode"
    ]

    with (run / "timeline.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 20, len(rows)
    header = rows[0].keys()
    for name in COMPONENTS:
        for field in ("desired", "ready", "running", "cpu_cores", "rss_bytes"):
            assert f"{name}_{field}" in header, header
    assert all(int(r["Frontend_ready"]) >= 1 for r in rows)
    assert {r["Prefill_desired"] for r in rows} == {"1"}
    assert (rows[0]["Decode_desired"], rows[0]["Decode_ready"]) == ("1", "1")
    assert (rows[-1]["Decode_desired"], rows[-1]["Decode_ready"]) == ("1", "1")
    assert max(int(r["Decode_ready"]) for r in rows) >= 2
    assert {r["phase"] for r in rows} >= {"burst", "calm"}
    busy = [r for r in rows if r["phase"] == "burst" and r["inflight"]]
    assert busy and max(float(r["inflight"]) for r in busy) == 8, busy
    assert any(r["ttft_p99_s"] for r in rows) and any(r["request_rate"] for r in rows)
    # Over the SLO: every row with a TTFT p99 (the bound is 1 ms), for the time until the next.
    over = sum(
        float(b["t_s"]) - float(a["t_s"])
        for a, b in itertools.pairwise(rows)
        if a["ttft_p99_s"] and float(a["ttft_p99_s"]) > 0.001
    )
    assert over > 10 and summary["seconds_over_slo"] == pytest.approx(over, abs=0.01), summary
    assert summary["seconds_over_slo_by_bound"]["ttftP99Seconds"] == summary["seconds_over_slo"]
    cells = " ; ".join(r["events"] for r in rows)
    assert f"autoscale Decode 1→2 (policy) ok — {decided[0]['reason']}" in cells, cells
    assert "scale Decode 1→2 (policy) ok in " in cells, cells
    assert f"autoscale Decode {moves[-1][0]}→1 (policy) ok" in cells, cells
    # Up during the burst, never down before the load fell.
    burst = [int(r["Decode_desired"]) for r in rows if r["phase"] == "burst"]
    assert burst == sorted(burst), burst
    started_at = float(rows[0]["time"]) - float(rows[0]["t_s"])
    assert decided[-1]["time"] >= started_at + summary["load_fall_at_s"], decided
    assert (run / "plan.yaml").read_text() == plan_text
    assert (run / "aiperf" / "segment1" / "aiperf.yaml").is_file()

    page = await _rendered(run / "report.html")
    assert page["errors"] == []
    assert [r for r in page["requests"] if not r.startswith("file://")] == []
    charts = page["charts"]
    assert len(charts) == 1 + len(COMPONENTS), charts
    assert [c["title"] for c in charts][1:] == list(COMPONENTS)
    for chart in charts:
        assert chart["svgs"] >= 1 and chart["traces"] >= 5, chart
        assert chart["drawn"] >= 3, chart  # lines with data, not empty axes
    overview, decode = charts[0], charts[1 + COMPONENTS.index("Decode")]
    traces = {t["name"]: t for t in decode["data"]}
    for name in ("desired", "ready", "running"):
        assert max(y for y in traces[name]["y"] if y is not None) >= 2, traces[name]
    assert decode["top"] and decode["top"][1] > 2, decode["top"]  # the axis shows it
    ops = traces["scale operation (done)"]
    assert any(t.startswith("scale Decode 1→2 (policy) ok") for t in ops["text"]), ops
    marks = {t["name"]: t for t in overview["data"]}["Planner/policy decision"]
    assert any(t.startswith("autoscale Decode 1→2 (policy) ok") for t in marks["text"]), marks
    ready = {t["name"]: t for t in overview["data"]}["Decode ready"]
    assert max(y for y in ready["y"] if y is not None) >= 2, ready
    assert "requests failed (aiperf)" in page["headline"]
    print(f"experiment took {took:.1f} s; {len(rows)} rows; summary {summary}")
