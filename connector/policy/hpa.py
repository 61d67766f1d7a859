"""The Horizontal Pod Autoscaler's algorithm, as pure functions over numbers and timestamps.

What the Kubernetes documentation says the HPA controller does
(https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details
and #configurable-scaling-behavior), one function per step:

1. :func:`replicas_for_metric`: ``desired = ceil(current * metric / target)``, skipped when
   the ratio is within the tolerance (0.1) of 1; an ``AverageValue`` target divides the
   metric by the current replicas first.
2. :func:`combine`: the largest proposal over all metrics; scaling is skipped when a metric
   is missing and the others suggest a scale-down (or all are missing).
3. :func:`stabilize`: the stabilization windows: a scale-up takes the lowest, a scale-down
   the highest recommendation of its window.
4. :func:`rate_limit`: the scaling policies (``Pods``/``Percent`` per ``periodSeconds``,
   ``selectPolicy`` Max/Min/Disabled) and min/max replicas.

No I/O and no clock: every function takes ``now`` (seconds, any monotonic origin) and
returns a new state, so the table tests in ``tests/test_policy_hpa.py`` can replay the
documented examples exactly. :mod:`connector.policy.keda` puts KEDA's activation in front.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

# --horizontal-pod-autoscaler-tolerance, 0.1 by default.
TOLERANCE = 0.1


class MetricType(StrEnum):
    """How a metric is compared with its target (``metricType`` of a KEDA trigger)."""

    AVERAGE_VALUE = "AverageValue"  # KEDA's default: the value is divided by the replicas
    VALUE = "Value"


class PolicyType(StrEnum):
    PODS = "Pods"
    PERCENT = "Percent"


class SelectPolicy(StrEnum):
    MAX = "Max"  # the policy that allows the largest change (the default)
    MIN = "Min"  # the policy that allows the smallest change
    DISABLED = "Disabled"  # no scaling in that direction


@dataclass(frozen=True)
class ScalingPolicy:
    type: PolicyType
    value: int
    period_s: int

    def describe(self) -> str:
        unit = "%" if self.type is PolicyType.PERCENT else ""
        return f"{self.type.value} {self.value}{unit} per {self.period_s} s"


@dataclass(frozen=True)
class ScalingRules:
    """One direction of ``behavior`` (``scaleUp`` or ``scaleDown``)."""

    stabilization_window_s: int
    policies: tuple[ScalingPolicy, ...]
    select: SelectPolicy = SelectPolicy.MAX


# The documented defaults ("Default Behavior"), which fill whatever a behavior leaves out.
DEFAULT_SCALE_UP = ScalingRules(
    0,
    (ScalingPolicy(PolicyType.PERCENT, 100, 15), ScalingPolicy(PolicyType.PODS, 4, 15)),
)
DEFAULT_SCALE_DOWN = ScalingRules(300, (ScalingPolicy(PolicyType.PERCENT, 100, 15),))


@dataclass(frozen=True)
class Behavior:
    scale_up: ScalingRules = DEFAULT_SCALE_UP
    scale_down: ScalingRules = DEFAULT_SCALE_DOWN


@dataclass(frozen=True)
class Recommendation:
    """A desired count the metrics gave (before stabilization), and when."""

    at: float
    replicas: int


@dataclass(frozen=True)
class ScaleEvent:
    """A change this autoscaler made: ``change`` > 0 added replicas, < 0 removed them."""

    at: float
    change: int


@dataclass(frozen=True)
class HpaState:
    """What the controller remembers between evaluations of one target."""

    recommendations: tuple[Recommendation, ...] = ()
    events: tuple[ScaleEvent, ...] = ()


@dataclass(frozen=True)
class Proposal:
    """One metric's answer: the replica count it asks for and the usage ratio behind it."""

    replicas: int
    ratio: float
    within_tolerance: bool


@dataclass(frozen=True)
class HpaResult:
    desired: int
    # The largest proposal (None: scaling skipped for missing metrics, or a min/max bound
    # applied before any metric was looked at).
    recommendation: int | None
    limited_by: str | None  # why ``desired`` differs from ``recommendation``, if it does
    state: HpaState


def milli(value: float) -> int:
    """``value`` in thousandths, truncated: KEDA hands metrics and targets to the HPA as
    milli-quantities, so the ratios are taken between integers (``0.3 / 0.1`` is 3)."""
    return int(value * 1000)


def replicas_for_metric(
    current: int,
    value: float,
    target: float,
    metric_type: MetricType,
    tolerance: float = TOLERANCE,
) -> Proposal:
    """The replica count one metric asks for, with ``current`` >= 1 replicas running.

    ``Value``: ``ratio = value / target``, ``desired = ceil(current * ratio)``.
    ``AverageValue``: the value per replica is compared, ``ratio = value / (target *
    current)``, and ``desired = ceil(value / target)``. Within ``tolerance`` of 1 the
    current count stands.
    """
    if current < 1:
        raise ValueError(f"the HPA step needs at least one replica, got {current}")
    usage, goal = milli(value), milli(target)
    if goal <= 0:
        raise ValueError(f"a target must be > 0, got {target!r}")
    if metric_type is MetricType.AVERAGE_VALUE:
        ratio = usage / (goal * current)
        if abs(1.0 - ratio) <= tolerance:
            return Proposal(current, ratio, True)
        return Proposal(math.ceil(usage / goal), ratio, False)
    ratio = usage / goal
    if abs(1.0 - ratio) <= tolerance:
        return Proposal(current, ratio, True)
    return Proposal(math.ceil(ratio * current), ratio, False)


def combine(proposals: Sequence[int | None], current: int) -> int | None:
    """The largest proposal; ``None`` (skip scaling) when every metric is missing, or when
    one is missing and the others suggest fewer replicas than ``current``: a metric that
    could not be read never lets the others scale down, only up."""
    known = [p for p in proposals if p is not None]
    if not known:
        return None
    best = max(known)
    if len(known) < len(proposals) and best < current:
        return None
    return best


def stabilize(
    now: float,
    current: int,
    recommendation: int,
    history: Iterable[Recommendation],
    behavior: Behavior,
) -> tuple[int, tuple[Recommendation, ...], str | None]:
    """Apply the stabilization windows: among the recommendations of the last
    ``scaleUp.stabilizationWindowSeconds`` (this one included) a scale-up goes no higher
    than the lowest; among those of the last ``scaleDown.stabilizationWindowSeconds`` a
    scale-down goes no lower than the highest. Returns the stabilized count, the history
    to keep (this recommendation added, what no window can see any more dropped) and
    why the count differs from ``recommendation`` (None when it does not)."""
    up_window = behavior.scale_up.stabilization_window_s
    down_window = behavior.scale_down.stabilization_window_s
    up_cutoff, down_cutoff = now - up_window, now - down_window
    past = tuple(history)
    up_limit = down_limit = recommendation
    for rec in past:
        if rec.at > up_cutoff:
            up_limit = min(up_limit, rec.replicas)
        if rec.at > down_cutoff:
            down_limit = max(down_limit, rec.replicas)
    stabilized = max(current, up_limit)
    stabilized = min(stabilized, down_limit)
    oldest = now - max(up_window, down_window)
    kept = (*(r for r in past if r.at > oldest), Recommendation(now, recommendation))
    why = None
    if stabilized != recommendation:
        if recommendation > current:
            why = (
                f"scale-up stabilization window {up_window} s (lowest recommendation in it "
                f"{up_limit})"
            )
        else:
            why = (
                f"scale-down stabilization window {down_window} s (highest recommendation "
                f"in it {down_limit})"
            )
    return stabilized, kept, why


def _changed_within(events: Iterable[ScaleEvent], now: float, period_s: int) -> tuple[int, int]:
    """Replicas (added, removed) by this autoscaler within the last ``period_s``."""
    cutoff = now - period_s
    added = sum(e.change for e in events if e.at > cutoff and e.change > 0)
    removed = sum(-e.change for e in events if e.at > cutoff and e.change < 0)
    return added, removed


def _period_start(events: Sequence[ScaleEvent], now: float, current: int, period_s: int) -> int:
    """The replica count at the start of the policy's period: what the policy limits is the
    change over the whole period, not per evaluation."""
    added, removed = _changed_within(events, now, period_s)
    return current - added + removed


def scale_up_limit(
    now: float, current: int, rules: ScalingRules, events: Sequence[ScaleEvent]
) -> tuple[int, ScalingPolicy | None]:
    """The most replicas the scale-up policies allow now, and the policy that sets it
    (None when ``selectPolicy`` is Disabled: the limit is ``current``)."""
    if rules.select is SelectPolicy.DISABLED or not rules.policies:
        return current, None
    proposals: list[tuple[int, ScalingPolicy]] = []
    for policy in rules.policies:
        start = _period_start(events, now, current, policy.period_s)
        if policy.type is PolicyType.PODS:
            proposed = start + policy.value
        else:
            # Rounded up, so that a small percentage of a few replicas still adds one.
            proposed = math.ceil(start * (1 + policy.value / 100))
        proposals.append((proposed, policy))
    pick = min if rules.select is SelectPolicy.MIN else max
    limit, policy = pick(proposals, key=lambda p: p[0])
    return max(limit, current), policy


def scale_down_limit(
    now: float, current: int, rules: ScalingRules, events: Sequence[ScaleEvent]
) -> tuple[int, ScalingPolicy | None]:
    """The fewest replicas the scale-down policies allow now, and the policy that sets it
    (None when ``selectPolicy`` is Disabled: the limit is ``current``)."""
    if rules.select is SelectPolicy.DISABLED or not rules.policies:
        return current, None
    proposals: list[tuple[int, ScalingPolicy]] = []
    for policy in rules.policies:
        start = _period_start(events, now, current, policy.period_s)
        if policy.type is PolicyType.PODS:
            proposed = start - policy.value
        else:
            # Truncated, as the controller does: 10% of 72 removes 8, not 7.
            proposed = int(start * (1 - policy.value / 100))
        proposals.append((proposed, policy))
    # For a scale-down the largest change is the lowest count.
    pick = max if rules.select is SelectPolicy.MIN else min
    limit, policy = pick(proposals, key=lambda p: p[0])
    return min(limit, current), policy


def rate_limit(
    now: float,
    current: int,
    desired: int,
    min_replicas: int,
    max_replicas: int,
    behavior: Behavior,
    events: Sequence[ScaleEvent],
) -> tuple[int, str | None]:
    """``desired`` within what the scaling policies allow now and within min/max replicas,
    and what limited it (None: nothing did)."""
    if desired > current:
        limit, policy = scale_up_limit(now, current, behavior.scale_up, events)
        if max_replicas <= limit:
            if desired > max_replicas:
                return max_replicas, f"maxReplicaCount {max_replicas}"
            return desired, None
        if desired > limit:
            if policy is None:
                return limit, "scale-up disabled (selectPolicy Disabled)"
            return limit, f"scale-up policy {policy.describe()}"
        return desired, None
    if desired < current:
        limit, policy = scale_down_limit(now, current, behavior.scale_down, events)
        if min_replicas >= limit:
            if desired < min_replicas:
                return min_replicas, f"minReplicaCount {min_replicas}"
            return desired, None
        if desired < limit:
            if policy is None:
                return limit, "scale-down disabled (selectPolicy Disabled)"
            return limit, f"scale-down policy {policy.describe()}"
        return desired, None
    return desired, None


def longest_period(behavior: Behavior) -> int:
    periods = [p.period_s for p in (*behavior.scale_up.policies, *behavior.scale_down.policies)]
    return max(periods, default=0)


def record_scale(
    state: HpaState, now: float, before: int, after: int, behavior: Behavior
) -> HpaState:
    """``state`` once this autoscaler changed the count from ``before`` to ``after`` (what
    the policies' periods count); events no period can see any more are dropped."""
    cutoff = now - longest_period(behavior)
    events = tuple(e for e in state.events if e.at > cutoff)
    if after != before:
        events = (*events, ScaleEvent(now, after - before))
    return replace(state, events=events)


def hpa_step(
    now: float,
    current: int,
    proposals: Sequence[int | None],
    min_replicas: int,
    max_replicas: int,
    behavior: Behavior,
    state: HpaState,
) -> HpaResult:
    """One evaluation of the controller for a target with ``current`` >= 1 replicas: a
    count outside min/max is brought back first; then the metrics' proposals are combined,
    stabilized and rate-limited. The returned state has the new recommendation; a scale
    this leads to is added with :func:`record_scale` once it was made."""
    if current > max_replicas:
        return HpaResult(max_replicas, None, f"maxReplicaCount {max_replicas}", state)
    if current < min_replicas:
        return HpaResult(min_replicas, None, f"minReplicaCount {min_replicas}", state)
    recommendation = combine(proposals, current)
    if recommendation is None:
        return HpaResult(current, None, None, state)
    stabilized, history, why = stabilize(
        now, current, recommendation, state.recommendations, behavior
    )
    desired, limit_why = rate_limit(
        now, current, stabilized, min_replicas, max_replicas, behavior, state.events
    )
    reasons = [r for r in (why, limit_why) if r]
    return HpaResult(
        desired,
        recommendation,
        "; ".join(reasons) or None,
        replace(state, recommendations=history),
    )
