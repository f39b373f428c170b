"""One simulated training process: start-up, optional resume, the epoch loop and its saves."""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import time
from pathlib import Path

from sidecar.simulator.accelerate_state import StateSaver, load_state
from sidecar.simulator.context import TrainerContext
from sidecar.simulator.fault_actor import FaultActor
from sidecar.simulator.file_formats import png_bytes, safetensors_bytes, write_complete
from sidecar.simulator.gpu_state import GpuActivity
from sidecar.simulator.run_settings import SimulatedCadence
from sidecar.simulator.schedule import (
    TrainingPlan,
    epoch_state_name,
    final_state_name,
    first_epoch_index,
    initial_step_for,
    should_sample,
    stale_step_state,
    step_state_name,
)
from sidecar.simulator.terminal_output import LossCurve, ProgressBar

# sd-scripts' names when --output_name is absent (train_util.DEFAULT_*_NAME).
_DEFAULT_NAMES = {"step": "at", "epoch": "epoch", "last": "last"}


class SimulatedTraining:
    """One trainer process: start-up, optional resume, the epoch loop, final saves."""

    def __init__(
        self, args: argparse.Namespace, cadence: SimulatedCadence, context: TrainerContext
    ) -> None:
        self.args = args
        self.cadence = cadence
        self.context = context
        self.plan = TrainingPlan.from_arguments(args, cadence.steps_per_epoch)
        self.output_dir = Path(args.output_dir)
        self.actor = FaultActor(context)
        self.saver = StateSaver(context, self.actor, cadence.save_seconds)
        self.loss = LossCurve()
        self.global_step = 0
        self.current_epoch = 0

    def name(self, purpose: str) -> str:
        return self.args.output_name or _DEFAULT_NAMES[purpose]

    def run(self) -> None:
        self._start_up()
        steps_from_state = (
            load_state(Path(self.args.resume), self.context.terminal) if self.args.resume else None
        )
        initial_step = initial_step_for(self.args, steps_from_state, self.plan.steps_per_epoch)
        first_epoch = first_epoch_index(initial_step, self.plan)
        self._sample(step=0, epoch=0)
        bar = ProgressBar(self.context.terminal, self.plan.max_train_steps, self.context.clock)
        for epoch in range(first_epoch, self.plan.num_train_epochs):
            self._train_epoch(epoch, bar)
            if self.global_step >= self.plan.max_train_steps:
                break
        bar.close()
        self._finish()

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

    def _train_epoch(self, epoch: int, bar: ProgressBar) -> None:
        self.context.terminal.say(f"\nepoch {epoch + 1}/{self.plan.num_train_epochs}\n")
        self.current_epoch = epoch + 1
        if self.global_step == 0:
            self._suffer_after_step(0)  # "stuck at steps 0%" hangs fire here
        for _ in range(self.plan.steps_per_epoch):
            self.context.gpu.show(GpuActivity.TRAINING)
            jitter = self.cadence.step_jitter
            self.context.sleep(self.cadence.step_seconds * random.uniform(1 - jitter, 1 + jitter))
            self.global_step += 1
            bar.update(f"avr_loss={self.loss.next_average():2.3g}")
            self._suffer_after_step(self.global_step)
            self._sample(step=self.global_step, epoch=None)
            self._save_every_n_steps()
            if self.global_step >= self.plan.max_train_steps:
                break
        self._save_at_epoch_end(epoch + 1)
        self._sample(step=self.global_step, epoch=epoch + 1)

    def _suffer_after_step(self, step: int) -> None:
        fault = self.context.faults.after_step(step)
        if fault is not None:
            self.actor.suffer(fault)

    def _save_every_n_steps(self) -> None:
        every = self.args.save_every_n_steps
        if not every or self.global_step % every:
            return
        name = self.name("step")
        self._save_model(f"{name}-step{self.global_step:08d}.safetensors")
        if not self.args.save_state:
            return
        self.context.terminal.log("")
        self.context.terminal.log(f"saving state at step {self.global_step}")
        self._save_state(step_state_name(name, self.global_step))
        keep = self.args.save_last_n_steps_state or self.args.save_last_n_steps
        stale = stale_step_state(self.global_step, keep, every) if keep is not None else None
        if stale is not None:
            self._remove_state(step_state_name(name, stale))

    def _save_at_epoch_end(self, epoch_number: int) -> None:
        every = self.args.save_every_n_epochs
        if not every or epoch_number % every or epoch_number >= self.plan.num_train_epochs:
            return
        name = self.name("epoch")
        self._save_model(f"{name}-{epoch_number:06d}.safetensors")
        if not self.args.save_state:
            return
        self.context.terminal.log("")
        self.context.terminal.log(f"saving state at epoch {epoch_number}")
        self._save_state(epoch_state_name(name, epoch_number))
        keep = self.args.save_last_n_epochs_state
        if keep is not None:
            self._remove_state(epoch_state_name(name, epoch_number - every * keep))

    def _finish(self) -> None:
        if self.args.save_state or self.args.save_state_on_train_end:
            self.context.terminal.log("")
            self.context.terminal.log("saving last state.")
            self._save_state(final_state_name(self.name("last")))
        final = self.output_dir / f"{self.name('last')}.safetensors"
        self.context.terminal.say(f"\nsaving checkpoint: {final}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_complete(final, safetensors_bytes(self._metadata(self.plan.num_train_epochs)))
        self.context.terminal.log("model saved.")
        self.context.gpu.show(GpuActivity.IDLE)

    def _save_model(self, file_name: str) -> None:
        path = self.output_dir / file_name
        self.context.gpu.show(GpuActivity.IDLE)
        self.context.terminal.say(f"\nsaving checkpoint: {path}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(safetensors_bytes(self._metadata(self.current_epoch)))

    def _metadata(self, epoch: int) -> dict[str, str]:
        return {
            "ss_steps": str(self.global_step),
            "ss_epoch": str(epoch),
            "ss_training_finished_at": str(time.time()),
        }

    def _save_state(self, folder_name: str) -> None:
        self.saver.save(
            self.output_dir / folder_name, epoch=self.current_epoch, step=self.global_step
        )

    def _remove_state(self, folder_name: str) -> None:
        folder = self.output_dir / folder_name
        if folder.exists():
            self.context.terminal.log(f"removing old state: {folder}")
            shutil.rmtree(folder)

    def _sample(self, *, step: int, epoch: int | None) -> None:
        if not should_sample(self.args, step, epoch):
            return
        prompts = _read_prompts(Path(self.args.sample_prompts))
        if prompts is None:
            self.context.terminal.log(
                f"No prompt file / プロンプトファイルがありません: {self.args.sample_prompts}",
                "ERROR",
            )
            return
        self.context.terminal.log("")
        self.context.terminal.log(
            f"generating sample images at step / サンプル画像生成 ステップ: {step}"
        )
        folder = self.output_dir / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        self.context.gpu.show(GpuActivity.TRAINING)
        for index, _prompt in enumerate(prompts):
            self.context.sleep(self.cadence.sample_seconds)
            stamp = time.strftime("%Y%m%d%H%M%S")
            (folder / f"{self.name('step')}_{suffix}_{index:02d}_{stamp}.png").write_bytes(
                png_bytes()
            )


def _read_prompts(path: Path) -> list[str] | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
