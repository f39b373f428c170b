"""The ledger that keeps the restart budget and quarantine across sidecar restarts."""

from __future__ import annotations

import json

import pytest

from sidecar.run.ledger import Ledger, LedgerError, LedgerStore


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
    assert json.loads((tmp_path / "state.json").read_text())["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
