"""``report.html``: one self-contained page (plotly's JavaScript inlined, nothing fetched from
anywhere) with the summary, an overview chart (every component's ready replicas, the load,
the latency, the Planner's decisions) and one chart per component (its replicas desired,
running and ready with its scale operations marked, against the load and the latency, and
its CPU and memory). Load phases are shaded on every chart.

plotly comes with the Dynamo Planner's dependencies (the ``dynamo`` extra); it is imported
only when a report is written.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from connector.experiment.plan import SLO_COLUMNS, Plan
from connector.experiment.summary import PhaseRun
from connector.experiment.timeline import Sample, describe_event, timeline_events

PHASE_COLOURS = ("rgba(99,110,250,0.10)", "rgba(239,85,59,0.10)", "rgba(0,204,150,0.10)")
MIB = 1024 * 1024


def _t(samples: Sequence[Sample]) -> list[float]:
    return [round(s.t, 3) for s in samples]


def _shade_phases(fig: Any, phases: Sequence[PhaseRun], end_t: float) -> None:
    for i, p in enumerate(phases):
        if p.start_t is None:
            continue
        fig.add_vrect(
            x0=p.start_t,
            x1=p.end_t if p.end_t is not None else end_t,
            fillcolor=PHASE_COLOURS[i % len(PHASE_COLOURS)],
            line_width=0,
            layer="below",
        )
        fig.add_annotation(  # once, above the top chart
            x=p.start_t,
            y=1.0,
            xref="x",
            yref="y domain",
            text=f"<b>{html.escape(p.name)}</b>",
            showarrow=False,
            xanchor="left",
            yanchor="top",
        )


def _load_traces(fig: Any, go: Any, samples: Sequence[Sample], row: int) -> None:
    t = _t(samples)
    fig.add_trace(
        go.Scatter(
            x=t,
            y=[s.target_concurrency for s in samples],
            name="target concurrency",
            line={"shape": "hv", "dash": "dot", "color": "#636efa"},
        ),
        row=row,
        col=1,
    )
    if any(s.target_request_rate is not None for s in samples):
        fig.add_trace(
            go.Scatter(
                x=t,
                y=[s.target_request_rate for s in samples],
                name="target req/s",
                line={"shape": "hv", "dash": "dot", "color": "#ab63fa"},
            ),
            row=row,
            col=1,
        )
    fig.add_trace(
        go.Scatter(
            x=t, y=[s.inflight for s in samples], name="in flight", line={"color": "#00cc96"}
        ),
        row=row,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=t, y=[s.request_rate for s in samples], name="req/s done", line={"color": "#ef553b"}
        ),
        row=row,
        col=1,
    )
    if any(s.errors_per_s for s in samples):
        fig.add_trace(
            go.Scatter(
                x=t, y=[s.errors_per_s for s in samples], name="errors/s", line={"color": "black"}
            ),
            row=row,
            col=1,
        )


def _latency_traces(
    fig: Any, go: Any, samples: Sequence[Sample], slo: Mapping[str, float], row: int
) -> None:
    t = _t(samples)
    for column, label, colour in (
        ("ttft_p50_s", "TTFT p50", "#19d3f3"),
        ("ttft_p99_s", "TTFT p99", "#636efa"),
        ("itl_p99_s", "ITL p99", "#ffa15a"),
    ):
        fig.add_trace(
            go.Scatter(
                x=t, y=[s.value(column) for s in samples], name=label, line={"color": colour}
            ),
            row=row,
            col=1,
        )
    # TTFT and ITL differ by orders of magnitude (and a queue makes TTFT jump): log scale.
    fig.update_yaxes(type="log", row=row, col=1)
    for key, bound in slo.items():  # a trace, not an hline: its label stays right on log axes
        fig.add_trace(
            go.Scatter(
                x=[t[0], t[-1]] if t else [],
                y=[bound, bound],
                mode="lines",
                name=f"SLO {SLO_COLUMNS[key]} {bound:g} s",
                line={"dash": "dash", "color": "red", "width": 1},
                hoverinfo="name",
            ),
            row=row,
            col=1,
        )


def _layout(fig: Any, title: str, height: int, rows: int) -> None:
    fig.update_layout(
        title=title,
        height=height,
        margin={"l": 60, "r": 30, "t": 60, "b": 40},
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.08},
        template="plotly_white",
    )
    fig.update_xaxes(title_text="seconds since the experiment started", row=rows, col=1)


def overview(
    samples: Sequence[Sample],
    components: Sequence[str],
    phases: Sequence[PhaseRun],
    events: Sequence[Mapping[str, Any]],
    slo: Mapping[str, float],
    started_at: float,
) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=("ready replicas", "load", "latency (s, log scale)"),
    )
    t = _t(samples)
    for name in components:
        fig.add_trace(
            go.Scatter(
                x=t,
                y=[s.components[name].ready if name in s.components else None for s in samples],
                name=f"{name} ready",
                line={"shape": "hv"},
            ),
            row=1,
            col=1,
        )
    decisions = [e for e in events if e.get("kind") in ("decision", "autoscale")]
    if decisions:
        fig.add_trace(
            go.Scatter(
                x=[round(float(e["time"]) - started_at, 3) for e in decisions],
                y=[0] * len(decisions),
                mode="markers",
                marker={"symbol": "x", "size": 10, "color": "black"},
                name="Planner/policy decision",
                hovertext=[describe_event(e) for e in decisions],
                hoverinfo="text+x",
            ),
            row=1,
            col=1,
        )
    _load_traces(fig, go, samples, 2)
    _latency_traces(fig, go, samples, slo, 3)
    _shade_phases(fig, phases, t[-1] if t else 0.0)
    _layout(fig, "Overview: replicas against load and latency", 820, 3)
    return fig


def component_chart(
    name: str,
    samples: Sequence[Sample],
    phases: Sequence[PhaseRun],
    events: Sequence[Mapping[str, Any]],
    slo: Mapping[str, float],
    started_at: float,
) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=4,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.05,
        subplot_titles=(
            f"{name} replicas",
            "load",
            "latency (s, log scale)",
            "CPU (cores) and RSS (MiB)",
        ),
        specs=[[{}], [{}], [{}], [{"secondary_y": True}]],
    )
    t = _t(samples)

    def series(field: str) -> list[Any]:
        return [
            getattr(s.components[name], field) if name in s.components else None for s in samples
        ]

    for field, dash, colour in (
        ("desired", "dash", "#636efa"),
        ("running", "dot", "#ab63fa"),
        ("ready", "solid", "#00cc96"),
    ):
        fig.add_trace(
            go.Scatter(
                x=t,
                y=series(field),
                name=field,
                line={"shape": "hv", "dash": dash, "color": colour},
                legendgroup="replicas",
            ),
            row=1,
            col=1,
        )
    scales = [
        e
        for e in timeline_events(events)
        if e.get("kind") == "scale" and e.get("component") == name
    ]
    if scales:
        fig.add_trace(
            go.Scatter(
                x=[round(float(e["time"]) - started_at, 3) for e in scales],
                y=[e.get("to_replicas") for e in scales],
                mode="markers",
                marker={
                    "symbol": [
                        "triangle-up"
                        if (e.get("to_replicas") or 0) >= (e.get("from_replicas") or 0)
                        else "triangle-down"
                        for e in scales
                    ],
                    "size": 12,
                    "color": "#ef553b",
                },
                name="scale operation (done)",
                hovertext=[describe_event(e) for e in scales],
                hoverinfo="text+x",
            ),
            row=1,
            col=1,
        )
        for e in scales:
            done = float(e["time"]) - started_at
            began = done - float(e.get("duration_s") or 0.0)
            fig.add_vrect(
                x0=began, x1=done, fillcolor="rgba(239,85,59,0.25)", line_width=0, row=1, col=1
            )
    _load_traces(fig, go, samples, 2)
    _latency_traces(fig, go, samples, slo, 3)
    fig.add_trace(
        go.Scatter(x=t, y=series("cpu_cores"), name="CPU cores", line={"color": "#ff6692"}),
        row=4,
        col=1,
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=t,
            y=[None if v is None else round(v / MIB, 1) for v in series("rss_bytes")],
            name="RSS MiB",
            line={"color": "#b6e880"},
        ),
        row=4,
        col=1,
        secondary_y=True,
    )
    _shade_phases(fig, phases, t[-1] if t else 0.0)
    _layout(fig, name, 900, 4)
    return fig


HEADLINES = (
    ("time_to_scale_up_s", "time from load rising to the first new ready replica", " s"),
    ("scaled_up_component", "component that scaled up first", ""),
    ("time_to_scale_down_s", "time from load falling to scaled back down", " s"),
    ("seconds_over_slo", "seconds over the SLO", " s"),
    ("replica_seconds", "replica-seconds (running replicas times seconds)", ""),
    ("requests_total", "requests sent (aiperf)", ""),
    ("requests_failed", "requests failed (aiperf)", ""),
)


def _summary_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for key, label, unit in HEADLINES:
        value = summary.get(key)
        shown = "—" if value is None else f"{value}{unit}"
        rows.append(
            f"<tr data-key='{key}'><th>{html.escape(label)}</th><td>{html.escape(shown)}</td></tr>"
        )
    everything = html.escape(json.dumps(summary, indent=2, default=str))
    return (
        "<table class='summary'>"
        + "".join(rows)
        + "</table><details><summary>summary.json</summary>"
        + f"<pre>{everything}</pre></details>"
    )


def render(
    plan: Plan,
    samples: Sequence[Sample],
    components: Sequence[str],
    phases: Sequence[PhaseRun],
    events: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    started_at: float,
) -> str:
    """The whole page."""
    figures = [overview(samples, components, phases, events, plan.slo, started_at)]
    figures += [
        component_chart(name, samples, phases, events, plan.slo, started_at) for name in components
    ]
    config = {"displaylogo": False, "responsive": True}
    charts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), config=config)
        for i, fig in enumerate(figures)
    ]
    phase_items = "".join(f"<li>{html.escape(p.describe())}</li>" for p in plan.phases)
    title = html.escape(f"dynamo-local experiment: {plan.name}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table.summary {{ border-collapse: collapse; font-size: 0.9rem; }}
table.summary th {{ text-align: left; padding: 2px 12px 2px 0; font-weight: 600; }}
table.summary td {{ font-family: ui-monospace, monospace; }}
.chart {{ margin-top: 1.5rem; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Plan {html.escape(plan.source)}, seed {plan.seed}, sampled every {plan.interval_s:g} s
(rates and percentiles over {plan.window_s:g} s).</p>
<ul>{phase_items}</ul>
{_summary_table(summary)}
{"".join(f'<div class="chart">{c}</div>' for c in charts)}
</body></html>
"""
