"""KEDA in front of the HPA, as a pure function: one evaluation of a ScaledObject from its
triggers' readings.

What the KEDA documentation says (https://keda.sh/docs/2.16/reference/scaledobject-spec/,
https://keda.sh/docs/2.16/concepts/scaling-deployments/#activating-and-scaling-thresholds,
https://keda.sh/docs/2.16/scalers/prometheus/):

- A trigger is *active* when its value is above ``activationThreshold`` (strictly).
  KEDA alone scales between 0 (or ``idleReplicaCount``) and ``minReplicaCount``: from 0 to
  ``max(minReplicaCount, 1)`` as soon as a trigger is active, and back to
  ``idleReplicaCount`` (else ``minReplicaCount``) only once no trigger has been active for
  ``cooldownPeriod``. From 1 to N the HPA decides (:mod:`connector.policy.hpa`), with
  ``max(minReplicaCount, 1)`` as its minimum.
- A trigger whose query fails counts its consecutive failures. Once they pass
  ``fallback.failureThreshold``, it reports ``threshold * fallback.replicas``, which an
  ``AverageValue`` HPA turns into exactly ``fallback.replicas``. Until then, and without a
  fallback, a failed trigger gives the HPA no metric: it never scales down for it, and
  KEDA never scales to zero while a trigger fails. A failure is never read as zero demand.

Both run at every ``pollingInterval`` here (KEDA polls at that interval, the HPA every
15 s by default); :class:`PolicyState` is what the two remember in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from connector.policy.hpa import (
    Behavior,
    HpaState,
    MetricType,
    Proposal,
    hpa_step,
    record_scale,
    replicas_for_metric,
)


@dataclass(frozen=True)
class Fallback:
    failure_threshold: int
    replicas: int


@dataclass(frozen=True)
class TriggerTarget:
    """What evaluation needs of a trigger: its target and how it is compared."""

    threshold: float
    activation_threshold: float = 0.0
    metric_type: MetricType = MetricType.AVERAGE_VALUE


@dataclass(frozen=True)
class PolicySpec:
    """The numbers of a ScaledObject (defaults: KEDA's)."""

    triggers: tuple[TriggerTarget, ...]
    min_replicas: int = 0
    max_replicas: int = 100
    idle_replicas: int | None = None
    cooldown_s: int = 300
    initial_cooldown_s: int = 0
    fallback: Fallback | None = None
    behavior: Behavior = field(default_factory=Behavior)

    @property
    def hpa_min_replicas(self) -> int:
        """The minimum of the HPA KEDA creates: it cannot go below one replica."""
        return max(self.min_replicas, 1)

    def uses_fallback(self, trigger: int) -> bool:
        """KEDA falls back only for ``AverageValue`` triggers."""
        return (
            self.fallback is not None
            and self.triggers[trigger].metric_type is MetricType.AVERAGE_VALUE
        )


@dataclass(frozen=True)
class Reading:
    """What one trigger's query gave: a value, or why there is none."""

    value: float | None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.error is None):
            raise ValueError("a reading has either a value or an error")


@dataclass(frozen=True)
class PolicyState:
    started_at: float  # when the ScaledObject started: initialCooldownPeriod counts from it
    last_active_at: float | None = None
    failures: tuple[int, ...] = ()  # consecutive failed queries, per trigger
    hpa: HpaState = field(default_factory=HpaState)


class Step(StrEnum):
    """Which part of the algorithm decided an evaluation."""

    ACTIVATE = "activate"  # KEDA: a trigger became active at 0 (or idle) replicas
    IDLE = "idle"  # KEDA: nothing active for cooldownPeriod: to idleReplicaCount / min
    MIN = "min"  # KEDA: below minReplicaCount with nothing active: to minReplicaCount
    HPA = "hpa"  # the HPA algorithm, from 1 to N
    HOLD = "hold"  # nothing may decide: a query failed and the others suggest less
    ZERO = "zero"  # at 0 with nothing active: the HPA does not run on 0 replicas


@dataclass(frozen=True)
class TriggerOutcome:
    value: float | None  # what the query returned (None: it failed)
    error: str | None
    active: bool
    failures: int  # consecutive failures, this one included
    fallback: bool  # past failureThreshold: the HPA was given fallback.replicas
    proposal: Proposal | None  # what the HPA made of it (None: no metric, or no HPA step)


@dataclass(frozen=True)
class Evaluation:
    current: int
    desired: int
    step: Step
    active: bool
    cooldown_left_s: float | None  # until a scale to idle/min is allowed (None: n/a)
    recommendation: int | None  # the HPA's combined proposal, before its behaviors
    limited_by: str | None  # what held the HPA's count back from its recommendation
    triggers: tuple[TriggerOutcome, ...]
    state: PolicyState

    @property
    def changes(self) -> bool:
        return self.desired != self.current


def _cooldown_left(spec: PolicySpec, state: PolicyState, now: float) -> float:
    """Seconds until nothing-active may scale to idle/min (0: now). Before anything was
    ever active, only ``initialCooldownPeriod`` after the start counts, as KEDA's
    "immediately scale it to minReplicaCount" when a ScaledObject is created."""
    if state.last_active_at is None:
        return max(0.0, state.started_at + spec.initial_cooldown_s - now)
    return max(0.0, state.last_active_at + spec.cooldown_s - now)


def evaluate(
    spec: PolicySpec,
    state: PolicyState,
    readings: Sequence[Reading],
    current: int,
    now: float,
) -> Evaluation:
    """One evaluation with ``current`` replicas at ``now``. The state returned is the one
    to keep whether or not the count is then changed; a change that was made is added
    with :func:`scaled` (the HPA's scaling policies count it)."""
    if len(readings) != len(spec.triggers):
        raise ValueError(f"{len(spec.triggers)} triggers, {len(readings)} readings")
    previous = state.failures or (0,) * len(readings)
    failures = tuple(
        0 if r.error is None else n + 1 for r, n in zip(readings, previous, strict=True)
    )
    metrics: list[float | None] = []
    fallbacks: list[bool] = []
    actives: list[bool] = []
    for i, (reading, target) in enumerate(zip(readings, spec.triggers, strict=True)):
        fallback = (
            reading.value is None
            and spec.fallback is not None
            and spec.uses_fallback(i)
            and failures[i] > spec.fallback.failure_threshold
        )
        fallbacks.append(fallback)
        if fallback:
            assert spec.fallback is not None
            metrics.append(target.threshold * spec.fallback.replicas)
        else:
            metrics.append(reading.value)
        actives.append(reading.value is not None and reading.value > target.activation_threshold)
    active = any(actives)
    failing = any(r.error is not None for r in readings)
    state = replace(
        state, failures=failures, last_active_at=now if active else state.last_active_at
    )

    def done(
        desired: int,
        step: Step,
        *,
        proposals: Sequence[Proposal | None] = (),
        recommendation: int | None = None,
        limited_by: str | None = None,
        new_state: PolicyState = state,
        cooldown_left: float | None = None,
    ) -> Evaluation:
        props = list(proposals) or [None] * len(readings)
        outcomes = tuple(
            TriggerOutcome(r.value, r.error, a, n, f, p)
            for r, a, n, f, p in zip(readings, actives, failures, fallbacks, props, strict=True)
        )
        return Evaluation(
            current,
            desired,
            step,
            active,
            cooldown_left,
            recommendation,
            limited_by,
            outcomes,
            new_state,
        )

    # KEDA's part: 0 <-> 1 (and idle <-> min).
    idle = spec.idle_replicas
    cooldown_left: float | None = None
    if active:
        if current == 0 or (idle is not None and current < spec.min_replicas):
            return done(spec.hpa_min_replicas, Step.ACTIVATE)
    elif failing and spec.fallback is not None and spec.fallback.replicas != 0:
        pass  # the HPA moves to fallback.replicas; never to zero while a trigger fails
    elif failing and spec.fallback is None:
        pass  # nothing is known: the HPA holds (a failure is never zero demand)
    elif (idle is not None and current > idle) or (current > 0 and spec.min_replicas == 0):
        cooldown_left = _cooldown_left(spec, state, now)
        if cooldown_left == 0:
            return done(idle if idle is not None else spec.min_replicas, Step.IDLE)
    elif current < spec.min_replicas and idle is None:
        return done(spec.min_replicas, Step.MIN)
    if current == 0:
        return done(0, Step.ZERO)
    # The HPA's part: 1 <-> N.
    proposals = [
        None
        if metric is None
        else replicas_for_metric(current, metric, target.threshold, target.metric_type)
        for metric, target in zip(metrics, spec.triggers, strict=True)
    ]
    result = hpa_step(
        now,
        current,
        [p.replicas if p is not None else None for p in proposals],
        spec.hpa_min_replicas,
        spec.max_replicas,
        spec.behavior,
        state.hpa,
    )
    step = Step.HPA
    if result.recommendation is None and result.limited_by is None:
        step = Step.HOLD
    return done(
        result.desired,
        step,
        proposals=proposals,
        recommendation=result.recommendation,
        limited_by=result.limited_by,
        new_state=replace(state, hpa=result.state),
        cooldown_left=cooldown_left,
    )


def scaled(spec: PolicySpec, state: PolicyState, now: float, evaluation: Evaluation) -> PolicyState:
    """``state`` once ``evaluation``'s count was set: a change the HPA made counts against
    its scaling policies; KEDA's own (activation, idle) do not, as in Kubernetes."""
    if evaluation.step is not Step.HPA:
        return state
    hpa = record_scale(state.hpa, now, evaluation.current, evaluation.desired, spec.behavior)
    return replace(state, hpa=hpa)
