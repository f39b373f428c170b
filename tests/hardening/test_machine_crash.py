"""The machine goes away under a run in process mode, again and again: the run goes on by itself.

A machine crash, a power cut, a preemption: the sidecar and its trainer die together, with no
chance to write anything. Here that is SIGKILL to the sidecar's process group and to every
trainer's (the trainer runs in its own session), at seeded random moments: during a trainer's
start-up (once always within 10 ms of a relaunch, most likely before the new trainer wrote
anything), or while it trains (between its state saves or inside one). After each kill a new
sidecar starts with the same settings, as systemd or a pod's start command would after the
reboot (deploy/systemd/). Each restart must

- infer the interruption from the ledger (``run_interrupted``, ``inferred: true``,
  ``how: "unclean"``) and resume the run itself (``run_resumed_after_interruption``,
  ``by: "sidecar"``), with the downtime measured from the run's last sign of life: at least
  the pause between the kill and the restart, at most that plus a poll or so, and never from
  before the previous resume;
- not charge it to the restart budget: the ledger's ``recoveries`` stays empty and
  ``interruptions`` gets one entry per kill, each resumed.

Throughout, a census of the process table every 20 ms never sees two trainers. In the end
the run completes (exit 0) with the final LoRA's lineage equal to an uninterrupted run's (no
batch lost, none trained twice: see tests/test_exact_resume.py), and every state folder that
existed after a kill still exists. A second test stops the sidecar with SIGTERM, as systemd's
``KillMode=mixed`` does: the trainer is stopped, the interruption recorded (``sigterm``), and
the next sidecar resumes it.

``SIDECAR_CRASH_SEED`` replays another schedule; the one used is printed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from sidecar_process import RunningSidecar

from sidecar.simulator import read_lineage, uninterrupted_lineage
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.simulator.harness import FAST_SIMULATION, event_time, sidecar_environment

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SIDECAR_CRASH_SEED", "20261211"))
CRASHES = 5
STEPS_PER_EPOCH = int(FAST_SIMULATION["SIM_STEPS_PER_EPOCH"])
# 60 epochs of 4 steps of 0.05 s: 12 s of training, longer than the kills take to come.
EPOCHS = 60
# A state every 5 steps (a quarter of a second): most kills land between two saves, some
# inside one.
TRAINER_ARGS = f"--save_every_n_steps 5 --save_state --max_train_epochs {EPOCHS}"
SETTINGS = {
    # Kills a second or two apart can come before a new state completes: that streak is what
    # SIDECAR_MAX_INTERRUPTIONS bounds, and it is not what this test is about.
    "SIDECAR_MAX_INTERRUPTIONS": "100",
}
# Downtime is measured from the run's last sign of life, which a poll (0.2 s) refreshes.
DOWNTIME_SLACK = 1.0
# A relaunch takes a few milliseconds: its first sign of life can precede its resumed_at.
LAUNCH_SLACK = 0.25
CENSUS_INTERVAL = 0.02


def trainer_sessions(tree: FluxgymTree) -> set[int]:
    """Sessions of the live ``bash train.sh`` processes of this tree: one per trainer.

    Counted by session, not by process: a bash that forks to run ``accelerate`` has, until
    its child executes, two processes with the same command line, one trainer.
    """
    script = str(tree.train_script)
    sessions = set()
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE or process.info["name"] != "bash":
            continue
        if script in (process.info["cmdline"] or ()):
            with contextlib.suppress(ProcessLookupError):
                sessions.add(os.getsid(process.pid))
    return sessions


class TrainerCensus(threading.Thread):
    """Samples the process table every CENSUS_INTERVAL: the most trainers seen at once."""

    def __init__(self, tree: FluxgymTree):
        super().__init__(name="trainer-census", daemon=True)
        self.tree = tree
        self.samples = 0
        self.most = 0
        self.crowded: list[set[int]] = []
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.wait(CENSUS_INTERVAL):
            sessions = trainer_sessions(self.tree)
            self.samples += 1
            self.most = max(self.most, len(sessions))
            if len(sessions) > 1:
                self.crowded.append(sessions)

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(timeout=5)


class Sidecar(RunningSidecar):
    """One ``python -m sidecar run`` (spawn_sidecar: its own session), its events collected."""

    def __init__(self, tree: FluxgymTree):
        self.started_at = time.time()
        super().__init__(sidecar_environment(tree, settings=SETTINGS))


def tree_processes(tree: FluxgymTree, session: int) -> list[psutil.Process]:
    """Live processes of the sidecar's session or running this tree's trainer."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            ours = os.getsid(process.pid) == session
        except (ProcessLookupError, PermissionError):
            continue
        if ours or str(tree.root) in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def crash_machine(tree: FluxgymTree, sidecar: Sidecar) -> float:
    """SIGKILL the sidecar's group and every trainer's, as a machine crash ends them; returns
    the wall time of the kill. The sidecar goes first, so it never sees its trainer die (that
    would be a crash of the run, not of the machine)."""
    trainers = trainer_sessions(tree)
    killed_at = time.time()
    os.killpg(sidecar.process.pid, signal.SIGKILL)
    for session in trainers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)
    # And whatever that did not catch: a launch between fork and exec, its children. Two
    # empty sweeps in a row, so that one caught between setsid and exec shows up too.
    deadline = time.monotonic() + 10
    empty = 0
    while empty < 2:
        left = tree_processes(tree, sidecar.process.pid)
        assert time.monotonic() < deadline, f"processes survived SIGKILL: {left}"
        empty = 0 if left else empty + 1
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        time.sleep(0.02)
    sidecar.finish(timeout=10)
    return killed_at


def state_folders(tree: FluxgymTree) -> set[str]:
    return {path.name for path in tree.output_dir.glob("*-state") if path.is_dir()}


def ledger(tree: FluxgymTree) -> dict[str, Any]:
    return json.loads((tree.output_dir / ".sidecar" / "state.json").read_text())


def final_lineage(tree: FluxgymTree) -> list[tuple[int, int]]:
    return read_lineage(tree.output_dir / f"{tree.name}.safetensors")


def stop_leftovers(tree: FluxgymTree, sidecars: list[Sidecar]) -> None:
    for sidecar in sidecars:
        if sidecar.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sidecar.process.pid, signal.SIGKILL)
            sidecar.process.wait()
    for process in tree_processes(tree, session=-1):
        with contextlib.suppress(psutil.Error):
            process.kill()


@dataclass
class Crash:
    moment: str
    delay: float
    killed_at: float  # wall clock
    last_event: str | None


def test_repeated_machine_crashes_resume_by_themselves_and_lose_nothing(tmp_path: Path) -> None:
    tree = build_fluxgym_tree(tmp_path / "fluxgym", extra_trainer_args=TRAINER_ARGS)
    rng = random.Random(SEED)
    print(f"SIDECAR_CRASH_SEED={SEED}")
    census = TrainerCensus(tree)
    census.start()
    sidecars: list[Sidecar] = []
    crashes: list[Crash] = []
    states_seen: set[str] = set()
    started = time.monotonic()
    try:
        # One crash always comes right after a relaunch, most likely before the new trainer
        # wrote a line or the sidecar polled once: a machine that dies again as soon as it is
        # back. (The ledger says "supervising" from just before that event on.)
        again_at_once = rng.randrange(1, CRASHES)
        for number in range(CRASHES):
            sidecar = Sidecar(tree)
            sidecars.append(sidecar)
            if number == again_at_once:
                moment, delay = "run_resumed_after_interruption", rng.uniform(0.0, 0.01)
            elif rng.random() < 0.25:
                moment = "trainer_started"  # in the trainer's start-up, before its first step
                delay = rng.uniform(0.0, 0.3)
            else:
                moment = "training_progressing"  # while it trains
                delay = rng.uniform(0.1, 1.5)
            sidecar.wait_for(moment)
            time.sleep(delay)
            assert sidecar.process.poll() is None, sidecar.describe()
            last = sidecar.names()[-1]
            killed_at = crash_machine(tree, sidecar)
            states_seen |= state_folders(tree)
            pause = rng.uniform(0.0, 1.0)  # the machine takes its time to come back
            time.sleep(pause)
            crashes.append(Crash(moment, delay, killed_at, last))
            print(f"crash {len(crashes)}: {moment} + {delay:.3f} s (last event: {last})")
        final = Sidecar(tree)
        sidecars.append(final)
        exit_code = final.finish(timeout=90)
    finally:
        census.stop()
        stop_leftovers(tree, sidecars)
    print(f"{time.monotonic() - started:.1f} s, {census.samples} census samples")
    for number, sidecar in enumerate(sidecars[1:], start=1):
        resumed = sidecar.named("run_resumed_after_interruption")
        stepping = sidecar.named("training_progressing")
        if resumed and stepping:
            began = datetime.fromisoformat(sidecar.named("sidecar_started")[0]["timestamp"])
            first = datetime.fromisoformat(stepping[0]["timestamp"])
            print(
                f"start {number}: down {resumed[0]['down_seconds']:.2f} s, sidecar start -> "
                f"first resumed step {(first - began).total_seconds():.2f} s"
            )

    assert exit_code == 0, final.describe()
    assert final.named("training_completed"), final.describe()
    assert sidecars[0].named("run_interrupted") == [], "a fresh run was not interrupted"
    for number, (crash, sidecar) in enumerate(zip(crashes, sidecars[1:], strict=True), 1):
        context = f"restart after crash {number} ({crash}):\n{sidecar.describe()}"
        interrupted = sidecar.only("run_interrupted")
        assert interrupted["inferred"] is True, (interrupted, context)
        assert interrupted["how"] == "unclean", (interrupted, context)
        resumed = sidecar.only("run_resumed_after_interruption")
        assert resumed["by"] == "sidecar", (resumed, context)
        down = resumed["down_seconds"]
        assert down >= 0, (resumed, context)
        # From the last sign of life (at most a poll before the kill) to the resume: at least
        # the time the machine was away.
        pause = sidecar.started_at - crash.killed_at
        assert down >= pause - 0.05, (pause, resumed, context)
        real = event_time(resumed) - crash.killed_at
        assert down <= real + DOWNTIME_SLACK, (
            f"down_seconds {down} but {real:.3f} s from the kill to the resume: measured from a "
            f"sign of life older than the crash; {context}"
        )
        names = sidecar.names()
        assert names.index("run_interrupted") < names.index("run_resumed_after_interruption")
        # Not a recovery of the run's own failure, and nothing was left running to adopt.
        for name in ("trainer_restarted", "trainer_adopted", "gave_up"):
            assert name not in names, context

    record = ledger(tree)
    assert record["recoveries"] == [], "interruptions are not charged to the restart budget"
    interruptions = record["interruptions"]
    assert len(interruptions) == CRASHES, interruptions
    assert [entry["how"] for entry in interruptions] == ["unclean"] * CRASHES
    for entry in interruptions:
        assert entry["resumed_at"] is not None and entry["down_seconds"] >= 0, entry
    for number, (before, entry) in enumerate(itertools.pairwise(interruptions), 2):
        # The relaunched trainer may write its first line before resumed_at is stamped.
        assert entry["at"] >= before["resumed_at"] - LAUNCH_SLACK, (
            f"interruption {number} went down at {entry['at']}, before interruption "
            f"{number - 1} was resumed at {before['resumed_at']}: {interruptions}"
        )
    assert census.most <= 1, f"two trainers at once: {census.crowded[:3]}"
    assert census.most == 1, "the census never saw the trainer: it counts nothing"
    assert census.samples >= 200, "the process table was hardly sampled"
    assert final_lineage(tree) == uninterrupted_lineage(STEPS_PER_EPOCH, EPOCHS)
    assert states_seen, "no state was ever saved between the crashes"
    assert states_seen <= state_folders(tree), "a state folder was deleted"


def test_sigterm_records_the_interruption_and_the_next_sidecar_resumes(tmp_path: Path) -> None:
    """systemd's stop (KillMode=mixed): SIGTERM to the sidecar alone. It stops its trainer,
    records the interruption and exits 143; the next start resumes the run."""
    epochs = 16
    tree = build_fluxgym_tree(
        tmp_path / "fluxgym", extra_trainer_args="--save_every_n_steps 5 --save_state"
    )
    sidecars: list[Sidecar] = []
    census = TrainerCensus(tree)
    census.start()
    try:
        first = Sidecar(tree)
        sidecars.append(first)
        first.wait_for("training_progressing")
        time.sleep(0.5)
        first.process.send_signal(signal.SIGTERM)
        assert first.finish(timeout=30) == 128 + signal.SIGTERM, first.describe()
        stopped_at = time.time()
        assert trainer_sessions(tree) == set(), "the trainer outlived the sidecar"
        assert "stopping_trainer" in first.names()
        (entry,) = ledger(tree)["interruptions"]
        assert entry["how"] == "sigterm" and entry["resumed_at"] is None, entry
        pause = 0.3
        time.sleep(pause)
        second = Sidecar(tree)
        sidecars.append(second)
        assert second.finish(timeout=60) == 0, second.describe()
    finally:
        census.stop()
        stop_leftovers(tree, sidecars)

    resumed = second.only("run_resumed_after_interruption")
    assert resumed["by"] == "sidecar" and resumed["how"] == "sigterm", resumed
    assert resumed["down_seconds"] >= pause - 0.05, resumed
    assert resumed["down_seconds"] <= event_time(resumed) - stopped_at + DOWNTIME_SLACK, resumed
    # Recorded when it happened, not inferred afterwards.
    reported = first.named("run_interrupted") + second.named("run_interrupted")
    assert reported, f"{first.describe()}\n{second.describe()}"
    assert all(event["how"] == "sigterm" and event["inferred"] is False for event in reported)
    assert second.named("training_completed")
    record = ledger(tree)
    assert record["recoveries"] == []
    (entry,) = record["interruptions"]
    assert entry["how"] == "sigterm" and entry["resumed_at"] is not None, entry
    assert census.most <= 1, f"two trainers at once: {census.crowded[:3]}"
    assert census.most == 1, "the census never saw the trainer: it counts nothing"
    assert final_lineage(tree) == uninterrupted_lineage(STEPS_PER_EPOCH, epochs)
