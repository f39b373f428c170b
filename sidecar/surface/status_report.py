"""``training-sidecar status``: what happened to the run, for the person reading it in the morning.

Everything comes from files, so it works whether or not a sidecar is running, from any
shell that sees the output folder: the ledger (``state.json``: restarts, their reasons,
quarantine, completion), the output folder (checkpoints, the final model), the tail of
the trainer's log (the step counter and tqdm's own rate and time-left estimate), the
heartbeat file (is a sidecar watching) and the incident bundles.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.checkpoints.choice import newest_resumable
from sidecar.observe.log_follower import tail_text
from sidecar.observe.progress import TqdmBar
from sidecar.run.abandon import AbandonMarker
from sidecar.run.ledger import Ledger, LedgerStore
from sidecar.run.paths import RunPaths
from sidecar.surface.health import Heartbeat
from sidecar.surface.incidents import INCIDENTS_FOLDER, list_bundles
from sidecar.surface.step_rate import format_duration
from sidecar.trainers.sd_scripts import SD_SCRIPTS

_TAIL_BYTES = 64 * 1024


@dataclass
class Progress:
    step: int
    total: int
    steps_per_second: float | None
    eta_seconds: float | None  # tqdm's estimate; after a resume an upper bound (see README)


@dataclass
class StatusReport:
    run: str
    train_script: str
    output_dir: str
    phase: str  # completed | abandoned | gave_up | interrupted | training | quiet | not_started
    phase_detail: str
    sidecar_alive: bool
    sidecar_detail: str
    progress: Progress | None
    last_checkpoint: dict[str, Any] | None
    resumes_from: str | None
    restarts: int
    max_restarts: int
    restarts_by_reason: dict[str, int]
    recoveries: list[dict[str, Any]]
    quarantined: list[str]
    incidents_dir: str
    # Each time the sidecar or the machine went away while it trained, and how it came back.
    interruptions: list[dict[str, Any]] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)
    # Incomplete states renamed out of the trainer's way (still there, and restorable).
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    trainer: str = "sd-scripts"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def build_status_report(
    paths: RunPaths,
    *,
    heartbeat: Heartbeat,
    max_restarts: int,
    stall_after: float,
    checkpoint_settle: float,
    now: float | None = None,
) -> StatusReport:
    """The run's report at ``now``; raises LedgerError when state.json cannot be read.

    ``stall_after`` is the longest quiet spell that is not yet a stall (the stall timeout's
    bound); ``checkpoint_settle`` how long a state folder must be unchanged to count.
    """
    now = time.time() if now is None else now
    ledger = LedgerStore(paths.state_dir).load()
    log_age = _age(paths.train_log, now)
    phase, detail = _phase(ledger, paths, log_age, stall_after)
    health = heartbeat.health(now)
    incidents_dir = paths.state_dir / INCIDENTS_FOLDER
    return StatusReport(
        run=paths.output_name,
        train_script=str(paths.train_script),
        output_dir=str(paths.output_dir),
        phase=phase,
        phase_detail=detail,
        sidecar_alive=health.ok,
        sidecar_detail=health.message,
        progress=parse_progress(tail_text(paths.train_log, _TAIL_BYTES), paths.trainer.step_bar),
        last_checkpoint=_last_checkpoint(paths, ledger, now, checkpoint_settle),
        resumes_from=ledger.current_checkpoint,
        restarts=ledger.restarts,
        max_restarts=max_restarts,
        restarts_by_reason=dict(Counter(recovery.kind for recovery in ledger.recoveries)),
        recoveries=[asdict(recovery) for recovery in ledger.recoveries],
        quarantined=list(ledger.quarantined),
        incidents_dir=str(incidents_dir),
        incidents=[bundle_summary(folder) for folder in reversed(list_bundles(incidents_dir))],
        interruptions=[asdict(interruption) for interruption in ledger.interruptions],
        set_aside=[asdict(moved) for moved in ledger.set_aside if moved.put_back_at is None],
        trainer=paths.trainer.name,
    )


def parse_progress(
    tail: str, step_bar: Callable[[str], TqdmBar | None] = SD_SCRIPTS.step_bar
) -> Progress | None:
    """The last step bar in the log's tail, with tqdm's own rate and time-left estimate."""
    bar = step_bar(tail)
    if bar is None:
        return None
    return Progress(
        step=bar.n,
        total=bar.total,
        steps_per_second=bar.rate,
        eta_seconds=bar.remaining_seconds,
    )


def render_text(report: StatusReport, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"{'run':<13}{report.run}  ({report.output_dir})",
        f"{'phase':<13}{report.phase.replace('_', ' ')}: {report.phase_detail}",
        f"{'sidecar':<13}{'alive' if report.sidecar_alive else 'not seen here'}: "
        f"{report.sidecar_detail}",
        f"{'step':<13}{_progress_text(report)}",
    ]
    checkpoint = report.last_checkpoint
    if checkpoint:
        step = f", step {checkpoint['step']}" if checkpoint.get("step") is not None else ""
        lines.append(
            f"{'checkpoint':<13}{checkpoint['name']}{step}, "
            f"{format_duration(checkpoint['age_seconds'])} ago"
        )
    else:
        lines.append(f"{'checkpoint':<13}none complete yet")
    if report.resumes_from:
        lines.append(f"{'resumes from':<13}{Path(report.resumes_from).name}")
    reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(report.restarts_by_reason.items()))
    lines.append(
        f"{'restarts':<13}{report.restarts} of {report.max_restarts}"
        + (f" ({reasons})" if reasons else "")
    )
    for recovery in report.recoveries:
        source = Path(recovery["checkpoint"]).name if recovery["checkpoint"] else "from scratch"
        hang = f" [{recovery['diagnosis']}]" if recovery.get("diagnosis") else ""
        lines.append(
            f"  {recovery['at']}  {recovery['kind']:<6}{hang} {recovery['reason']} -> {source}"
        )
    lines.append(
        f"{'quarantined':<13}" + (", ".join(Path(p).name for p in report.quarantined) or "none")
    )
    if report.set_aside:  # only trainers that resume from "the latest" themselves
        names = ", ".join(Path(moved["moved_to"]).name for moved in report.set_aside)
        lines.append(f"{'set aside':<13}{names} (incomplete; renamed, not deleted)")
    lines.append(_interruptions_text(report.interruptions))
    lines.append(f"{'incidents':<13}{len(report.incidents)} in {report.incidents_dir}")
    for incident in report.incidents:
        stacks = f", {incident['stacks']} stack dump(s)" if incident["stacks"] else ""
        lines.append(
            f"  {incident['name']}  {incident['kind'] or '?':<6} {incident['reason'] or ''}"
            f"  [{_size(incident['bytes'])}{stacks}]" + _diagnosis_line(incident)
        )
    return "\n".join(lines) + "\n"


# -- pieces ------------------------------------------------------------------------------------


def _phase(
    ledger: Ledger,
    paths: RunPaths,
    log_age: float | None,
    stall_after: float,
) -> tuple[str, str]:
    phase, detail = run_phase(ledger, paths)
    if phase is not None:
        return phase, detail
    if log_age is None:
        return "not_started", f"no trainer log at {paths.train_log} yet"
    if log_age <= stall_after:
        return "training", f"last output {format_duration(log_age)} ago"
    return "quiet", (
        f"no output for {format_duration(log_age)} (a stall after {format_duration(stall_after)})"
    )


def run_phase(ledger: Ledger, paths: RunPaths) -> tuple[str | None, str]:
    """The run's phase when its ledger (or the final model) settles it: completed,
    abandoned, interrupted or gave_up; (None, "") while it is still the trainer's to tell.
    The user's abandon marker counts at once (the running sidecar reads it at its next poll)."""
    if ledger.completed or paths.final_model_present():
        return "completed", "the final model is in the output folder"
    abandoned = AbandonMarker(paths.state_dir).reason_for(ledger.run_started_at)
    if ledger.abandoned or abandoned is not None:
        return "abandoned", f"not resumed and not recovered any more ({abandoned or 'abandoned'})"
    interrupted = ledger.interrupted
    if interrupted is not None:
        when = datetime.fromtimestamp(interrupted.at, UTC).isoformat(timespec="seconds")
        return "interrupted", (
            f"the sidecar or the machine went away ({interrupted.how}) at {when}; the next "
            "start resumes it from the newest complete state"
        )
    if ledger.gave_up:
        last = ledger.recoveries[-1].reason if ledger.recoveries else "see the sidecar's log"
        why = ledger.stopped_because
        because = f" ({why})" if why and why != "gave up" else ""
        return "gave_up", (
            f"the sidecar gave up{because} after {ledger.restarts} restart(s); last: {last}"
        )
    return None, ""


def _interruptions_text(interruptions: list[dict[str, Any]]) -> str:
    if not interruptions:
        return f"{'interrupted':<13}never"
    resumed = [item for item in interruptions if item["resumed_at"] is not None]
    last = interruptions[-1]
    down = (
        f", down {format_duration(last['down_seconds'])}"
        if last["down_seconds"] is not None
        else ", not resumed yet"
    )
    return (
        f"{'interrupted':<13}{len(interruptions)} time(s), {len(resumed)} resumed after "
        f"interruption (last: {last['how']}{down}); not counted as restarts"
    )


def _progress_text(report: StatusReport) -> str:
    progress = report.progress
    if progress is None:
        return "no step counter in the log yet"
    percent = 100 * progress.step / progress.total if progress.total else 0
    parts = [f"{progress.step}/{progress.total} ({percent:.0f}%)"]
    if progress.steps_per_second:
        parts.append(_rate_text(progress.steps_per_second))
    if report.phase in ("training", "not_started") and progress.eta_seconds is not None:
        parts.append(f"ETA {format_duration(progress.eta_seconds)}")
    return ", ".join(parts)


def _rate_text(steps_per_second: float) -> str:
    if steps_per_second >= 1:
        return f"{steps_per_second:.2f} steps/s"
    return f"{1 / steps_per_second:.1f} s/step"


def _last_checkpoint(
    paths: RunPaths, ledger: Ledger, now: float, settle_seconds: float
) -> dict[str, Any] | None:
    newest = newest_resumable(paths, ledger.quarantined, now=now, settle=settle_seconds)
    if newest is None or newest.completed_at is None:
        return None
    return {
        "name": newest.path.name,
        "path": str(newest.path),
        "step": newest.step,
        "completed_at": newest.completed_at,
        "age_seconds": round(max(now - newest.completed_at, 0.0), 1),
    }


def _diagnosis_line(incident: dict[str, Any]) -> str:
    if not incident.get("diagnosis"):
        return ""
    evidence = "; ".join(incident.get("evidence") or [])[:300]
    return f"\n    diagnosis {incident['diagnosis']}: {evidence}"


def bundle_summary(folder: Path) -> dict[str, Any]:
    verdict = _read_json(folder / "verdict.json")
    diagnosis = _read_json(folder / "diagnosis.json")
    manifest = _read_json(folder / "manifest.json")
    files = manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else {}
    return {
        "name": folder.name,
        "path": str(folder),
        "kind": verdict.get("kind"),
        "reason": verdict.get("reason"),
        "diagnosis": diagnosis.get("class"),
        "evidence": diagnosis.get("evidence", []),
        "mitigation": diagnosis.get("mitigation"),
        "bytes": sum(v for v in files.values() if isinstance(v, int)),
        "stacks": sum(1 for name in files if name.startswith("stacks/")),
        "skipped": manifest.get("skipped", {}),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _age(path: Path, now: float) -> float | None:
    try:
        return max(now - path.stat().st_mtime, 0.0)
    except FileNotFoundError:
        return None


def _size(size: int) -> str:
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MB"
    return f"{size / 1024:.0f} KB" if size >= 1024 else f"{size} B"
