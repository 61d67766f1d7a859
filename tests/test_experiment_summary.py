"""The experiment's arithmetic, as tables: the summary's figures from timelines written out by
hand, Prometheus' histogram_quantile over the frontend's buckets, the window figures from
two scrapes, the timeline CSV, and aiperf's config, phase lines and exports."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from connector.experiment import aiperf, metrics, summary
from connector.experiment.plan import parse_plan
from connector.experiment.timeline import ComponentSample, Sample, describe_event, to_csv

INF = math.inf


def timeline(rows: str, components: tuple[str, ...] = ("Decode",)) -> list[Sample]:
    """Rows of ``t ttft_p99 <desired/ready/running per component>``, e.g. ``3 0.2 1/2/2``;
    ``-`` for no latency."""
    out = []
    for line in rows.strip().splitlines():
        t, ttft, *counts = line.split()
        comps = {}
        for name, c in zip(components, counts, strict=True):
            desired, ready, running = (int(x) for x in c.split("/"))
            comps[name] = ComponentSample(desired=desired, ready=ready, running=running)
        out.append(
            Sample(
                t=float(t),
                time=1000.0 + float(t),
                ttft_p99_s=None if ttft == "-" else float(ttft),
                components=comps,
            )
        )
    return out


BURST_THEN_CALM = timeline(
    """
    0  -    1/1/1
    1  0.1  1/1/1
    2  0.6  2/1/2
    3  0.7  2/1/2
    4  0.8  2/2/2
    5  0.4  2/2/2
    6  0.1  1/2/2
    7  0.1  1/1/1
    8  -    1/1/1
    """
)
PHASES = [
    summary.PhaseRun("burst", 8.0, 1.0, 5.0),
    summary.PhaseRun("calm", 1.0, 5.0, 8.0),
]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("", {}),
        ("0 - 1/1/1", {"Decode": 0.0}),  # one sample stands for no time
        ("0 - 1/1/1\n2 - 1/1/1", {"Decode": 2.0}),
        ("0 - 1/1/2\n1 - 1/1/3\n3 - 1/1/0", {"Decode": 2.0 + 6.0}),
        ("0 - 1/1/1\n0.5 - 2/2/2\n1 - 1/1/1", {"Decode": 0.5 + 1.0}),
    ],
)
def test_replica_seconds_are_running_replicas_times_the_time_they_stand_for(
    rows: str, expected: dict[str, float]
) -> None:
    assert summary.replica_seconds(timeline(rows) if rows else []) == expected


@pytest.mark.parametrize(
    ("slo", "expected"),
    [
        ({}, {"any": 0.0}),
        ({"ttftP99Seconds": 0.5}, {"ttftP99Seconds": 3.0, "any": 3.0}),  # t=2,3,4
        ({"ttftP99Seconds": 0.75}, {"ttftP99Seconds": 1.0, "any": 1.0}),  # t=4 only
        ({"ttftP99Seconds": 5}, {"ttftP99Seconds": 0.0, "any": 0.0}),
        # A bound on a figure with no data (no ITL here) is never over.
        ({"ttftP99Seconds": 0.5, "itlP99Seconds": 0.01}, {
            "ttftP99Seconds": 3.0, "itlP99Seconds": 0.0, "any": 3.0}),
    ],
)  # fmt: skip
def test_seconds_over_the_slo(slo: dict[str, float], expected: dict[str, float]) -> None:
    assert summary.seconds_over_slo(BURST_THEN_CALM, slo) == expected


@pytest.mark.parametrize(
    ("levels", "rise", "fall"),
    [
        ([8, 1], "p0", 5.0),  # the first phase is the peak; the load falls when p1 starts
        ([1, 8, 1], "p1", 10.0),
        ([2, 4, 8], "p2", 15.0),  # the peak is last: the load falls when it ends
        ([8, 8, 1], "p0", 10.0),  # an equal phase is not a fall
        ([4, 8, 8], "p1", 15.0),
    ],
)
def test_load_rises_at_the_first_peak_phase_and_falls_after_it(
    levels: list[float], rise: str, fall: float
) -> None:
    phases = [
        summary.PhaseRun(f"p{i}", level, i * 5.0, (i + 1) * 5.0) for i, level in enumerate(levels)
    ]
    peak = summary.load_rise(phases)
    assert peak is not None and peak.name == rise
    assert summary.load_fall(phases, peak) == fall


def test_a_phase_that_never_ran_is_not_the_peak() -> None:
    phases = [summary.PhaseRun("low", 1.0, 0.0, 5.0), summary.PhaseRun("high", 9.0, None, None)]
    assert summary.load_rise(phases) == phases[0]
    assert summary.load_rise([summary.PhaseRun("x", 1.0, None, None)]) is None


@pytest.mark.parametrize(
    ("rows", "rise_t", "expected"),
    [
        (BURST_THEN_CALM, 1.0, (3.0, "Decode")),  # ready 1 -> 2 at t=4
        (BURST_THEN_CALM, 4.5, None),  # already 2 when the load rose
        (timeline("0 - 1/1/1\n1 - 1/1/1"), 0.0, None),  # nothing scaled
        (timeline("0 - 1/1/1 1/1/1\n1 - 1/1/1 1/2/2", ("A", "B")), 0.5, (0.5, "B")),
        (timeline("0 - 1/1/1\n5 - 2/2/2"), 10.0, None),  # no sample after the rise
    ],
)
def test_time_to_scale_up(
    rows: list[Sample], rise_t: float, expected: tuple[float, str] | None
) -> None:
    assert summary.time_to_scale_up(rows, rise_t) == expected


@pytest.mark.parametrize(
    ("rows", "fall_t", "expected"),
    [
        (BURST_THEN_CALM, 5.0, 2.0),  # back to 1 desired, 1 ready at t=7
        (BURST_THEN_CALM, 7.0, 0.0),
        (timeline("0 - 1/1/1\n1 - 2/2/2\n2 - 2/2/2"), 1.0, None),  # never came back
        # Desired lowered first, the draining replica still ready: not down yet.
        (timeline("0 - 1/1/1\n1 - 2/2/2\n2 - 1/2/2\n3 - 1/1/1"), 1.5, 1.5),
    ],
)
def test_time_to_scale_down(rows: list[Sample], fall_t: float, expected: float | None) -> None:
    # The load rose at 0.5 s (1 replica), the scale-up was seen at 1 s.
    assert summary.time_to_scale_down(rows, 0.5, fall_t, 1.0) == expected


def test_summarize_puts_it_together() -> None:
    requests = [summary.RequestCounts("burst", 16, 16, 0), summary.RequestCounts("calm", 3, 2, 1)]
    got = summary.summarize(BURST_THEN_CALM, PHASES, {"ttftP99Seconds": 0.5}, requests)
    assert got == {
        "load_rise": {"phase": "burst", "at_s": 1.0, "level": 8.0},
        "load_fall_at_s": 5.0,
        "time_to_scale_up_s": 3.0,
        "scaled_up_component": "Decode",
        "time_to_scale_down_s": 2.0,
        "seconds_over_slo": 3.0,
        "seconds_over_slo_by_bound": {"ttftP99Seconds": 3.0},
        "slo": {"ttftP99Seconds": 0.5},
        "replica_seconds": 1 + 1 + 2 + 2 + 2 + 2 + 2 + 1 + 0.0,
        "replica_seconds_by_component": {"Decode": 13.0},
        "requests_total": 19,
        "requests_succeeded": 18,
        "requests_failed": 1,
        "requests_by_phase": {
            "burst": {"total": 16, "succeeded": 16, "failed": 0},
            "calm": {"total": 3, "succeeded": 2, "failed": 1},
        },
        "duration_s": 8.0,
        "samples": 9,
    }
    empty = summary.summarize([], [], {}, [])
    assert empty["time_to_scale_up_s"] is None and empty["replica_seconds"] == 0.0
    assert empty["requests_failed"] == 0 and empty["load_rise"] is None


# ------------------------------------------------------------------ histogram quantiles

# The frontend's TTFT buckets (cumulative counts), abbreviated.
BUCKETS = ((0.0, 0.0), (0.1, 10.0), (0.22, 30.0), (0.47, 40.0), (1.0, 40.0), (INF, 40.0))


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, BUCKETS, 0.1 + 0.12 * (20 - 10) / 20),  # rank 20 in (0.1, 0.22]
        (0.25, BUCKETS, 0.1),  # rank 10: the top of the first bucket
        (0.1, BUCKETS, 0.1 * 4 / 10),  # the lowest bucket starts at 0
        (0.99, BUCKETS, 0.22 + 0.25 * (39.6 - 30) / 10),
        (1.0, BUCKETS, 0.47),
        (0.99, ((0.1, 1.0), (INF, 10.0)), 0.1),  # in +Inf: the highest finite bound
        (0.5, ((0.0, 4.0), (1.0, 4.0), (INF, 4.0)), 0.0),  # all in the le=0 bucket
        (0.5, ((0.1, 0.0), (INF, 0.0)), None),  # no observations
        (0.5, (), None),
        (0.5, ((0.1, 3.0),), None),  # no +Inf bucket: not a histogram
        (1.5, BUCKETS, None),
        # Cumulative counts that go down (a non-atomic scrape) are made monotonic.
        (0.5, ((0.1, 10.0), (0.2, 8.0), (INF, 20.0)), 0.1),
    ],
)
def test_histogram_quantile_is_prometheus_one(
    q: float, buckets: tuple[tuple[float, float], ...], expected: float | None
) -> None:
    got = metrics.histogram_quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


FRONTEND_TEXT = """\
# TYPE dynamo_frontend_requests_total counter
dynamo_frontend_requests_total{{model="m",status="success",request_type="stream"}} {ok}
dynamo_frontend_requests_total{{model="m",status="error",error_type="cancelled"}} {failed}
# TYPE dynamo_frontend_inflight_requests gauge
dynamo_frontend_inflight_requests{{model="m"}} {inflight}
# TYPE dynamo_frontend_time_to_first_token_seconds histogram
dynamo_frontend_time_to_first_token_seconds_bucket{{model="m",le="0.1"}} {t1}
dynamo_frontend_time_to_first_token_seconds_bucket{{model="m",le="1"}} {t2}
dynamo_frontend_time_to_first_token_seconds_bucket{{model="m",le="+Inf"}} {t2}
dynamo_frontend_time_to_first_token_seconds_sum{{model="m"}} 1
dynamo_frontend_time_to_first_token_seconds_count{{model="m"}} {t2}
# TYPE dynamo_frontend_inter_token_latency_seconds histogram
dynamo_frontend_inter_token_latency_seconds_bucket{{model="m",le="0.01"}} {i1}
dynamo_frontend_inter_token_latency_seconds_bucket{{model="m",le="+Inf"}} {i1}
dynamo_frontend_inter_token_latency_seconds_sum{{model="m"}} 1
dynamo_frontend_inter_token_latency_seconds_count{{model="m"}} {i1}
"""


def _scrape(**values: float) -> metrics.Totals:
    return metrics.parse_totals(FRONTEND_TEXT.format(**values))


def test_frontend_totals_and_window_figures() -> None:
    before = _scrape(ok=10, failed=1, inflight=3, t1=5, t2=10, i1=100)
    after = _scrape(ok=30, failed=3, inflight=8, t1=5, t2=30, i1=300)
    assert before == metrics.Totals(
        10, 1, 3, ((0.1, 5), (1.0, 10), (INF, 10)), ((0.01, 100), (INF, 100))
    )
    got = metrics.window(before, after, 10.0)
    assert got.request_rate == pytest.approx(2.2)  # (33 - 11) / 10 s, errors included
    assert got.errors_per_s == pytest.approx(0.2)
    assert got.inflight == 8
    # In the window: 0 in (0, 0.1], 20 in (0.1, 1].
    assert got.ttft_p50_s == pytest.approx(0.1 + 0.9 * 10 / 20)
    assert got.ttft_p99_s == pytest.approx(0.1 + 0.9 * 19.8 / 20)
    assert got.itl_p99_s == pytest.approx(0.01 * 0.99)
    # A frontend that restarted counts from zero, as rate() does.
    reset = metrics.window(after, before, 10.0)
    assert reset.request_rate == pytest.approx(1.1)
    assert reset.ttft_p50_s == pytest.approx(0.1)  # its own 10 observations, 5 below 0.1
    # No earlier scrape yet: only the gauge.
    assert metrics.window(None, after, 0.0) == metrics.Figures(inflight=8)
    # Two replicas add up bucket by bucket.
    both = metrics.add([before, after])
    assert both.requests_ok == 40 and both.ttft == ((0.1, 10), (1.0, 40), (INF, 40))
    assert metrics.window(after, after, 5.0).ttft_p99_s is None  # nothing finished


def test_promql_for_the_same_figures() -> None:
    queries = metrics.promql('dynamo_namespace="ns",role="frontend"', 10)
    assert queries["request_rate"] == (
        'sum(rate(dynamo_frontend_requests_total{dynamo_namespace="ns",role="frontend"}[10000ms]))'
    )
    assert queries["errors_per_s"] == (
        "sum(rate(dynamo_frontend_requests_total"
        '{dynamo_namespace="ns",role="frontend",status!="success"}[10000ms])) or vector(0)'
    )
    assert queries["ttft_p99_s"] == (
        "histogram_quantile(0.99, sum by (le) (rate("
        'dynamo_frontend_time_to_first_token_seconds_bucket{dynamo_namespace="ns",'
        'role="frontend"}[10000ms])))'
    )
    assert metrics.figures_from_values({"ttft_p99_s": math.nan, "inflight": 2.0}) == (
        metrics.Figures(inflight=2.0)
    )


# --------------------------------------------------------------------------- timeline


def test_timeline_csv_has_the_components_columns() -> None:
    sample = Sample(
        t=1.5,
        time=1700000000.25,
        phase="burst",
        target_concurrency=8,
        request_rate=2.0,
        ttft_p99_s=0.1234567,
        components={"Decode": ComponentSample(1, 1, 1, 0.25, 1024)},
        events=("scale Decode 1→2 (planner) ok in 3.0 s", "ready Decode/2 in 2.9 s"),
    )
    text = to_csv([sample, Sample(t=2.5, time=1700000001.25)], ["Decode"])
    header, first, second = text.splitlines()
    assert header == (
        "t_s,time,phase,target_concurrency,target_request_rate,request_rate,errors_per_s,"
        "inflight,ttft_p50_s,ttft_p99_s,itl_p50_s,itl_p99_s,Decode_desired,Decode_ready,"
        "Decode_running,Decode_cpu_cores,Decode_rss_bytes,events"
    )
    assert first == (
        "1.5,1700000000.25,burst,8,,2,,,,0.123457,,,1,1,1,0.25,1024,"
        "scale Decode 1→2 (planner) ok in 3.0 s; ready Decode/2 in 2.9 s"
    )
    assert second == "2.5,1700000001.25" + "," * 16  # phase, 9 figures, 5 counts, events


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (
            {"kind": "scale", "component": "Decode", "from_replicas": 1, "to_replicas": 2,
             "source": "planner", "outcome": "ok", "duration_s": 6.12},
            "scale Decode 1→2 (planner) ok in 6.1 s",
        ),
        (
            {"kind": "decision", "source": "planner", "outcome": "partial", "duration_s": 2,
             "reason": "no GPU", "details": {"decision_id": 3, "num_prefill_workers": 1,
                                             "num_decode_workers": 2}},
            "decision #3 prefill=1 decode=2, acknowledged (planner) partial in 2.0 s — no GPU",
        ),
        ({"kind": "ready", "component": "D", "replica": "D/2", "duration_s": 1.25},
         "ready D/2 in 1.2 s"),
        ({"kind": "exit", "replica": "D/1", "reason": "exited with code 1"},
         "exit D/1 — exited with code 1"),
    ],
)  # fmt: skip
def test_events_in_a_timeline_cell(event: dict[str, Any], text: str) -> None:
    assert describe_event(event) == text


# ----------------------------------------------------------------------------- aiperf


def _two_runs() -> Any:
    return parse_plan(
        {
            "tokenizer": "org/model",
            "seed": 7,
            "gracePeriod": 5,
            "phases": [
                {"name": "a", "concurrency": 8, "inputTokens": 100, "outputTokens": 20,
                 "duration": 10},
                {"name": "b", "requestRate": 2, "concurrency": 4, "inputTokens": 100,
                 "outputTokens": 20, "duration": 5},
                {"name": "c", "concurrency": 1, "inputTokens": {"mean": 50, "stddev": 5},
                 "outputTokens": 20, "duration": 5},
            ],
        }
    )  # fmt: skip


def test_phases_with_the_same_lengths_share_one_aiperf_run() -> None:
    plan = _two_runs()
    first, second = aiperf.segments(plan)
    assert [p.name for p in first.phases] == ["a", "b"] and first.name == "segment1"
    assert [p.name for p in second.phases] == ["c"] and second.load_seconds == 5
    doc = aiperf.config(plan, first, url="http://127.0.0.1:1", model="m", artifact_dir=Path("x"))
    assert doc["randomSeed"] == 7
    bench = doc["benchmark"]
    assert bench["endpoint"] == {"url": "http://127.0.0.1:1", "type": "chat", "streaming": True}
    assert bench["tokenizer"] == {"name": "org/model"}
    assert bench["dataset"]["prompts"] == {"isl": {"mean": 100}, "osl": {"mean": 20}}
    assert bench["phases"] == [
        {"name": "a", "kind": "profiling", "duration": 10.0, "gracePeriod": 5.0,
         "type": "concurrency", "concurrency": 8},
        {"name": "b", "kind": "profiling", "duration": 5.0, "gracePeriod": 5.0,
         "type": "poisson", "rate": 2.0, "concurrency": 4, "seamless": True},
    ]  # fmt: skip
    doc = aiperf.config(plan, second, url="u", model="m", artifact_dir=Path("x"))
    assert doc["benchmark"]["dataset"]["prompts"]["isl"] == {"mean": 50, "stddev": 5.0}


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (
            "22:09:42.294 NOTICE   Phase burst (profiling) started | phase_index=0 | "
            "profiling_index=0 | target: 10.0s duration (runner.py:660)",
            aiperf.PhaseLine("burst", "started"),
        ),
        (
            "22:09:52.295 NOTICE   Phase burst (profiling) sending complete | sent=24",
            aiperf.PhaseLine("burst", "sending complete"),
        ),
        (
            "22:09:52.314 NOTICE   Phase calm (profiling) complete | completed=16",
            aiperf.PhaseLine("calm", "complete"),
        ),
        ("22:09:52.297 WARNING  Phase profiling timed out, cancelling all credits.", None),
    ],
)
def test_aiperf_phase_lines(line: str, parsed: aiperf.PhaseLine | None) -> None:
    assert aiperf.parse_phase_line(line) == parsed


def test_request_counts_from_aiperf_exports(tmp_path: Path) -> None:
    manifest = {
        "phases": [
            {"phase_name": "a", "total_request_count": 16, "successful_request_count": 15,
             "error_request_count": 1},
            {"phase_name": "b", "total_request_count": 6, "successful_request_count": 6,
             "error_request_count": 0},
        ]
    }  # fmt: skip
    (tmp_path / "phase_manifest.json").write_text(json.dumps(manifest))
    assert aiperf.read_results(tmp_path, ["a", "b"]) == [
        aiperf.PhaseResult("a", 16, 15, 1),
        aiperf.PhaseResult("b", 6, 6, 0),
    ]
    single = tmp_path / "single"
    single.mkdir()
    export = {
        "request_count": {"unit": "requests", "avg": 24.0},
        "error_summary": [{"error_details": {"code": 500}, "count": 2}],
    }
    (single / "profile_export_aiperf.json").write_text(json.dumps(export))
    assert aiperf.read_results(single, ["only"]) == [aiperf.PhaseResult("only", 26, 24, 2)]
    assert aiperf.read_results(tmp_path / "nothing", ["x"]) == []


def test_aiperf_env_drops_what_breaks_it() -> None:
    env = aiperf.aiperf_env(
        {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": "/x", "PATH": "/bin"}
    )
    assert env == {"PATH": "/bin", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


def test_finding_aiperf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "aiperf"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert aiperf.find_aiperf(str(exe), env={}) == exe
    assert aiperf.find_aiperf(None, env={"AIPERF": str(exe)}) == exe
    with pytest.raises(aiperf.AiperfMissing) as caught:
        aiperf.find_aiperf(str(tmp_path / "nope"), env={})
    assert (
        str(caught.value) == f"--aiperf names {tmp_path / 'nope'}, which is not an executable file"
    )
    with pytest.raises(aiperf.AiperfMissing) as caught:
        aiperf.find_aiperf(None, env={"AIPERF": str(tmp_path)})
    assert str(caught.value) == f"$AIPERF names {tmp_path}, which is not an executable file"
    monkeypatch.setattr(aiperf.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(aiperf.AiperfMissing) as caught:
        aiperf.find_aiperf(None, env={})
    sibling = tmp_path / ".venv-aiperf" / "bin" / "aiperf"
    assert str(caught.value) == (
        f"aiperf is not installed (looked at {sibling}, PATH): scripts/setup.sh installs it "
        "into .venv-aiperf; or point --aiperf or $AIPERF at one"
    )
    sibling.parent.mkdir(parents=True)
    sibling.write_text("#!/bin/sh\n")
    sibling.chmod(0o755)
    assert aiperf.find_aiperf(None, env={}) == sibling
    assert os.access(sibling, os.X_OK)


# ----------------------------------------------------------------------------- report


def test_the_report_is_one_self_contained_page() -> None:
    pytest.importorskip("plotly")
    from connector.experiment import report

    plan = parse_plan(
        {
            "name": "table",
            "tokenizer": "org/model",
            "slo": {"ttftP99Seconds": 0.5},
            "phases": [
                {"name": "burst", "concurrency": 8, "inputTokens": 1, "outputTokens": 1,
                 "duration": 4},
                {"name": "calm", "concurrency": 1, "inputTokens": 1, "outputTokens": 1,
                 "duration": 3},
            ],
        }
    )  # fmt: skip
    events = [
        {"seq": 1, "time": 1003.5, "kind": "scale", "component": "Decode", "from_replicas": 1,
         "to_replicas": 2, "source": "planner", "outcome": "ok", "duration_s": 1.5},
        {"seq": 2, "time": 1003.6, "kind": "decision", "source": "planner", "outcome": "ok",
         "details": {"decision_id": 0, "num_prefill_workers": 1, "num_decode_workers": 2}},
    ]  # fmt: skip
    figures = summary.summarize(BURST_THEN_CALM, PHASES, plan.slo, [])
    page = report.render(plan, BURST_THEN_CALM, ["Decode"], PHASES, events, figures, 1000.0)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and not [tag for tag in scripts if "src" in tag]  # plotly.js is inlined
    assert "Plotly" in page and len(page) > 1_000_000
    assert page.count('class="plotly-graph-div"') == 2  # the overview and Decode
    # The scale marker's hover text (plotly's JSON writes the arrow as \u2192).
    assert "scale Decode 1\\u21922 (planner) ok in 1.5 s" in page
    assert "<tr data-key='time_to_scale_up_s'><th>" in page


@pytest.mark.parametrize(
    ("tail", "said"),
    [
        (["INFO starting", "ERROR    Dataset configuration failed: no tokenizer", "bye"],
         ": ERROR Dataset configuration failed: no tokenizer"),
        (["╭─ Error Running AIPerf System ──╮", "│ 2 validation errors for AIPerfConfig │",
          "╰──────────────────────────────╯"],
         ": 2 validation errors for AIPerfConfig"),
        (["all fine", "exiting"], ""),
    ],
)  # fmt: skip
def test_a_failed_aiperf_run_says_why(tail: list[str], said: str) -> None:
    assert aiperf._last_error(tail) == said
