"""One simulated training process: start-up, optional resume, the epoch loop and its saves.

The loop follows sd-scripts' ``train_network.py`` (sd3 == main 48d368f) line for line where
it matters to whoever watches the trainer from outside: the resume position
(:mod:`~sidecar.simulator.resume_position`), ``current_step.value = global_step`` at the top
of every batch (so the pre-save hook's ``current_step.value + 1`` is the step just done),
``global_step += 1`` after each optimizer step, step-numbered saves named by this attempt's
``global_step``, the ``global_step >= max_train_steps`` break inside the batch loop, epoch-end
saves and the train-end state. One process, ``gradient_accumulation_steps`` 1 (FluxGym's
setting): every batch is one optimizer step.

Where a hang's stack matters (see :mod:`~sidecar.simulator.hangs`) the methods carry
upstream's names: train_util's ``save_and_remove_state_stepwise``,
``save_and_remove_state_on_epoch_end`` and ``save_state_on_train_end``, flux_train_utils'
``sample_images`` and ``sample_image_inference``.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from sidecar.simulator.accelerate_state import StateSaver, load_state
from sidecar.simulator.context import TrainerContext
from sidecar.simulator.fault_actor import FaultActor
from sidecar.simulator.faults import Fault
from sidecar.simulator.file_formats import png_bytes, safetensors_bytes, write_complete
from sidecar.simulator.gpu_state import GpuActivity
from sidecar.simulator.hangs import DSTATE_LIBRARY_VARIABLE
from sidecar.simulator.lineage import Lineage, lineage_metadata
from sidecar.simulator.resume_position import ResumePosition, resume_position
from sidecar.simulator.run_settings import SimulatedCadence
from sidecar.simulator.schedule import (
    TrainingPlan,
    epoch_state_name,
    final_state_name,
    should_sample,
    stale_epoch_model,
    stale_step_model,
    stale_step_state,
    step_state_name,
)
from sidecar.simulator.terminal_output import LossCurve, ProgressBar

# sd-scripts' names when --output_name is absent (train_util.DEFAULT_*_NAME).
_DEFAULT_NAMES = {"step": "at", "epoch": "epoch", "last": "last"}


class SimulatedTraining:
    """One trainer process: start-up, optional resume, the epoch loop, final saves."""

    def __init__(
        self,
        args: argparse.Namespace,
        cadence: SimulatedCadence,
        context: TrainerContext,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.args = args
        self.cadence = cadence
        self.context = context
        self.plan = TrainingPlan.from_arguments(args, cadence.steps_per_epoch)
        self.output_dir = Path(args.output_dir)
        gpu_state = environ.get("SIM_GPU_STATE_FILE")
        self.actor = FaultActor(
            context,
            dstate_library=environ.get(DSTATE_LIBRARY_VARIABLE),
            gpu_state_file=Path(gpu_state) if gpu_state else None,
            dataloader_workers=min(args.max_data_loader_n_workers, os.cpu_count() or 1),
        )
        self.saver = StateSaver(context, self.actor, cadence.save_seconds)
        self.loss = LossCurve()
        self.global_step = 0
        self.current_epoch = 0  # sd-scripts' current_epoch.value (1-based)
        self.current_step = 0  # sd-scripts' current_step.value: global_step at the batch's start
        self.lineage: Lineage = []  # the simulated weights: (epoch, batch) pairs trained
        self._sampling_hang_fired = False

    def name(self, purpose: str) -> str:
        return self.args.output_name or _DEFAULT_NAMES[purpose]

    def run(self) -> None:
        self._start_up()
        steps_from_state = None
        if self.args.resume:
            loaded = load_state(Path(self.args.resume), self.context.terminal)
            steps_from_state, self.lineage = loaded.steps_from_state, list(loaded.lineage)
        self._print_running_training()
        log = self.context.terminal.log
        position = resume_position(self.args, steps_from_state, self.plan, log)
        self._sample(step=0, epoch=0)  # "For --sample_at_first", before the skip loop
        for message in position.skipped_epoch_messages():
            self.context.terminal.log(message)
        self.global_step = position.batches_to_discard  # global_step = initial_step
        # tqdm(range(args.max_train_steps - initial_step)): counts from 0, not from global_step
        total = self.plan.max_train_steps - position.batches_to_discard
        bar = ProgressBar(self.context.terminal, total, self.context.clock)
        self.actor.start()  # dataloader workers start with the first epoch's iterator
        try:
            # train_network.py has no break in the epoch loop, only in the batch loop.
            for epoch in range(position.epoch_to_start, self.plan.num_train_epochs):
                first = epoch == position.epoch_to_start
                self._train_epoch(epoch, bar, position, first=first)
            bar.close()
            self._finish()
        finally:
            self.actor.close()

    def _start_up(self) -> None:
        self.context.gpu.show(GpuActivity.IDLE)
        self.context.terminal.say("sidecar.simulator: simulated sd-scripts flux_train_network.py")
        if self.args.dataset_config:
            self.context.terminal.say(f"Loading dataset config from {self.args.dataset_config}")
        model = self.args.pretrained_model_name_or_path
        if model and not os.path.exists(model):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), model)
        self.context.terminal.say("prepare accelerator")
        self.context.terminal.say("loading model for process 0/1")
        self.context.sleep(self.cadence.startup_seconds + self.context.faults.startup_delay())
        self.context.terminal.log("caching latents.")
        caching = ProgressBar(
            self.context.terminal, self.cadence.steps_per_epoch, self.context.clock, desc=""
        )
        for _ in range(self.cadence.steps_per_epoch):
            caching.update()
        caching.close()
        if self.args.max_train_epochs is not None:  # train_network.py, "学習ステップ数を計算する"
            self.context.terminal.say(
                f"override steps. steps for {self.args.max_train_epochs} epochs is / "
                f"指定エポックまでのステップ数: {self.plan.max_train_steps}"
            )

    def _print_running_training(self) -> None:
        """train_network.py's accelerator.print block after the resume ("running training").

        Batch size 1 and no validation or regularisation images: SIM_STEPS_PER_EPOCH stands
        for images x repeats, and gradient accumulation is FluxGym's 1.
        """
        say, batches = self.context.terminal.say, self.plan.steps_per_epoch
        say("running training / 学習開始")
        say(f"  num train images * repeats / 学習画像の数×繰り返し回数: {batches}")
        say("  num validation images * repeats / 学習画像の数×繰り返し回数: 0")
        say("  num reg images / 正則化画像の数: 0")
        say(f"  num batches per epoch / 1epochのバッチ数: {batches}")
        say(f"  num epochs / epoch数: {self.plan.num_train_epochs}")
        say("  batch size per device / バッチサイズ: 1")
        say("  gradient accumulation steps / 勾配を合計するステップ数 = 1")
        say(f"  total optimization steps / 学習ステップ数: {self.plan.max_train_steps}")

    def _train_epoch(
        self, epoch: int, bar: ProgressBar, position: ResumePosition, *, first: bool
    ) -> None:
        self.context.terminal.say(f"\nepoch {epoch + 1}/{self.plan.num_train_epochs}\n")
        self.current_epoch = epoch + 1  # current_epoch.value = epoch + 1
        if first:
            self._suffer_after_step(0)  # "stuck at steps 0%" hangs fire before this run's step 1
        # skip_first_batches(train_dataloader, initial_step - 1) plus one more batch read and
        # dropped by "if initial_step > 0: initial_step -= 1; continue"
        discard = position.batches_to_discard if first else 0
        for batch in range(self.plan.steps_per_epoch):
            self.current_step = self.global_step  # current_step.value = global_step
            if batch < discard:
                continue
            self._train_batch(epoch, batch, bar)
            if self.global_step >= self.plan.max_train_steps:
                break
        self._save_at_epoch_end(epoch + 1)
        self._sample(step=self.global_step, epoch=epoch + 1)

    def _train_batch(self, epoch: int, batch: int, bar: ProgressBar) -> None:
        self.context.gpu.show(GpuActivity.TRAINING)
        jitter = self.cadence.step_jitter
        self.context.sleep(self.cadence.step_seconds * random.uniform(1 - jitter, 1 + jitter))
        self.lineage.append((epoch, batch))  # the optimizer step changed the weights
        bar.update(f"avr_loss={self.loss.next_average():2.3g}")  # progress_bar.update(1)
        self.global_step += 1  # then global_step += 1
        self._suffer_after_step(self.global_step)
        self._sample(step=self.global_step, epoch=None)
        self._save_every_n_steps(epoch)

    def _suffer_after_step(self, step: int) -> None:
        fault = self.context.faults.after_step(step)
        if fault is not None:
            self.actor.suffer(fault)

    def _save_every_n_steps(self, epoch: int) -> None:
        """train_network.py "指定ステップごとにモデルを保存": model, state, old model removed."""
        every = self.args.save_every_n_steps
        if not every or self.global_step % every:
            return
        name = self.name("step")
        # save_model(ckpt_name, ..., global_step, epoch): the 0-based loop epoch as ss_epoch
        self._save_model(f"{name}-step{self.global_step:08d}.safetensors", epoch)
        if self.args.save_state:
            self.save_and_remove_state_stepwise(name, every)
        old_model = stale_step_model(self.global_step, self.args.save_last_n_steps, every)
        if old_model is not None:
            self._remove_model(f"{name}-step{old_model:08d}.safetensors")

    def save_and_remove_state_stepwise(self, name: str, every: int) -> None:
        """train_util.save_and_remove_state_stepwise: the step state, then a stale one removed."""
        self.context.terminal.log("")
        self.context.terminal.log(
            f"saving state at step {self.global_step}", source="train_util.py:5964"
        )
        self._save_state(step_state_name(name, self.global_step))
        keep = self.args.save_last_n_steps_state or self.args.save_last_n_steps
        stale = stale_step_state(self.global_step, keep, every) if keep is not None else None
        if stale is not None:
            self._remove_state(step_state_name(name, stale))

    def _save_at_epoch_end(self, epoch_number: int) -> None:
        """train_network.py "指定エポックごとにモデルを保存": model, old model removed, state."""
        every = self.args.save_every_n_epochs
        if not every or epoch_number % every or epoch_number >= self.plan.num_train_epochs:
            return
        name = self.name("epoch")
        self._save_model(f"{name}-{epoch_number:06d}.safetensors", epoch_number)
        old_model = stale_epoch_model(epoch_number, self.args.save_last_n_epochs, every)
        if old_model is not None:
            self._remove_model(f"{name}-{old_model:06d}.safetensors")
        if self.args.save_state:
            self.save_and_remove_state_on_epoch_end(name, epoch_number, every)

    def save_and_remove_state_on_epoch_end(self, name: str, epoch_number: int, every: int) -> None:
        """train_util.save_and_remove_state_on_epoch_end: the epoch state, a stale one removed."""
        self.context.terminal.log("")
        self.context.terminal.log(
            f"saving state at epoch {epoch_number}", source="train_util.py:5942"
        )
        self._save_state(epoch_state_name(name, epoch_number))
        keep = self.args.save_last_n_epochs_state or self.args.save_last_n_epochs
        if keep is not None:
            self._remove_state(epoch_state_name(name, epoch_number - every * keep))

    def save_state_on_train_end(self) -> None:
        """train_util.save_state_on_train_end."""
        self.context.terminal.log("")
        self.context.terminal.log("saving last state.", source="train_util.py:5990")
        self._save_state(final_state_name(self.name("last")))

    def _finish(self) -> None:
        if self.args.save_state or self.args.save_state_on_train_end:
            self.save_state_on_train_end()
        final = self.output_dir / f"{self.name('last')}.safetensors"
        self.context.terminal.say(f"\nsaving checkpoint: {final}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_complete(final, safetensors_bytes(self._metadata(self.plan.num_train_epochs)))
        self.context.terminal.log("model saved.", source="train_network.py:1729")
        self.context.gpu.show(GpuActivity.IDLE)

    def _save_model(self, file_name: str, epoch: int) -> None:
        path = self.output_dir / file_name
        self.context.gpu.show(GpuActivity.IDLE)
        self.context.terminal.say(f"\nsaving checkpoint: {path}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(safetensors_bytes(self._metadata(epoch)))

    def _remove_model(self, file_name: str) -> None:
        path = self.output_dir / file_name  # train_network.py remove_model
        if path.exists():
            self.context.terminal.say(f"removing old checkpoint: {path}")
            path.unlink()

    def _metadata(self, epoch: int) -> dict[str, str]:
        return {
            "ss_steps": str(self.global_step),
            "ss_epoch": str(epoch),
            "ss_training_finished_at": str(time.time()),
            **lineage_metadata(self.lineage),
        }

    def _save_state(self, folder_name: str) -> None:
        # the pre-save hook writes current_epoch.value and current_step.value + 1
        self.saver.save(
            self.output_dir / folder_name,
            epoch=self.current_epoch,
            step=self.current_step + 1,
            lineage=self.lineage,
        )

    def _remove_state(self, folder_name: str) -> None:
        folder = self.output_dir / folder_name
        if folder.exists():
            self.context.terminal.log(f"removing old state: {folder}")
            shutil.rmtree(folder)

    def _sample(self, *, step: int, epoch: int | None) -> None:
        self.sample_images(step, epoch)

    def sample_images(self, step: int, epoch: int | None) -> None:
        """flux_train_utils.sample_images: decide, log, then one inference per prompt."""
        if not should_sample(self.args, step, epoch):
            return
        prompts = _read_prompts(Path(self.args.sample_prompts))
        if prompts is None:
            self.context.terminal.log(
                f"No prompt file / プロンプトファイルがありません: {self.args.sample_prompts}",
                "ERROR",
            )
            return
        self.context.terminal.log("", source="flux_train_utils.py:60")
        self.context.terminal.log(
            f"generating sample images at step / サンプル画像生成 ステップ: {step}",
            source="flux_train_utils.py:61",
        )
        folder = self.output_dir / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        self.context.gpu.show(GpuActivity.TRAINING)
        hang = None if self._sampling_hang_fired else self.context.faults.in_sampling(step)
        for index, _prompt in enumerate(prompts):
            self.sample_image_inference(folder / f"{self.name('step')}_{suffix}_{index:02d}", hang)
            hang = None

    def sample_image_inference(self, stem: Path, hang: Fault | None) -> None:
        """flux_train_utils.sample_image_inference: render a prompt, save ``<stem>_<time>.png``."""
        if hang is not None:
            self._sampling_hang_fired = True
            self.actor.suffer(hang)
        self.context.sleep(self.cadence.sample_seconds)
        stamp = time.strftime("%Y%m%d%H%M%S")
        stem.with_name(f"{stem.name}_{stamp}.png").write_bytes(png_bytes())


def _read_prompts(path: Path) -> list[str] | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
