"""The ledger that keeps the restart budget and quarantine across sidecar restarts."""

from __future__ import annotations

import json

import pytest

from sidecar.run.ledger import Attempt, Interruption, Ledger, LedgerError, LedgerStore


def test_round_trip_keeps_budget_and_quarantine(tmp_path):
    """What is saved is what a new sidecar loads."""
    store = LedgerStore(tmp_path / ".sidecar")
    ledger = Ledger()
    ledger.record_recovery("stall", "no progress", "/out/a-state")
    ledger.current_checkpoint = "/out/a-state"
    ledger.current_checkpoint_completed_at = 1234.5
    assert not ledger.record_failed_resume("/out/a-state")
    assert ledger.record_failed_resume("/out/a-state")
    store.save(ledger)
    loaded = store.load()
    assert loaded.restarts == 1
    assert loaded.quarantined == ["/out/a-state"]
    assert loaded.current_checkpoint == "/out/a-state"
    assert loaded.current_checkpoint_completed_at == 1234.5
    assert loaded.recoveries[0].kind == "stall"


def test_missing_file_is_a_fresh_ledger(tmp_path):
    """No state.json yet means no restarts yet."""
    assert LedgerStore(tmp_path).load().restarts == 0


def test_unreadable_ledger_is_a_clear_error(tmp_path):
    """A corrupt state.json is reported, never silently reset."""
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(LedgerError, match="move it away"):
        LedgerStore(tmp_path).load()


def test_saved_file_is_complete_json_and_no_temp_file_remains(tmp_path):
    """The write is atomic: a complete JSON document, no leftovers."""
    store = LedgerStore(tmp_path)
    store.save(Ledger())
    assert json.loads((tmp_path / "state.json").read_text())["version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_version_1_ledger_is_read_and_upgraded(tmp_path):
    """A ledger from before attempts were recorded keeps its budget and quarantine."""
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                "version": 1,
                "recoveries": [
                    {
                        "at": "2026-01-01T00:00:00+00:00",
                        "reason": "r",
                        "kind": "stall",
                        "checkpoint": "/o/a-state",
                    }
                ],
                "resume_failures": {"/o/a-state": 1},
                "quarantined": [],
                "current_checkpoint": "/o/a-state",
                "current_checkpoint_completed_at": 5.0,
                "consecutive_failures": 1,
                "completed": False,
                "gave_up": False,
            }
        )
    )
    ledger = LedgerStore(tmp_path).load()
    assert ledger.restarts == 1 and ledger.attempts == [] and ledger.steps_per_epoch is None
    LedgerStore(tmp_path).save(ledger)
    assert json.loads((tmp_path / "state.json").read_text())["version"] == 2


def test_the_attempt_that_wrote_a_state_is_the_last_launched_before_it():
    """Attempts cover the time from their launch to the next one's."""
    ledger = Ledger()
    first, second = Attempt(launched_at=100.0, initial_step=0), Attempt(200.0, 24, "/o/s")
    ledger.record_attempt(first)
    ledger.record_attempt(second)
    assert ledger.attempt_that_wrote(150.0) is first
    assert ledger.attempt_that_wrote(200.0) is second
    assert ledger.attempt_that_wrote(99.0) is None
    assert ledger.attempt_that_wrote(None) is None


# -- interruptions ---------------------------------------------------------------------------


def test_interruptions_round_trip_and_are_not_restarts(tmp_path):
    store = LedgerStore(tmp_path)
    ledger = Ledger(supervising=True)
    ledger.record_interruption(
        Interruption(at=100.0, how="sigterm", newest_state_completed_at=50.0)
    )
    store.save(ledger)
    loaded = store.load()
    assert loaded.restarts == 0
    assert loaded.interruptions == [Interruption(100.0, "sigterm", 50.0)]
    assert loaded.supervising is False  # recorded interruptions end the watch
    assert loaded.state == "interrupted"
    assert loaded.interrupted == Interruption(100.0, "sigterm", 50.0)


def test_the_streak_counts_interruptions_with_no_newer_state_in_between():
    ledger = Ledger()
    for at, newest in [(1.0, None), (2.0, None), (3.0, 2.5), (4.0, 2.5), (5.0, 2.5)]:
        ledger.record_interruption(
            Interruption(at=at, how="unclean", newest_state_completed_at=newest)
        )
        ledger.interruptions[-1].resumed_at = at + 0.5
    # 1 (first), 2 (nothing new), 1 (a state completed at 2.5), 2, 3.
    assert ledger.consecutive_interruptions == 3
    assert ledger.interrupted is None  # the last one was resumed
    assert ledger.state == "idle"


def test_an_ended_run_is_not_interrupted():
    for end in ("completed", "gave_up", "abandoned"):
        ledger = Ledger()
        ledger.record_interruption(Interruption(at=1.0, how="unclean"))
        setattr(ledger, end, True)
        assert ledger.interrupted is None
        assert ledger.state == end


def test_a_version_2_ledger_without_interruption_keys_still_loads():
    old = {"version": 2, "recoveries": [], "completed": False}
    ledger = Ledger.from_json(json.dumps(old))
    assert (ledger.interruptions, ledger.supervising, ledger.abandoned) == ([], False, False)


def test_keys_a_newer_sidecar_added_are_left_out_not_fatal():
    """After a downgrade: fields this version does not know do not make the ledger unreadable."""
    newer = {
        "version": 2,
        "recoveries": [
            {"at": "x", "reason": "r", "kind": "stall", "checkpoint": None, "future": 1}
        ],
        "attempts": [{"launched_at": 1.0, "initial_step": 0, "future": True}],
        "some_future_field": {"a": 1},
    }
    ledger = Ledger.from_json(json.dumps(newer))
    assert ledger.restarts == 1 and ledger.recoveries[0].diagnosis is None
    assert ledger.attempts[0].launched_at == 1.0


def test_a_stall_keeps_its_diagnosis_and_where_it_failed_from(tmp_path):
    ledger = Ledger()
    ledger.record_recovery("stall", "r", "/s/b", diagnosis="cuda_sync", failed_from="/s/a")
    store = LedgerStore(tmp_path)
    store.save(ledger)
    (recovery,) = store.load().recoveries
    assert (recovery.diagnosis, recovery.failed_from) == ("cuda_sync", "/s/a")
