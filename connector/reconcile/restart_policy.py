"""What happens to a replica that exited: restart after a backoff, give the component up to
a crash loop, or leave it exited. A pure function of the policy and the replica's history,
so the arithmetic is tested like a table (``tests/test_restart_policy.py``) apart from the
loop that carries it out (``Reconciler._after_exit``).

The rules, as Kubernetes' restartPolicy and CrashLoopBackOff have them, with a budget:

* ``never`` leaves the replica exited; ``on-failure`` restarts only a non-zero exit (or a
  signal); ``always`` restarts every exit, and counts each against the budget: a process
  that exits 0 at once is crash-looping as much as one that exits 1.
* Each counted exit is remembered for ``crashloop_window_s``; ``crashloop_failures`` of
  them within the window put the component in crash loop.
* Otherwise the restart waits ``backoff_base_s * 2**n`` (at most ``backoff_max_s``), where
  ``n`` counts the replica's consecutive failures; a replica that ran at least
  ``stable_after_s`` starts again from ``n = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from connector.graph.model import RestartMode, RestartPolicy


class ExitAction(StrEnum):
    RESTART = "restart"  # after delay_s
    CRASHLOOP = "crashloop"  # the component stops restarting
    EXITED = "exited"  # the policy does not restart it


@dataclass(frozen=True)
class ExitDecision:
    action: ExitAction
    delay_s: float  # before the restart (RESTART only)
    failures: tuple[float, ...]  # the component's counted exits within the window, after this
    consecutive_failures: int  # the replica's, after this


def decide(
    policy: RestartPolicy,
    *,
    exit_code: int | None,
    ran_s: float,
    now: float,
    failures: Sequence[float],
    consecutive_failures: int,
) -> ExitDecision:
    """The decision for one exit at ``now`` of a replica that ran ``ran_s`` seconds, given
    the component's counted exits (``failures``, wall-clock times) and the replica's
    consecutive failures so far. ``exit_code`` None: unknown (a signal or a lost process),
    which counts as a failure."""
    consecutive = 0 if ran_s >= policy.stable_after_s else consecutive_failures
    restartable = policy.mode is RestartMode.ALWAYS or (
        policy.mode is RestartMode.ON_FAILURE and exit_code != 0
    )
    if not restartable:
        return ExitDecision(ExitAction.EXITED, 0.0, tuple(failures), consecutive)
    counted = (*(t for t in failures if now - t < policy.crashloop_window_s), now)
    if len(counted) >= policy.crashloop_failures:
        return ExitDecision(ExitAction.CRASHLOOP, 0.0, counted, consecutive)
    delay = min(policy.backoff_base_s * 2**consecutive, policy.backoff_max_s)
    return ExitDecision(ExitAction.RESTART, delay, counted, consecutive + 1)
