"""The restart / backoff / crash-loop decision as a table.

The semantics follow Kubernetes' container restart policy and its CrashLoopBackOff
(https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#restart-policy): Always
restarts every exit, OnFailure only a failed one, Never none; restarts back off
exponentially to a cap, and the backoff resets once a container has run for a while. On top
of it, dynamo-local's crash-loop budget: ``crashloop_failures`` counted exits within
``crashloop_window_s`` stop the restarts until the spec changes or a restart is asked for.
"""

from __future__ import annotations

import pytest

from connector.graph.model import RestartMode, RestartPolicy
from connector.reconcile.restart_policy import ExitAction, ExitDecision, decide

NOW = 10_000.0
POLICY = RestartPolicy(
    mode=RestartMode.ALWAYS,
    backoff_base_s=1.0,
    backoff_max_s=60.0,
    stable_after_s=60.0,
    crashloop_failures=5,
    crashloop_window_s=300.0,
)


def policy(**kw: object) -> RestartPolicy:
    return RestartPolicy(**{**POLICY.__dict__, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "rules", "code", "ran_s", "failures", "consecutive", "expected"),
    [
        (
            "always restarts a clean exit, and counts it",
            POLICY,
            0,
            1.0,
            (),
            0,
            ExitDecision(ExitAction.RESTART, 1.0, (NOW,), 1),
        ),
        (
            "the backoff doubles with each consecutive failure",
            POLICY,
            1,
            1.0,
            (NOW - 3,),
            3,
            ExitDecision(ExitAction.RESTART, 8.0, (NOW - 3, NOW), 4),
        ),
        (
            "the backoff stops at its cap",
            POLICY,
            1,
            1.0,
            (),
            10,
            ExitDecision(ExitAction.RESTART, 60.0, (NOW,), 11),
        ),
        (
            "a replica that ran past stable_after starts its backoff again",
            POLICY,
            1,
            61.0,
            (),
            6,
            ExitDecision(ExitAction.RESTART, 1.0, (NOW,), 1),
        ),
        (
            "on-failure leaves a clean exit alone, uncounted",
            policy(mode=RestartMode.ON_FAILURE),
            0,
            1.0,
            (NOW - 1,),
            2,
            ExitDecision(ExitAction.EXITED, 0.0, (NOW - 1,), 2),
        ),
        (
            "on-failure restarts an unknown exit (a signal, a lost process)",
            policy(mode=RestartMode.ON_FAILURE),
            None,
            1.0,
            (),
            0,
            ExitDecision(ExitAction.RESTART, 1.0, (NOW,), 1),
        ),
        (
            "never restarts nothing",
            policy(mode=RestartMode.NEVER),
            3,
            1.0,
            (),
            0,
            ExitDecision(ExitAction.EXITED, 0.0, (), 0),
        ),
        (
            "the fifth counted exit within the window is a crash loop",
            POLICY,
            3,
            1.0,
            (NOW - 40, NOW - 30, NOW - 20, NOW - 10),
            4,
            ExitDecision(
                ExitAction.CRASHLOOP, 0.0, (NOW - 40, NOW - 30, NOW - 20, NOW - 10, NOW), 4
            ),
        ),
        (
            "exits older than the window no longer count",
            POLICY,
            3,
            1.0,
            (NOW - 400, NOW - 350, NOW - 301, NOW - 10),
            1,
            ExitDecision(ExitAction.RESTART, 2.0, (NOW - 10, NOW), 2),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_the_decision(
    case: str,
    rules: RestartPolicy,
    code: int | None,
    ran_s: float,
    failures: tuple[float, ...],
    consecutive: int,
    expected: ExitDecision,
) -> None:
    got = decide(
        rules,
        exit_code=code,
        ran_s=ran_s,
        now=NOW,
        failures=failures,
        consecutive_failures=consecutive,
    )
    assert got == expected, case
