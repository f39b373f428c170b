"""Did the relaunch really resume? Judged from what the trainer said before its first step.

A relaunch that starts stepping without having loaded the state it was pointed at, or that
starts from another step than the one asked for, would silently train from the wrong place:
it is a failed resume, counted against that checkpoint like any other failed attempt.
Pure: the trainer's start-up report in, a problem (or None) out.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from sidecar.trainers.base import ExpectedResume, StartupReport


def resume_problem(
    expected: ExpectedResume, report: StartupReport, *, saw_output: bool
) -> str | None:
    """Why the attempt did not resume as asked; None when it did, or when its output could
    not be read (nothing to judge by: the relaunch is then trusted, as before)."""
    if not saw_output:
        return None
    if report.resumed_from is None:
        return (
            f"the trainer started stepping without saying it loaded {expected.state} "
            "(no line of its own that says it resumed)"
        )
    if _normal(report.resumed_from) != _normal(expected.state):
        return f"the trainer loaded {report.resumed_from}, not {expected.state}"
    if expected.initial_step and report.skipped_steps != expected.initial_step:
        said = report.skipped_steps if report.skipped_steps is not None else "no"
        return (
            f"the trainer skipped {said} steps instead of {expected.initial_step}: "
            "it did not start where the state was saved"
        )
    return None


def _normal(path: str) -> str:
    """A path as compared, whitespace left out: a trainer's log can wrap a long path at one of
    its spaces in a way that cannot be told from a fold (rich at 80 columns: a row that ends
    a word exactly at the column's edge), so a space may be lost when its rows are joined."""
    text = str(PurePosixPath(path.strip().strip('"').strip("'").rstrip("/")))
    return "".join(text.split())
