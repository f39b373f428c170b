"""A tiny sd-scripts stand-in on the REAL accelerate and torch (CPU), run as a script.

It reproduces what the sidecar depends on in kohya-ss sd-scripts' ``train_network.py`` (read at
48d368f, the commit whose requirements.txt pins accelerate==1.6.0) and ``library/train_util.py``:

- the save/load pre-hooks that write and read ``train_state.json`` (train_network.py ~936-975);
- ``resume_from_local_or_hf_if_specified`` (train_util.py ~4772): log line, then ``load_state``;
- the resume arithmetic: ``initial_step`` from ``--initial_step`` / ``--initial_epoch`` /
  ``steps_from_state``, ``epoch_to_start``, ``--skip_until_initial_step`` and the relative
  ``global_step`` (train_network.py ~1231-1345);
- the epoch loop with ``accelerator.skip_first_batches`` and the per-batch discard
  (~1396-1410), step saves (~1490-1505), epoch-end saves (~1690-1705) and the train-end state
  followed by the final model (~1712-1726);
- state folder names and the removal of old states (train_util.py ~90-99, ~5938-5998).

The model is an ``nn.Linear`` plus two persistent buffers holding the LINEAGE: every
(epoch, batch) pair an optimizer step was taken on. The buffers live in the network's state
dict, so accelerate writes them into ``model.safetensors`` and ``load_state`` restores them;
the state folder keeps exactly sd-scripts' file set (no ``custom_checkpoint_0.pkl``, which
``register_for_checkpointing`` would add and sd-scripts never has). The final
``<name>.safetensors`` carries the lineage and AdamW's own ``state['step']`` (restored from
``optimizer.bin``) in its metadata.

Faults (for the tests), from ``SD_TRAINER_FAULTS``, comma-separated ``kind@n``; ``n`` is the
lineage's step count (AdamW's step), and each fault fires once per output folder (a marker
file there), so the relaunch carries on:

- ``hang@n``: after optimizer step n (and any save at it), sleep forever;
- ``crash@n``: after optimizer step n, raise (a traceback, exit status 1);
- ``save_kill@n``: in the first state save at a lineage step >= n, ``os._exit(137)`` right after
  accelerate has written ``model.safetensors`` (``train_state.json`` is already there);
  ``accelerate launch`` reports it as CalledProcessError and exits 1.

``SD_TRAINER_STEP_SECONDS`` (default 0.05) is slept per step; ``SD_TRAINER_BATCHES`` (default
8) is the dataset's size, i.e. the batches per epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from multiprocessing import Value
from pathlib import Path
from typing import Any

import accelerate.checkpointing
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

# train_util.py ~90-99.
EPOCH_STATE_NAME = "{}-{:06d}-state"
EPOCH_FILE_NAME = "{}-{:06d}"
LAST_STATE_NAME = "{}-state"
STEP_STATE_NAME = "{}-step{:08d}-state"
STEP_FILE_NAME = "{}-step{:08d}"

FAULTS_ENV = "SD_TRAINER_FAULTS"
FAULTS_FIRED_FILE = ".sd_trainer_faults_fired"
LINEAGE_CAPACITY_FACTOR = 8  # room for a run that retrains epochs (the bug under test)
INPUT_FEATURES = 4

# library/utils.py setup_logging without rich: a stdout handler, the bare message.
logger = logging.getLogger("sd_trainer")


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt="%(message)s"))
    logging.root.setLevel(logging.INFO)
    logging.root.addHandler(handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """sd-scripts' flag names (train_util.add_training_arguments and friends)."""
    parser = argparse.ArgumentParser()
    add = parser.add_argument
    add("--output_dir", required=True)
    add("--output_name", default=None)
    add("--save_model_as", default="safetensors", choices=["safetensors"])
    add("--save_state", action="store_true")
    add("--save_state_on_train_end", action="store_true")
    add("--save_every_n_steps", type=int, default=None)
    add("--save_every_n_epochs", type=int, default=None)
    add("--save_last_n_steps", type=int, default=None)
    add("--save_last_n_steps_state", type=int, default=None)
    add("--save_last_n_epochs", type=int, default=None)
    add("--save_last_n_epochs_state", type=int, default=None)
    add("--resume", default=None)
    add("--initial_step", type=int, default=None)
    add("--initial_epoch", type=int, default=None)
    add("--skip_until_initial_step", action="store_true")
    add("--max_train_steps", type=int, default=1600)
    add("--max_train_epochs", type=int, default=None)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    add("--learning_rate", type=float, default=1e-3)
    add("--seed", type=int, default=None)
    add("--dataset_config", default=None)  # FluxGym passes one; the data here is built in
    return parser.parse_args(argv)


class IndexedDataset(Dataset[dict[str, torch.Tensor]]):
    """Deterministic samples that carry their own index, so a step knows its batch."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = torch.linspace(-1.0, 1.0, INPUT_FEATURES) * (index + 1) / self.size
        y = torch.tensor([math.sin(index + 1.0)])
        return {"index": torch.tensor(index), "x": x, "y": y}


class TinyNetwork(nn.Module):
    """The "network" sd-scripts trains, plus the lineage buffers (saved with its weights)."""

    lineage: torch.Tensor
    lineage_len: torch.Tensor

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.linear = nn.Linear(INPUT_FEATURES, 1)
        self.register_buffer("lineage", torch.full((capacity, 2), -1, dtype=torch.int64))
        self.register_buffer("lineage_len", torch.zeros(1, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def record(self, epoch: int, batch: int) -> None:
        count = int(self.lineage_len.item())
        if count < self.lineage.shape[0]:
            self.lineage[count, 0] = epoch
            self.lineage[count, 1] = batch
        self.lineage_len += 1

    def pairs(self) -> list[tuple[int, int]]:
        count = min(int(self.lineage_len.item()), self.lineage.shape[0])
        return [(int(e), int(b)) for e, b in self.lineage[:count].tolist()]


class Faults:
    """Injected faults, each fired at most once per output folder."""

    def __init__(self, spec: str, output_dir: Path) -> None:
        self.pending: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, at = item.partition("@")
            if kind not in ("hang", "crash", "save_kill") or not at.isdigit():
                raise ValueError(f"bad fault {item!r} in {FAULTS_ENV}")
            self.pending[item] = int(at)
        self.marker = output_dir / FAULTS_FIRED_FILE
        fired = self.marker.read_text().split() if self.marker.exists() else []
        for item in fired:
            self.pending.pop(item, None)

    def due(self, kind: str, step: int) -> str | None:
        for item, at in self.pending.items():
            if item.startswith(kind + "@") and step >= at:
                return item
        return None

    def fire(self, item: str) -> None:
        self.pending.pop(item)
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        with self.marker.open("a", encoding="utf-8") as marker:
            marker.write(item + "\n")
            marker.flush()
            os.fsync(marker.fileno())
        print(f"[fault] {item}", file=sys.stderr, flush=True)

    def after_step(self, step: int) -> None:
        if (item := self.due("hang", step)) is not None:
            self.fire(item)
            while True:
                time.sleep(3600)
        if (item := self.due("crash", step)) is not None:
            self.fire(item)
            raise RuntimeError(f"injected crash after optimizer step {step}")

    def arm_save_kill(self, step: int) -> None:
        """Make the next accelerate ``save`` of the model weights end the process."""
        item = self.due("save_kill", step)
        if item is None:
            return
        original: Callable[..., Any] = accelerate.checkpointing.save

        def save_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(obj, f, *args, **kwargs)
            if Path(f).name == "model.safetensors":
                self.fire(item)
                os._exit(137)
            return result

        # checkpointing.save_accelerator_state calls the module-level name ``save``.
        accelerate.checkpointing.save = save_then_die


def default_if_none(value: str | None, default: str) -> str:
    return default if value is None else value


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    faults = Faults(os.environ.get(FAULTS_ENV, ""), output_dir)
    step_seconds = float(os.environ.get("SD_TRAINER_STEP_SECONDS", "0.05"))
    batches = int(os.environ.get("SD_TRAINER_BATCHES", "8"))
    name = default_if_none(args.output_name, "last")

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    if args.seed is not None:
        torch.manual_seed(args.seed)

    # train_network.py ~562: shared values the hooks read.
    current_epoch = Value("i", 0)
    current_step = Value("i", 0)

    # sd-scripts shuffles (DataLoader shuffle=True); in order here, so the lineage is exact.
    train_dataloader = DataLoader(IndexedDataset(batches), batch_size=1, shuffle=False)
    # train_network.py ~799-805: epochs override max_train_steps.
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * math.ceil(
            len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps
        )
        accelerator.print(
            f"override steps. steps for {args.max_train_epochs} epochs is / "
            f"指定エポックまでのステップ数: {args.max_train_steps}"
        )

    network = TinyNetwork(LINEAGE_CAPACITY_FACTOR * args.max_train_steps)
    optimizer = torch.optim.AdamW(network.linear.parameters(), lr=args.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant
    network, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        network, optimizer, train_dataloader, lr_scheduler
    )
    network_type = type(accelerator.unwrap_model(network))

    # train_network.py ~936-957: keep only the network's weights, then write train_state.json
    # with current_step + 1 ("the state is saved before current_step is set from global_step").
    def save_model_hook(models: list[nn.Module], weights: list[Any], hook_dir: str) -> None:
        if accelerator.is_main_process:
            remove_indices = [i for i, m in enumerate(models) if not isinstance(m, network_type)]
            for i in reversed(remove_indices):
                if len(weights) > i:
                    weights.pop(i)
        train_state_file = os.path.join(hook_dir, "train_state.json")
        logger.info(
            f"save train state to {train_state_file} at epoch {current_epoch.value} "
            f"step {current_step.value + 1}"
        )
        with open(train_state_file, "w", encoding="utf-8") as f:
            json.dump(
                {"current_epoch": current_epoch.value, "current_step": current_step.value + 1}, f
            )

    steps_from_state: int | None = None

    # train_network.py ~959-975: read current_step back as steps_from_state.
    def load_model_hook(models: list[nn.Module], input_dir: str) -> None:
        nonlocal steps_from_state
        remove_indices = [i for i, m in enumerate(models) if not isinstance(m, network_type)]
        for i in reversed(remove_indices):
            models.pop(i)
        train_state_file = os.path.join(input_dir, "train_state.json")
        if os.path.exists(train_state_file):
            with open(train_state_file, encoding="utf-8") as f:
                data = json.load(f)
            steps_from_state = data["current_step"]
            logger.info(f"load train state from {train_state_file}: {data}")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # train_util.resume_from_local_or_hf_if_specified (~4772), local branch.
    if args.resume:
        logger.info(f"resume training from local state: {args.resume}")
        accelerator.load_state(args.resume)

    # train_network.py ~977-978.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # train_network.py ~987-1000: the banner the sidecar reads the run's shape from.
    accelerator.print("running training / 学習開始")
    accelerator.print(f"  num train images * repeats / 学習画像の数×繰り返し回数: {batches}")
    accelerator.print("  num validation images * repeats / 学習画像の数×繰り返し回数: 0")
    accelerator.print("  num reg images / 正則化画像の数: 0")
    accelerator.print(f"  num batches per epoch / 1epochのバッチ数: {len(train_dataloader)}")
    accelerator.print(f"  num epochs / epoch数: {num_train_epochs}")
    accelerator.print("  batch size per device / バッチサイズ: 1")
    accelerator.print(
        "  gradient accumulation steps / 勾配を合計するステップ数 = "
        f"{args.gradient_accumulation_steps}"
    )
    accelerator.print(f"  total optimization steps / 学習ステップ数: {args.max_train_steps}")

    # train_network.py ~1231-1279: the initial step and the epoch to start from.
    initial_step = 0
    if args.initial_epoch is not None or args.initial_step is not None:
        if steps_from_state is not None:
            logger.warning("steps from the state is ignored because initial_step is specified")
        if args.initial_step is not None:
            initial_step = args.initial_step
        else:
            initial_step = (args.initial_epoch - 1) * math.ceil(
                len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps
            )
    elif steps_from_state is not None:
        initial_step = steps_from_state
        steps_from_state = None

    if initial_step > 0:
        assert args.max_train_steps > initial_step, (
            "max_train_steps should be greater than initial step / "
            "max_train_stepsは初期ステップより大きい必要があります: "
            f"{args.max_train_steps} vs {initial_step}"
        )

    epoch_to_start = 0
    if initial_step > 0:
        if args.skip_until_initial_step:
            if not args.resume:
                logger.info(
                    "initial_step is specified but not resuming. "
                    "lr scheduler will be started from the beginning"
                )
            logger.info(f"skipping {initial_step} steps / {initial_step}ステップをスキップします")
            initial_step *= args.gradient_accumulation_steps
            epoch_to_start = initial_step // math.ceil(
                len(train_dataloader) / args.gradient_accumulation_steps
            )
        else:
            # only the epoch number is skipped; the partial epoch is trained again
            epoch_to_start = initial_step // math.ceil(
                len(train_dataloader) / args.gradient_accumulation_steps
            )
            initial_step = 0

    global_step = 0

    def unwrapped() -> TinyNetwork:
        model = accelerator.unwrap_model(network)
        assert isinstance(model, TinyNetwork)
        return model

    def optimizer_steps() -> int:
        """AdamW's own step count for the weight (restored by load_state from optimizer.bin)."""
        state = optimizer.state.get(unwrapped().linear.weight, {})
        step = state.get("step", 0)
        return int(step.item() if isinstance(step, torch.Tensor) else step)

    # train_network.py ~1293-1310: save_model / remove_model (weights + metadata).
    def save_model(ckpt_name: str, steps: int, epoch_no: int) -> None:
        os.makedirs(args.output_dir, exist_ok=True)
        ckpt_file = os.path.join(args.output_dir, ckpt_name)
        accelerator.print(f"\nsaving checkpoint: {ckpt_file}")
        model = unwrapped()
        metadata = {
            "ss_training_finished_at": str(time.time()),
            "ss_steps": str(steps),
            "ss_epoch": str(epoch_no),
            "lineage_optimizer_step": str(optimizer_steps()),
            "lineage_pairs": json.dumps(model.pairs()),
        }
        tensors = {
            key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()
        }
        save_file(tensors, ckpt_file, metadata)

    def remove_model(old_ckpt_name: str) -> None:
        old_ckpt_file = os.path.join(args.output_dir, old_ckpt_name)
        if os.path.exists(old_ckpt_file):
            accelerator.print(f"removing old checkpoint: {old_ckpt_file}")
            os.remove(old_ckpt_file)

    def save_state(state_dir: str) -> None:
        faults.arm_save_kill(optimizer_steps())
        accelerator.save_state(state_dir)

    # train_util.save_and_remove_state_stepwise (~5960).
    def save_and_remove_state_stepwise(step_no: int) -> None:
        logger.info("")
        logger.info(f"saving state at step {step_no}")
        os.makedirs(args.output_dir, exist_ok=True)
        save_state(os.path.join(args.output_dir, STEP_STATE_NAME.format(name, step_no)))
        last_n_steps = args.save_last_n_steps_state or args.save_last_n_steps
        if last_n_steps is not None:
            remove_step_no = step_no - last_n_steps - 1
            remove_step_no -= remove_step_no % args.save_every_n_steps
            if remove_step_no > 0:
                old = os.path.join(args.output_dir, STEP_STATE_NAME.format(name, remove_step_no))
                if os.path.exists(old):
                    logger.info(f"removing old state: {old}")
                    shutil.rmtree(old)

    # train_util.save_and_remove_state_on_epoch_end (~5938).
    def save_and_remove_state_on_epoch_end(epoch_no: int) -> None:
        logger.info("")
        logger.info(f"saving state at epoch {epoch_no}")
        os.makedirs(args.output_dir, exist_ok=True)
        save_state(os.path.join(args.output_dir, EPOCH_STATE_NAME.format(name, epoch_no)))
        last_n_epochs = args.save_last_n_epochs_state or args.save_last_n_epochs
        if last_n_epochs is not None:
            remove_epoch_no = epoch_no - args.save_every_n_epochs * last_n_epochs
            old = os.path.join(args.output_dir, EPOCH_STATE_NAME.format(name, remove_epoch_no))
            if os.path.exists(old):
                logger.info(f"removing old state: {old}")
                shutil.rmtree(old)

    # train_util.get_remove_step_no / get_remove_epoch_no (~5786-5806).
    def get_remove_step_no(step_no: int) -> int | None:
        if args.save_last_n_steps is None:
            return None
        remove_step_no = step_no - args.save_last_n_steps - 1
        remove_step_no -= remove_step_no % args.save_every_n_steps
        return None if remove_step_no < 0 else remove_step_no

    def get_remove_epoch_no(epoch_no: int) -> int | None:
        if args.save_last_n_epochs is None:
            return None
        remove_epoch_no = epoch_no - args.save_every_n_epochs * args.save_last_n_epochs
        return None if remove_epoch_no < 0 else remove_epoch_no

    # train_network.py ~1338-1343: with --skip_until_initial_step, drop whole epochs from the
    # step count; global_step becomes the remainder inside the epoch, not an absolute step.
    if initial_step > 0:
        for skip_epoch in range(epoch_to_start):
            logger.info(
                f"skipping epoch {skip_epoch + 1} because initial_step (multiplied) is "
                f"{initial_step}"
            )
            initial_step -= len(train_dataloader)
        global_step = initial_step

    progress_bar = tqdm(
        range(args.max_train_steps - initial_step),
        smoothing=0,
        disable=not accelerator.is_local_main_process,
        desc="steps",
    )
    losses: list[float] = []

    for epoch in range(epoch_to_start, num_train_epochs):
        accelerator.print(f"\nepoch {epoch + 1}/{num_train_epochs}\n")
        current_epoch.value = epoch + 1
        network.train()

        # train_network.py ~1396-1405: skip initial_step - 1 batches, discard one more.
        skipped_dataloader = None
        if initial_step > 0:
            skipped_dataloader = accelerator.skip_first_batches(train_dataloader, initial_step - 1)
            initial_step = 1

        for _step, batch in enumerate(skipped_dataloader or train_dataloader):
            current_step.value = global_step
            if initial_step > 0:
                initial_step -= 1
                continue

            with accelerator.accumulate(network):
                prediction = network(batch["x"])
                loss = nn.functional.mse_loss(prediction.float(), batch["y"].float())
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            time.sleep(step_seconds)

            if accelerator.sync_gradients:
                unwrapped().record(epoch + 1, int(batch["index"].item()))
                progress_bar.update(1)
                global_step += 1

                # train_network.py ~1490-1505: every n steps, model then state, then pruning.
                if (
                    args.save_every_n_steps is not None
                    and global_step % args.save_every_n_steps == 0
                ):
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        save_model(
                            STEP_FILE_NAME.format(name, global_step) + ".safetensors",
                            global_step,
                            epoch,
                        )
                        if args.save_state:
                            save_and_remove_state_stepwise(global_step)
                        remove_step_no = get_remove_step_no(global_step)
                        if remove_step_no is not None:
                            remove_model(
                                STEP_FILE_NAME.format(name, remove_step_no) + ".safetensors"
                            )

                faults.after_step(optimizer_steps())

            losses.append(loss.detach().item())
            progress_bar.set_postfix(avr_loss=sum(losses[-batches:]) / len(losses[-batches:]))

            if global_step >= args.max_train_steps:
                break

        accelerator.wait_for_everyone()
        # train_network.py ~1690-1705: epoch-end model then state, never for the last epoch.
        if args.save_every_n_epochs is not None:
            saving = (epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs
            if accelerator.is_main_process and saving:
                save_model(
                    EPOCH_FILE_NAME.format(name, epoch + 1) + ".safetensors", global_step, epoch + 1
                )
                remove_epoch_no = get_remove_epoch_no(epoch + 1)
                if remove_epoch_no is not None:
                    remove_model(EPOCH_FILE_NAME.format(name, remove_epoch_no) + ".safetensors")
                if args.save_state:
                    save_and_remove_state_on_epoch_end(epoch + 1)

    progress_bar.close()
    accelerator.end_training()

    # train_network.py ~1712-1726: the train-end state first, then the final model.
    if accelerator.is_main_process and (args.save_state or args.save_state_on_train_end):
        logger.info("")
        logger.info("saving last state.")
        os.makedirs(args.output_dir, exist_ok=True)
        save_state(os.path.join(args.output_dir, LAST_STATE_NAME.format(name)))
    if accelerator.is_main_process:
        save_model(name + ".safetensors", global_step, num_train_epochs)
        logger.info("model saved.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
