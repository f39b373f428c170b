"""The recovery sequence on a real FluxGym tree with a recording restarter and a fake wait."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import structlog
from state_factory import write_state_folder
from structlog.testing import capture_logs

from sidecar.config import Settings
from sidecar.decide.decision import Verdict, VerdictKind
from sidecar.decide.recovery_rules import RecoveryRules
from sidecar.recover.recovery import OutcomeKind, Recovery
from sidecar.recover.resume_point import ResumeOptions, ResumePointer
from sidecar.restarters.base import RestartError, TrainerStatus
from sidecar.run.paths import RunPaths, resolve_run_paths
from sidecar.run.record import RunRecord
from sidecar.simulator.fluxgym_tree import FluxgymTree
from sidecar.trainers.sd_scripts import launch_script
from sidecar.trainers.shell.train_script import parse_train_script

STALL = Verdict(VerdictKind.STALL, "no progress for 90 s")
CRASH = Verdict(VerdictKind.CRASH, "trainer exited with code 7")
OLD = 1_700_000_000.0


class RecordingRestarter:
    """Records what the recovery asks, and what train.sh said at the moment of asking."""

    mode = "test"
    acts = True
    exits_with_run = True

    def __init__(self, script: Path, *, stop_before_rewrite: bool, relaunches: bool = True):
        self.script = script
        self.stop_before_rewrite = stop_before_rewrite
        self.relaunches = relaunches
        self.calls: list[tuple[str, str | None]] = []
        self.fail_stop = False

    def _resume(self) -> str | None:
        return parse_train_script(self.script.read_text()).resume

    def use_run(self, paths: RunPaths) -> None: ...
    def start(self) -> None: ...

    def status(self) -> TrainerStatus:
        return TrainerStatus(running=True)

    def trainer_pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        self.calls.append(("stop", self._resume()))
        if self.fail_stop:
            raise RestartError("cannot stop it")

    def restart(self) -> None:
        self.calls.append(("restart", self._resume()))


def setup(
    fluxgym: FluxgymTree, *, max_restarts: int = 3, **restarter: bool
) -> tuple[RunRecord, ResumePointer, RecordingRestarter, list[float], Recovery]:
    paths = resolve_run_paths(Settings(train_script=fluxgym.train_script))
    log = structlog.get_logger()
    record = RunRecord(paths, log)
    pointer = ResumePointer(paths, ResumeOptions(ensure_save_state=True, allow_scratch=False), log)
    fake = RecordingRestarter(paths.train_script, **restarter)
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return False

    rules = RecoveryRules(
        max_restarts=max_restarts, backoff=5.0, backoff_max=60.0, startup_grace=30
    )
    recovery = Recovery(restarter=fake, rules=rules, log=log, wait=wait, monotonic=lambda: 0.0)
    return record, pointer, fake, waits, recovery


def test_process_mode_stops_before_rewriting_and_restarts_from_the_newest_state(
    fluxgym: FluxgymTree,
) -> None:
    """stop (train.sh untouched), rewrite to the newest complete state, back off, restart."""
    state = write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=OLD)
    record, pointer, fake, waits, recovery = setup(fluxgym, stop_before_rewrite=True)

    outcome = recovery.recover(STALL, record, pointer, wall=OLD + 3600, retrying=False)

    assert outcome.kind is OutcomeKind.RESTARTED and outcome.checkpoint == str(state)
    assert fake.calls == [("stop", None), ("restart", str(state))]
    assert waits == [5.0]
    assert record.store.load().restarts == 1


def test_container_modes_rewrite_first_and_leave_a_crash_to_the_runtime(
    fluxgym: FluxgymTree,
) -> None:
    """No stop, no restart: the restart policy brings the crashed trainer back onto the
    rewritten train.sh."""
    state = write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=OLD)
    record, pointer, fake, _, recovery = setup(fluxgym, stop_before_rewrite=False, relaunches=False)

    outcome = recovery.recover(CRASH, record, pointer, wall=OLD + 3600, retrying=False)

    assert outcome.kind is OutcomeKind.LEFT_TO_RUNTIME
    assert fake.calls == []
    assert parse_train_script(fluxgym.train_script.read_text()).resume == str(state)


def test_spent_budget_gives_up_and_leaves_train_sh_alone(fluxgym: FluxgymTree) -> None:
    """At the budget: gave_up with the figures, train.sh byte for byte as it was."""
    record, pointer, _, _, recovery = setup(fluxgym, max_restarts=0, stop_before_rewrite=True)
    before = fluxgym.train_script.read_bytes()

    with capture_logs() as logs:
        outcome = recovery.recover(STALL, record, pointer, wall=OLD, retrying=False)

    assert outcome.kind is OutcomeKind.GAVE_UP
    assert fluxgym.train_script.read_bytes() == before
    (gave_up,) = [entry for entry in logs if entry["event"] == "gave_up"]
    assert gave_up["reason"] == "restart budget of 0 spent"
    assert record.store.load().gave_up


def test_a_stop_that_fails_gives_up(fluxgym: FluxgymTree) -> None:
    """A trainer that cannot be stopped is never joined by a second one."""
    record, pointer, fake, _, recovery = setup(fluxgym, stop_before_rewrite=True)
    fake.fail_stop = True
    outcome = recovery.recover(STALL, record, pointer, wall=OLD, retrying=False)
    assert outcome.kind is OutcomeKind.GAVE_UP
    assert fake.calls == [("stop", None)]


def test_shutdown_during_the_backoff_restarts_nothing(fluxgym: FluxgymTree) -> None:
    """A stop requested while backing off ends the recovery before the restart."""
    record, pointer, fake, _, _ = setup(fluxgym, stop_before_rewrite=True)
    recovery = Recovery(
        restarter=fake,
        rules=RecoveryRules(max_restarts=3, backoff=5.0, backoff_max=60.0, startup_grace=30),
        log=structlog.get_logger(),
        wait=lambda seconds: True,
        monotonic=lambda: 0.0,
    )
    outcome = recovery.recover(STALL, record, pointer, wall=OLD, retrying=False)
    assert outcome.kind is OutcomeKind.SHUTTING_DOWN
    assert [call for call, _ in fake.calls] == ["stop"]


def test_a_rewrite_that_fails_is_retried_and_logged_once(
    fluxgym: FluxgymTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that refuses the atomic rewrite twice: RETRY each time, one restart_failed, the
    trainer stopped only once, nothing counted until the rewrite works."""
    write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=OLD)
    record, pointer, fake, _, recovery = setup(fluxgym, stop_before_rewrite=True)
    real_replace = launch_script.replace_atomically
    refusals = [OSError(errno.ENOSPC, "No space left on device", f"tmp{n}") for n in range(2)]

    def full_disk_twice(path: Path, text: str) -> None:
        if refusals:
            raise refusals.pop(0)  # each names another temporary file, as the real one does
        real_replace(path, text)

    monkeypatch.setattr(launch_script, "replace_atomically", full_disk_twice)
    before = fluxgym.train_script.read_bytes()
    with capture_logs() as logs:
        first = recovery.recover(STALL, record, pointer, wall=OLD + 3600, retrying=False)
        second = recovery.recover(STALL, record, pointer, wall=OLD + 3600, retrying=True)
    assert first.kind is second.kind is OutcomeKind.RETRY
    assert fluxgym.train_script.read_bytes() == before
    assert len([entry for entry in logs if entry["event"] == "restart_failed"]) == 1
    assert [call for call, _ in fake.calls] == ["stop"]
    assert record.ledger.restarts == 0
    third = recovery.recover(STALL, record, pointer, wall=OLD + 3600, retrying=True)
    assert third.kind is OutcomeKind.RESTARTED and record.ledger.restarts == 1
    assert [call for call, _ in fake.calls] == ["stop", "restart"]


# -- stops that no relaunch can fix -------------------------------------------------------


def test_recoveries_from_the_same_checkpoint_stop_after_the_futile_limit(
    fluxgym: FluxgymTree,
) -> None:
    """Each attempt hangs before saving anything newer: the third recovery in a row stops
    the run (no progress), before the budget of 10 is anywhere near spent; quarantine
    falling back to an older state on the way does not reset the count."""
    write_state_folder(fluxgym.output_dir / "my-lora-000002-state", mtime=OLD - 60)
    state = write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=OLD)
    record, pointer, fake, _, recovery = setup(fluxgym, max_restarts=10, stop_before_rewrite=True)
    outcomes = []
    with capture_logs() as logs:
        for _ in range(4):
            outcome = recovery.recover(STALL, record, pointer, wall=OLD + 3600, retrying=False)
            outcomes.append(outcome.kind)
            if outcome.kind is not OutcomeKind.RESTARTED:
                break
    # The first recovery moves from "no checkpoint" to the state (news, so progress); then
    # the same state again, then the older one once it is quarantined; the next is the third
    # futile recovery in a row and stops.
    assert outcomes == [OutcomeKind.RESTARTED] * 3 + [OutcomeKind.NO_PROGRESS]
    assert [call for call, _ in fake.calls].count("restart") == 3
    (gave_up,) = [entry for entry in logs if entry["event"] == "gave_up"]
    assert gave_up["stopped_because"] == "no progress"
    assert "my-lora-000002-state" in gave_up["reason"], "the older state it fell back to"
    assert "SIDECAR_MAX_FUTILE_RECOVERIES=3" in gave_up["reason"]
    assert str(state) in record.store.load().quarantined
    ledger = record.store.load()
    assert ledger.gave_up and ledger.stopped_because == "no progress"


def test_a_newer_checkpoint_resets_the_futile_count(fluxgym: FluxgymTree) -> None:
    record, pointer, _, _, recovery = setup(fluxgym, max_restarts=10, stop_before_rewrite=True)
    for epoch in range(1, 6):  # every attempt saves one more state before it hangs
        write_state_folder(fluxgym.output_dir / f"my-lora-{epoch:06d}-state", mtime=OLD + epoch)
        outcome = recovery.recover(STALL, record, pointer, wall=OLD + 3600, retrying=False)
        assert outcome.kind is OutcomeKind.RESTARTED


def test_processes_that_survive_sigkill_stop_the_run_for_the_host(fluxgym: FluxgymTree) -> None:
    """No second trainer beside processes in uninterruptible sleep: the host needs attention."""
    from sidecar.restarters.base import SurvivedKill

    record, pointer, fake, _, recovery = setup(fluxgym, stop_before_rewrite=True)
    survivors = [{"pid": 4242, "state": "D", "wchan": "nfs_wait_bit_killable"}]

    def stop() -> None:
        fake.calls.append(("stop", None))
        raise SurvivedKill(survivors)

    fake.stop = stop  # type: ignore[method-assign]
    with capture_logs() as logs:
        outcome = recovery.recover(STALL, record, pointer, wall=OLD, retrying=False)
    assert outcome.kind is OutcomeKind.HOST_NEEDS_ATTENTION
    assert fake.calls == [("stop", None)], "nothing relaunched"
    (attention,) = [entry for entry in logs if entry["event"] == "host_needs_attention"]
    assert attention["processes"] == survivors
    assert "nfs_wait_bit_killable" in attention["reason"]
    assert record.store.load().stopped_because == "host needs attention"


def test_a_stall_records_its_diagnosis_and_the_checkpoint_it_failed_from(
    fluxgym: FluxgymTree,
) -> None:
    from sidecar.run.ledger import Attempt

    state = write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=OLD)
    record, pointer, _, _, recovery = setup(fluxgym, stop_before_rewrite=True)
    record.ledger.record_attempt(Attempt(launched_at=OLD, initial_step=0, resumed_from=str(state)))
    stall = Verdict(VerdictKind.STALL, "no progress", {"diagnosis": "dataloader_wait"})
    recovery.recover(stall, record, pointer, wall=OLD + 3600, retrying=False)
    (recorded,) = record.store.load().recoveries
    assert recorded.diagnosis == "dataloader_wait"
    assert recorded.failed_from == str(state)
