"""A scaling experiment end to end: the real demo graph under ``python -m connector up``
(frontend, mocker prefill and decode, the Planner; a private etcd), then
``python -m connector experiment`` with two short phases driven by the real aiperf (from
``.venv-aiperf``) while the Planner scales. The run folder must hold a summary with sane
figures, a timeline with a row per second and every component's columns, and a report that
headless Chromium renders into charts with data in them, loading nothing from anywhere.
The screenshot lands in ``test-artifacts/experiment-report.png``.

The graph is copied next to a tiny model folder in the test's temporary directory, as
``tests/test_demo_real.py`` does, so nothing is written into the repository.
"""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from connector.experiment.aiperf import AiperfMissing, find_aiperf
from connector.tiny_model import write_tiny_model
from tests.dynamo_helpers import TINY_MODEL_NAME, require_dynamo
from tests.test_demo_real import _env

ROOT = Path(__file__).resolve().parent.parent
GRAPH = ROOT / "examples" / "dynamo.yaml"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
COMPONENTS = ("Frontend", "Prefill", "Decode", "Planner")
SERVING_DEADLINE_S = 90.0
EXPERIMENT_DEADLINE_S = 150.0
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
PLAN = f"""
name: e2e
seed: 7
tokenizer: models/{TINY_MODEL_NAME}
gracePeriod: 15
cooldown: 3
slo: {{ttftP99Seconds: 0.5}}
phases:
  - {{name: burst, concurrency: 8, inputTokens: 400, outputTokens: 100, duration: 10}}
  - {{name: calm, concurrency: 1, inputTokens: 400, outputTokens: 100, duration: 10}}
"""

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium"),
]


def _aiperf() -> Path:
    try:
        return find_aiperf()
    except AiperfMissing as exc:
        pytest.skip(str(exc))


async def _rendered(report: Path) -> dict[str, Any]:
    """What Chromium drew: per plotly chart, its data traces and how many have a drawn
    line; plus every request the page made and every console error."""
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
                }))""",
            )
            headline = await page.inner_text("table.summary")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "experiment-report.png"))
        finally:
            await browser.close()
    return {"charts": charts, "errors": errors, "requests": requests, "headline": headline}


@pytest.mark.timeout(300)
async def test_an_experiment_on_the_real_demo_writes_a_report_chromium_renders(
    tmp_path: Path,
) -> None:
    require_dynamo()
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian package etcd-server; scripts/setup.sh)")
    executable = _aiperf()
    write_tiny_model(tmp_path / "models", TINY_MODEL_NAME)
    graph = tmp_path / "dynamo.yaml"
    shutil.copyfile(GRAPH, graph)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    run = tmp_path / "run"
    up_stderr = tmp_path / "up.stderr"

    with up_stderr.open("wb") as stderr:
        up = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "connector", "up", str(graph), "--port", "0"),
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
        api = next(line.split()[1] for line in lines if line.strip().startswith("API"))
        api = api.removesuffix("/v1")

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
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(up.wait(), 60) == 0

    assert "dynamo-local: phase burst started" in text, text
    assert f"run folder: {run}" in text, text
    summary = json.loads((run / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS, summary.keys()
    assert summary["errors"] == [], summary
    assert summary["requests_failed"] == 0, summary
    assert summary["requests_total"] > 8, summary  # a burst of 8 in flight for 10 s, and more
    assert set(summary["requests_by_phase"]) == {"burst", "calm"}
    assert summary["replica_seconds"] > 0
    assert set(summary["replica_seconds_by_component"]) == set(COMPONENTS)
    # Four components, one replica each at least, for the whole run.
    assert summary["replica_seconds"] >= 4 * 0.9 * summary["duration_s"], summary
    assert summary["load_rise"]["phase"] == "burst"
    if summary["time_to_scale_up_s"] is not None:  # the Planner may scale Decode: in time
        assert 0 <= summary["time_to_scale_up_s"] < summary["duration_s"]
    assert summary["seconds_over_slo"] >= 0

    with (run / "timeline.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 15, len(rows)
    header = rows[0].keys()
    for name in COMPONENTS:
        for field in ("desired", "ready", "running", "cpu_cores", "rss_bytes"):
            assert f"{name}_{field}" in header, header
    assert all(int(r["Frontend_ready"]) >= 1 for r in rows)
    assert {r["phase"] for r in rows} >= {"burst", "calm"}
    busy = [r for r in rows if r["phase"] == "burst" and r["inflight"]]
    assert busy and max(float(r["inflight"]) for r in busy) >= 4, busy
    assert any(r["ttft_p99_s"] for r in rows) and any(r["request_rate"] for r in rows)
    assert (run / "plan.yaml").read_text() == PLAN
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
    assert "requests failed (aiperf)" in page["headline"]
    print(f"experiment took {took:.1f} s; {len(rows)} rows; summary {summary}")
