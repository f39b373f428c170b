"""What the sidecar does at start about an interrupted run: the pure rules."""

from __future__ import annotations

import pytest

from sidecar.decide.interruption import Plan, down_seconds, plan_after_interruption

RESUMABLE = {
    "enabled": True,
    "acts": True,
    "relaunches": True,
    "completed": False,
    "abandoned": False,
    "trainer_running": False,
    "consecutive": 1,
    "max_interruptions": 5,
}


def test_an_interrupted_run_is_relaunched():
    assert plan_after_interruption(**RESUMABLE).plan is Plan.RELAUNCH


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"completed": True}, "completed"),
        ({"abandoned": True}, "abandoned"),
        ({"acts": False}, "detect_only"),
        ({"enabled": False}, "disabled"),
        # A finished run is never relaunched, whatever else holds.
        ({"completed": True, "abandoned": True, "consecutive": 99}, "completed"),
    ],
)
def test_runs_that_are_left_alone_say_why(change, cause):
    plan = plan_after_interruption(**{**RESUMABLE, **change})
    assert (plan.plan, plan.cause) == (Plan.LEAVE, cause)
    assert plan.reason


def test_a_running_trainer_or_an_orchestrator_restart_is_awaited_not_doubled():
    assert plan_after_interruption(**{**RESUMABLE, "trainer_running": True}).plan is (
        Plan.AWAIT_TRAINER
    )
    assert plan_after_interruption(**{**RESUMABLE, "relaunches": False}).plan is (
        Plan.AWAIT_TRAINER
    )


def test_the_streak_is_bounded_by_its_own_budget():
    at_limit = plan_after_interruption(**{**RESUMABLE, "consecutive": 5})
    assert at_limit.plan is Plan.RELAUNCH
    over = plan_after_interruption(**{**RESUMABLE, "consecutive": 6})
    assert over.plan is Plan.GIVE_UP
    assert "SIDECAR_MAX_INTERRUPTIONS=5" in over.reason and "6 times" in over.reason


def test_downtime_never_negative():
    assert down_seconds(100.0, 142.5) == 42.5
    assert down_seconds(100.0, 90.0) == 0.0  # a wall clock that stepped back
