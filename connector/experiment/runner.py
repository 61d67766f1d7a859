"""One experiment against a running ``dynamo-local up``, through its HTTP API only: find the
frontend (its port from ``GET /v1/components/{name}``) and the model, start the sampler,
drive the plan's phases with aiperf while whatever drives scaling (the Planner, a policy,
a person) scales the graph, keep sampling through the cool-down, then write the run folder:

- ``plan.yaml``: the plan as given;
- ``timeline.csv``: one row per sample (:mod:`connector.experiment.timeline`);
- ``events.jsonl``: every connector event of the run, as ``GET /v1/events`` gave it;
- ``summary.json``: the figures of :mod:`connector.experiment.summary`, plus what failed;
- ``report.html``: the charts (:mod:`connector.experiment.report`);
- ``aiperf/segmentN/``: aiperf's config, log and exports.

Everything is async and bounded: aiperf runs under a ceiling (its phases, grace and
start-up allowance), the sampler under a sample count, each API call under a deadline;
files are written in threads.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from connector.client import ApiError, Unreachable
from connector.experiment import aiperf, report, summary, timeline
from connector.experiment.plan import Plan
from connector.experiment.sampler import (
    LOOPBACK,
    FrontendSource,
    GraphApi,
    Load,
    PrometheusSource,
    Sampler,
    ScrapeSource,
)

FRONTEND_WAIT_S = 90.0


class ExperimentError(RuntimeError):
    """The experiment cannot run against this graph (no frontend, no model, ...)."""


@dataclass(frozen=True)
class Target:
    namespace: str
    components: tuple[str, ...]
    frontends: tuple[str, ...]
    frontend_url: str
    model: str


async def _models(url: str) -> list[str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=3)) as resp,
    ):
        if resp.status != 200:
            return []
        body = await resp.json()
    return [str(m["id"]) for m in body.get("data", []) if "id" in m]


async def discover(api: GraphApi, plan: Plan, *, wait_s: float = FRONTEND_WAIT_S) -> Target:
    """The graph's components and its frontend's URL and model, waiting (bounded) until a
    frontend replica is ready and lists a model."""
    deadline = time.monotonic() + wait_s
    why = "no answer yet"
    while True:
        listing = await api.components()
        names = tuple(c["name"] for c in listing.get("components", []))
        frontends = tuple(
            c["name"] for c in listing.get("components", []) if c.get("role") == "frontend"
        )
        if not frontends:
            raise ExperimentError(
                "the graph has no frontend component (componentType: frontend) to send load to"
            )
        detail = await api.component(frontends[0])
        ports = [
            r["ports"]["http"]
            for r in detail.get("replicas", [])
            if r.get("ready") and (r.get("ports") or {}).get("http")
        ]
        if ports:
            url = f"http://{LOOPBACK}:{ports[0]}"
            try:
                models = await _models(url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                models, why = [], f"{url}/v1/models: {exc}"
            if plan.model is not None and plan.model in models:
                return Target(listing["namespace"], names, frontends, url, plan.model)
            if plan.model is None and models:
                return Target(listing["namespace"], names, frontends, url, models[0])
            why = f"{url}/v1/models lists {models}"
        else:
            why = f"{frontends[0]} has no ready replica with an http port"
        if time.monotonic() >= deadline:
            wanted = f"model {plan.model!r}" if plan.model else "a model"
            raise ExperimentError(f"no frontend serves {wanted} after {wait_s:g} s: {why}")
        await asyncio.sleep(1.0)


class PhaseTracker:
    """When each phase started and stopped sending, as aiperf reports it; the load asked
    for at any moment; how far the experiment has come (for the progress bar)."""

    def __init__(self, plan: Plan, started_at: float) -> None:
        self.plan = plan
        self.started_at = started_at
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.load_over_at: float | None = None
        self.listeners: list[Callable[[str, str], None]] = []

    def on_line(self, line: aiperf.PhaseLine, at: float) -> None:
        if line.what == "started" and line.phase not in self.start:
            self.start[line.phase] = at
            for listener in self.listeners:
                listener(line.phase, "started")
        elif line.what in ("sending complete", "complete") and line.phase not in self.end:
            self.end[line.phase] = at

    def finish(self, at: float) -> None:
        """The load is over: a phase still open (aiperf died) ends now."""
        for name in self.start:
            self.end.setdefault(name, at)
        self.load_over_at = at

    def current(self, now: float) -> Load:
        running = None
        for phase in self.plan.phases:
            began = self.start.get(phase.name)
            if began is None or began > now:
                continue
            ended = self.end.get(phase.name)
            if ended is None or ended > now:
                running = phase
        if running is None:
            return Load()
        return Load(running.name, running.concurrency, running.request_rate)

    def progress(self, now: float) -> tuple[float, str]:
        """(seconds done out of the plan's load + cool-down, what is happening)."""
        done = 0.0
        for i, phase in enumerate(self.plan.phases):
            began = self.start.get(phase.name)
            if began is None:
                label = "aiperf starting" if i == 0 else f"aiperf starting for {phase.name}"
                return done, label if self.load_over_at is None else "finishing"
            ended = self.end.get(phase.name)
            if ended is None or ended > now:
                return done + min(now - began, phase.duration_s), phase.name
            done += phase.duration_s
        over = self.load_over_at
        if over is None:
            return done, "requests finishing"
        return done + min(max(now - over, 0.0), self.plan.cooldown_s), "cool-down"

    def runs(self) -> list[summary.PhaseRun]:
        def rel(t: float | None) -> float | None:
            return None if t is None else t - self.started_at

        return [
            summary.PhaseRun(
                p.name, p.level, rel(self.start.get(p.name)), rel(self.end.get(p.name))
            )
            for p in self.plan.phases
        ]


@dataclass
class Outcome:
    folder: Path
    summary: dict[str, Any]
    errors: list[str] = field(default_factory=list)


def _max_samples(plan: Plan, segs: Sequence[aiperf.Segment]) -> int:
    ceiling = sum(s.load_seconds + plan.grace_period_s + aiperf.STARTUP_ALLOWANCE_S for s in segs)
    return math.ceil((ceiling + plan.cooldown_s + 60.0) / plan.interval_s)


async def run_experiment(
    plan: Plan,
    api: GraphApi,
    folder: Path,
    *,
    executable: Path,
    on_sample: Callable[[timeline.Sample, PhaseTracker], None] | None = None,
    on_phase: Callable[[str, str], None] | None = None,
    target: Target | None = None,
    plan_text: str | None = None,
) -> Outcome:
    """Run ``plan`` and write its run folder. ``plan_text``: the plan as it was given when it
    did not come from a file (through the API), written as ``plan.yaml``; otherwise the file
    ``plan.source`` names is copied. Cancelled, it stops aiperf, writes what was sampled and
    raises CancelledError."""
    target = target or await discover(api, plan)
    folder = await asyncio.to_thread(folder.absolute)  # aiperf runs inside it
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    given = Path(plan.source) if plan.source and plan_text is None else None
    if plan_text is not None:
        await asyncio.to_thread(_write, folder / "plan.yaml", plan_text)
    elif given is not None and await asyncio.to_thread(given.is_file):
        await asyncio.to_thread(shutil.copyfile, given, folder / "plan.yaml")
    source: FrontendSource
    if plan.prometheus is not None:
        selector = plan.prometheus.selector or (
            f'dynamo_namespace="{target.namespace}",role="frontend"'
        )
        source = PrometheusSource(plan.prometheus.url, selector, plan.window_s)
    else:
        source = ScrapeSource(api, target.frontends, plan.window_s)
    events_since = int((await api.events(limit=1)).get("last_seq", 0))
    started_at = time.time()
    tracker = PhaseTracker(plan, started_at)
    if on_phase is not None:
        tracker.listeners.append(on_phase)
    sampler = Sampler(
        api,
        target.components,
        source,
        started_at=started_at,
        interval_s=plan.interval_s,
        load=tracker.current,
        events_since=events_since,
        on_sample=None if on_sample is None else (lambda s: on_sample(s, tracker)),
    )
    segs = aiperf.segments(plan)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop, _max_samples(plan, segs)))
    errors: list[str] = []
    results: list[aiperf.SegmentResult] = []
    interrupted: BaseException | None = None
    try:
        for seg in segs:
            result = await aiperf.run_segment(
                executable,
                plan,
                seg,
                url=target.frontend_url,
                model=target.model,
                folder=folder / "aiperf" / seg.name,
                on_phase=tracker.on_line,
            )
            results.append(result)
            if result.error:
                errors.append(f"{seg.name}: {result.error}")
                break
        tracker.finish(time.time())
        if plan.cooldown_s and not errors:
            await _sleep_unless_done(sampling, plan.cooldown_s)
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:
        # Stopped (Ctrl-C): aiperf is already stopped; what was sampled is still written.
        interrupted = exc
        tracker.finish(time.time())
        errors.append("interrupted")
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(sampling), 15.0)
        except TimeoutError:
            sampling.cancel()
            errors.append("the sampler did not stop within 15 s")
        await source.close()
    requests = [
        summary.RequestCounts(p.name, p.total, p.succeeded, p.failed)
        for r in results
        for p in r.phases
    ]
    figures = summary.summarize(sampler.samples, tracker.runs(), plan.slo, requests)
    figures["errors"] = errors
    figures["sampling_failures"] = dict(sampler.stats.failures)
    figures["target"] = {
        "namespace": target.namespace,
        "frontend_url": target.frontend_url,
        "model": target.model,
        "prometheus": plan.prometheus.url if plan.prometheus else None,
    }
    await write_outputs(plan, folder, sampler, tracker, figures, started_at)
    if interrupted is not None:
        raise interrupted
    return Outcome(folder, figures, errors)


async def _sleep_unless_done(task: asyncio.Task[None], seconds: float) -> None:
    await asyncio.wait({task}, timeout=seconds)


async def write_outputs(
    plan: Plan,
    folder: Path,
    sampler: Sampler,
    tracker: PhaseTracker,
    figures: dict[str, Any],
    started_at: float,
) -> None:
    components = sampler.components
    csv_text = timeline.to_csv(sampler.samples, components)
    events_text = "".join(json.dumps(e) + "\n" for e in sampler.events)
    await asyncio.to_thread(_write, folder / "timeline.csv", csv_text)
    await asyncio.to_thread(_write, folder / "events.jsonl", events_text)
    await asyncio.to_thread(
        _write, folder / "summary.json", json.dumps(figures, indent=2, default=str) + "\n"
    )
    try:
        page = await asyncio.to_thread(
            report.render,
            plan,
            sampler.samples,
            components,
            tracker.runs(),
            sampler.events,
            figures,
            started_at,
        )
    except ImportError as exc:  # plotly comes with the dynamo extra (x86_64 only)
        figures["errors"].append(f"no report.html: {exc} (pip install plotly)")
        await asyncio.to_thread(
            _write, folder / "summary.json", json.dumps(figures, indent=2, default=str) + "\n"
        )
        return
    await asyncio.to_thread(_write, folder / "report.html", page)


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


__all__ = [
    "ApiError",
    "ExperimentError",
    "Outcome",
    "PhaseTracker",
    "Target",
    "Unreachable",
    "discover",
    "run_experiment",
]
