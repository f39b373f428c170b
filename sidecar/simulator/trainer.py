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
- ``--resume DIR`` fails like accelerate does on a missing or damaged folder, skips the whole
  epochs already done, and then, as sd-scripts does without ``--skip_until_initial_step``,
  counts steps from 0 again (progress bar, step-numbered names and the next train_state.json).
  The epochs to skip are ``current_step // steps_per_epoch`` from train_state.json, exactly as
  sd-scripts computes them, so resuming from a state written by a resumed run goes back further
  than its ``current_epoch`` says, and a resumed run rewrites any same-named step states left
  by the earlier run. ``--initial_epoch``/``--initial_step`` override the step from
  train_state.json, as in sd-scripts. The bar's total stays ``max_train_steps``, so a resumed
  run ends below 100%.

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
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TextIO

from sidecar.atomic_files import replace_atomically
from sidecar.simulator.faults import Fault, FaultPlan, parse_faults

Sleep = Callable[[float], None]
Clock = Callable[[], float]

# sd-scripts' names when --output_name is absent (train_util.DEFAULT_*_NAME).
_DEFAULT_NAMES = {"step": "at", "epoch": "epoch", "last": "last"}
# What sd-scripts uses when neither --max_train_steps nor --max_train_epochs is given.
_DEFAULT_MAX_TRAIN_STEPS = 1600
_TQDM_BAR_WIDTH = 10  # tqdm's bar width when it writes to a pipe (no terminal size known)
_TQDM_BLOCKS = " ▏▎▍▌▋▊▉█"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Cadence:
    """How fast the simulated training goes; see the module docstring for the variables."""

    steps_per_epoch: int = 4
    step_seconds: float = 0.05
    step_jitter: float = 0.0
    startup_seconds: float = 0.2
    save_seconds: float = 0.0
    sample_seconds: float = 0.1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Cadence:
        defaults = cls()
        steps = int(
            _environ_number(environ, "SIM_STEPS_PER_EPOCH", defaults.steps_per_epoch, integer=True)
        )
        if steps < 1:
            raise ValueError(f"SIM_STEPS_PER_EPOCH must be an integer >= 1, got {steps}")
        return cls(
            steps_per_epoch=steps,
            step_seconds=_environ_number(environ, "SIM_STEP_SECONDS", defaults.step_seconds),
            step_jitter=min(1.0, _environ_number(environ, "SIM_STEP_JITTER", 0.0)),
            startup_seconds=_environ_number(
                environ, "SIM_STARTUP_SECONDS", defaults.startup_seconds
            ),
            save_seconds=_environ_number(environ, "SIM_SAVE_SECONDS", defaults.save_seconds),
            sample_seconds=_environ_number(environ, "SIM_SAMPLE_SECONDS", defaults.sample_seconds),
        )


def _environ_number(
    environ: Mapping[str, str], name: str, default: float, *, integer: bool = False
) -> float:
    """Read one number; the error names the variable and the expected format."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number of seconds"
        raise ValueError(f"{name} must be {kind}, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The flags the simulator acts on; every other flag of train.sh is accepted and ignored."""
    # allow_abbrev=False: an ignored flag such as --save_state_to_huggingface must never be
    # taken for an abbreviation of a flag we know.
    parser = argparse.ArgumentParser(prog="flux_train_network.py", allow_abbrev=False)
    add = parser.add_argument
    add("--output_dir", default=None)
    add("--output_name", default=None)
    add("--max_train_epochs", type=int, default=None)
    add("--max_train_steps", type=int, default=_DEFAULT_MAX_TRAIN_STEPS)
    add("--save_every_n_epochs", type=int, default=None)
    add("--save_every_n_steps", type=int, default=None)
    add("--save_state", action="store_true")
    add("--save_state_on_train_end", action="store_true")
    add("--save_last_n_steps", type=int, default=None)
    add("--save_last_n_steps_state", type=int, default=None)
    add("--save_last_n_epochs_state", type=int, default=None)
    add("--resume", default=None)
    add("--initial_epoch", type=int, default=None)
    add("--initial_step", type=int, default=None)
    add("--sample_prompts", default=None)
    add("--sample_every_n_steps", type=int, default=None)
    add("--sample_every_n_epochs", type=int, default=None)
    add("--sample_at_first", action="store_true")
    add("--pretrained_model_name_or_path", default=None)
    add("--dataset_config", default=None)
    # Several values each; declared so those values are consumed here, not left dangling.
    add("--optimizer_args", nargs="*", default=None)
    add("--network_args", nargs="*", default=None)
    return parser


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, _ignored = parser.parse_known_args(argv)
    if not args.output_dir:
        parser.error("--output_dir is required")
    return args


# --------------------------------------------------------------------------- schedule (pure)


@dataclass(frozen=True)
class TrainingPlan:
    """Step and epoch totals, computed the way sd-scripts computes them."""

    steps_per_epoch: int
    max_train_steps: int
    num_train_epochs: int

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, steps_per_epoch: int) -> TrainingPlan:
        max_steps = args.max_train_steps
        if args.max_train_epochs is not None:  # sd-scripts: epochs override steps
            max_steps = args.max_train_epochs * steps_per_epoch
        return cls(steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch))


def initial_step_for(
    args: argparse.Namespace, steps_from_state: int | None, steps_per_epoch: int
) -> int:
    """The step count to start from: --initial_step/--initial_epoch win over train_state.json."""
    if args.initial_step is not None:
        return int(args.initial_step)
    if args.initial_epoch is not None:
        return (int(args.initial_epoch) - 1) * steps_per_epoch
    return steps_from_state or 0


def first_epoch_index(initial_step: int, plan: TrainingPlan) -> int:
    """Index of the first epoch to train; whole epochs before it are skipped.

    Raises AssertionError, worded like sd-scripts, when nothing would be left to train
    (for instance when resuming from a finished run's final state).
    """
    if initial_step <= 0:
        return 0
    if plan.max_train_steps <= initial_step:
        raise AssertionError(
            "max_train_steps should be greater than initial step: "
            f"{plan.max_train_steps} vs {initial_step}"
        )
    return initial_step // plan.steps_per_epoch


def step_state_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}-state"


def epoch_state_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}-state"


def final_state_name(name: str) -> str:
    return f"{name}-state"


def stale_step_state(step: int, keep_steps: int, every_n_steps: int) -> int | None:
    """The step state sd-scripts removes after saving at ``step``, or None.

    ``--save_last_n_steps_state`` counts steps, not folders: the state saved just over
    ``keep_steps`` steps ago (rounded down to the save cadence) is removed.
    """
    candidate = step - keep_steps - 1
    candidate -= candidate % every_n_steps
    return candidate if candidate > 0 else None


def should_sample(args: argparse.Namespace, step: int, epoch: int | None) -> bool:
    """sd-scripts' rule: per-epoch sampling, when asked for, replaces per-step sampling."""
    if not args.sample_prompts:
        return False
    if step == 0:
        return bool(args.sample_at_first)
    if args.sample_every_n_epochs:
        return epoch is not None and epoch % args.sample_every_n_epochs == 0
    if not args.sample_every_n_steps:
        return False
    return epoch is None and step % args.sample_every_n_steps == 0


# --------------------------------------------------------------------------- progress output


def format_interval(seconds: float) -> str:
    """tqdm's ``[mm:ss]`` / ``[h:mm:ss]`` rendering."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_progress(
    n: int, total: int, elapsed: float, desc: str = "steps", postfix: str = ""
) -> str:
    """One tqdm status line as tqdm draws it into a pipe (10-character unicode bar)."""
    fraction = min(n / total, 1.0) if total else 0.0
    full, partial = divmod(int(fraction * _TQDM_BAR_WIDTH * 8), 8)
    bar = _TQDM_BLOCKS[-1] * full
    if full < _TQDM_BAR_WIDTH:
        bar += _TQDM_BLOCKS[partial] + " " * (_TQDM_BAR_WIDTH - full - 1)
    rate = n / elapsed if n and elapsed > 0 else None
    if rate is None:
        rate_text, remaining_text = "?it/s", "?"
    else:
        rate_text = f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"
        remaining_text = format_interval((total - n) / rate)
    prefix = f"{desc}: " if desc else ""
    extra = f", {postfix}" if postfix else ""
    return (
        f"{prefix}{fraction * 100:3.0f}%|{bar}| {n}/{total} "
        f"[{format_interval(elapsed)}<{remaining_text}, {rate_text}{extra}]"
    )


class Terminal:
    """The trainer's two output streams, flushed after every write like a live trainer's."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout = stdout
        self.stderr = stderr

    def say(self, text: str = "") -> None:
        """A line on stdout, where sd-scripts' ``accelerator.print`` goes."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def log(self, message: str, level: str = "INFO") -> None:
        """A line on stderr, shaped like sd-scripts' rich logging handler writes to a pipe."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.stderr.write(f"{stamp} {level:<8} {message}\n")
        self.stderr.flush()

    def draw(self, text: str) -> None:
        """Raw stderr output (progress bars redraw with a leading carriage return)."""
        self.stderr.write(text)
        self.stderr.flush()


class ProgressBar:
    """A tqdm bar on stderr: redrawn in place with ``\\r`` and no newline until it closes."""

    def __init__(self, terminal: Terminal, total: int, clock: Clock, desc: str = "steps") -> None:
        self._terminal = terminal
        self._total = total
        self._clock = clock
        self._desc = desc
        self._started = clock()
        self._last_length = 0
        self.n = 0
        self.postfix = ""
        self.refresh()

    def update(self, postfix: str | None = None) -> None:
        self.n += 1
        if postfix is not None:
            self.postfix = postfix
        self.refresh()

    def refresh(self) -> None:
        line = format_progress(
            self.n, self._total, self._clock() - self._started, self._desc, self.postfix
        )
        padding = " " * max(self._last_length - len(line), 0)
        self._last_length = len(line)
        self._terminal.draw("\r" + line + padding)

    def close(self) -> None:
        self.refresh()
        self._terminal.draw("\n")


class LossCurve:
    """Plausible, reproducible ``avr_loss`` values: a noisy, slowly falling moving average."""

    def __init__(self, seed: int = 42) -> None:
        self._random = random.Random(seed)
        self._losses: list[float] = []

    def next_average(self) -> float:
        base = 0.45 * math.exp(-len(self._losses) / 400) + 0.3
        self._losses.append(base + self._random.uniform(-0.05, 0.05))
        window = self._losses[-50:]
        return sum(window) / len(window)


# --------------------------------------------------------------------------- GPU stand-in


class GpuActivity(Enum):
    """(utilisation %, power in mW) as NVML would report them for each phase."""

    IDLE = (0, 30_000)  # loading, saving, idle hangs, after exit
    TRAINING = (97, 250_000)  # steps and sample generation
    BUSY_HANG = (100, 60_000)  # a hung collective: "100% busy" at near-idle power


class GpuStateFile:
    """Publishes simulated GPU activity for the stand-in NVML library; no-op without a path."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._current: GpuActivity | None = None

    def show(self, activity: GpuActivity) -> None:
        if self._path is None or activity is self._current:
            return
        utilisation, power_mw = activity.value
        self._path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(self._path, f"util={utilisation}\npower_mw={power_mw}\n")
        self._current = activity


# --------------------------------------------------------------------------- checkpoint files


class SafetensorError(Exception):
    """Raised, like ``safetensors_rust.SafetensorError``, for a damaged .safetensors file."""


def safetensors_bytes(metadata: Mapping[str, str], values: int = 64) -> bytes:
    """A real, tiny safetensors file: one F32 tensor and sd-scripts-like metadata."""
    data = struct.pack(f"<{values}f", *(0.01 * i for i in range(values)))
    header = {
        "__metadata__": dict(metadata),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": {
            "dtype": "F32",
            "shape": [values],
            "data_offsets": [0, len(data)],
        },
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def torch_archive_bytes(stem: str, payload: object) -> bytes:
    """A zip laid out like ``torch.save`` output, so the same structural checks apply."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{stem}/data.pkl", pickle.dumps(payload))
        archive.writestr(f"{stem}/byteorder", "little")
        archive.writestr(f"{stem}/version", "3\n")
    return buffer.getvalue()


def check_safetensors(path: Path) -> None:
    """Cheap structural check: header length, JSON header, tensor data ends at end of file."""
    size = path.stat().st_size  # FileNotFoundError for a missing file, as the loader raises
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorError("Error while deserializing header: HeaderTooSmall")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise SafetensorError("Error while deserializing header: InvalidHeaderLength")
        try:
            header = json.loads(handle.read(header_length))
            data_end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError):
            raise SafetensorError(
                "Error while deserializing header: InvalidHeaderDeserialization"
            ) from None
    if 8 + header_length + data_end != size:
        raise SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")


def check_torch_archive(path: Path) -> None:
    """``torch.load``'s failure modes: missing file, or a zip without its central directory."""
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        with zipfile.ZipFile(path) as archive:
            archive.testzip()
    except zipfile.BadZipFile:
        raise RuntimeError(
            "PytorchStreamReader failed reading zip archive: failed finding central directory"
        ) from None


def write_slowly(path: Path, data: bytes, seconds: float, sleep: Sleep) -> None:
    """Write ``data`` in two halves with a pause between, as a large file grows on disk."""
    with open(path, "wb") as handle:
        middle = len(data) // 2
        handle.write(data[:middle])
        handle.flush()
        if seconds > 0:
            sleep(seconds)
        handle.write(data[middle:])


def write_complete(path: Path, data: bytes) -> None:
    """Write via a temporary file and ``os.replace``, so the name appears only when complete."""
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed before the rename
        "wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def png_bytes() -> bytes:
    """Just enough of a PNG (signature and IEND chunk) for a file-type sniffer."""
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x00IEND\xaeB`\x82"


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


# --------------------------------------------------------------------------- faults in action


class SimulatedCrash(Exception):
    """Unwinds the simulated training to main(), which prints the crash and exits with its code."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.to_spec())
        self.fault = fault


def crash_report(fault: Fault, script: str) -> str:
    """A traceback shaped like a CUDA failure inside sd-scripts' training step."""
    return (
        "Traceback (most recent call last):\n"
        f'  File "{script}", line 519, in <module>\n'
        "    trainer.train(args)\n"
        '  File "train_network.py", line 1230, in train\n'
        "    accelerator.backward(loss)\n"
        "RuntimeError: CUDA error: an illegal memory access was encountered\n"
        f"(simulated by sidecar.simulator: {fault.to_spec()})\n"
    )


class FaultActor:
    """Carries out a hang or crash; hangs last forever unless the fault gives ``seconds``."""

    def __init__(self, gpu: GpuStateFile, sleep: Sleep, clock: Clock) -> None:
        self._gpu = gpu
        self._sleep = sleep
        self._clock = clock

    def suffer(self, fault: Fault) -> None:
        if fault.kind == "crash":
            raise SimulatedCrash(fault)
        if fault.kind == "hang_busy":
            self._gpu.show(GpuActivity.BUSY_HANG)
            self._spin(fault.seconds)
        else:  # hang_idle, hang_in_save
            self._gpu.show(GpuActivity.IDLE)
            self._idle(fault.seconds)

    def _idle(self, seconds: float | None) -> None:
        if seconds is not None:
            self._sleep(seconds)
            return
        while True:
            self._sleep(3600)

    def _spin(self, seconds: float | None) -> None:
        deadline = math.inf if seconds is None else self._clock() + seconds
        while self._clock() < deadline:
            pass  # burn one CPU, like a thread stuck polling a collective


# --------------------------------------------------------------------------- the run


class StateSaver:
    """Writes state folders as ``Accelerator.save_state`` does, with hooks for save faults."""

    def __init__(
        self,
        terminal: Terminal,
        gpu: GpuStateFile,
        plan: FaultPlan,
        actor: FaultActor,
        save_seconds: float,
        sleep: Sleep,
    ) -> None:
        self._terminal = terminal
        self._gpu = gpu
        self._plan = plan
        self._actor = actor
        self._save_seconds = save_seconds
        self._sleep = sleep
        self.saves_done = 0

    def save(self, folder: Path, *, epoch: int, step: int) -> None:
        number = self.saves_done + 1
        pause = (self._save_seconds + self._plan.extra_save_seconds(number)) / 5
        self._gpu.show(GpuActivity.IDLE)
        self._terminal.log(f"Saving current state to {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        # sd-scripts' pre-save hook writes train_state.json before accelerate writes anything.
        (folder / "train_state.json").write_text(
            json.dumps({"current_epoch": epoch, "current_step": step})
        )
        self._sleep_if(pause)
        model = safetensors_bytes({"ss_steps": str(step), "ss_epoch": str(epoch)})
        write_slowly(folder / "model.safetensors", model, pause, self._sleep)
        self._terminal.log(f"Model weights saved in {folder / 'model.safetensors'}")
        hang = self._plan.inside_save(number)
        if hang is not None:
            self._actor.suffer(hang)
        for stem in ("optimizer", "scheduler"):
            archive = torch_archive_bytes(stem, {"state": {}, "step": step})
            write_slowly(folder / f"{stem}.bin", archive, pause, self._sleep)
            self._terminal.log(f"{stem.capitalize()} state saved in {folder / (stem + '.bin')}")
        random_states = pickle.dumps({"random_state": random.getstate(), "step": step})
        write_slowly(folder / "random_states_0.pkl", random_states, pause, self._sleep)
        self._terminal.log(f"Random states saved in {folder / 'random_states_0.pkl'}")
        self.saves_done = number
        after = self._plan.after_save(number)
        if after is not None:
            self._actor.suffer(after)

    def _sleep_if(self, seconds: float) -> None:
        if seconds > 0:
            self._sleep(seconds)


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
        check_safetensors(weights)
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


class SimulatedTraining:
    """One trainer process: start-up, optional resume, the epoch loop, final saves."""

    def __init__(
        self,
        args: argparse.Namespace,
        cadence: Cadence,
        faults: FaultPlan,
        terminal: Terminal,
        gpu: GpuStateFile,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self.args = args
        self.cadence = cadence
        self.faults = faults
        self.terminal = terminal
        self.gpu = gpu
        self.sleep = sleep
        self.clock = clock
        self.plan = TrainingPlan.from_arguments(args, cadence.steps_per_epoch)
        self.output_dir = Path(args.output_dir)
        self.actor = FaultActor(gpu, sleep, clock)
        self.saver = StateSaver(terminal, gpu, faults, self.actor, cadence.save_seconds, sleep)
        self.loss = LossCurve()
        self.global_step = 0
        self.current_epoch = 0

    def name(self, purpose: str) -> str:
        return self.args.output_name or _DEFAULT_NAMES[purpose]

    def run(self) -> None:
        self._start_up()
        steps_from_state = (
            load_state(Path(self.args.resume), self.terminal) if self.args.resume else None
        )
        initial_step = initial_step_for(self.args, steps_from_state, self.plan.steps_per_epoch)
        first_epoch = first_epoch_index(initial_step, self.plan)
        self._sample(step=0, epoch=0)
        bar = ProgressBar(self.terminal, self.plan.max_train_steps, self.clock)
        for epoch in range(first_epoch, self.plan.num_train_epochs):
            self._train_epoch(epoch, bar)
            if self.global_step >= self.plan.max_train_steps:
                break
        bar.close()
        self._finish()

    def _start_up(self) -> None:
        self.gpu.show(GpuActivity.IDLE)
        self.terminal.say("sidecar.simulator: simulated sd-scripts flux_train_network.py")
        if self.args.dataset_config:
            self.terminal.say(f"Loading dataset config from {self.args.dataset_config}")
        model = self.args.pretrained_model_name_or_path
        if model and not os.path.exists(model):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), model)
        self.terminal.say("prepare accelerator")
        self.terminal.say("loading model for process 0/1")
        self.sleep(self.cadence.startup_seconds + self.faults.startup_delay())
        self.terminal.log("caching latents.")
        caching = ProgressBar(self.terminal, self.cadence.steps_per_epoch, self.clock, desc="")
        for _ in range(self.cadence.steps_per_epoch):
            caching.update()
        caching.close()

    def _train_epoch(self, epoch: int, bar: ProgressBar) -> None:
        self.terminal.say(f"\nepoch {epoch + 1}/{self.plan.num_train_epochs}\n")
        self.current_epoch = epoch + 1
        if self.global_step == 0:
            self._suffer_after_step(0)  # "stuck at steps 0%" hangs fire here
        for _ in range(self.plan.steps_per_epoch):
            self.gpu.show(GpuActivity.TRAINING)
            jitter = self.cadence.step_jitter
            self.sleep(self.cadence.step_seconds * random.uniform(1 - jitter, 1 + jitter))
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
        fault = self.faults.after_step(step)
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
        self.terminal.log("")
        self.terminal.log(f"saving state at step {self.global_step}")
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
        self.terminal.log("")
        self.terminal.log(f"saving state at epoch {epoch_number}")
        self._save_state(epoch_state_name(name, epoch_number))
        keep = self.args.save_last_n_epochs_state
        if keep is not None:
            self._remove_state(epoch_state_name(name, epoch_number - every * keep))

    def _finish(self) -> None:
        if self.args.save_state or self.args.save_state_on_train_end:
            self.terminal.log("")
            self.terminal.log("saving last state.")
            self._save_state(final_state_name(self.name("last")))
        final = self.output_dir / f"{self.name('last')}.safetensors"
        self.terminal.say(f"\nsaving checkpoint: {final}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_complete(final, safetensors_bytes(self._metadata(self.plan.num_train_epochs)))
        self.terminal.log("model saved.")
        self.gpu.show(GpuActivity.IDLE)

    def _save_model(self, file_name: str) -> None:
        path = self.output_dir / file_name
        self.gpu.show(GpuActivity.IDLE)
        self.terminal.say(f"\nsaving checkpoint: {path}")
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
            self.terminal.log(f"removing old state: {folder}")
            shutil.rmtree(folder)

    def _sample(self, *, step: int, epoch: int | None) -> None:
        if not should_sample(self.args, step, epoch):
            return
        prompts = _read_prompts(Path(self.args.sample_prompts))
        if prompts is None:
            self.terminal.log(
                f"No prompt file / プロンプトファイルがありません: {self.args.sample_prompts}",
                "ERROR",
            )
            return
        self.terminal.log("")
        self.terminal.log(f"generating sample images at step / サンプル画像生成 ステップ: {step}")
        folder = self.output_dir / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        self.gpu.show(GpuActivity.TRAINING)
        for index, _prompt in enumerate(prompts):
            self.sleep(self.cadence.sample_seconds)
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


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run one simulated training process; returns the exit status.

    Bad ``SIM_*`` settings exit 2 with a message; resume failures propagate as exceptions
    (traceback, exit 1) exactly where the real trainer would raise them.
    """
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    terminal = Terminal(sys.stdout, sys.stderr)
    try:
        cadence = Cadence.from_environ(os.environ)
        faults = parse_faults(os.environ.get("SIM_FAULTS", ""))
    except ValueError as error:
        terminal.draw(f"sidecar.simulator: {error}\n")
        return 2
    gpu_state = os.environ.get("SIM_GPU_STATE_FILE")
    gpu = GpuStateFile(Path(gpu_state) if gpu_state else None)
    run_number = next_run_number(Path(args.output_dir))
    training = SimulatedTraining(
        args, cadence, FaultPlan.for_run(faults, run_number), terminal, gpu
    )
    try:
        training.run()
    except SimulatedCrash as crash:
        terminal.draw("\n" + crash_report(crash.fault, sys.argv[0]))
        return 1 if crash.fault.code is None else crash.fault.code
    finally:
        gpu.show(GpuActivity.IDLE)
    return 0
