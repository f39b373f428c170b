"""State folders as ``Accelerator.save_state`` writes them and ``load_state`` rejects them."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

from sidecar.simulator.context import TrainerContext
from sidecar.simulator.fault_actor import FaultActor
from sidecar.simulator.file_formats import (
    check_safetensors_loadable,
    check_torch_archive,
    safetensors_bytes,
    torch_archive_bytes,
    write_slowly,
)
from sidecar.simulator.gpu_state import GpuActivity
from sidecar.simulator.terminal_output import Terminal


class StateSaver:
    """Writes state folders as ``Accelerator.save_state`` does, with hooks for save faults."""

    def __init__(self, context: TrainerContext, actor: FaultActor, save_seconds: float) -> None:
        self._context = context
        self._actor = actor
        self._save_seconds = save_seconds
        self.saves_done = 0

    def save(self, folder: Path, *, epoch: int, step: int) -> None:
        terminal, faults, sleep = self._context.terminal, self._context.faults, self._context.sleep
        number = self.saves_done + 1
        pause = (self._save_seconds + faults.extra_save_seconds(number)) / 5
        self._context.gpu.show(GpuActivity.IDLE)
        terminal.log(f"Saving current state to {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        # sd-scripts' pre-save hook writes train_state.json before accelerate writes anything.
        (folder / "train_state.json").write_text(
            json.dumps({"current_epoch": epoch, "current_step": step})
        )
        self._sleep_if(pause)
        model = safetensors_bytes({"ss_steps": str(step), "ss_epoch": str(epoch)})
        write_slowly(folder / "model.safetensors", model, pause, sleep)
        terminal.log(f"Model weights saved in {folder / 'model.safetensors'}")
        hang = faults.inside_save(number)
        if hang is not None:
            self._actor.suffer(hang)
        for stem in ("optimizer", "scheduler"):
            archive = torch_archive_bytes(stem, {"state": {}, "step": step})
            write_slowly(folder / f"{stem}.bin", archive, pause, sleep)
            terminal.log(f"{stem.capitalize()} state saved in {folder / (stem + '.bin')}")
        random_states = pickle.dumps({"random_state": random.getstate(), "step": step})
        write_slowly(folder / "random_states_0.pkl", random_states, pause, sleep)
        terminal.log(f"Random states saved in {folder / 'random_states_0.pkl'}")
        self.saves_done = number
        after = faults.after_save(number)
        if after is not None:
            self._actor.suffer(after)

    def _sleep_if(self, seconds: float) -> None:
        if seconds > 0:
            self._context.sleep(seconds)


def load_state(folder: Path, terminal: Terminal) -> int | None:
    """Check a state folder the way ``Accelerator.load_state`` would fail on it.

    Returns ``current_step`` from train_state.json (None when that file is absent, which
    sd-scripts tolerates). Missing or damaged weights/optimizer/scheduler raise; unreadable
    random states are only logged, as accelerate does.
    """
    terminal.log(f"resume training from local state: {folder}")
    if not folder.is_dir():
        raise ValueError(f"Tried to find {folder} but folder does not exist")
    terminal.log(f"Loading states from {folder}")
    train_state = _read_train_state(folder / "train_state.json", terminal)
    weights = folder / "model.safetensors"
    if weights.exists():
        check_safetensors_loadable(weights)
    else:
        check_torch_archive(folder / "pytorch_model.bin")
    terminal.log("All model weights loaded successfully")
    check_torch_archive(folder / "optimizer.bin")
    terminal.log("All optimizer states loaded successfully")
    check_torch_archive(folder / "scheduler.bin")
    terminal.log("All scheduler states loaded successfully")
    try:
        pickle.loads((folder / "random_states_0.pkl").read_bytes())
        terminal.log("All random states loaded successfully")
    except (OSError, EOFError, ValueError, pickle.UnpicklingError):
        terminal.log("Could not load random states")
    if train_state is None:
        terminal.say(f"resuming from {folder} (no train_state.json)")
        return None
    epoch, step = train_state
    terminal.say(f"resuming from {folder} (epoch {epoch}, step {step})")
    return step


def _read_train_state(path: Path, terminal: Terminal) -> tuple[int, int] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    terminal.log(f"load train state from {path}: {data}")
    return int(data["current_epoch"]), int(data["current_step"])
