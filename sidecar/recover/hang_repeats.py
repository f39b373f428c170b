"""A hang that comes back: the same class from the same checkpoint, told with its remedy.

A relaunch from the checkpoint that hung before replays the same data in the same order,
so a deadlock of the same kind is likely to come back. The second time, the user is told
the known mitigation (``decide/diagnosis.MITIGATIONS``); with ``SIDECAR_REMEDIATE=true`` it
is applied to train.sh for the relaunch, logged with the diff, once per class per run
(``train.sh.orig`` keeps the user's own script; undoing it is restoring the flags the diff
shows).
"""

from __future__ import annotations

from typing import Any

from sidecar import events
from sidecar.decide.decision import Verdict
from sidecar.decide.diagnosis import MITIGATIONS, HangClass
from sidecar.run.ledger import Ledger
from sidecar.trainers import LaunchScriptError
from sidecar.watched_run import WatchedRun


def earlier_hangs(ledger: Ledger, hang: str, failed_from: str | None) -> int:
    """Recoveries of the same hang class whose failed attempt began at ``failed_from``."""
    return sum(
        1
        for recovery in ledger.recoveries
        if recovery.diagnosis == hang and recovery.failed_from == failed_from
    )


def tell_repeat(run: WatchedRun, verdict: Verdict, log: Any, *, remediate: bool) -> None:
    """Log ``hang_repeated`` (and apply the remedy when asked) for a class seen before."""
    hang = verdict.figures.get("diagnosis")
    ledger = run.record.ledger
    if not isinstance(hang, str) or hang == HangClass.UNKNOWN.value:
        return
    failed_from = ledger.attempts[-1].resumed_from if ledger.attempts else None
    before = earlier_hangs(ledger, hang, failed_from)
    if before == 0:
        return
    mitigation = MITIGATIONS.get(HangClass(hang))
    applied = _apply(run, hang, log) if remediate and mitigation else False
    log.warning(
        events.HANG_REPEATED,
        diagnosis=hang,
        times=before + 1,
        checkpoint=failed_from,
        mitigation=mitigation,
        remedy="applied to train.sh for the relaunch"
        if applied
        else ("not applied (SIDECAR_REMEDIATE=true applies it)" if not remediate else None),
    )


def _apply(run: WatchedRun, hang: str, log: Any) -> bool:
    ledger = run.record.ledger
    if hang in ledger.remedies:
        return False  # once per class and run: a remedy that did not help is not repeated
    trainer, script = run.paths.trainer, run.paths.train_script
    try:
        changed, old, new = trainer.remedy(script, hang)
    except (LaunchScriptError, OSError) as error:
        log.warning(events.TRAIN_SCRIPT_NOT_UPDATED, reason=str(error))
        return False
    if not changed:
        return False
    run.pointer.last_write_ns = script.stat().st_mtime_ns  # the sidecar's edit, not a new run
    ledger.remedies.append(hang)
    run.record.save()
    log.warning(
        events.REMEDY_APPLIED,
        diagnosis=hang,
        mitigation=MITIGATIONS[HangClass(hang)],
        diff=trainer.launch_script_diff(old, new, script),
        original=str(script.with_name(script.name + ".orig")),
    )
    return True
