"""Counting the training processes a train.sh launch line starts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from bash_argv import argv_bash_passes

from sidecar.trainers.shell.launch_processes import MORE_THAN_ONE, launch_process_count
from sidecar.trainers.shell.train_script import parse_train_script

FIXTURES = Path("/work/shared/fixtures/fluxgym-train-scripts")
FIXTURE_SCRIPTS = sorted(FIXTURES.glob("*.sh")) if FIXTURES.is_dir() else []
SCRIPT = "sd-scripts/flux_train_network.py --output_dir out --seed 42"


@pytest.mark.skipif(not FIXTURE_SCRIPTS, reason="no FluxGym fixtures on this machine")
@pytest.mark.parametrize("script", FIXTURE_SCRIPTS, ids=lambda path: path.name)
def test_fluxgym_scripts_launch_one_process(script, tmp_path):
    """FluxGym's generated train.sh runs a single process, read by the script reader and as bash
    passes it to accelerate."""
    command = parse_train_script(script.read_text())
    argv = [*command.launcher_args, command.trainer_script, *command.trainer_args]
    assert launch_process_count(argv) == 1
    passed = argv_bash_passes(script.read_text(), tmp_path)  # what bash gives `accelerate`
    assert launch_process_count(["accelerate", *passed]) == 1


@pytest.mark.parametrize(
    ("line", "count"),
    [
        ("accelerate launch --num_processes 4 " + SCRIPT, 4),
        ("accelerate launch --num_processes=3 " + SCRIPT, 3),
        ("accelerate launch --num-processes=2 " + SCRIPT, 2),
        ("accelerate launch --multi_gpu --num_processes 8 " + SCRIPT, 8),
        ("/venv/bin/accelerate launch --num_processes 1 " + SCRIPT, 1),
        ("accelerate launch --num_machines 2 --num_processes 16 " + SCRIPT, 16),
        ("accelerate launch --mixed_precision bf16 --num_cpu_threads_per_process 4 " + SCRIPT, 1),
        ("env CUDA_VISIBLE_DEVICES=0,1 accelerate launch --num_processes 2 " + SCRIPT, 2),
        ("exec accelerate launch " + SCRIPT, 1),
        ("torchrun --nproc_per_node 4 " + SCRIPT, 4),
        ("torchrun --nproc-per-node=2 --nnodes 3 " + SCRIPT, 6),
        ("torchrun --nnodes=1:4 --nproc-per-node 2 " + SCRIPT, 8),
        ("torchrun " + SCRIPT, 1),
        ("python -m torch.distributed.run --nproc_per_node=2 " + SCRIPT, 2),
        ("python3 -u -m torch.distributed.launch --nproc_per_node 3 " + SCRIPT, 3),
        ("python -m accelerate.commands.launch --num_processes 2 " + SCRIPT, 2),
        ("python " + SCRIPT, 1),
        ("python3.10 -W ignore " + SCRIPT, 1),
        ("python -m sd_scripts.train --num_processes 8", 1),
    ],
)
def test_exact_counts(line, count):
    """A count on the line is the count; none means one process."""
    assert launch_process_count(shlex.split(line)) == count


@pytest.mark.parametrize(
    "line",
    [
        "accelerate launch --multi_gpu " + SCRIPT,
        "accelerate launch --num_machines 2 " + SCRIPT,
        "accelerate launch --use_deepspeed " + SCRIPT,
        "torchrun --nproc_per_node gpu " + SCRIPT,
        "torchrun --nproc-per-node=auto --nnodes 2 " + SCRIPT,
    ],
)
def test_distributed_without_a_count_is_more_than_one(line):
    """--multi_gpu or a device-count word: several processes, how many unknown here."""
    assert launch_process_count(shlex.split(line)) == MORE_THAN_ONE == 2


def test_options_after_the_script_are_the_trainers():
    """A --num_processes after the training script is the script's own argument."""
    line = "accelerate launch sd-scripts/flux_train_network.py --num_processes 8"
    assert launch_process_count(shlex.split(line)) == 1
    assert launch_process_count(shlex.split("torchrun train.py --nproc_per_node 4")) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "empty launch line"),
        ("CUDA_VISIBLE_DEVICES=0", "empty launch line"),
        ("bash train.sh", "not a training launcher"),
        ("accelerate config", "expected 'accelerate launch"),
        ("accelerate launch --num_processes zero " + SCRIPT, "--num_processes 'zero'"),
        ("accelerate launch --num_processes 0 " + SCRIPT, "at least 1"),
        ("accelerate launch --num_processes", "needs a value"),
        ("torchrun --nproc_per_node 2.5 " + SCRIPT, "--nproc-per-node '2.5'"),
        ("torchrun --nnodes 1:x " + SCRIPT, "--nnodes '1:x'"),
        ("python -m", "module name is missing"),
    ],
)
def test_bad_lines_are_refused_with_a_reason(line, message):
    """What is not a launch line, or a count that is not a number, is an error naming it."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        launch_process_count(shlex.split(line))
