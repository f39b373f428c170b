"""A relaunch resumed only if the trainer said it loaded the state, and from the step asked."""

from __future__ import annotations

from sidecar.decide.resume_check import resume_problem
from sidecar.trainers.base import ExpectedResume, StartupReport

STATE = "/app/fluxgym/outputs/my-lora/my-lora-step00000005-state"
EXPECTED = ExpectedResume(STATE, 21)


def test_loading_the_state_and_skipping_to_the_step_is_a_resume() -> None:
    report = StartupReport(resumed_from=STATE + "/", train_state_loaded=True, skipped_steps=21)
    assert resume_problem(EXPECTED, report, saw_output=True) is None


def test_stepping_without_loading_is_a_failed_resume() -> None:
    problem = resume_problem(EXPECTED, StartupReport(), saw_output=True)
    assert problem is not None and STATE in problem


def test_loading_another_state_is_a_failed_resume() -> None:
    report = StartupReport(resumed_from="/elsewhere-state", skipped_steps=21)
    assert "not " + STATE in (resume_problem(EXPECTED, report, saw_output=True) or "")


def test_starting_from_another_step_is_a_failed_resume() -> None:
    report = StartupReport(resumed_from=STATE, skipped_steps=16)
    assert "16 steps instead of 21" in (resume_problem(EXPECTED, report, saw_output=True) or "")


def test_without_readable_output_there_is_nothing_to_judge() -> None:
    assert resume_problem(EXPECTED, StartupReport(), saw_output=False) is None


def test_the_trainers_own_rule_needs_no_skip_line() -> None:
    report = StartupReport(resumed_from=STATE)
    assert resume_problem(ExpectedResume(STATE, None), report, saw_output=True) is None


def test_a_space_lost_where_the_log_wrapped_the_path_is_still_the_same_state() -> None:
    """rich wraps a long path at its spaces; a row that ends a word exactly at the column's
    edge looks like a fold, and joining the rows drops that space."""
    spaced = ExpectedResume("/outputs/it's my lora/it's my lora-step00000018-state", None)
    joined = StartupReport(resumed_from="/outputs/it's mylora/it's my lora-step00000018-state")
    assert resume_problem(spaced, joined, saw_output=True) is None
    other = StartupReport(resumed_from="/outputs/it's my lora/it's my lora-step00000012-state")
    assert resume_problem(spaced, other, saw_output=True) is not None
