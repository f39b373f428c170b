"""The sub-commands, each taking the validated settings."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import structlog

from sidecar import events
from sidecar.checkpoints.choice import run_candidates
from sidecar.checkpoints.scan import Candidate, choose_checkpoint
from sidecar.checkpoints.set_aside import SetAsideError, put_back
from sidecar.config import Settings
from sidecar.log_setup import configure_logging, get_logger
from sidecar.observe.gpu import NvmlGpuMonitor
from sidecar.observe.gpu_health import NvmlHealthProbe
from sidecar.recover.health_gate import HealthGate
from sidecar.recover.resume_point import ResumePointer
from sidecar.run.abandon import AbandonMarker
from sidecar.run.command_launch import prepare_command_run
from sidecar.run.gui_take_over import take_over_gui_run
from sidecar.run.ledger import Ledger, LedgerError, LedgerStore, SetAside
from sidecar.run.locator import RunLocator
from sidecar.run.lock import RunLock, RunLockHeld
from sidecar.run.paths import RunPaths, RunSetupError, read_train_script
from sidecar.surface.health import Heartbeat
from sidecar.surface.http_server import probe
from sidecar.surface.observability import Observability
from sidecar.surface.status_report import build_status_report, render_text
from sidecar.watchdog import EXIT_ERROR, Watchdog
from sidecar.wiring import build_restarter, loop_options_of, resume_options_of

EXIT_PROBLEM = 1
EXIT_USAGE = 2

# For commands that print their own outcome: the pipeline's events are not theirs to log.
_QUIET = structlog.wrap_logger(structlog.ReturnLogger(), processors=[])


def run(settings: Settings, arguments: argparse.Namespace) -> int:
    words = list(getattr(arguments, "launch_command", None) or [])
    if words and words[0] == "--":
        words = words[1:]
    if words:
        try:
            settings = prepare_command_run(settings, words, cwd=Path.cwd())
        except (RunSetupError, OSError) as error:
            get_logger().error(events.CONFIGURATION_INVALID, reason=str(error))
            return EXIT_USAGE
    elif getattr(arguments, "launch_command", None):
        get_logger().error(
            events.CONFIGURATION_INVALID,
            reason="`training-sidecar run --` needs the trainer command after `--`",
        )
        return EXIT_USAGE
    elif settings.follow == "kohya-gui" and settings.train_script is None:
        stop_waiting, _ = _stop_on_signals()
        try:
            taken_over = take_over_gui_run(settings, stop_event=stop_waiting, log=get_logger())
        except (RunSetupError, OSError) as error:
            get_logger().error(events.CONFIGURATION_INVALID, reason=str(error))
            return EXIT_USAGE
        if taken_over is None:
            return 0  # asked to stop while no run had started
        settings = taken_over
    # Metrics, webhooks and the progress line watch the event stream from the first event.
    observability = Observability(settings)
    configure_logging(settings.log_format, settings.log_level, observers=observability.observers())
    log = get_logger()
    locator = RunLocator(settings, re.compile(settings.trainer_pattern))
    try:
        paths = _run_to_watch(settings, locator)
    except RunSetupError as error:
        log.error(events.CONFIGURATION_INVALID, reason=str(error))
        return EXIT_USAGE
    log.info(
        events.SIDECAR_STARTED,
        settings=settings.redacted(),
        following=str(locator.root) if locator.following else None,
        **(_paths_summary(paths) if paths else {}),
    )
    stop_event, received = _stop_on_signals()
    gpu = observability.wrap_gpu(NvmlGpuMonitor(settings.gpu_indices, logger=log))
    health = _health_gate(settings, log)
    try:
        watchdog = Watchdog(
            options=loop_options_of(settings),
            locator=locator,
            restarter=build_restarter(settings, paths, log, stop_event=stop_event),
            gpu=gpu,
            log=log,
            stop_event=stop_event,
            heartbeat=_heartbeat(settings, log).beat,
            before_stop=observability.incident_recorder(log),
            on_poll=observability.on_poll,
            health_gate=health[1] if health else None,
        )
        try:
            observability.attach(watchdog, log)
        except OSError as error:
            log.error(
                events.CONFIGURATION_INVALID,
                reason=f"SIDECAR_HTTP_PORT {settings.http_port} cannot be served ({error}); "
                "choose a free port, or 0 to disable the endpoint",
            )
            return EXIT_USAGE
        code = watchdog.run()
    except LedgerError as error:
        log.error(events.CONFIGURATION_INVALID, reason=str(error))
        return EXIT_ERROR
    finally:
        observability.close()
        gpu.close()
        if health is not None:
            health[0].close()
    if received:
        log.info(events.SIDECAR_STOPPED, signal=signal.Signals(received[0]).name)
        return 128 + received[0]
    return code


def _health_gate(settings: Settings, log: Any) -> tuple[NvmlHealthProbe, HealthGate] | None:
    """The GPU check between stopping a trainer and relaunching it; None without NVML.

    The probe reads once now: XID errors are seen from their registration on, so a card
    that fails during a hang is known by the time of the relaunch."""
    probe = NvmlHealthProbe(settings.gpu_indices, logger=log)
    if probe.read() is None:
        probe.close()
        return None
    return probe, HealthGate(probe, bound=settings.gpu_release_timeout, log=log)


def _run_to_watch(settings: Settings, locator: RunLocator) -> RunPaths | None:
    if locator.following and settings.restart_mode == "process":
        raise RunSetupError(
            "process mode launches one train.sh: set SIDECAR_TRAIN_SCRIPT (an outputs root "
            "in SIDECAR_OUTPUT_DIR is followed in the container modes)"
        )
    return locator.current()


def _stop_on_signals() -> tuple[threading.Event, list[int]]:
    """SIGTERM and SIGINT only set the event the loop waits on; the signals received."""
    stop_event = threading.Event()
    received: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        received.append(signum)
        stop_event.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    return stop_event, received


def _heartbeat(settings: Settings, log: Any = None) -> Heartbeat:
    return Heartbeat(
        settings.heartbeat_file,
        poll_interval=settings.poll_interval,
        kill_grace=settings.kill_grace,
        log=log,
    )


def check(settings: Settings, arguments: argparse.Namespace) -> int:
    """Print what the sidecar sees, and every problem; exit 1 when there is one."""
    problems: list[str] = []
    paths = _locate_run(settings, sys.stdout)
    if paths is None:
        return EXIT_PROBLEM
    _, command = read_train_script(paths.train_script, paths.trainer)
    for key, value in _paths_summary(paths).items():
        print(f"{key + ':':<18} {value}")
    print(f"{'trainer script:':<18} {command.trainer_script}")
    print(f"{'resume:':<18} {command.resume or '(none)'}")
    if not command.save_state:
        note = "added at launch" if settings.ensure_save_state else "nothing will be resumable"
        problems.append(f"train.sh has no --save_state ({note})")
    if not paths.output_dir.is_dir():
        problems.append(f"output folder {paths.output_dir} does not exist")
    if not paths.trainer_workdir.is_dir():
        problems.append(f"trainer working directory {paths.trainer_workdir} does not exist")
    candidates = _candidates(settings, paths)
    _print_candidates(candidates, choose_checkpoint(candidates))
    print(f"{'GPUs:':<18} {_describe_gpus(settings)}")
    try:
        ledger = LedgerStore(paths.state_dir).load()
        print(f"{'restarts:':<18} {ledger.restarts} of {settings.max_restarts}")
        if ledger.quarantined:
            print(f"{'quarantined:':<18} {', '.join(ledger.quarantined)}")
    except LedgerError as error:
        problems.append(str(error))
    for problem in problems:
        print(f"problem: {problem}")
    # A missing --save_state is fixed automatically when the sidecar may edit train.sh.
    blocking = [p for p in problems if "added at launch" not in p]
    return EXIT_PROBLEM if blocking else 0


def checkpoints(settings: Settings, arguments: argparse.Namespace) -> int:
    paths = _locate_run(settings, sys.stderr)
    if paths is None:
        return EXIT_PROBLEM
    try:
        ledger = LedgerStore(paths.state_dir).load()
    except LedgerError as error:
        print(f"problem: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    if getattr(arguments, "put_back", None):
        return _put_back(paths, ledger, arguments.put_back)
    candidates = _candidates(settings, paths)
    chosen = choose_checkpoint(candidates)
    aside = [moved for moved in ledger.set_aside if moved.put_back_at is None]
    if arguments.json:
        listing = [_candidate_json(c, c == chosen) for c in candidates]
        listing += [_aside_json(moved) for moved in aside]
        print(json.dumps(listing, indent=2))
    else:
        _print_candidates(candidates, chosen)
        _print_set_aside(aside)
    return 0


def _put_back(paths: RunPaths, ledger: Ledger, name: str) -> int:
    """Rename a set-aside state back, and record it (the trainer may pick it again); not
    while a sidecar supervises the run (it keeps its own ledger, and may set it aside again)."""
    lock = RunLock(paths.state_dir)
    try:
        lock.acquire()
    except RunLockHeld as error:
        print(f"problem: {error}: stop it first, then put the state back", file=sys.stderr)
        return EXIT_PROBLEM
    try:
        return _put_back_unsupervised(paths, ledger, name)
    finally:
        lock.release()


def _put_back_unsupervised(paths: RunPaths, ledger: Ledger, name: str) -> int:
    for moved in ledger.set_aside:
        if moved.put_back_at is None and Path(moved.moved_to).name == name:
            try:
                put_back(Path(moved.moved_to), Path(moved.original))
            except SetAsideError as error:
                print(f"problem: {error}", file=sys.stderr)
                return EXIT_PROBLEM
            moved.put_back_at = datetime.now(UTC).isoformat(timespec="seconds")
            LedgerStore(paths.state_dir).save(ledger)
            structlog.get_logger().info(
                events.CHECKPOINT_PUT_BACK, checkpoint=moved.original, was=moved.moved_to
            )
            print(f"put back {moved.moved_to} as {moved.original}")
            if moved.problems:
                # Its trainer's own "latest" rule sees it again: say what it held when moved.
                print(f"it was set aside as incomplete: {'; '.join(moved.problems)}")
            return 0
    names = ", ".join(Path(m.moved_to).name for m in ledger.set_aside if m.put_back_at is None)
    print(
        f"problem: no state set aside as {name!r}; set aside now: {names or 'none'}",
        file=sys.stderr,
    )
    return EXIT_PROBLEM


def _print_set_aside(aside: list[SetAside]) -> None:
    if not aside:
        return
    print(f"{'set aside:':<18} {len(aside)} incomplete state(s), renamed, never deleted")
    for moved in aside:
        print(f"     {Path(moved.moved_to).name:<40} was {Path(moved.original).name} ({moved.at})")
        print(f"     {'':<40} {'; '.join(moved.problems) or 'incomplete'}")


def _aside_json(moved: SetAside) -> dict[str, Any]:
    return {
        "path": moved.moved_to,
        "set_aside": True,
        "original": moved.original,
        "at": moved.at,
        "complete": False,
        "problems": moved.problems,
        "chosen": False,
    }


def resume(settings: Settings, arguments: argparse.Namespace) -> int:
    """Resolve the newest complete checkpoint and point train.sh at it, without restarting."""
    paths = _locate_run(settings, sys.stderr)
    if paths is None:
        return EXIT_PROBLEM
    try:
        ledger = LedgerStore(paths.state_dir).load()
    except LedgerError as error:
        print(f"problem: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    # The recovery's own pipeline; this command prints its outcome instead of logging it.
    pointer = ResumePointer(paths, resume_options_of(settings), _QUIET)
    chosen = pointer.newest(ledger, now=time.time(), settle=settings.checkpoint_settle)
    if chosen is None:
        print("problem: no complete checkpoint to resume from", file=sys.stderr)
        _print_candidates(_candidates(settings, paths), None)
        return EXIT_PROBLEM
    if arguments.dry_run:
        print("\n".join(pointer.planned_rewrite(chosen, ledger)) or "train.sh unchanged")
        return 0
    position = pointer.position_of(chosen, ledger)
    changed = pointer.point_at(
        str(chosen.path), reason="training-sidecar resume", initial_step=position.initial_step
    )
    trainer_path = paths.path_map.to_trainer(str(chosen.path))
    print(f"{'rewrote' if changed else 'unchanged'} {paths.train_script}: --resume {trainer_path}")
    return 0


def abandon(settings: Settings, arguments: argparse.Namespace) -> int:
    """Mark the run as abandoned: the sidecar will not resume or recover it any more."""
    paths = _locate_run(settings, sys.stderr)
    if paths is None:
        return EXIT_PROBLEM
    marker = AbandonMarker(paths.state_dir)
    reason = arguments.reason or "training-sidecar abandon"
    try:
        marker.write(reason)
    except OSError as error:
        print(f"problem: cannot write {marker.path}: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    print(
        f"abandoned {paths.output_dir}: not resumed after an interruption and not recovered "
        f"any more; a trainer that runs now is left running. Undo: rm {marker.path}"
    )
    return 0


def healthcheck(settings: Settings, arguments: argparse.Namespace) -> int:
    """Exit 0 when the running sidecar's loop beat recently.

    With the HTTP endpoint on, ask its /healthz (the same heartbeat rule, and proof that the
    endpoint probes and Prometheus use is up); with SIDECAR_HTTP_PORT=0, read the heartbeat
    file directly.
    """
    if settings.http_port:
        health = probe(settings.http_port, "/healthz")
    else:
        health = _heartbeat(settings).health()
    message = health.message.removeprefix("ok: ").removeprefix("unhealthy: ")
    print(f"{'healthy' if health.ok else 'unhealthy'}: {message}")
    return 0 if health.ok else EXIT_PROBLEM


def status(settings: Settings, arguments: argparse.Namespace) -> int:
    """Summarise the run from its ledger, output folder, log and incident bundles."""
    try:
        paths = RunLocator(settings, re.compile(settings.trainer_pattern)).current()
    except RunSetupError as error:
        print(f"problem: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    if paths is None:
        print(f"problem: no run under {settings.output_dir} yet", file=sys.stderr)
        return EXIT_PROBLEM
    try:
        report = build_status_report(
            paths,
            heartbeat=_heartbeat(settings),
            max_restarts=settings.max_restarts,
            stall_after=settings.stall_timeout_bound,
            checkpoint_settle=settings.checkpoint_settle,
        )
    except LedgerError as error:
        print(f"problem: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    print(report.to_json() if arguments.json else render_text(report), end="")
    return 0


def _locate_run(settings: Settings, stream: TextIO) -> RunPaths | None:
    """The run these commands look at (a fixed train.sh, or the active one under an outputs
    root), or None after printing the problem."""
    try:
        paths = RunLocator(settings, re.compile(settings.trainer_pattern)).current()
    except RunSetupError as error:
        print(f"problem: {error}", file=stream)
        return None
    if paths is None:
        print(f"problem: no <run>/train.sh under {settings.output_dir} yet", file=stream)
    return paths


def _candidates(settings: Settings, paths: RunPaths) -> list[Candidate]:
    return run_candidates(paths, now=time.time(), settle=settings.checkpoint_settle)


def _paths_summary(paths: RunPaths) -> dict[str, str]:
    return {
        "train_script": str(paths.train_script),
        "output_dir": str(paths.output_dir),
        "trainer_workdir": str(paths.trainer_workdir),
        "state_dir": str(paths.state_dir),
        "train_log": str(paths.train_log),
        "output_name": paths.output_name,
        "path_map": str(paths.path_map) or "(none)",
    }


def _print_candidates(candidates: list[Candidate], chosen: Candidate | None) -> None:
    print(f"{'checkpoints:':<18} {len(candidates)} candidate(s)")
    for candidate in candidates:
        mark = "->" if candidate == chosen else "  "
        verdict = "; ".join(candidate.problems) or "complete"
        if candidate.complete and candidate.problems:  # a note (ai-toolkit's lost optimizer)
            verdict = f"complete; {verdict}"
        print(f"  {mark} {candidate.path.name:<40} {candidate.kind:<11} {verdict}")


def _candidate_json(candidate: Candidate, chosen: bool) -> dict[str, Any]:
    return {
        "path": str(candidate.path),
        "kind": candidate.kind,
        "number": candidate.number,
        "complete": candidate.complete,
        "problems": list(candidate.problems),
        "completed_at": candidate.completed_at,
        "step": candidate.step,
        "epoch": candidate.epoch,
        "chosen": chosen,
    }


def _describe_gpus(settings: Settings) -> str:
    monitor = NvmlGpuMonitor(settings.gpu_indices)
    try:
        reading = monitor.sample()
    finally:
        monitor.close()
    if reading is None:
        return "none visible (NVML unavailable); GPU signal off"
    if reading.error:
        return f"error: {reading.error}"
    return ", ".join(
        f"#{s.index} {s.utilization_percent}% busy, {s.memory_used_bytes >> 20} MiB used"
        for s in reading.samples
    )
