"""The recovery rules: pure functions of plain values and an injected ``now``."""

from __future__ import annotations

import dataclasses

import pytest

from sidecar.decide import decision
from sidecar.decide.decision import Observation, Phase, VerdictKind
from sidecar.decide.recovery_rules import (
    RecoveryRules,
    leave_restart_to_runtime,
    rearm_after_stall,
    restart_overdue,
)

RULES = RecoveryRules(max_restarts=3, backoff=10.0, backoff_max=300.0, startup_grace=60.0)


def test_budget_is_spent_at_the_maximum_and_not_before() -> None:
    """Three restarts are allowed with a budget of three; the fourth is refused."""
    assert [RULES.budget_spent(restarts) for restarts in range(5)] == [
        False,
        False,
        False,
        True,
        True,
    ]
    assert RULES.budget_left(1) == 2


def test_backoff_doubles_per_fruitless_recovery_up_to_the_maximum() -> None:
    """10 s, 20 s, 40 s ... while recoveries find nothing newer, never above the maximum."""
    delays = [RULES.backoff_delay(streak) for streak in range(8)]
    assert delays == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]


def test_backoff_stays_finite_for_a_huge_streak() -> None:
    """A ledger with an absurd streak still gives the maximum, not an overflow."""
    assert RULES.backoff_delay(10**9) == 300.0


def test_no_backoff_when_the_base_delay_is_zero() -> None:
    """SIDECAR_RESTART_BACKOFF=0 restarts at once, whatever the streak."""
    rules = RecoveryRules(max_restarts=3, backoff=0.0, backoff_max=300.0, startup_grace=60.0)
    assert rules.backoff_delay(5) == 0.0


@pytest.mark.parametrize(
    ("kind", "relaunches", "left"),
    [
        (VerdictKind.CRASH, False, True),  # a restart policy already brings it back
        (VerdictKind.CRASH, True, False),  # the sidecar relaunches it itself
        (VerdictKind.STALL, False, False),  # a hung trainer must be stopped first
        (VerdictKind.STALL, True, False),
    ],
)
def test_only_a_crash_under_a_restart_policy_is_left_to_the_runtime(
    kind: VerdictKind, relaunches: bool, left: bool
) -> None:
    """Stopping a crashed trainer the runtime restarts could only kill its new attempt."""
    assert leave_restart_to_runtime(kind, sidecar_relaunches=relaunches) is left


def test_a_restart_left_to_the_runtime_is_overdue_after_the_startup_grace() -> None:
    """Due 60 s after the recovery on the injected clock; not a moment before."""
    due = RULES.restart_due_by(1000.0)
    assert due == 1060.0
    assert not restart_overdue(due, 1060.0)
    assert restart_overdue(due, 1060.5)
    assert not restart_overdue(None, 10**9)


def test_detect_only_watches_again_once_a_stalled_run_progresses() -> None:
    """After a stall, log growth re-arms the watch; silence, or a running run, does not."""
    stalled = dataclasses.replace(decision.started(0.0), phase=Phase.STALLED)
    assert rearm_after_stall(stalled, Observation(now=50.0, log_grew=True))
    assert rearm_after_stall(stalled, Observation(now=50.0, outputs_changed=True))
    assert not rearm_after_stall(stalled, Observation(now=50.0))
    running = decision.started(0.0)
    assert not rearm_after_stall(running, Observation(now=50.0, log_grew=True))


def test_progress_is_judged_on_the_state_files_own_clock() -> None:
    """A newer state than the one resumed is progress, whatever the sidecar's clock says (an
    NFS server behind it); the same one, an older one, or the beginning is not."""
    from sidecar.decide.recovery_rules import made_progress

    assert made_progress(1_000.0, 900.0)
    assert not made_progress(900.0, 900.0)
    assert not made_progress(800.0, 900.0)
    assert not made_progress(None, 900.0)
    assert made_progress(10.0, None), "the first state after a fresh start"
    assert RULES.futile(3) and not RULES.futile(2)
