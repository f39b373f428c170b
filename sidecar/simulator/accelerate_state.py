"""State folders as ``Accelerator.save_state`` writes them and ``load_state`` rejects them."""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.simulator.context import TrainerContext
from sidecar.simulator.fault_actor import FaultActor
from sidecar.simulator.faults import SAVE_FILE_COUNT
from sidecar.simulator.file_formats import (
    check_safetensors_loadable,
    check_torch_archive,
    safetensors_bytes,
    torch_archive_bytes,
    write_slowly,
)
from sidecar.simulator.gpu_state import GpuActivity
from sidecar.simulator.lineage import Lineage, lineage_metadata, read_lineage
from sidecar.simulator.terminal_output import Terminal


class StateSaver:
    """Writes state folders as ``Accelerator.save_state`` does, with hooks for save faults.

    accelerate's ``save_state`` (1.6, which sd-scripts pins) calls ``os.makedirs(output_dir,
    exist_ok=True)``, runs the pre-hooks (sd-scripts' ``save_model_hook`` in train_network.py
    writes ``train_state.json``), then writes the model, optimizer, scheduler and finally
    ``random_states_0.pkl``, each file opened for writing where it is. An existing folder (a
    step-numbered name come round again after a resume) is therefore overwritten file by file:
    a fault part-way leaves new files beside the previous save's.
    """

    def __init__(self, context: TrainerContext, actor: FaultActor, save_seconds: float) -> None:
        self._context = context
        self._actor = actor
        self._save_seconds = save_seconds
        self.saves_done = 0

    def save(self, folder: Path, *, epoch: int, step: int, lineage: Lineage) -> None:
        """Save one state; ``step`` is what the pre-hook writes (``current_step.value + 1``).

        A fault that fires after the save is complete does so outside :meth:`save_state`,
        so a stack taken during that hang does not show a save in progress.
        """
        self.save_state(folder, epoch=epoch, step=step, lineage=lineage)
        after = self._context.faults.after_save(self.saves_done)
        if after is not None:
            self._actor.suffer(after)

    def save_state(self, folder: Path, *, epoch: int, step: int, lineage: Lineage) -> None:
        """``Accelerator.save_state``'s work, in a frame of that name (a hang inside a save
        shows ``save_state`` in py-spy's stack, as the real one does)."""
        terminal, faults = self._context.terminal, self._context.faults
        number = self.saves_done + 1
        pause = (self._save_seconds + faults.extra_save_seconds(number)) / SAVE_FILE_COUNT
        self._context.gpu.show(GpuActivity.IDLE)
        terminal.log(f"Saving current state to {folder}", source="accelerator.py:3241")
        folder.mkdir(parents=True, exist_ok=True)  # accelerate: os.makedirs(..., exist_ok=True)
        inside = faults.inside_save(number)
        for index, write in enumerate(self._writers(folder, epoch, step, lineage, pause)):
            if inside is not None and index == inside.files_before:
                self._actor.suffer(inside)
            write()
        self.saves_done = number

    def _writers(
        self, folder: Path, epoch: int, step: int, lineage: Lineage, pause: float
    ) -> list[Callable[[], None]]:
        """One callable per file, in accelerate's order (SAVE_FILE_COUNT of them)."""
        terminal, sleep = self._context.terminal, self._context.sleep

        def train_state() -> None:
            # train_network.py save_model_hook: logs, then json.dump of current_epoch.value and
            # current_step.value + 1 into train_state.json (the first file of the folder).
            path = folder / "train_state.json"
            terminal.log(
                f"save train state to {path} at epoch {epoch} step {step}",
                source="train_network.py:946",
            )
            path.write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
            if pause > 0:
                sleep(pause)

        def model() -> None:
            metadata = {"ss_steps": str(step), "ss_epoch": str(epoch), **lineage_metadata(lineage)}
            write_slowly(folder / "model.safetensors", safetensors_bytes(metadata), pause, sleep)
            terminal.log(f"Model weights saved in {folder / 'model.safetensors'}")

        def archive(stem: str) -> Callable[[], None]:
            def write() -> None:
                # Like Adam's state["step"] and the scheduler's last_epoch, the count of
                # optimizer steps survives resumes: it is the lineage's length.
                payload = {"state": {}, "step": step, "optimizer_steps": len(lineage)}
                data = torch_archive_bytes(stem, payload)
                write_slowly(folder / f"{stem}.bin", data, pause, sleep)
                terminal.log(f"{stem.capitalize()} state saved in {folder / (stem + '.bin')}")

            return write

        def random_states() -> None:
            data = pickle.dumps({"random_state": random.getstate(), "step": step})
            write_slowly(folder / "random_states_0.pkl", data, pause, sleep)
            terminal.log(f"Random states saved in {folder / 'random_states_0.pkl'}")

        return [train_state, model, archive("optimizer"), archive("scheduler"), random_states]


@dataclass(frozen=True)
class LoadedState:
    """What ``--resume`` brings back: sd-scripts' ``steps_from_state`` and the weights' lineage."""

    steps_from_state: int | None
    lineage: Lineage


def load_state(folder: Path, terminal: Terminal) -> LoadedState:
    """Check a state folder the way ``Accelerator.load_state`` would fail on it.

    Returns ``current_step`` from train_state.json (None when that file is absent, which
    sd-scripts tolerates) and the lineage of the weights. Missing or damaged
    weights/optimizer/scheduler raise; unreadable random states are only logged, as
    accelerate does.
    """
    # train_util.resume_from_local_or_hf_if_specified logs this, then accelerator.load_state.
    terminal.log(f"resume training from local state: {folder}", source="train_util.py:4777")
    if not folder.is_dir():
        raise ValueError(f"Tried to find {folder} but folder does not exist")
    terminal.log(f"Loading states from {folder}")
    # accelerate runs the load pre-hooks (sd-scripts' load_model_hook reads train_state.json)
    # before it loads any file.
    train_state = _read_train_state(folder / "train_state.json", terminal)
    weights = folder / "model.safetensors"
    lineage: Lineage = []
    if weights.exists():
        check_safetensors_loadable(weights)
        lineage = read_lineage(weights)
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
    # "resuming from ..." is the simulator's own summary line (no sd-scripts counterpart).
    if train_state is None:
        terminal.say(f"resuming from {folder} (no train_state.json)")
        return LoadedState(None, lineage)
    epoch, step = train_state
    terminal.say(f"resuming from {folder} (epoch {epoch}, step {step})")
    return LoadedState(step, lineage)


def _read_train_state(path: Path, terminal: Terminal) -> tuple[int, int] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    terminal.log(f"load train state from {path}: {data}", source="train_network.py:969")
    return int(data["current_epoch"]), int(data["current_step"])
