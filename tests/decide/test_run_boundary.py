"""One run per name: where this run begins (pure)."""

from __future__ import annotations

from sidecar.decide.run_boundary import ScriptSeen, run_boundary, written_by_this_run

SCRIPT = ScriptSeen(digest="a", mtime=1000.0, mtime_ns=1_000_000_000_000)


def boundary(**recorded):  # type: ignore[no-untyped-def]
    values = {
        "recorded_digest": None,
        "recorded_started_at": None,
        "recorded_script_mtime_ns": None,
        "completed": False,
        "final_model_mtime": None,
    }
    values.update(recorded)
    return run_boundary(script=SCRIPT, **values)


def test_a_script_newer_than_an_earlier_final_model_starts_a_new_run_then() -> None:
    """FluxGym reused the folder: the earlier run's final model and states are not ours."""
    found = boundary(final_model_mtime=900.0)
    assert found.new_run and found.started_at == 1000.0


def test_first_sight_without_an_earlier_final_model_counts_every_file() -> None:
    found = boundary()
    assert found.new_run and found.started_at is None


def test_other_settings_are_a_new_run_from_the_script_write() -> None:
    found = boundary(recorded_digest="b", recorded_started_at=10.0)
    assert found.new_run and found.started_at == 1000.0


def test_the_same_untouched_script_after_completion_is_the_completed_run() -> None:
    """A sidecar restarted after this run completed never trains it again."""
    found = boundary(
        recorded_digest="a",
        recorded_started_at=10.0,
        recorded_script_mtime_ns=SCRIPT.mtime_ns,
        completed=True,
    )
    assert not found.new_run and found.started_at == 10.0


def test_the_same_settings_written_again_after_completion_are_a_new_run() -> None:
    """FluxGym writes train.sh at every Start: a later write is the user's new run."""
    found = boundary(
        recorded_digest="a", recorded_script_mtime_ns=5, completed=True, recorded_started_at=1
    )
    assert found.new_run and found.started_at == 1000.0


def test_files_from_before_the_boundary_are_an_earlier_runs() -> None:
    assert written_by_this_run(1000.0, 1000.0)
    assert not written_by_this_run(999.9, 1000.0)
    assert not written_by_this_run(None, 1000.0)
    assert written_by_this_run(None, None)
