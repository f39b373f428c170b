"""Bounded lost work: the cadence added, and when nothing is added."""

from __future__ import annotations

from sidecar.decide.lost_work import STEPS_TO_MEASURE, SaveCadence, StepClock, denser_cadence


def test_an_epoch_cadence_that_loses_hours_gets_a_step_cadence_within_the_bound() -> None:
    """4 epochs of 500 steps at 6 s/step lose 3.3 h; a 30 min bound saves every 240 steps
    (24 min: a margin for step times that wander)."""
    cadence = denser_cadence(bound_seconds=1800, step_seconds=6.0, state_every_steps=2000)
    assert cadence == SaveCadence(every_n_steps=240, keep_last_steps=480)
    assert cadence.every_n_steps * 6.0 <= 1800


def test_a_cadence_within_the_bound_is_left_alone() -> None:
    """The user's own every-100-steps at 6 s/step loses 10 min: nothing to add."""
    assert denser_cadence(bound_seconds=1800, step_seconds=6.0, state_every_steps=100) is None


def test_no_state_saved_at_all_gets_a_cadence() -> None:
    assert denser_cadence(bound_seconds=60, step_seconds=7.0, state_every_steps=None) == (
        SaveCadence(every_n_steps=6, keep_last_steps=12)
    )


def test_steps_longer_than_the_bound_save_every_step() -> None:
    cadence = denser_cadence(bound_seconds=10, step_seconds=30, state_every_steps=None)
    assert cadence is not None and cadence.every_n_steps == 1


def test_off_when_the_bound_is_zero() -> None:
    """SIDECAR_MAX_LOST_WORK=0 turns it off."""
    assert denser_cadence(bound_seconds=0, step_seconds=6, state_every_steps=None) is None


def test_the_step_time_is_trusted_only_after_enough_steps() -> None:
    clock = StepClock(first_step=40, first_at=100.0)
    assert clock.seconds_per_step(40 + STEPS_TO_MEASURE - 1, 200.0) is None
    assert clock.seconds_per_step(40 + STEPS_TO_MEASURE, 140.0) == 40 / STEPS_TO_MEASURE
