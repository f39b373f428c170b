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
from sidecar.trainers.sd_scripts.train_script import parse_train_script

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
