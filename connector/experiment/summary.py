"""The figures an experiment is judged by, as pure functions of the timeline, the phases as
they ran and aiperf's request counts (``summary.json``).

- **Load rising** is the start of the first phase at the plan's highest load (its request
  rate, else its concurrency). **Time to scale up** runs from there to the first sample in
  which some component has more ready replicas than it had when the load rose.
- **Load falling** is the start of the first later phase with less load, else the end of
  the last phase. **Time to scale down** runs from there to the first sample in which every
  component is back to (at most) the replicas, desired and ready, it had when the load
  rose; only when something scaled up.
- **Seconds over the SLO**: the time (each sample stands for the time until the next) in
  which a bounded figure (TTFT/ITL p50/p99 over the sampling window) was above its bound;
  per bound, and ``any`` for the time any of them was.
- **Replica-seconds** (the cost): running replicas (starting or ready) times seconds, per
  component and in total.
- **Requests** (aiperf's count): sent, succeeded, failed, per phase and in total.

Times are at the sampling interval's resolution.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connector.experiment.plan import SLO_COLUMNS
from connector.experiment.timeline import Sample


@dataclass(frozen=True)
class PhaseRun:
    """A phase as it ran: its load level and when aiperf said it started and stopped
    sending (seconds since the experiment started; ``None``: it never did)."""

    name: str
    level: float
    start_t: float | None
    end_t: float | None


@dataclass(frozen=True)
class RequestCounts:
    phase: str
    total: int
    succeeded: int
    failed: int


def _durations(samples: Sequence[Sample]) -> list[float]:
    """How long each sample stands for: until the next one (the last: nothing)."""
    gaps = [max(0.0, b.t - a.t) for a, b in itertools.pairwise(samples)]
    return [*gaps, 0.0] if samples else []


def replica_seconds(samples: Sequence[Sample]) -> dict[str, float]:
    out: dict[str, float] = {}
    for sample, dt in zip(samples, _durations(samples), strict=True):
        for name, c in sample.components.items():
            out[name] = out.get(name, 0.0) + (c.running or 0) * dt
    return out


def seconds_over_slo(samples: Sequence[Sample], slo: Mapping[str, float]) -> dict[str, float]:
    out = dict.fromkeys(slo, 0.0)
    out["any"] = 0.0
    for sample, dt in zip(samples, _durations(samples), strict=True):
        over = False
        for key, bound in slo.items():
            value = sample.value(SLO_COLUMNS[key])
            if value is not None and value > bound:
                out[key] += dt
                over = True
        if over:
            out["any"] += dt
    return out


def load_rise(phases: Sequence[PhaseRun]) -> PhaseRun | None:
    """The first phase that ran at the highest load."""
    ran = [p for p in phases if p.start_t is not None]
    if not ran:
        return None
    peak = max(p.level for p in ran)
    return next(p for p in ran if p.level == peak)


def load_fall(phases: Sequence[PhaseRun], rise: PhaseRun) -> float | None:
    """When the load fell after ``rise``: the first later phase with less load starting,
    else the last phase ending."""
    ran = [p for p in phases if p.start_t is not None]
    after = ran[ran.index(rise) + 1 :]
    for p in after:
        if p.level < rise.level:
            return p.start_t
    return ran[-1].end_t


def _before(samples: Sequence[Sample], t: float) -> Sample | None:
    """The last sample at or before ``t`` (else the first one)."""
    chosen = None
    for s in samples:
        if s.t <= t:
            chosen = s
        else:
            break
    return chosen if chosen is not None else (samples[0] if samples else None)


def time_to_scale_up(samples: Sequence[Sample], rise_t: float) -> tuple[float, str] | None:
    """Seconds from ``rise_t`` to the first sample with more ready replicas of a component
    than when the load rose, and that component."""
    base = _before(samples, rise_t)
    if base is None:
        return None
    for s in samples:
        if s.t < rise_t:
            continue
        for name, c in s.components.items():
            was = base.components.get(name)
            if (
                c.ready is not None
                and was is not None
                and was.ready is not None
                and (c.ready > was.ready)
            ):
                return s.t - rise_t, name
    return None


def time_to_scale_down(
    samples: Sequence[Sample], rise_t: float, fall_t: float, scaled_up_at: float
) -> float | None:
    """Seconds from ``fall_t`` to the first sample (after the scale-up) in which every
    component wants and has at most the replicas it had when the load rose."""
    base = _before(samples, rise_t)
    if base is None:
        return None
    for s in samples:
        if s.t < max(fall_t, scaled_up_at):
            continue
        back = True
        for name, c in s.components.items():
            was = base.components.get(name)
            if was is None or was.ready is None:
                continue
            limit = max(was.ready, was.desired or 0)
            if (c.ready or 0) > limit or (c.desired or 0) > limit:
                back = False
                break
        if back:
            return s.t - fall_t
    return None


def summarize(
    samples: Sequence[Sample],
    phases: Sequence[PhaseRun],
    slo: Mapping[str, float],
    requests: Sequence[RequestCounts],
) -> dict[str, Any]:
    """``summary.json``'s figures."""
    rise = load_rise(phases)
    scale_up: tuple[float, str] | None = None
    scale_down: float | None = None
    fall_t: float | None = None
    if rise is not None and rise.start_t is not None:
        scale_up = time_to_scale_up(samples, rise.start_t)
        fall_t = load_fall(phases, rise)
        if scale_up is not None and fall_t is not None:
            scale_down = time_to_scale_down(
                samples, rise.start_t, fall_t, rise.start_t + scale_up[0]
            )
    cost = replica_seconds(samples)
    over = seconds_over_slo(samples, slo)
    return {
        "load_rise": None
        if rise is None
        else {"phase": rise.name, "at_s": _round(rise.start_t), "level": rise.level},
        "load_fall_at_s": _round(fall_t),
        "time_to_scale_up_s": None if scale_up is None else _round(scale_up[0]),
        "scaled_up_component": None if scale_up is None else scale_up[1],
        "time_to_scale_down_s": _round(scale_down),
        "seconds_over_slo": _round(over["any"]),
        "seconds_over_slo_by_bound": {k: _round(v) for k, v in over.items() if k != "any"},
        "slo": dict(slo),
        "replica_seconds": _round(sum(cost.values())),
        "replica_seconds_by_component": {k: _round(v) for k, v in cost.items()},
        "requests_total": sum(r.total for r in requests),
        "requests_succeeded": sum(r.succeeded for r in requests),
        "requests_failed": sum(r.failed for r in requests),
        "requests_by_phase": {
            r.phase: {"total": r.total, "succeeded": r.succeeded, "failed": r.failed}
            for r in requests
        },
        "duration_s": _round(samples[-1].t - samples[0].t) if samples else 0.0,
        "samples": len(samples),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
