"""The same hang from the same checkpoint again: told with its mitigation, applied on request."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from sidecar.config import Settings
from sidecar.decide.decision import Verdict, VerdictKind
from sidecar.recover.hang_repeats import tell_repeat
from sidecar.recover.resume_point import ResumeOptions
from sidecar.run.ledger import Attempt
from sidecar.run.paths import resolve_run_paths
from sidecar.simulator.fluxgym_tree import FluxgymTree
from sidecar.trainers.shell.train_script import parse_train_script
from sidecar.watched_run import WatchedRun

STATE = "/outputs/my-lora/my-lora-000004-state"
HUNG = Verdict(VerdictKind.STALL, "no progress", {"diagnosis": "dataloader_wait"})


def watched(fluxgym: FluxgymTree) -> WatchedRun:
    paths = resolve_run_paths(Settings(train_script=fluxgym.train_script))
    options = ResumeOptions(ensure_save_state=True, allow_scratch=False)
    return WatchedRun.open(paths, gpu=None, resume=options, log=structlog.get_logger())


def hung_before(run: WatchedRun, diagnosis: str, *, failed_from: str | None = STATE) -> None:
    ledger = run.record.ledger
    ledger.record_recovery(
        "stall", "no progress", STATE, diagnosis=diagnosis, failed_from=failed_from
    )
    ledger.record_attempt(Attempt(launched_at=1.0, initial_step=0, resumed_from=STATE))


def repeats(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "hang_repeated"]


def test_the_first_hang_of_a_class_is_not_a_repeat(fluxgym: FluxgymTree) -> None:
    run = watched(fluxgym)
    hung_before(run, "cuda_sync")
    with capture_logs() as logs:
        tell_repeat(run, HUNG, structlog.get_logger(), remediate=False)
    assert repeats(logs) == []


def test_a_hang_from_another_checkpoint_is_not_a_repeat(fluxgym: FluxgymTree) -> None:
    run = watched(fluxgym)
    hung_before(run, "dataloader_wait", failed_from="/outputs/my-lora/my-lora-000002-state")
    with capture_logs() as logs:
        tell_repeat(run, HUNG, structlog.get_logger(), remediate=False)
    assert repeats(logs) == []


def test_a_repeat_is_told_with_its_mitigation_and_train_sh_stays(fluxgym: FluxgymTree) -> None:
    run = watched(fluxgym)
    before = fluxgym.train_script.read_bytes()
    hung_before(run, "dataloader_wait")
    with capture_logs() as logs:
        tell_repeat(run, HUNG, structlog.get_logger(), remediate=False)
    (repeat,) = repeats(logs)
    assert repeat["times"] == 2 and repeat["checkpoint"] == STATE
    assert "--max_data_loader_n_workers 0" in repeat["mitigation"]
    assert "SIDECAR_REMEDIATE=true" in repeat["remedy"]
    assert fluxgym.train_script.read_bytes() == before


def test_remediate_applies_it_once_with_the_diff_and_keeps_the_original(
    fluxgym: FluxgymTree,
) -> None:
    run = watched(fluxgym)
    original = fluxgym.train_script.read_text()
    hung_before(run, "dataloader_wait")
    with capture_logs() as logs:
        tell_repeat(run, HUNG, structlog.get_logger(), remediate=True)
    (applied,) = [entry for entry in logs if entry["event"] == "remedy_applied"]
    added = [line for line in applied["diff"] if line.startswith("+  ")]
    assert any("--max_data_loader_n_workers" in line and "0" in line for line in added)
    command = parse_train_script(fluxgym.train_script.read_text())
    assert command.option("--max_data_loader_n_workers") == "0"
    assert (fluxgym.train_script.parent / "train.sh.orig").read_text() == original
    assert run.record.store.load().remedies == ["dataloader_wait"]
    assert repeats(logs)[0]["remedy"] == "applied to train.sh for the relaunch"
    # Not the user's new run: the boundary still sees the same run.
    assert (
        run.paths.trainer.run_identity(fluxgym.train_script.read_text())
        == run.record.ledger.run_digest
    )
    # A third time: told again, not applied again.
    hung_before(run, "dataloader_wait")
    with capture_logs() as logs:
        tell_repeat(run, HUNG, structlog.get_logger(), remediate=True)
    assert [entry["event"] for entry in logs if entry["event"] == "remedy_applied"] == []
    assert repeats(logs)[0]["times"] == 3
