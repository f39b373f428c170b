"""Soak: one long supervised run through 20+ random faults, and proof that each was recovered.

The real sidecar (``python -m sidecar run``, process mode) supervises the simulated FluxGym
trainer for about ``--minutes`` of wall time. A seeded plan gives every trainer run but the
last one disruptive fault through the faults grammar's ``run=N`` option: a hang with an idle
CPU, a hang with a busy CPU, a crash (random exit code), or a hang or a crash inside a state
save that leaves a half-written (or, where the name came round again, mixed) state folder.
Slow saves (longer than the stall timeout, still writing) and slow starts (longer than the
stall timeout, within the startup grace) ride along in some runs; they must cost no restart.
The last run has no disruptive fault and must complete.

The simulator follows sd-scripts' resume rules exactly and the sidecar resumes every attempt
with ``--initial_step <absolute step> --skip_until_initial_step``, so no step is trained twice
across recoveries: a resumed run skips the whole epochs before that step, its ``global_step``
starts at the remainder ``initial_step % steps_per_epoch``, its progress bar counts from 0,
and its step-numbered states are named by its own ``global_step`` (names come round again).
The plan therefore walks the schedule as the trainer will: it knows where each run resumes
(the last state its predecessor completed before its fault) and so each run's remainder; a
fault's ``step=N`` counts that run's ``global_step`` and is always above the run's first
save, and the run is given enough epochs that every planned fault is reached before the
schedule ends (the old plan assumed every resume restarted ``global_step`` at 0 and redid the
partial epoch, so most of its faults were never reached once resumes became exact).

Each run saves a state before its fault fires, so no checkpoint is ever blamed. Verdicts are
mapped to runs in order (the k-th ``stall_detected``/``trainer_crashed`` ends run k, the k-th
``checkpoint_selected`` says where run k + 1 starts, and the simulator's own run counter must
agree). The soak exits 1 unless:

- every disruptive fault drew exactly its verdict (a hang or a hung save: a stall; a crash or
  a crashed save: its exit code) with the progress bar where the fault struck, in that run's
  terms: the fault's ``global_step`` minus the run's remainder (taken from the
  ``initial_step`` of the ``checkpoint_selected`` that started it), and was followed by a
  restart;
- every resume started at the absolute step the plan predicts (the last state completed);
- no run was restarted for anything else (no verdict in the last, healthy run, and no extra
  verdict caused by a slow save or a slow start);
- the final model is there and its lineage is exactly an uninterrupted run's (every batch
  trained once, in order: nothing lost, nothing repeated), the sidecar exited 0, nothing was
  given up or left failing;
- the ledger's restart count equals the restarts logged, and never were two trainers running.

    python benchmarks/soak.py                  # about 30 minutes, 24 faults
    python benchmarks/soak.py --minutes 3      # the short version tests/hardening/test_soak.py runs
    python benchmarks/soak.py --seed 7 --keep  # another plan; keep the run folder to inspect
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil

from sidecar.run.ledger import LedgerStore
from sidecar.simulator.faults import Fault, FaultKind, format_faults
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.simulator.harness import event_time, sidecar_environment
from sidecar.simulator.lineage import read_lineage, uninterrupted_lineage

STALL_TIMEOUT = 3.0
STARTUP_GRACE = 8.0
STEP_SECONDS = 0.05
STEPS_PER_EPOCH = 4
# Seconds a run spends outside its steps: bash, the launcher and the trainer starting,
# the silent start-up, and (hangs) the stall timeout before the verdict.
RUN_OVERHEAD = 3.5
DISRUPTIVE = ("hang_idle", "hang_busy", "crash", "hang_in_save", "crash_in_save")
IN_SAVE = ("hang_in_save", "crash_in_save")
BENIGN = ("slow_save", "slow_start")
CRASH_CODES = (1, 2, 7, 134, 137)
VERDICTS = ("stall_detected", "trainer_crashed")
SHOWN = ("checkpoint_selected", "trainer_restarted", "gave_up")


@dataclass
class RunPlan:
    number: int  # the trainer's run number (1 = the first launch)
    faults: list[Fault]
    disruptive: Fault | None  # None: the healthy last run
    start_step: int = 0  # the absolute step it resumes at (its --initial_step; 0: the first)
    fault_step: int | None = None  # the run's global_step when its fault strikes
    remainder: int = 0  # where its global_step starts: start_step % STEPS_PER_EPOCH

    @property
    def expected_step(self) -> int | None:
        """Where the progress bar stands when the fault strikes (it counts from 0)."""
        return None if self.fault_step is None else self.fault_step - self.remainder


@dataclass
class Plan:
    seed: int
    runs: list[RunPlan]
    save_every: int
    max_train_epochs: int

    @property
    def faults(self) -> list[Fault]:
        return [fault for run in self.runs for fault in run.faults]

    @property
    def disruptive_runs(self) -> list[RunPlan]:
        return [run for run in self.runs if run.disruptive is not None]

    @property
    def max_train_steps(self) -> int:
        return self.max_train_epochs * STEPS_PER_EPOCH


def make_plan(seed: int, fault_count: int, minutes: float) -> Plan:
    """A random plan of ``fault_count`` faults (each kind at least twice) sized to ``minutes``.

    It walks the schedule the way sd-scripts will with the sidecar's exact resumes: run k
    resumes at the absolute step of the last state run k - 1 completed, skips the whole epochs
    before it and starts its ``global_step`` (which saves, names and ``step=N`` count) at the
    remainder. The schedule is then made long enough that no run reaches its end before its
    fault, and the last, healthy run trains about two runs' worth to the end.
    """
    rng = random.Random(seed)
    kinds = [*DISRUPTIVE, *BENIGN] * 2
    kinds += rng.choices([*DISRUPTIVE, *DISRUPTIVE, *BENIGN], k=max(0, fault_count - len(kinds)))
    rng.shuffle(kinds)
    disruptive_count = sum(kind in DISRUPTIVE for kind in kinds)
    # The last run trains from wherever it resumed to the end: about two runs' worth.
    seconds_per_run = minutes * 60 / (disruptive_count + 2)
    mean_steps = max(24, int((seconds_per_run - RUN_OVERHEAD) / STEP_SECONDS))
    save_every = max(STEPS_PER_EPOCH, mean_steps // 4)
    # Above the run's first save (at global_step save_every, which is above any remainder):
    # every run leaves a complete state of its own before its fault.
    lowest, highest = save_every + 1, 2 * mean_steps - save_every - 1

    runs: list[RunPlan] = []
    riders: list[str] = []
    position = 0  # the absolute step the next run resumes at
    needed = 0  # the schedule must run past every planned fault
    for kind in kinds:
        if kind in BENIGN:
            riders.append(kind)
            continue
        number = len(runs) + 1
        run = RunPlan(number, [], None, position, None, position % STEPS_PER_EPOCH)
        run.faults = [_benign(rider, number, rng) for rider in riders]
        riders = []
        run.disruptive, run.fault_step, last_save = _disruptive(
            kind, number, rng, (lowest, highest), save_every
        )
        run.faults.append(run.disruptive)
        runs.append(run)
        offset = position - run.remainder  # where this run's global_step 0 sits
        needed = max(needed, offset + run.fault_step + 1)
        position = offset + last_save
    last = len(runs) + 1
    healthy = RunPlan(last, [_benign(rider, last, rng) for rider in riders], None, position)
    healthy.remainder = position % STEPS_PER_EPOCH
    runs.append(healthy)
    max_steps = max(needed, position + 2 * mean_steps)
    epochs = -(-max_steps // STEPS_PER_EPOCH)
    return Plan(seed, runs, save_every, epochs)


def _disruptive(
    kind: str, run: int, rng: random.Random, steps: tuple[int, int], save_every: int
) -> tuple[Fault, int, int]:
    """The run's disruptive fault, the global_step it strikes at, and the global_step of the
    last state the run completes before it (where the next run resumes)."""
    if kind in IN_SAVE:
        save = rng.randint(2, 3)  # the first save of the run completes: nothing is blamed
        files = rng.randint(1, 4)  # train_state.json first; never the whole folder
        code = rng.choice(CRASH_CODES) if kind == "crash_in_save" else None
        fault = Fault(cast(FaultKind, kind), save=save, run=run, code=code, files=files)
        return fault, save * save_every, (save - 1) * save_every
    step = rng.randint(*steps)
    # The fault fires after step N is shown and before a save at step N: the last state
    # completed is the last multiple of save_every below N.
    last_save = (step - 1) // save_every * save_every
    if kind == "crash":
        return Fault("crash", step=step, run=run, code=rng.choice(CRASH_CODES)), step, last_save
    return Fault(cast(FaultKind, kind), step=step, run=run), step, last_save


def _benign(kind: str, run: int, rng: random.Random) -> Fault:
    if kind == "slow_save":
        # Longer than the stall timeout, but spread over five pauses of at most half of it.
        seconds = round(rng.uniform(1.5, 2.4) * STALL_TIMEOUT, 2)
        return Fault("slow_save", save=1, run=run, seconds=seconds)
    # Longer than the stall timeout, well within the startup grace.
    seconds = round(rng.uniform(STALL_TIMEOUT + 0.5, STARTUP_GRACE - 2.5), 2)
    return Fault("slow_start", run=run, seconds=seconds)


# -- running it --------------------------------------------------------------------------------


class TrainerCensus(threading.Thread):
    """Counts the process groups running this tree's trainer, every 0.2 s."""

    def __init__(self, tree: FluxgymTree):
        super().__init__(name="trainer-census", daemon=True)
        self.tree = tree
        self.most = 0
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.wait(0.2):
            groups = set()
            for process in psutil.process_iter(["cmdline", "status"]):
                cmdline = " ".join(process.info["cmdline"] or [])
                if str(self.tree.root) in cmdline and process.info["status"] != "zombie":
                    with contextlib.suppress(ProcessLookupError):
                        groups.add(os.getpgid(process.pid))
            self.most = max(self.most, len(groups))

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(timeout=5)


@dataclass
class Outcome:
    exit_code: int
    seconds: float
    events: list[dict[str, Any]]
    runs_counted: int
    ledger_restarts: int
    final_model: bool
    most_trainers: int
    lineage: list[tuple[int, int]] | None = None  # the final model's; None: no final model
    problems: list[str] = field(default_factory=list)


def run_soak(plan: Plan, folder: Path, *, timeout: float, quiet: bool = False) -> Outcome:
    extra = (
        f"--max_train_epochs {plan.max_train_epochs} --save_every_n_epochs "
        f"{plan.max_train_epochs + 1} --save_every_n_steps {plan.save_every} "
        "--save_last_n_steps_state 4"
    )
    tree = build_fluxgym_tree(folder / "fluxgym", extra_trainer_args=extra)
    settings = {
        "SIDECAR_STALL_TIMEOUT": f"{STALL_TIMEOUT}s",
        "SIDECAR_STARTUP_GRACE": f"{STARTUP_GRACE}s",
        "SIDECAR_MAX_RESTARTS": str(len(plan.runs) + 10),
        "SIDECAR_HEARTBEAT_FILE": str(folder / "heartbeat"),
    }
    simulation = {
        "SIM_FAULTS": format_faults(plan.faults),
        "SIM_STEP_SECONDS": str(STEP_SECONDS),
        "SIM_STEP_JITTER": "0.3",
        "SIM_STEPS_PER_EPOCH": str(STEPS_PER_EPOCH),
    }
    census = TrainerCensus(tree)
    census.start()
    started = time.monotonic()
    with (folder / "sidecar.stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=sidecar_environment(tree, settings=settings, simulation=simulation),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        events = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                events.append(event)
                if not quiet and event["event"] in (*VERDICTS, *SHOWN):
                    print(f"  {time.monotonic() - started:7.1f} s  {_describe(event)}", flush=True)
            code = process.wait()
        finally:
            timer.cancel()
            census.stop()
            _stop_leftovers(tree, process)
    runs_file = tree.output_dir / ".simulator" / "runs"
    final_model = tree.output_dir / "my-lora.safetensors"
    return Outcome(
        exit_code=code,
        seconds=time.monotonic() - started,
        events=events,
        runs_counted=int(runs_file.read_text()) if runs_file.is_file() else 0,
        ledger_restarts=LedgerStore(tree.output_dir / ".sidecar").load().restarts,
        final_model=final_model.is_file(),
        most_trainers=census.most,
        lineage=read_lineage(final_model) if final_model.is_file() else None,
    )


def _describe(event: dict[str, Any]) -> str:
    name = event["event"]
    if name == "trainer_crashed":
        return f"trainer_crashed   exit {event.get('exit_code')} at step {event.get('last_step')}"
    if name == "stall_detected":
        return f"stall_detected    at step {event.get('last_step')}"
    if name == "trainer_restarted":
        return f"trainer_restarted #{event.get('restarts')}"
    if name == "checkpoint_selected":
        return f"checkpoint_selected initial_step {event.get('initial_step')}"
    return f"{name}: {event.get('reason')}"


def _stop_leftovers(tree: FluxgymTree, process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    for leftover in psutil.process_iter(["cmdline"]):
        if str(tree.root) in " ".join(leftover.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                leftover.kill()


# -- judging it --------------------------------------------------------------------------------


def judge(plan: Plan, outcome: Outcome) -> list[dict[str, Any]]:
    """One row per run (what was planned, what happened); problems go to ``outcome``."""
    problems = outcome.problems
    names = [event["event"] for event in outcome.events]
    verdicts = [event for event in outcome.events if event["event"] in VERDICTS]
    restarts = [event for event in outcome.events if event["event"] == "trainer_restarted"]
    starts = _selections(outcome.events)  # starts[k]: where run k + 2 was sent
    rows = []
    for index, run in enumerate(plan.runs):
        verdict = verdicts[index] if index < len(verdicts) else None
        restart = restarts[index] if index < len(restarts) else None
        selection = None if index == 0 else starts[index - 1] if index <= len(starts) else {}
        rows.append(_judge_run(run, selection, verdict, restart, problems))
    if len(verdicts) > len(plan.disruptive_runs):
        problems.append(
            f"{len(verdicts)} verdicts for {len(plan.disruptive_runs)} disruptive faults: "
            "a healthy stretch was restarted"
        )
    if len(restarts) != len(plan.disruptive_runs):
        problems.append(f"{len(restarts)} restarts for {len(plan.disruptive_runs)} faults")
    if outcome.runs_counted != len(plan.runs):
        problems.append(
            f"the trainer counted {outcome.runs_counted} runs, {len(plan.runs)} planned"
        )
    if outcome.ledger_restarts != len(restarts):
        problems.append(
            f"the ledger records {outcome.ledger_restarts} restarts, {len(restarts)} were logged"
        )
    for bad in ("gave_up", "restart_failed", "checkpoint_quarantined"):
        if bad in names:
            problems.append(f"{bad} was logged")
    if outcome.exit_code != 0 or "training_completed" not in names:
        problems.append(f"the sidecar exited {outcome.exit_code} without training_completed")
    if not outcome.final_model:
        problems.append("the final model my-lora.safetensors is missing")
    elif not lineage_exact(plan, outcome):
        problems.append(f"the final model's lineage {_lineage_difference(plan, outcome)}")
    if outcome.most_trainers > 1:
        problems.append(f"{outcome.most_trainers} trainers ran at once")
    return rows


def lineage_exact(plan: Plan, outcome: Outcome) -> bool:
    """Whether the final model trained every batch of the schedule once, in order."""
    expected = uninterrupted_lineage(STEPS_PER_EPOCH, plan.max_train_epochs)
    return outcome.lineage == expected


def _lineage_difference(plan: Plan, outcome: Outcome) -> str:
    expected = uninterrupted_lineage(STEPS_PER_EPOCH, plan.max_train_epochs)
    seen = outcome.lineage or []
    first = next(
        (i for i, (a, b) in enumerate(zip(seen, expected, strict=False)) if a != b),
        min(len(seen), len(expected)),
    )
    repeated = len(seen) - len(set(seen))
    missing = len(set(expected) - set(seen))
    return (
        f"has {len(seen)} steps, an uninterrupted run {len(expected)}: {repeated} repeated, "
        f"{missing} missing, first difference at step {first} "
        f"({seen[first] if first < len(seen) else 'end'} for "
        f"{expected[first] if first < len(expected) else 'end'})"
    )


def _selections(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each ``trainer_restarted``, the last ``checkpoint_selected`` logged before it
    (``{}`` where there was none)."""
    found: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    for event in events:
        if event["event"] == "checkpoint_selected":
            pending = event
        elif event["event"] == "trainer_restarted":
            found.append(pending)
            pending = {}
    return found


def _judge_run(
    run: RunPlan,
    selection: dict[str, Any] | None,
    verdict: dict[str, Any] | None,
    restart: dict[str, Any] | None,
    problems: list[str],
) -> dict[str, Any]:
    planned = ", ".join(_without_run(fault.to_spec(), run.number) for fault in run.faults)
    row: dict[str, Any] = {"run": run.number, "faults": planned or "(none)"}
    remainder = _judge_start(run, selection, row, problems)
    fault = run.disruptive
    if fault is None:
        row["outcome"] = "completed" if verdict is None else f"restarted: {verdict['event']}"
        return row
    if verdict is None:
        problems.append(f"run {run.number}: {fault.kind} drew no verdict")
        row["outcome"] = "no verdict"
        return row
    crashes = fault.kind in ("crash", "crash_in_save")
    expected = "trainer_crashed" if crashes else "stall_detected"
    # The bar counts from 0; the fault's step (or save) counts global_step, which this run
    # started at the remainder of the step it resumed at.
    assert run.fault_step is not None
    bar = run.fault_step - remainder
    seen = f"{verdict['event']} at step {verdict.get('last_step')}"
    if verdict["event"] != expected:
        problems.append(f"run {run.number}: {fault.kind} planned, {seen}")
    elif crashes and verdict.get("exit_code") != fault.code:
        problems.append(
            f"run {run.number}: {fault.kind} with code {fault.code}, "
            f"exit {verdict.get('exit_code')}"
        )
    elif verdict.get("last_step") != bar:
        problems.append(
            f"run {run.number}: {fault.kind} at global_step {run.fault_step} (bar step {bar}, "
            f"remainder {remainder}), {seen}"
        )
    if restart is None:
        problems.append(f"run {run.number}: not restarted after {verdict['event']}")
        row["outcome"] = f"{seen}; not restarted"
        return row
    recovered_in = event_time(restart) - event_time(verdict)
    row["outcome"] = f"{seen}; restarted in {recovered_in:.2f} s"
    row["recovery_seconds"] = round(recovered_in, 3)
    return row


def _judge_start(
    run: RunPlan, selection: dict[str, Any] | None, row: dict[str, Any], problems: list[str]
) -> int:
    """Check where the run resumed (``checkpoint_selected``'s absolute ``initial_step``)
    against the plan; returns the remainder its global_step started at."""
    if selection is None:  # the first run starts from the beginning
        row["starts_at"] = "0"
        return 0
    initial = selection.get("initial_step")
    if not isinstance(initial, int):
        problems.append(
            f"run {run.number}: resumed without an exact step "
            f"(checkpoint_selected: {selection.get('position') or 'none logged'})"
        )
        row["starts_at"] = f"? (planned {run.start_step})"
        return run.remainder
    if initial != run.start_step:
        problems.append(
            f"run {run.number}: resumed at step {initial}, planned {run.start_step} "
            f"(the last state run {run.number - 1} completed)"
        )
    remainder = initial % STEPS_PER_EPOCH
    row["starts_at"] = f"{initial} (+{remainder})"
    return remainder


def _without_run(spec: str, number: int) -> str:
    return spec.replace(f"@run={number}", "").replace(f":run={number}", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall time to aim for")
    parser.add_argument("--faults", type=int, default=24, help="faults in the plan (>= 20)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--keep", action="store_true", help="keep the run folder")
    parser.add_argument("--json", type=Path, help="also write the summary here as JSON")
    arguments = parser.parse_args(argv)
    if arguments.faults < 12:
        parser.error("--faults must be at least 12 (each of the six kinds twice)")
    plan = make_plan(arguments.seed, arguments.faults, arguments.minutes)
    kinds = {kind: sum(f.kind == kind for f in plan.faults) for kind in (*DISRUPTIVE, *BENIGN)}
    print(
        f"soak: seed {plan.seed}, {len(plan.faults)} faults over {len(plan.runs)} trainer runs "
        f"({', '.join(f'{n} {kind}' for kind, n in kinds.items())}); aiming at "
        f"{arguments.minutes:g} min, saves every {plan.save_every} steps, "
        f"{plan.max_train_epochs} epochs of {STEPS_PER_EPOCH} steps",
        flush=True,
    )
    folder = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    try:
        outcome = run_soak(plan, folder, timeout=arguments.minutes * 120 + 300)
        rows = judge(plan, outcome)
    finally:
        if not arguments.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    recoveries = [row["recovery_seconds"] for row in rows if "recovery_seconds" in row]
    print("\n| run | starts at (+remainder) | faults | outcome |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['starts_at']} | {row['faults']} | {row['outcome']} |")
    summary = {
        "seed": plan.seed,
        "minutes": round(outcome.seconds / 60, 2),
        "faults": len(plan.faults),
        "fault_kinds": kinds,
        "disruptive_faults": len(plan.disruptive_runs),
        "recovered": len(recoveries),
        "restarts_logged": sum(e["event"] == "trainer_restarted" for e in outcome.events),
        "ledger_restarts": outcome.ledger_restarts,
        "trainer_runs": outcome.runs_counted,
        "final_model": outcome.final_model,
        "max_train_steps": plan.max_train_steps,
        "lineage_steps": None if outcome.lineage is None else len(outcome.lineage),
        "lineage_exact": outcome.final_model and lineage_exact(plan, outcome),
        "exit_code": outcome.exit_code,
        "most_trainers_at_once": outcome.most_trainers,
        "slowest_recovery_seconds": max(recoveries, default=None),
        "problems": outcome.problems,
        "plan": [asdict(run) | {"faults": [f.to_spec() for f in run.faults]} for run in plan.runs],
        "kept": str(folder) if arguments.keep else None,
    }
    print(
        f"\n{summary['minutes']} min, {summary['faults']} faults, "
        f"{summary['recovered']}/{summary['disruptive_faults']} disruptive faults recovered, "
        f"{summary['restarts_logged']} restarts (ledger: {summary['ledger_restarts']}), "
        f"slowest recovery {summary['slowest_recovery_seconds']} s, "
        f"final model {'present' if outcome.final_model else 'MISSING'}, lineage "
        f"{'exact' if summary['lineage_exact'] else 'WRONG'} ({summary['lineage_steps']} of "
        f"{plan.max_train_steps} steps)"
    )
    for problem in outcome.problems:
        print(f"PROBLEM: {problem}")
    if arguments.keep:
        print(f"run folder kept: {folder}")
    if arguments.json:
        arguments.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("soak: OK" if not outcome.problems else "soak: FAILED")
    return 0 if not outcome.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
