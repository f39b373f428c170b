"""The NCCL flight recorder, end to end on the real sidecar: a two-process launch gets the
recorder's environment, and a stall asks each rank for its dump through its real FIFO
before the kill; the bundle keeps the dumps and says which rank is behind.

The ranks are stand-ins (``tests/flight_rank.py``: what ProcessGroupNCCL's heartbeat thread
does with the FIFO, without torch), started by an ``accelerate`` stand-in that launches
``--num_processes`` of them, as accelerate's launcher starts torch.distributed workers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import flight_rank
import pytest
from conftest import run_sidecar

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

pytestmark = pytest.mark.slow

LAUNCHER = """#!/bin/bash
# accelerate launch --num_processes 2 ...: rank 1 never completes collective #42.
{python} {ranks} --rank 0 --world 2 --collectives all_reduce:completed*42 &
{python} {ranks} --rank 1 --world 2 --collectives all_reduce:completed*41,all_reduce:scheduled &
wait
"""


def _two_rank_tree(root: Path):
    tree = build_fluxgym_tree(root)
    text = tree.train_script.read_text()
    tree.train_script.write_text(
        text.replace("accelerate launch", "accelerate launch --num_processes 2", 1)
    )
    launcher = tree.root / "bin" / "accelerate"
    launcher.write_text(LAUNCHER.format(python=sys.executable, ranks=flight_rank.__file__))
    launcher.chmod(0o755)
    return tree


def test_a_stall_of_two_ranks_dumps_their_flight_recorders_first(tmp_path):
    tree = _two_rank_tree(tmp_path / "ranks")
    run = run_sidecar(
        tree,
        settings={"SIDECAR_STARTUP_GRACE": "3s", "SIDECAR_MAX_RESTARTS": "1"},
        simulation={},
        timeout=60,
    )
    # Both attempts hang (the stand-ins never step): the second stall spends the budget.
    assert run.exit_code == 3, run.stderr[-2000:]
    stall = run.named("stall_detected")[0]
    assert stall["diagnosis"] == "collective_wait", stall
    notes = " ".join(stall.get("diagnosis_notes", [])) + " ".join(stall["diagnosis_evidence"])
    assert "ranks 1 behind" in notes, stall
    assert "2 ranks launched" in notes, "the launch's rank count reaches the diagnosis"
    saved = run.named("incident_saved")[0]
    bundle = Path(saved["path"])
    summary = (bundle / "flight-recorder" / "summary.txt").read_text()
    assert "ranks 1 behind" in summary and "#42" in summary and "all_reduce" in summary
    assert {path.name for path in (bundle / "flight-recorder").glob("rank*.pickle")} == {
        "rank0.pickle",
        "rank1.pickle",
    }
    diagnosis = json.loads((bundle / "diagnosis.json").read_text())
    assert diagnosis["class"] == "collective_wait"
    # The recorder's files live in the run's state folder, where both sides can see them.
    folder = tree.output_dir / ".sidecar" / "flight-recorder"
    assert (folder / "trace_rank_0").exists() and (folder / "trace_rank_1").exists()


def test_a_single_process_launch_gets_no_recorder(tmp_path):
    from sidecar.config import Settings
    from sidecar.observe.flight_recorder import launch_environment
    from sidecar.run.paths import resolve_run_paths

    def environment(tree):
        paths = resolve_run_paths(Settings(train_script=tree.train_script))
        return launch_environment(paths.flight_recorder, paths.launch_ranks())

    assert environment(build_fluxgym_tree(tmp_path / "one")) == {}
    double = _two_rank_tree(tmp_path / "two")
    folder = double.output_dir / ".sidecar" / "flight-recorder"
    assert environment(double)["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"] == f"{folder}/pipe_rank_"
    assert folder.is_dir()
