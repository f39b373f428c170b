"""What the status page shows, gathered into one plain value (:class:`PageModel`).

Built on the HTTP thread when someone asks, never by the loop: the loop's live view (its
snapshot, the step rate, the history) is only read, and the rest comes from the files
``status`` reads too (the ledger, the state folders, train.sh and its ``.orig``, the
incident bundles). Every text a trainer or a user wrote (run names, paths, log lines,
stacks) is carried as it is; escaping is the renderer's job, done once, at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidecar.checkpoints.choice import run_candidates
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import STILL_WRITTEN, Candidate
from sidecar.decide.recovery_rules import RecoveryRules
from sidecar.observe.log_follower import tail_text
from sidecar.recover.resume_point import EARLIER_RUN, earlier_run_excluded
from sidecar.run.ledger import Ledger, LedgerError, LedgerStore, SetAside
from sidecar.run.paths import RunPaths, RunSetupError, read_train_script
from sidecar.surface.history import Mark, Sample
from sidecar.surface.incidents import INCIDENTS_FOLDER, list_bundles
from sidecar.surface.status_report import bundle_summary, run_phase
from sidecar.surface.step_rate import Speed
from sidecar.trainers.sd_scripts.launch_script import script_diff

# Bounds on what one page carries: it must stay small however big the logs and bundles are.
_INCIDENTS_SHOWN = 5
_LOG_TAIL_BYTES = 8 * 1024
_STACK_BYTES = 12 * 1024
_DIFF_LINES = 200
_CHECKPOINTS_SHOWN = 30  # the newest; the one train.sh points at is always among them
_SCRIPT_BYTES = 256 * 1024


@dataclass(frozen=True)
class CheckpointRow:
    name: str
    kind: str
    step: int | None
    epoch: int | None
    # complete | still written | mixed | quarantined | incomplete | unreadable | earlier run
    # | set aside
    verdict: str
    why: str  # the problems, or "" when complete
    completed_at: float | None
    resumed: bool  # the one train.sh's --resume points at


@dataclass(frozen=True)
class IncidentView:
    name: str
    kind: str | None
    reason: str | None
    diagnosis: str | None
    evidence: list[str]
    mitigation: str | None
    log_tail: str
    stacks: str | None  # the first stack dump, when stacks were read


@dataclass(frozen=True)
class PageModel:
    rendered_at: float  # wall clock
    mode: str
    run: str | None  # the output name; None while no run is watched
    train_script: str | None = None
    output_dir: str | None = None
    phase: str = "idle"
    phase_detail: str = "no run is watched yet"
    section: str | None = None
    step: int | None = None
    total: int | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    quiet_seconds: float | None = None
    allowance_seconds: float | None = None
    resumes_from: str | None = None  # train.sh's --resume (the sidecar's view)
    restarts: int = 0
    max_restarts: int = 0
    backoff_seconds: float | None = None  # before the next relaunch, if one is needed
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    interruptions: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    checkpoints_total: int = 0
    checkpoints_scanned_at: float | None = None  # wall clock of the scan the table shows
    script_diff: str | None = None  # None: train.sh is as the user wrote it
    incidents: list[IncidentView] = field(default_factory=list)
    incidents_total: int = 0
    relaunches: int = 0  # times the sidecar started the trainer again itself
    samples: list[Sample] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read, and why

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PageSources:
    """What the page reads: the loop's live view and the run's settings."""

    snapshot: Callable[[], dict[str, Any]]
    paths: Callable[[], RunPaths | None]
    speed: Callable[[], Speed | None]
    history: Callable[[], tuple[list[Sample], list[Mark]]]
    mode: str
    rules: RecoveryRules
    checkpoint_settle: float


# The run's state folders and when they were scanned (wall clock), given the run's paths,
# the wall clock and what would make an earlier scan stale (see StatusPage._scan).
Scan = Callable[[RunPaths, float, tuple[Any, ...]], tuple[list[Candidate], float]]


class StatusPage:
    """Builds the model at most once every ``max_age`` seconds, however many browsers ask
    (a page left open in ten tabs costs what one costs).

    The state folders are scanned again only when something says the last scan is stale: a
    folder appeared or went (the output folder's own mtime), train.sh points elsewhere, the
    ledger recorded a recovery or a quarantine, a folder that was still being written has
    had time to settle, and in any case after ``scan_max_age`` seconds (a folder rewritten
    in place). On a folder of a thousand states the scan is most of a page's cost."""

    def __init__(
        self,
        sources: PageSources,
        *,
        max_age: float = 2.0,
        scan_max_age: float = 60.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._sources = sources
        self._max_age = max_age
        self._scan_max_age = scan_max_age
        self._wall = wall
        self._monotonic = monotonic
        self._memo = FileReportMemo()  # a state file already checked is not read again
        self._lock = threading.Lock()
        self._cached: tuple[float, PageModel] | None = None
        # (monotonic time, staleness key, candidates, wall time) of the last scan
        self._scanned: tuple[float, tuple[Any, ...], list[Candidate], float] | None = None

    def model(self) -> PageModel:
        with self._lock:
            now = self._monotonic()
            if self._cached is None or now - self._cached[0] >= self._max_age:
                self._cached = (now, build_model(self._sources, self._wall(), self._scan))
            return self._cached[1]

    def _scan(
        self, paths: RunPaths, wall: float, key: tuple[Any, ...]
    ) -> tuple[list[Candidate], float]:
        now = self._monotonic()
        settle = self._sources.checkpoint_settle
        key = (*key, paths.output_dir, _mtime_ns(paths.output_dir))
        scanned = self._scanned
        if (
            scanned is None
            or scanned[1] != key
            or now - scanned[0] >= self._scan_max_age
            or (now - scanned[0] >= settle and any(_settling(c) for c in scanned[2]))
        ):
            found = run_candidates(paths, now=wall, settle=settle, memo=self._memo)
            scanned = self._scanned = (now, key, found, wall)
        return scanned[2], scanned[3]


def _mtime_ns(folder: Path) -> int | None:
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return None


def _settling(candidate: Candidate) -> bool:
    return any(problem.startswith(STILL_WRITTEN) for problem in candidate.problems)


def build_model(sources: PageSources, now: float, scan: Scan | None = None) -> PageModel:
    """The page at wall-clock ``now``; ``scan`` lists the state folders (by default afresh)."""
    if scan is None:
        settle = sources.checkpoint_settle

        def scan(paths: RunPaths, now: float, _: tuple[Any, ...]) -> tuple[list[Candidate], float]:
            return run_candidates(paths, now=now, settle=settle), now

    view = sources.snapshot()
    paths = sources.paths()
    samples, marks = sources.history()
    if paths is None:
        return PageModel(rendered_at=now, mode=sources.mode, run=None, samples=samples, marks=marks)
    problems: list[str] = []
    try:
        ledger = LedgerStore(paths.state_dir).load()
    except LedgerError as error:
        problems.append(str(error))
        ledger = Ledger()
    phase, detail = _phase(view, ledger, paths)
    speed = sources.speed()
    resumes_from = _resume_pointer(paths, problems)
    stale_when = (resumes_from, len(ledger.recoveries), tuple(ledger.quarantined))
    candidates, scanned_at = scan(paths, now, stale_when)
    if ledger.run_started_at is not None:
        candidates = earlier_run_excluded(candidates, ledger.run_started_at)
    rows = [_row(c, ledger.quarantined, resumes_from) for c in candidates]
    rows += [_aside_row(moved) for moved in ledger.set_aside if moved.put_back_at is None]
    bundles = list_bundles(paths.state_dir / INCIDENTS_FOLDER)
    resumed_interruptions = sum(1 for i in ledger.interruptions if i.resumed_at is not None)
    return PageModel(
        rendered_at=now,
        mode=sources.mode,
        run=paths.output_name,
        train_script=str(paths.train_script),
        output_dir=str(paths.output_dir),
        phase=phase,
        phase_detail=detail,
        section=view.get("section"),
        step=view.get("last_step"),
        total=view.get("total_steps"),
        steps_per_second=speed.steps_per_second if speed else None,
        eta_seconds=speed.eta_seconds if speed else None,
        quiet_seconds=view.get("seconds_since_progress"),
        allowance_seconds=view.get("stall_allowance"),
        resumes_from=resumes_from,
        restarts=ledger.restarts,
        max_restarts=sources.rules.max_restarts,
        backoff_seconds=sources.rules.backoff_delay(ledger.consecutive_failures),
        recoveries=[asdict(recovery) for recovery in ledger.recoveries],
        interruptions=[asdict(interruption) for interruption in ledger.interruptions],
        checkpoints=_shown(rows),
        checkpoints_total=len(rows),
        checkpoints_scanned_at=scanned_at,
        script_diff=_script_diff(paths.train_script, problems),
        incidents=[_incident(folder) for folder in reversed(bundles[-_INCIDENTS_SHOWN:])],
        incidents_total=len(bundles),
        relaunches=len(ledger.recoveries) + resumed_interruptions,
        samples=samples,
        marks=marks,
        problems=problems,
    )


def _phase(view: dict[str, Any], ledger: Ledger, paths: RunPaths) -> tuple[str, str]:
    """The ledger's verdict on the run when it has one (completed, gave up, abandoned,
    interrupted), else the loop's live phase."""
    phase, detail = run_phase(ledger, paths)
    if phase is not None:
        return phase, detail
    live = str(view.get("phase") or "idle")
    return live, _LIVE_DETAIL.get(live, "")


_LIVE_DETAIL = {
    "idle": "no trainer is running",
    "starting": "the trainer is starting (loading the model, caching)",
    "running": "training",
    "stalled": "stalled: the sidecar is recovering it",
    "crashed": "the trainer exited with an error: the sidecar is recovering it",
    "completed": "the training completed",
}


def _resume_pointer(paths: RunPaths, problems: list[str]) -> str | None:
    try:
        _, command = read_train_script(paths.train_script, paths.trainer)
    except RunSetupError as error:
        problems.append(str(error))
        return None
    pointer = command.resume
    return paths.path_map.to_sidecar(pointer) if pointer else None


def _row(candidate: Candidate, quarantined: list[str], resumes_from: str | None) -> CheckpointRow:
    return CheckpointRow(
        name=candidate.path.name,
        kind=str(candidate.kind),
        step=candidate.step,
        epoch=candidate.epoch,
        verdict=checkpoint_verdict(candidate, quarantined),
        why="; ".join(candidate.problems),
        completed_at=candidate.completed_at,
        resumed=resumes_from is not None and Path(resumes_from) == candidate.path,
    )


def _aside_row(moved: SetAside) -> CheckpointRow:
    """A state the sidecar renamed out of the trainer's way (still on the volume)."""
    why = "; ".join(moved.problems) or "incomplete"
    return CheckpointRow(
        name=Path(moved.moved_to).name,
        kind="set aside",
        step=None,
        epoch=None,
        verdict="set aside",
        why=f"was {Path(moved.original).name}: {why} (checkpoints --put-back renames it back)",
        completed_at=None,
        resumed=False,
    )


def _shown(rows: list[CheckpointRow]) -> list[CheckpointRow]:
    """The newest rows, and the one train.sh points at however old it is."""
    shown = rows[:_CHECKPOINTS_SHOWN]
    shown += [row for row in rows[_CHECKPOINTS_SHOWN:] if row.resumed]
    return shown


def checkpoint_verdict(candidate: Candidate, quarantined: list[str]) -> str:
    if str(candidate.path) in quarantined:
        return "quarantined"
    if EARLIER_RUN in candidate.problems:
        return "earlier run"
    if candidate.mixed:
        return "mixed"
    if candidate.unreadable_only:
        return "unreadable"
    if candidate.complete:
        return "complete"
    if _settling(candidate):
        return "still written"
    return "incomplete"


def _script_diff(script: Path, problems: list[str]) -> str | None:
    """train.sh against the ``.orig`` the sidecar kept before its first edit (every
    trainer's launch script is kept the same way)."""
    original = script.with_name(script.name + ".orig")
    try:
        before = _read_bounded(original)
        after = _read_bounded(script)
    except FileNotFoundError:
        return None  # never edited: no .orig (or no train.sh, reported with the pointer)
    except OSError as error:
        problems.append(f"cannot compare {script} with {original}: {error}")
        return None
    if before == after:
        return None
    lines = script_diff(before, after, script, context=3)
    if len(lines) > _DIFF_LINES:
        lines = [*lines[:_DIFF_LINES], f"... {len(lines) - _DIFF_LINES} more lines"]
    return "\n".join(lines)


def _read_bounded(path: Path) -> str:
    with open(path, "rb") as handle:
        return handle.read(_SCRIPT_BYTES).decode("utf-8", "replace")


def _incident(folder: Path) -> IncidentView:
    summary = bundle_summary(folder)
    return IncidentView(
        name=summary["name"],
        kind=summary["kind"],
        reason=summary["reason"],
        diagnosis=summary["diagnosis"],
        evidence=[str(line) for line in summary["evidence"]],
        mitigation=summary["mitigation"],
        log_tail=_tail(folder / "train.log.tail", _LOG_TAIL_BYTES) or "",
        stacks=_first_stack(folder / "stacks"),
    )


def _first_stack(folder: Path) -> str | None:
    try:
        dumps = sorted(path for path in folder.iterdir() if path.suffix == ".txt")
    except OSError:
        return None
    return _tail(dumps[0], _STACK_BYTES) if dumps else None


def _tail(path: Path, max_bytes: int) -> str | None:
    try:
        return tail_text(path, max_bytes)
    except OSError as error:  # refused access, a folder in its place: say so, go on
        return f"({path.name} cannot be read: {error})"
