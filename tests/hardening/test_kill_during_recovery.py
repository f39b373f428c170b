"""The sidecar SIGKILLed at random moments, over and over, while it recovers a crashing run.

The trainer crashes in every run (``crash@step=8`` of its own step counter) after saving
states every 3 steps, so the sidecar spends its life recovering. Each exact resume keeps the
run's progress, so the run is made long enough (100,000 epochs) never to finish here. A
seeded schedule kills it with SIGKILL, most often a few milliseconds after it saw a crash
(inside the recovery: stopping, choosing, rewriting train.sh, writing the ledger,
relaunching), otherwise at a random moment, and starts a new one after a random pause.
After every kill:

- train.sh parses and holds at most one ``--resume``; train.sh.orig is FluxGym's original;
- state.json loads, and its restart count never went down;

and throughout, a census every 50 ms never sees two trainers (process groups) at once. At
the end a last sidecar is stopped with SIGTERM and no trainer process is left.

The sidecar restarted while its trainer keeps running (no kill during a recovery) is covered
by tests/test_process_mode.py::test_restarted_sidecar_adopts_its_running_trainer_instead_of_
starting_a_second. ``SIDECAR_KILL_SEED`` replays another schedule; the one used is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from sidecar.run.ledger import LedgerStore
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.simulator.harness import sidecar_environment
from sidecar.trainers.shell.train_script import parse_train_script

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SIDECAR_KILL_SEED", "20261129"))
KILLING_FOR = 45.0  # seconds of kills at least; the whole test takes about a minute
KILLING_AT_MOST = 120.0  # and at most, while too few kills or recoveries have been seen
ENOUGH_KILLS = 15
# A recovery takes about 90 ms from crash to relaunch here (the durable writes of train.sh
# and the ledger, the exact position, the launch), so most kills aimed at it land inside it
# and only some after: the schedule goes on until enough recoveries also went through.
ENOUGH_RECOVERIES = 5
SETTINGS = {
    "SIDECAR_MAX_RESTARTS": "1000",  # the budget is not what this test is about
    "SIDECAR_KILL_GRACE": "1s",
}
SIMULATION = {"SIM_FAULTS": "crash@step=8"}


def trainer_groups(tree: FluxgymTree) -> set[int]:
    """Process groups running this tree's trainer (each launch gets its own)."""
    groups = set()
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(tree.root) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(process.pid))
    return groups


class TrainerCensus(threading.Thread):
    def __init__(self, tree: FluxgymTree):
        super().__init__(name="trainer-census", daemon=True)
        self.tree = tree
        self.most = 0
        self.crowded: list[set[int]] = []
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.wait(0.05):
            groups = trainer_groups(self.tree)
            self.most = max(self.most, len(groups))
            if len(groups) > 1:
                self.crowded.append(groups)

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(timeout=5)


class Sidecar:
    """One ``python -m sidecar run``, its events collected by a reader thread."""

    def __init__(self, tree: FluxgymTree, stderr: Any):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=sidecar_environment(tree, settings=SETTINGS, simulation=SIMULATION),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its own session: the trainers it starts have theirs
        )
        self.events: list[str] = []
        self.crashes = threading.Event()
        self.restarted = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                name = json.loads(line)["event"]
                self.events.append(name)
                if name == "trainer_crashed":
                    self.crashes.set()
                elif name == "trainer_restarted" and self.crashes.is_set():
                    self.restarted.set()

    def wait_for_crash(self, timeout: float = 30) -> None:
        """Until this sidecar has seen the trainer crash; fails when the sidecar itself ended."""
        deadline = time.monotonic() + timeout
        while not self.crashes.wait(0.1):
            exited = self.process.poll()
            assert exited is None, f"the sidecar exited with {exited}: {self.events}"
            assert time.monotonic() < deadline, f"no crash within {timeout} s: {self.events}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)  # the sidecar alone, never its trainer
        self.process.wait()
        self._reader.join(timeout=5)


def check_nothing_lost(tree: FluxgymTree, original: str, restarts_before: int) -> int:
    """The invariants after a kill; returns the ledger's restart count."""
    text = tree.train_script.read_text()
    command = parse_train_script(text)  # raises when train.sh was left half-written
    resumes = [a for a in command.trainer_args if a == "--resume" or a.startswith("--resume=")]
    assert len(resumes) <= 1, text
    assert (tree.output_dir / "train.sh.orig").read_text() == original
    restarts = LedgerStore(tree.output_dir / ".sidecar").load().restarts
    assert restarts >= restarts_before, "the restart count went down"
    return restarts


def test_sigkill_at_random_moments_of_recovery_loses_nothing(tmp_path: Path) -> None:
    """Repeated SIGKILLs of the sidecar during recoveries never leave train.sh, its original or
    the ledger broken, never let two trainers run at once, and leave no orphan trainer."""
    tree = build_fluxgym_tree(
        tmp_path / "fluxgym", extra_trainer_args="--save_every_n_steps 3 --max_train_epochs 100000"
    )
    original = tree.train_script.read_text()
    rng = random.Random(SEED)
    print(f"SIDECAR_KILL_SEED={SEED}")
    census = TrainerCensus(tree)
    census.start()
    stderr = (tmp_path / "sidecar.stderr").open("ab")
    restarts = 0
    kills: list[str] = []
    sidecar: Sidecar | None = None
    try:
        started = time.monotonic()

        def killed_enough() -> bool:
            elapsed = time.monotonic() - started
            seen_enough = len(kills) >= ENOUGH_KILLS and restarts >= ENOUGH_RECOVERIES
            return elapsed >= KILLING_AT_MOST or (elapsed >= KILLING_FOR and seen_enough)

        while not killed_enough():
            sidecar = Sidecar(tree, stderr)
            if rng.random() < 0.7:
                # Inside a recovery: a few milliseconds after the crash was seen.
                moment = "after trainer_crashed"
                sidecar.wait_for_crash()
                # A recovery takes milliseconds: most kills land inside it, some just after.
                delay = rng.uniform(0.0, 0.02) if rng.random() < 0.6 else rng.uniform(0.02, 0.15)
            else:
                moment = "at random"
                delay = rng.uniform(0.05, 2.5)
            time.sleep(delay)
            last = sidecar.events[-1] if sidecar.events else None
            sidecar.kill()
            kills.append(f"kill {len(kills) + 1}: {moment} + {delay:.3f} s (last event: {last})")
            print(kills[-1])
            restarts = check_nothing_lost(tree, original, restarts)
            time.sleep(rng.uniform(0.0, 1.0))  # the orchestrator takes its time

        # After all that, a sidecar left alone still recovers the run, and stops cleanly.
        sidecar = Sidecar(tree, stderr)
        sidecar.wait_for_crash()
        assert sidecar.restarted.wait(30), f"no recovery after the kills: {sidecar.events}"
        sidecar.process.send_signal(signal.SIGTERM)
        assert sidecar.process.wait(timeout=30) == 128 + signal.SIGTERM
        restarts = check_nothing_lost(tree, original, restarts)
        deadline = time.monotonic() + 10
        while trainer_groups(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert trainer_groups(tree) == set(), "an orphan trainer was left running"
    finally:
        census.stop()
        if sidecar is not None and sidecar.process.poll() is None:
            sidecar.kill()
        for process in psutil.process_iter(["cmdline"]):
            if str(tree.root) in " ".join(process.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    process.kill()
        stderr.close()
    # A kill between a temporary file's creation and its rename leaves it behind, hidden and
    # harmless: what a reader sees is always the old or the new whole file.
    leftovers = sorted(path.name for path in tree.output_dir.rglob(".*.tmp"))
    print(f"{len(kills)} kills, {restarts} recoveries, temporary files left: {leftovers}")
    assert len(kills) >= ENOUGH_KILLS, "too few kills to mean anything"
    assert restarts >= ENOUGH_RECOVERIES, "the run was hardly recovered between the kills"
    assert census.most == 1, f"two trainers at once: {census.crowded[:3]}"
