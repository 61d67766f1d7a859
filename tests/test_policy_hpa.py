"""The policy arithmetic as tables, against what the HPA and KEDA documentation says.

- HPA algorithm:
  https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details
  (``desired = ceil(current * metric / target)``, the 0.1 tolerance, the largest proposal
  over metrics, a missing metric never lets the others scale down)
- HPA behaviors:
  https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#configurable-scaling-behavior
  (stabilization windows, ``Pods``/``Percent`` policies per ``periodSeconds``,
  ``selectPolicy`` Max/Min/Disabled, the default behavior; the 80 -> 10 example)
- KEDA ScaledObject: https://keda.sh/docs/2.16/reference/scaledobject-spec/ (metricType
  ``AverageValue`` vs ``Value`` with the 3-replica queue example, cooldownPeriod,
  initialCooldownPeriod, idleReplicaCount, fallback "passes the failureThreshold")
- KEDA activation:
  https://keda.sh/docs/2.16/concepts/scaling-deployments/#activating-and-scaling-thresholds
  (strictly above ``activationThreshold``; activation wins over scaling; min >= 1 is always
  "active")
- KEDA prometheus scaler: https://keda.sh/docs/2.16/scalers/prometheus/ (ignoreNullValues)

The functions are pure, so every row is exact: no clock, no I/O.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from connector.policy import hpa, keda
from connector.policy.hpa import (
    Behavior,
    HpaState,
    MetricType,
    PolicyType,
    Recommendation,
    ScaleEvent,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
)
from connector.policy.keda import Fallback, PolicySpec, PolicyState, Reading, Step, TriggerTarget
from connector.policy.prometheus import read_answer
from connector.policy.scaledobject import PrometheusTrigger

AVG, VAL = MetricType.AVERAGE_VALUE, MetricType.VALUE
PODS, PERCENT = PolicyType.PODS, PolicyType.PERCENT


# --------------------------------------------------------------------------- one metric


@pytest.mark.parametrize(
    ("current", "value", "target", "metric_type", "desired", "within"),
    [
        # "current metric value is 200m, and the desired value is 100m: doubled"
        (3, 0.2, 0.1, VAL, 6, False),
        # "50m: halve the number of replicas" (ceil(1.5) = 2)
        (3, 0.05, 0.1, VAL, 2, False),
        # KEDA: 3 replicas, queue of 20, threshold 5: AverageValue -> 20 / 5 = 4 ...
        (3, 20, 5, AVG, 4, False),
        # ... Value (average time 20 ms, threshold 5 ms) -> 3 * 20 / 5 = 12
        (3, 20, 5, VAL, 12, False),
        # Within the 0.1 tolerance of 1: no change
        (10, 1.09, 1, VAL, 10, True),
        (10, 0.91, 1, VAL, 10, True),
        (10, 1.11, 1, VAL, 12, False),  # ceil(11.1)
        # AverageValue: 15.5 over 3 replicas of target 5 is a ratio of 1.033
        (3, 15.5, 5, AVG, 3, True),
        (3, 17, 5, AVG, 4, False),
        # Zero demand on AverageValue asks for 0 (min replicas bound it later)
        (4, 0, 5, AVG, 0, False),
        # Milli-quantities, as KEDA hands them over: 0.3 / 0.1 is 3, not 3.0000000000000004
        (1, 0.3, 0.1, AVG, 3, False),
    ],
)
def test_one_metric_asks_for_ceil_of_current_times_ratio(
    current: int, value: float, target: float, metric_type: MetricType, desired: int, within: bool
) -> None:
    proposal = hpa.replicas_for_metric(current, value, target, metric_type)
    assert (proposal.replicas, proposal.within_tolerance) == (desired, within)


def test_the_average_value_ratio_divides_by_the_replicas() -> None:
    assert hpa.replicas_for_metric(1, 12, 5, AVG).ratio == pytest.approx(2.4)
    assert hpa.replicas_for_metric(2, 12, 5, AVG).ratio == pytest.approx(1.2)
    assert hpa.replicas_for_metric(2, 12, 5, VAL).ratio == pytest.approx(2.4)


# --------------------------------------------------------------------------- many metrics


@pytest.mark.parametrize(
    ("proposals", "current", "combined"),
    [
        ([3, 7, 5], 4, 7),  # the largest
        ([2, 1], 4, 2),  # all readable: a scale-down is fine
        ([None, 2], 4, None),  # one missing and the other says down: skipped
        ([None, 6], 4, 6),  # one missing, the other says up: still scales up
        ([None, 4], 4, 4),  # one missing, the other says stay: stays
        ([None, None], 4, None),  # nothing known: skipped
    ],
)
def test_the_largest_proposal_wins_and_a_missing_metric_blocks_a_scale_down(
    proposals: list[int | None], current: int, combined: int | None
) -> None:
    assert hpa.combine(proposals, current) == combined


# --------------------------------------------------------------------------- stabilization

DOWN_300 = Behavior(scale_down=ScalingRules(300, hpa.DEFAULT_SCALE_DOWN.policies))
UP_60 = Behavior(scale_up=ScalingRules(60, hpa.DEFAULT_SCALE_UP.policies))


@pytest.mark.parametrize(
    ("behavior", "history", "current", "recommendation", "stabilized"),
    [
        # Scale-down: the highest recommendation of the last 300 s
        (DOWN_300, [(900, 5), (600, 8)], 5, 2, 5),
        (DOWN_300, [(750, 4), (850, 3)], 5, 2, 4),
        # ... a recommendation older than the window no longer counts
        (DOWN_300, [(650, 8)], 5, 2, 2),
        # Scale-up: the lowest recommendation of the last 60 s
        (UP_60, [(970, 3)], 2, 6, 3),
        (UP_60, [(930, 3)], 2, 6, 6),
        # Default scale-up window (0 s): at once
        (Behavior(), [(999, 1)], 2, 6, 6),
        # A recommendation between them leaves the current count
        (Behavior(), [(990, 6)], 5, 3, 5),
    ],
)
def test_stabilization_windows(
    behavior: Behavior,
    history: list[tuple[float, int]],
    current: int,
    recommendation: int,
    stabilized: int,
) -> None:
    recs = [Recommendation(at, n) for at, n in history]
    got, kept, _ = hpa.stabilize(1000.0, current, recommendation, recs, behavior)
    assert got == stabilized
    assert kept[-1] == Recommendation(1000.0, recommendation)
    # What no window can see any more is not kept.
    window = max(
        behavior.scale_up.stabilization_window_s, behavior.scale_down.stabilization_window_s
    )
    assert all(r.at > 1000.0 - window for r in kept[:-1])


def test_stabilization_says_which_window_held_the_count() -> None:
    _, _, why = hpa.stabilize(1000.0, 5, 2, [Recommendation(900, 5)], DOWN_300)
    assert why == "scale-down stabilization window 300 s (highest recommendation in it 5)"
    _, _, why = hpa.stabilize(1000.0, 2, 6, [Recommendation(970, 3)], UP_60)
    assert why == "scale-up stabilization window 60 s (lowest recommendation in it 3)"


# --------------------------------------------------------------------------- policies


def _rules(
    *policies: tuple[PolicyType, int, int], select: SelectPolicy = SelectPolicy.MAX
) -> ScalingRules:
    return ScalingRules(0, tuple(ScalingPolicy(t, v, p) for t, v, p in policies), select)


DOCS_DOWN = _rules((PODS, 4, 60), (PERCENT, 10, 60))  # the documentation's example


def test_the_documented_scale_down_from_80_to_10() -> None:
    """ "if there are 80 replicas and the target has to be scaled down to 10 replicas then
    during the first step 8 replicas will be reduced. In the next iteration when the number
    of replicas is 72, 10% of the pods is 7.2 but the number is rounded up to 8 ... When the
    number of replicas falls below 40 the first policy (Pods) is applied and 4 replicas will
    be reduced at a time." One step per period (a new period each time)."""
    behavior = Behavior(scale_down=DOCS_DOWN)
    counts = [80]
    while counts[-1] > 10:
        got, _ = hpa.rate_limit(0.0, counts[-1], 10, 0, 100, behavior, ())
        counts.append(got)
    assert counts == [80, 72, 64, 57, 51, 45, 40, 36, 32, 28, 24, 20, 16, 12, 10]
    # Below 40 the Pods policy (4 at a time) allows more than 10%; the last step is the
    # remainder to the target.
    below_40 = [a - b for a, b in itertools.pairwise(counts) if a <= 40]
    assert below_40 == [4, 4, 4, 4, 4, 4, 4, 2]


def test_a_policy_limits_the_change_over_its_whole_period() -> None:
    """ "periodSeconds indicates the length of time in the past for which the policy must
    hold true": 8 removed 30 s ago count against the same 60 s period."""
    behavior = Behavior(scale_down=DOCS_DOWN)
    events = (ScaleEvent(70.0, -8),)
    assert hpa.rate_limit(100.0, 72, 10, 0, 100, behavior, events) == (
        72,
        "scale-down policy Percent 10% per 60 s",
    )
    # Once the period is over, the next step is allowed.
    assert hpa.rate_limit(131.0, 72, 10, 0, 100, behavior, events) == (
        64,
        "scale-down policy Percent 10% per 60 s",
    )


@pytest.mark.parametrize(
    ("select", "current", "desired", "allowed", "why"),
    [
        (SelectPolicy.MAX, 80, 10, 72, "scale-down policy Percent 10% per 60 s"),
        (SelectPolicy.MIN, 80, 10, 76, "scale-down policy Pods 4 per 60 s"),
        (SelectPolicy.DISABLED, 80, 10, 80, "scale-down disabled (selectPolicy Disabled)"),
        (SelectPolicy.MAX, 30, 10, 26, "scale-down policy Pods 4 per 60 s"),
        (SelectPolicy.MIN, 30, 10, 27, "scale-down policy Percent 10% per 60 s"),
    ],
)
def test_select_policy_picks_the_largest_or_smallest_change(
    select: SelectPolicy, current: int, desired: int, allowed: int, why: str
) -> None:
    behavior = Behavior(scale_down=_rules((PODS, 4, 60), (PERCENT, 10, 60), select=select))
    assert hpa.rate_limit(0.0, current, desired, 0, 100, behavior, ()) == (allowed, why)


@pytest.mark.parametrize(
    ("current", "desired", "allowed", "why"),
    [
        # The default scale-up: 100% or 4 pods per 15 s, whichever is more.
        (2, 20, 6, "scale-up policy Pods 4 per 15 s"),
        (10, 50, 20, "scale-up policy Percent 100% per 15 s"),
        (10, 15, 15, None),
        (10, 150, 20, "scale-up policy Percent 100% per 15 s"),
    ],
)
def test_the_default_scale_up(current: int, desired: int, allowed: int, why: str | None) -> None:
    assert hpa.rate_limit(0.0, current, desired, 1, 100, Behavior(), ()) == (allowed, why)


def test_a_percent_scale_up_rounds_up_so_that_it_always_adds_one() -> None:
    behavior = Behavior(scale_up=_rules((PERCENT, 10, 15)))
    assert hpa.rate_limit(0.0, 1, 5, 1, 100, behavior, ())[0] == 2


def test_min_and_max_replicas_bound_the_policies() -> None:
    behavior = Behavior()
    assert hpa.rate_limit(0.0, 4, 50, 1, 6, behavior, ()) == (6, "maxReplicaCount 6")
    assert hpa.rate_limit(0.0, 4, 0, 2, 6, behavior, ()) == (2, "minReplicaCount 2")


def test_scale_events_count_against_the_policy_until_their_period_ends() -> None:
    behavior = Behavior(scale_up=_rules((PODS, 1, 15)), scale_down=_rules((PODS, 1, 15)))
    state = hpa.record_scale(HpaState(), 0.0, 1, 2, behavior)
    assert state.events == (ScaleEvent(0.0, 1),)
    assert hpa.rate_limit(5.0, 2, 9, 1, 10, behavior, state.events)[0] == 2
    assert hpa.rate_limit(16.0, 2, 9, 1, 10, behavior, state.events)[0] == 3
    # Older than any period: dropped at the next record.
    later = hpa.record_scale(state, 100.0, 3, 4, behavior)
    assert later.events == (ScaleEvent(100.0, 1),)


def test_hpa_step_brings_a_count_outside_min_max_back_first() -> None:
    assert hpa.hpa_step(0.0, 12, [3], 1, 10, Behavior(), HpaState()).desired == 10
    assert hpa.hpa_step(0.0, 1, [1], 2, 10, Behavior(), HpaState()).desired == 2


def test_hpa_step_records_the_recommendation_not_the_limited_count() -> None:
    behavior = Behavior(scale_up=_rules((PODS, 1, 15)))
    result = hpa.hpa_step(10.0, 1, [4], 1, 10, behavior, HpaState())
    assert (result.desired, result.recommendation) == (2, 4)
    assert result.limited_by == "scale-up policy Pods 1 per 15 s"
    assert result.state.recommendations == (Recommendation(10.0, 4),)


# --------------------------------------------------------------------------- KEDA


def _spec(**changes: Any) -> PolicySpec:
    fields: dict[str, Any] = {
        "triggers": (TriggerTarget(5.0),),
        "min_replicas": 0,
        "max_replicas": 10,
        "cooldown_s": 300,
    }
    fields.update(changes)
    return PolicySpec(**fields)


def _eval(
    spec: PolicySpec,
    readings: list[Reading],
    current: int,
    now: float = 1000.0,
    **state: Any,
) -> keda.Evaluation:
    return keda.evaluate(spec, PolicyState(started_at=0.0, **state), readings, current, now)


def test_a_trigger_above_its_activation_threshold_scales_from_zero() -> None:
    ev = _eval(_spec(), [Reading(3.0)], 0)
    assert (ev.step, ev.desired, ev.active) == (Step.ACTIVATE, 1, True)
    assert ev.state.last_active_at == 1000.0
    # To minReplicaCount when it is above 1.
    ev = _eval(_spec(min_replicas=3), [Reading(3.0)], 0)
    assert (ev.step, ev.desired) == (Step.ACTIVATE, 3)


def test_activation_is_strictly_above_the_threshold() -> None:
    """ "Activation only occurs when this value is greater than the set value; not greater
    than or equal to": activationThreshold 0 activates at 1, not at 0."""
    spec = _spec(triggers=(TriggerTarget(5.0, activation_threshold=2.0),))
    assert _eval(spec, [Reading(2.0)], 0).step is Step.ZERO
    assert _eval(spec, [Reading(2.5)], 0).step is Step.ACTIVATE
    assert _eval(_spec(), [Reading(0.0)], 0).desired == 0


def test_activation_has_priority_over_scaling() -> None:
    """ "threshold: 10 and activationThreshold: 50, in case of 40 messages the scaler is not
    active and it'll be scaled to zero even the HPA requires 4 instances.\""""
    spec = _spec(triggers=(TriggerTarget(10.0, activation_threshold=50.0),))
    ev = _eval(spec, [Reading(40.0)], 4, last_active_at=100.0)
    assert (ev.step, ev.desired, ev.active) == (Step.IDLE, 0, False)


def test_to_zero_only_after_cooldown_without_activity() -> None:
    spec = _spec(behavior=Behavior(scale_down=_rules((PERCENT, 100, 15))))
    # Last active 250 s ago, cooldown 300 s: the HPA runs (down to 1 at most), not KEDA.
    ev = _eval(spec, [Reading(0.0)], 3, now=1000.0, last_active_at=750.0)
    assert (ev.step, ev.desired, ev.cooldown_left_s) == (Step.HPA, 1, 50.0)
    # 301 s: to zero.
    ev = _eval(spec, [Reading(0.0)], 1, now=1051.0, last_active_at=750.0)
    assert (ev.step, ev.desired) == (Step.IDLE, 0)


def test_before_anything_was_active_only_the_initial_cooldown_counts() -> None:
    """KEDA scales a new ScaledObject's target to minReplicaCount at once, unless
    initialCooldownPeriod delays it."""
    assert _eval(_spec(), [Reading(0.0)], 2, now=10.0).step is Step.IDLE
    spec = _spec(initial_cooldown_s=120)
    ev = _eval(spec, [Reading(0.0)], 2, now=60.0)
    assert (ev.step, ev.cooldown_left_s) == (Step.HPA, 60.0)
    assert _eval(spec, [Reading(0.0)], 2, now=121.0).step is Step.IDLE


def test_idle_replica_count() -> None:
    """ "If there's no activity on triggers the target resource is scaled down to
    idleReplicaCount (0), once there is an activity the target resource is immediately
    scaled to minReplicaCount (10)"."""
    spec = _spec(min_replicas=10, max_replicas=100, idle_replicas=0)
    assert _eval(spec, [Reading(0.0)], 10).desired == 0
    assert _eval(spec, [Reading(1.0)], 0).desired == 10
    # Below min while active (a manual scale): straight to min, as from idle.
    ev = _eval(spec, [Reading(1.0)], 4)
    assert (ev.step, ev.desired) == (Step.ACTIVATE, 10)


def test_with_min_one_or_more_inactivity_never_goes_below_min() -> None:
    """ "If the minimum replicas is >= 1, the scaler is always active"."""
    spec = _spec(min_replicas=2)
    ev = _eval(spec, [Reading(0.0)], 0)
    assert (ev.step, ev.desired) == (Step.MIN, 2)
    ev = _eval(spec, [Reading(0.0)], 5)
    assert ev.step is Step.HPA and ev.desired >= 2


def test_a_failed_query_is_never_read_as_zero_demand() -> None:
    """Without a fallback, a failing trigger gives the HPA no metric: nothing scales down
    for it, and KEDA never scales to zero while it fails, however long the cooldown ago."""
    ev = _eval(_spec(), [Reading(None, "HTTP 503")], 3, last_active_at=0.0)
    assert (ev.step, ev.desired, ev.active) == (Step.HOLD, 3, False)
    assert ev.triggers[0].failures == 1
    # Two triggers: one fails, the other says down -> hold; says up -> up.
    spec = _spec(triggers=(TriggerTarget(5.0), TriggerTarget(5.0)))
    ev = _eval(spec, [Reading(None, "timeout"), Reading(5.0)], 3, last_active_at=999.0)
    assert (ev.step, ev.desired) == (Step.HOLD, 3)
    ev = _eval(spec, [Reading(None, "timeout"), Reading(25.0)], 3, last_active_at=999.0)
    assert (ev.step, ev.desired) == (Step.HPA, 5)
    # At zero it stays at zero (no metric, no activity).
    assert _eval(_spec(), [Reading(None, "HTTP 400")], 0).desired == 0


def test_fallback_after_the_failures_pass_the_threshold() -> None:
    """ "Once that value passes the failureThreshold ... the deployment will scale to"
    fallback.replicas: failures 1..3 hold, the 4th falls back (failureThreshold 3)."""
    spec = _spec(fallback=Fallback(failure_threshold=3, replicas=6))
    state = PolicyState(started_at=0.0, last_active_at=0.0)
    failed = [Reading(None, "connection refused")]
    steps = []
    for now in (10.0, 20.0, 30.0, 40.0):
        ev = keda.evaluate(spec, state, failed, 2, now)
        state = ev.state
        steps.append((ev.step, ev.desired, ev.triggers[0].failures, ev.triggers[0].fallback))
    assert steps == [
        (Step.HOLD, 2, 1, False),
        (Step.HOLD, 2, 2, False),
        (Step.HOLD, 2, 3, False),
        (Step.HPA, 6, 4, True),
    ]
    # A success resets the count.
    ev = keda.evaluate(spec, state, [Reading(10.0)], 6, 50.0)
    assert ev.triggers[0].failures == 0 and not ev.triggers[0].fallback


def test_fallback_goes_through_the_hpa_like_any_metric() -> None:
    """KEDA reports threshold * fallback.replicas, which the HPA turns into
    fallback.replicas: its tolerance, max and policies still apply."""
    spec = _spec(fallback=Fallback(0, 20), max_replicas=8)
    ev = _eval(spec, [Reading(None, "x")], 2)
    assert (ev.desired, ev.limited_by) == (6, "scale-up policy Pods 4 per 15 s")
    ev = _eval(spec, [Reading(None, "x")], 6)
    assert (ev.desired, ev.limited_by) == (8, "maxReplicaCount 8")
    # 20 -> 21 is within the tolerance (ratio 1.05): stays.
    spec = _spec(fallback=Fallback(0, 21), max_replicas=30)
    assert _eval(spec, [Reading(None, "x")], 20).desired == 20
    # At zero the HPA does not run: KEDA leaves it at zero.
    assert _eval(_spec(fallback=Fallback(0, 3)), [Reading(None, "x")], 0).desired == 0


def test_fallback_zero_replicas_may_scale_to_zero_after_cooldown() -> None:
    """KEDA holds the count while a trigger fails only when fallback.replicas is not 0."""
    spec = _spec(fallback=Fallback(5, 0))
    ev = _eval(spec, [Reading(None, "x")], 2, last_active_at=0.0)
    assert (ev.step, ev.desired) == (Step.IDLE, 0)


def test_scaled_counts_only_the_hpa_changes_against_its_policies() -> None:
    spec = _spec()
    ev = _eval(spec, [Reading(3.0)], 0)
    assert keda.scaled(spec, ev.state, 1000.0, ev).hpa.events == ()
    ev = _eval(spec, [Reading(30.0)], 2, last_active_at=999.0)
    assert ev.step is Step.HPA
    assert keda.scaled(spec, ev.state, 1000.0, ev).hpa.events == (ScaleEvent(1000.0, 4),)


# --------------------------------------------------------------------------- Prometheus answers


def _trigger(ignore_null_values: bool = True) -> PrometheusTrigger:
    return PrometheusTrigger(
        0, None, "http://127.0.0.1:9", "q", 1.0, ignore_null_values=ignore_null_values
    )


def _vector(*values: str) -> dict[str, Any]:
    result = [{"metric": {}, "value": [1.0, v]} for v in values]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.mark.parametrize(
    ("body", "ignore", "reading"),
    [
        (_vector("12.5"), True, Reading(12.5)),
        ({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}}, True,
         Reading(3.0)),
        # ignoreNullValues (KEDA's default true): an empty result is 0 ...
        (_vector(), True, Reading(0.0)),
        (_vector("NaN"), True, Reading(0.0)),
        (_vector("+Inf"), True, Reading(0.0)),
        # ... and false makes it a failure.
        (_vector(), False, Reading(None, "the query returned no series (ignoreNullValues is "
                                         "false)")),
        (_vector("NaN"), False, Reading(None, "the query's value is NaN (ignoreNullValues is "
                                              "false)")),
        # Never a number from anything else.
        (_vector("1", "2"), True, Reading(None, "the query returned 2 series; a trigger's query "
                                                "must return one")),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, True,
         Reading(None, "the query returned a matrix, not a vector or a scalar")),
        ({"status": "error", "error": "boom"}, True, Reading(None, "Prometheus answered boom")),
        (_vector("abc"), True, Reading(None, "the query's value 'abc' is not a number")),
    ],
)  # fmt: skip
def test_prometheus_answers_are_read_as_keda_reads_them(
    body: dict[str, Any], ignore: bool, reading: Reading
) -> None:
    assert read_answer(body, _trigger(ignore)) == reading
