"""Choosing the resume point: newest complete, not quarantined; failures counted, no mutation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sidecar.checkpoints.choice import NoCheckpointLeft, choose_resume_point
from sidecar.checkpoints.scan import Candidate, choose_checkpoint
from sidecar.run.ledger import Ledger


def candidate(name: str, completed_at: float, *, complete: bool = True) -> Candidate:
    return Candidate(
        path=Path("/out") / name,
        kind="step",
        number=None,
        complete=complete,
        problems=() if complete else ("optimizer.bin missing",),
        completed_at=completed_at,
        step=None,
        epoch=None,
    )


NEWER = candidate("b-state", 200.0)
OLDER = candidate("a-state", 100.0)
PARTIAL = candidate("c-state", 300.0, complete=False)
SCAN = [NEWER, OLDER, PARTIAL]  # the scan's order: complete ones newest first


def test_the_one_query_skips_partial_and_quarantined() -> None:
    """First complete candidate whose path is not quarantined (the ledger keeps strings)."""
    assert choose_checkpoint(SCAN) == NEWER
    assert choose_checkpoint(SCAN, exclude=[str(NEWER.path)]) == OLDER
    assert choose_checkpoint(SCAN, exclude=[str(NEWER.path), str(OLDER.path)]) is None
    assert choose_checkpoint([PARTIAL]) is None


def test_choice_points_the_new_ledger_and_leaves_the_given_one_alone() -> None:
    """The returned ledger names the choice; the caller's ledger is unchanged."""
    ledger = Ledger()
    before = copy.deepcopy(ledger)

    choice = choose_resume_point(SCAN, ledger, allow_scratch=False)

    assert choice.checkpoint == NEWER and choice.reason == "newest complete checkpoint"
    assert choice.ledger.current_checkpoint == str(NEWER.path)
    assert choice.ledger.current_checkpoint_completed_at == 200.0
    assert ledger == before


def test_second_failure_from_the_same_checkpoint_quarantines_it() -> None:
    """Resumed from NEWER and failed twice with nothing newer: the older one is chosen."""
    ledger = Ledger(current_checkpoint=str(NEWER.path), current_checkpoint_completed_at=200.0)

    first = choose_resume_point(SCAN, ledger, allow_scratch=False)
    assert first.checkpoint == NEWER and first.quarantined_now == ()
    assert first.ledger.resume_failures == {str(NEWER.path): 1}
    assert first.ledger.consecutive_failures == 1  # nothing newer: back off harder

    second = choose_resume_point(SCAN, first.ledger, allow_scratch=False)
    assert second.checkpoint == OLDER
    assert second.quarantined_now == (str(NEWER.path),)
    assert second.ledger.consecutive_failures == 0


def test_a_rewritten_folder_of_the_same_name_is_not_the_one_that_failed() -> None:
    """Same path, later completion (sd-scripts reused the name): no failure is counted."""
    ledger = Ledger(current_checkpoint=str(NEWER.path), current_checkpoint_completed_at=150.0)
    choice = choose_resume_point(SCAN, ledger, allow_scratch=False)
    assert choice.ledger.resume_failures == {}


def test_a_sidecar_start_counts_nothing_against_the_checkpoint() -> None:
    """after_failure False: a restart of the sidecar says nothing about the checkpoint."""
    ledger = Ledger(current_checkpoint=str(NEWER.path), current_checkpoint_completed_at=200.0)
    choice = choose_resume_point(SCAN, ledger, allow_scratch=False, after_failure=False)
    assert choice.ledger.resume_failures == {}


def test_nothing_written_yet_starts_from_the_beginning() -> None:
    """No complete checkpoint ever: starting over loses nothing."""
    choice = choose_resume_point([PARTIAL], Ledger(), allow_scratch=False)
    assert choice.checkpoint is None and choice.reason == "no checkpoint written yet"


def test_everything_quarantined_gives_up_unless_scratch_is_allowed() -> None:
    """Giving up carries the ledger with its quarantine; scratch restarts from zero."""
    ledger = Ledger(quarantined=[str(NEWER.path), str(OLDER.path)])
    with pytest.raises(NoCheckpointLeft, match="SIDECAR_FALLBACK=scratch") as raised:
        choose_resume_point(SCAN, ledger, allow_scratch=False)
    assert raised.value.ledger.quarantined == ledger.quarantined

    choice = choose_resume_point(SCAN, ledger, allow_scratch=True)
    assert choice.checkpoint is None and choice.reason == "every checkpoint quarantined"
