"""A stand-in for sd-scripts' ``flux_train_network.py`` that behaves like it from the outside.

The sidecar only ever sees a trainer through its output streams, the files it writes and its
process state, so that is what this simulator reproduces faithfully (see REFERENCE sections 1-3):

- stdout: start-up lines, ``epoch 2/16`` banners, ``saving checkpoint: ...`` lines;
  stderr: a tqdm bar ``steps:  33%|███▎      | 10/30 [00:04<00:08,  2.44it/s, avr_loss=0.407]``
  redrawn in place with ``\\r`` after every step (tqdm would throttle to ten redraws a
  second), plus log lines (sd-scripts logs to stderr). A short tqdm bar without the ``steps``
  description ("caching latents") ends the start-up. Every write is flushed, so an unread pipe
  blocks the simulator exactly as it blocks the real trainer.
- state folders only with ``--save_state``, in accelerate's file order, ``train_state.json``
  first; model files named like sd-scripts names them; ``--save_last_n_steps_state`` removes an
  older step state after writing a new one.
- ``--resume DIR`` fails like accelerate does on a missing or damaged folder and otherwise
  positions the run exactly as sd-scripts' train_network.py does (one process, gradient
  accumulation 1; :mod:`sidecar.simulator.resume_position`): ``steps_from_state`` is
  train_state.json's ``current_step``; ``--initial_step`` (or ``--initial_epoch``) overrides it
  with sd-scripts' warning; whole epochs ``initial_step // steps_per_epoch`` are skipped;
  without ``--skip_until_initial_step`` the partial epoch is trained again and ``global_step``
  restarts at 0, with it the first batches are discarded and ``global_step`` starts at the
  remainder. Either way ``global_step`` is relative to this attempt, so step-numbered states
  come round again and are overwritten in place, and a train_state.json written by a resumed
  run makes the next resume start too early. The bar's total is ``max_train_steps`` minus that
  remainder and counts from 0, so a resumed run ends below 100%.
- the simulated LoRA records the ``(epoch, batch)`` pairs it trained (its lineage, see
  :mod:`sidecar.simulator.lineage`) in every safetensors file and takes it back on resume.

Cadence and faults come from environment variables, read once at start:

``SIM_STEPS_PER_EPOCH``  optimizer steps per epoch (default 4); stands in for
                         images x repeats / batch size.
``SIM_STEP_SECONDS``     wall time of one step (default 0.05).
``SIM_STEP_JITTER``      each step takes SIM_STEP_SECONDS x a random factor in
                         [1 - jitter, 1 + jitter] (default 0: every step alike).
``SIM_STARTUP_SECONDS``  silent model loading and caching before step 1 (default 0.2).
``SIM_SAVE_SECONDS``     time to write one state folder, spread between its files and
                         through the middle of each binary file, so a scanner can catch a
                         folder, or a file, half-written (default 0).
``SIM_SAMPLE_SECONDS``   time to render one sample image; the step counter stands still
                         meanwhile (default 0.1).
``SIM_FAULTS``           faults to suffer; grammar in :mod:`sidecar.simulator.faults`.
``SIM_GPU_STATE_FILE``   when set, this file is rewritten atomically whenever the simulated
                         GPU activity changes, as ``util=<0-100>`` and ``power_mw=<int>`` lines;
                         a stand-in NVML library reports those values.

The number of runs is counted in ``<output_dir>/.simulator/runs`` (for ``:once`` faults).
Loader failures on ``--resume`` are raised as exceptions, so the interpreter prints a
traceback and exits 1, as the real trainer does.

This module holds only the entry point; the parts it assembles are listed in
:mod:`sidecar.simulator`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sidecar.atomic_files import replace_atomically
from sidecar.simulator.context import TrainerContext
from sidecar.simulator.fault_actor import SimulatedCrash, crash_report
from sidecar.simulator.faults import FaultPlan, parse_faults
from sidecar.simulator.gpu_state import GpuActivity, GpuStateFile
from sidecar.simulator.run_settings import SimulatedCadence, parse_arguments
from sidecar.simulator.terminal_output import Terminal
from sidecar.simulator.training import SimulatedTraining


def next_run_number(output_dir: Path) -> int:
    """Count this run in ``<output_dir>/.simulator/runs`` and return its number (1 = first)."""
    counter = output_dir / ".simulator" / "runs"
    counter.parent.mkdir(parents=True, exist_ok=True)
    try:
        previous = int(counter.read_text().strip() or 0)
    except FileNotFoundError:
        previous = 0
    replace_atomically(counter, f"{previous + 1}\n")
    return previous + 1


def main(argv: list[str] | None = None) -> int:
    """Run one simulated training process; returns the exit status.

    Bad ``SIM_*`` settings exit 2 with a message; resume failures propagate as exceptions
    (traceback, exit 1) exactly where the real trainer would raise them.
    """
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    terminal = Terminal(sys.stdout, sys.stderr)
    try:
        cadence = SimulatedCadence.from_environ(os.environ)
        faults = parse_faults(os.environ.get("SIM_FAULTS", ""))
    except ValueError as error:
        terminal.draw(f"sidecar.simulator: {error}\n")
        return 2
    gpu_state = os.environ.get("SIM_GPU_STATE_FILE")
    gpu = GpuStateFile(Path(gpu_state) if gpu_state else None)
    run_number = next_run_number(Path(args.output_dir))
    context = TrainerContext(terminal, gpu, FaultPlan.for_run(faults, run_number))
    training = SimulatedTraining(args, cadence, context)
    try:
        training.run()
    except SimulatedCrash as crash:
        terminal.draw("\n" + crash_report(crash.fault, sys.argv[0]))
        return 1 if crash.fault.code is None else crash.fault.code
    finally:
        gpu.show(GpuActivity.IDLE)
    return 0
