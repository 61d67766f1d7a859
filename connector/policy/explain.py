"""The words of a policy's events: why an evaluation gives the count it gives, from the
triggers' values up to what limited it, as one line a person reads in ``dynamo-local
events`` ("Decode 1 -> 2: trigger 0 query=... value 12.0, target 5 per replica, ratio 2.4;
scale-up policy Pods 1 per 15 s"). Pure: no I/O."""

from __future__ import annotations

from connector.policy.hpa import MetricType
from connector.policy.keda import Evaluation, Step, TriggerOutcome
from connector.policy.scaledobject import PrometheusTrigger, ScaledObject


def _value(x: float) -> str:
    return repr(round(x, 6))


def _number(x: float) -> str:
    return f"{x:g}"


def trigger_text(trigger: PrometheusTrigger, outcome: TriggerOutcome, so: ScaledObject) -> str:
    """One trigger's part: its query, what it gave and what the HPA made of it."""
    head = f"trigger {trigger.label} query={trigger.query}"
    if outcome.value is None:
        fallback = so.fallback
        if outcome.fallback and fallback is not None:
            return (
                f"{head} failed {outcome.failures} times in a row, past failureThreshold "
                f"{fallback.failure_threshold}: fallback to {fallback.replicas} replicas "
                f"({outcome.error})"
            )
        times = "once" if outcome.failures == 1 else f"{outcome.failures} times in a row"
        return f"{head} failed {times} ({outcome.error})"
    per = " per replica" if trigger.metric_type is MetricType.AVERAGE_VALUE else ""
    text = f"{head} value {_value(outcome.value)}, target {_number(trigger.threshold)}{per}"
    if outcome.proposal is not None:
        text += f", ratio {outcome.proposal.ratio:.3g}"
        if outcome.proposal.within_tolerance:
            text += " (within the 0.1 tolerance)"
    if outcome.active:
        text += f", active (above activationThreshold {_number(trigger.activation_threshold)})"
    return text


def _triggers(so: ScaledObject, evaluation: Evaluation) -> str:
    return "; ".join(
        trigger_text(t, o, so) for t, o in zip(so.triggers, evaluation.triggers, strict=True)
    )


def _step(so: ScaledObject, evaluation: Evaluation) -> str:
    """What decided, for the steps KEDA takes itself."""
    if evaluation.step is Step.ACTIVATE:
        return "activated: a trigger is above its activationThreshold"
    if evaluation.step is Step.IDLE:
        target = "idleReplicaCount" if so.idle_replicas is not None else "minReplicaCount"
        return f"no trigger active for cooldownPeriod {so.cooldown_s} s: to {target}"
    if evaluation.step is Step.MIN:
        return f"no trigger active and below minReplicaCount {so.min_replicas}"
    if evaluation.step is Step.HOLD:
        return (
            "a trigger's query failed and the others suggest no more replicas: the count "
            "stays (a failed query is never read as zero demand)"
        )
    if evaluation.step is Step.ZERO:
        return "at 0 replicas with no trigger active"
    return ""


def explain(so: ScaledObject, component: str, evaluation: Evaluation) -> str:
    """``Decode 1 -> 2: <triggers>; <what limited it>``, or ``Decode stays at 2: ...``."""
    if evaluation.changes:
        head = f"{component} {evaluation.current} -> {evaluation.desired}"
    else:
        head = f"{component} stays at {evaluation.current}"
    parts = [p for p in (_step(so, evaluation), _triggers(so, evaluation)) if p]
    rec = evaluation.recommendation
    if evaluation.limited_by:
        parts.append(evaluation.limited_by)
    elif evaluation.step is Step.HPA and rec is not None and rec != evaluation.desired:
        parts.append(f"recommendation {rec}")  # nothing limited it: say what was asked
    return f"{head}: " + "; ".join(parts)
