"""A real transformers Trainer run, tiny enough for seconds on two CPU cores.

A 2-layer GPT-2 (n_embd 32, vocabulary 64) built from its config (nothing downloaded) learns
random tokens. It takes TrainingArguments' own command line (``--output_dir``,
``--save_steps``, ``--resume_from_checkpoint`` ...) through ``HfArgumentParser``, as the
transformers examples do, and saves the final model with ``trainer.save_model()``.

Faults for the scenario tests, each on the first attempt only (a marker file in the output
folder, one per fault, makes a relaunch run clean of it):

- ``TINY_HANG_AT_STEP=N``: after step N, stop making progress and stay alive;
- ``TINY_CRASH_AT_STEP=N``: after step N, exit 1;
- ``TINY_KILL_MID_SAVE_AT_STEP=N``: SIGKILL itself inside the save of checkpoint-N, after
  the model, ``optimizer.pt``, ``scheduler.pt`` and ``rng_state.pth`` are written and
  before ``trainer_state.json`` (``Trainer._save_checkpoint`` writes it last);
- ``TINY_STEP_SECONDS`` (default 0.02): a pause per step, so a stall can be seen.

Each trained step is appended to ``<output_dir>/tiny-steps.jsonl`` as {"step", "attempt"}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

VOCABULARY = 64
SEQUENCE = 16
EXAMPLES = 256


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, VOCABULARY, (EXAMPLES, SEQUENCE), generator=generator)

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def marker(output_dir: Path, fault: str) -> Path:
    return output_dir / f".tiny-fault-done-{fault}"


def fault_step(name: str, output_dir: Path) -> int | None:
    value = os.environ.get(name)
    if not value or marker(output_dir, name).exists():
        return None
    return int(value)


def mark_fault(output_dir: Path, name: str) -> None:
    marker(output_dir, name).write_text("done\n")


class Faults(TrainerCallback):
    """Records each step and plays the hang and crash faults."""

    def __init__(self, output_dir: Path, attempt: int) -> None:
        self.output_dir = output_dir
        self.attempt = attempt
        self.pause = float(os.environ.get("TINY_STEP_SECONDS", "0.02"))
        self.hang_at = fault_step("TINY_HANG_AT_STEP", output_dir)
        self.crash_at = fault_step("TINY_CRASH_AT_STEP", output_dir)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        with open(self.output_dir / "tiny-steps.jsonl", "a") as steps:
            steps.write(json.dumps({"step": state.global_step, "attempt": self.attempt}) + "\n")
        time.sleep(self.pause)
        if state.global_step == self.hang_at:
            mark_fault(self.output_dir, "TINY_HANG_AT_STEP")
            print(f"tiny_clm: hanging after step {state.global_step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        if state.global_step == self.crash_at:
            mark_fault(self.output_dir, "TINY_CRASH_AT_STEP")
            print(f"tiny_clm: crashing after step {state.global_step}", file=sys.stderr, flush=True)
            sys.stderr.flush()
            os._exit(1)
        return control


class KilledMidSave(Trainer):
    """Dies inside the save of one checkpoint, after its RNG state, before its trainer state."""

    kill_at: int | None = None
    run_dir: Path | None = None

    def _save_rng_state(self, output_dir):  # type: ignore[no-untyped-def]
        super()._save_rng_state(output_dir)
        if self.state.global_step == self.kill_at and self.run_dir is not None:
            mark_fault(self.run_dir, "TINY_KILL_MID_SAVE_AT_STEP")
            print(f"tiny_clm: killed while saving {output_dir}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def next_attempt(output_dir: Path) -> int:
    counter = output_dir / "tiny-attempts"
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    return attempt


def main() -> None:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    attempt = next_attempt(output_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCABULARY, n_positions=SEQUENCE, n_embd=32, n_layer=2, n_head=2)
    trainer = KilledMidSave(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=RandomTokens(),
        callbacks=[Faults(output_dir, attempt)],
    )
    trainer.kill_at = fault_step("TINY_KILL_MID_SAVE_AT_STEP", output_dir)
    trainer.run_dir = output_dir
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()


if __name__ == "__main__":
    main()
