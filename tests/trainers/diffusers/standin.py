"""A stand-in for a diffusers LoRA example script, for the sidecar's scenario tests.

It does what ``examples/dreambooth/train_dreambooth_lora_flux.py`` ``main`` does on disk and
on the console (huggingface/diffusers at main, 58eb52c), without a model:

- ``--max_train_steps`` / ``--num_train_epochs``: ``num_update_steps_per_epoch =
  ceil(batches / gradient_accumulation_steps)``; ``max_train_steps`` defaults to ``epochs *
  num_update_steps_per_epoch``; then ``num_train_epochs = ceil(max_train_steps /
  num_update_steps_per_epoch)`` (``main``, "We need to recalculate our total training steps");
- resume (``main``, "Potentially load in the weights and states from a previous save"): a
  value other than ``latest`` is reduced to ``os.path.basename``; ``latest`` takes the
  highest ``int(d.split("-")[1])`` among names that ``startswith("checkpoint")``; none:
  prints ``Checkpoint '<value>' does not exist. Starting a new training run.``; else prints
  ``Resuming from checkpoint <name>``, loads ``output_dir/<name>`` (accelerate
  ``Accelerator.load_state``: ``Loading states from <dir>``, a ValueError when it is
  missing), ``global_step = int(name.split("-")[1])``, ``first_epoch = global_step //
  num_update_steps_per_epoch``; the bar is ``tqdm(range(0, max_train_steps),
  initial=global_step, desc="Steps")``;
- the loop: ``for epoch in range(first_epoch, num_train_epochs): for step, batch in
  enumerate(train_dataloader)`` from the first batch (no skipping: the partial epoch's
  batches are trained again); a step is counted on ``accelerator.sync_gradients`` (every
  ``gradient_accumulation_steps`` batches and at the epoch's last); ``if global_step >=
  max_train_steps: break`` after every batch, inner loop only;
- a save every ``--checkpointing_steps`` steps: ``--checkpoints_total_limit`` pruning FIRST
  (list, keep ``startswith("checkpoint")``, sort by number, ``shutil.rmtree`` the lowest
  down to ``limit - 1``), then ``accelerator.save_state(output_dir/checkpoint-<step>)``:
  ``os.makedirs(exist_ok=True)`` (a folder of that name is overwritten in place), the save
  pre-hook's ``pytorch_lora_weights.safetensors`` (``save_model_hook``), then accelerate's
  ``checkpointing.save_accelerator_state``: ``optimizer.bin``, ``scheduler.bin``,
  ``random_states_0.pkl``; then ``Saved state to <path>``;
- at the end, ``save_lora_weights(output_dir)``: ``output_dir/pytorch_lora_weights.safetensors``.

Faults for the tests, each on the first attempt only (a hidden marker file in output_dir):
``STANDIN_HANG_AT_STEP=N``, ``STANDIN_CRASH_AT_STEP=N`` (exit 1), and
``STANDIN_KILL_MID_SAVE_AT_STEP=N`` (SIGKILL itself inside that save, after the weights and
the optimizer). ``STANDIN_STEP_SECONDS`` (default 0.05), ``STANDIN_BATCHES_PER_EPOCH`` (the
dataset's size in batches, default 4). Every trained step is appended to
``output_dir/standin-steps.jsonl`` as ``{"step", "attempt", "epoch", "batch"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for state_factory
from state_factory import safetensors_bytes, tensor, torch_zip_bytes

logger = logging.getLogger("__main__")
accelerate_logger = logging.getLogger("accelerate.accelerator")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--pretrained_model_name_or_path", default="stand-in")
    parser.add_argument("--instance_prompt", default="a photo of sks dog")
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None)
    return parser.parse_args(argv)


def lora_bytes(step: int) -> bytes:
    return safetensors_bytes(
        [tensor("transformer.lora_A.weight", "F32", [4, 8], fill=step % 256)],
        metadata={"format": "pt"},
    )


class Faults:
    """The fault env vars, each firing once per output folder."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    def due(self, kind: str, step: int) -> bool:
        wanted = os.environ.get(f"STANDIN_{kind}_AT_STEP")
        marker = self.output_dir / f".standin-fault-{kind.lower()}"
        if wanted is None or int(wanted) != step or marker.exists():
            return False
        marker.write_text(str(step))
        return True


def next_attempt(output_dir: Path) -> int:
    counter = output_dir / ".standin-attempts"
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    return attempt


def prune_before_save(output_dir: Path, limit: int | None) -> None:
    """``main``: "_before_ saving state, check if this save would set us over the limit"."""
    if limit is None:
        return
    checkpoints = [d for d in os.listdir(output_dir) if d.startswith("checkpoint")]
    checkpoints = sorted(checkpoints, key=lambda x: int(x.split("-")[1]))
    if len(checkpoints) >= limit:
        removing = checkpoints[0 : len(checkpoints) - limit + 1]
        logger.info(
            f"{len(checkpoints)} checkpoints already exist, removing {len(removing)} checkpoints"
        )
        logger.info(f"removing checkpoints: {', '.join(removing)}")
        for name in removing:
            shutil.rmtree(output_dir / name)


def save_state(save_path: Path, step: int, faults: Faults) -> None:
    """accelerate ``Accelerator.save_state`` with the LoRA script's save pre-hook."""
    os.makedirs(save_path, exist_ok=True)
    accelerate_logger.info(f"Saving current state to {save_path}")
    (save_path / LORA_WEIGHTS).write_bytes(lora_bytes(step))  # save_model_hook, first
    (save_path / "optimizer.bin").write_bytes(torch_zip_bytes())
    accelerate_logger.info(f"Optimizer state saved in {save_path / 'optimizer.bin'}")
    scheduler = torch_zip_bytes({"archive/data.pkl": pickle.dumps({"last_epoch": step})})
    if faults.due("KILL_MID_SAVE", step):
        (save_path / "scheduler.bin").write_bytes(scheduler[: len(scheduler) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    (save_path / "scheduler.bin").write_bytes(scheduler)
    accelerate_logger.info(f"Scheduler state saved in {save_path / 'scheduler.bin'}")
    accelerate_logger.info(f"Sampler state for dataloader 0 saved in {save_path / 'sampler.bin'}")
    (save_path / "random_states_0.pkl").write_bytes(pickle.dumps({"step": step}))
    accelerate_logger.info(f"Random states saved in {save_path / 'random_states_0.pkl'}")


def load_state(input_dir: Path) -> None:
    """accelerate ``Accelerator.load_state``: the folder must exist; torch.load reads each file."""
    if not input_dir.is_dir():
        raise ValueError(f"Tried to find {input_dir} but folder does not exist")
    accelerate_logger.info(f"Loading states from {input_dir}")
    for name in (LORA_WEIGHTS, "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (input_dir / name).read_bytes()  # FileNotFoundError, as torch.load would raise


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.05"))
    batches = int(os.environ.get("STANDIN_BATCHES_PER_EPOCH", "4"))
    faults = Faults(output_dir)
    attempt = next_attempt(output_dir)

    num_update_steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {batches * args.train_batch_size}")
    logger.info(f"  Num batches each epoch = {batches}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    global_step = 0
    first_epoch = 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            path = os.path.basename(args.resume_from_checkpoint)
        else:
            dirs = [d for d in os.listdir(output_dir) if d.startswith("checkpoint")]
            dirs = sorted(dirs, key=lambda x: int(x.split("-")[1]))
            path = dirs[-1] if len(dirs) > 0 else None
        if path is None:
            value = args.resume_from_checkpoint
            print(f"Checkpoint '{value}' does not exist. Starting a new training run.")
            initial_global_step = 0
        else:
            print(f"Resuming from checkpoint {path}")  # accelerator.print: stdout, buffered
            load_state(output_dir / path)
            global_step = int(path.split("-")[1])
            initial_global_step = global_step
            first_epoch = global_step // num_update_steps_per_epoch
    else:
        initial_global_step = 0

    progress_bar = tqdm(range(0, args.max_train_steps), initial=initial_global_step, desc="Steps")
    steps_file = output_dir / "standin-steps.jsonl"
    for epoch in range(first_epoch, args.num_train_epochs):
        for step in range(batches):
            time.sleep(step_seconds)
            sync_gradients = (
                step + 1
            ) % args.gradient_accumulation_steps == 0 or step == batches - 1
            if sync_gradients:
                progress_bar.update(1)
                global_step += 1
                with steps_file.open("a") as steps:
                    record = {
                        "step": global_step,
                        "attempt": attempt,
                        "epoch": epoch,
                        "batch": step,
                    }
                    steps.write(json.dumps(record) + "\n")
                if faults.due("HANG", global_step):
                    while True:
                        time.sleep(60)
                if faults.due("CRASH", global_step):
                    return 1
                if global_step % args.checkpointing_steps == 0:
                    prune_before_save(output_dir, args.checkpoints_total_limit)
                    save_path = output_dir / f"checkpoint-{global_step}"
                    save_state(save_path, global_step, faults)
                    logger.info(f"Saved state to {save_path}")
            progress_bar.set_postfix(loss=0.1, lr=1e-4)
            if global_step >= args.max_train_steps:
                break
    progress_bar.close()
    (output_dir / LORA_WEIGHTS).write_bytes(lora_bytes(global_step))  # save_lora_weights
    return 0


if __name__ == "__main__":
    sys.exit(main())
