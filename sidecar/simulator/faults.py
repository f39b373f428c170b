"""Faults the simulated trainer can be told to suffer, so the sidecar meets real failure shapes.

The environment variable ``SIM_FAULTS`` holds a ``;``-separated list of faults. Each entry is::

    KIND[@TRIGGER][:key=value[:key=value...]][:once]

KIND
    ``hang_idle``     stop making progress and sleep with an idle CPU and an idle GPU (a
                      dataloader deadlock as seen from outside, sd-scripts issue 536, but
                      without worker processes: ``hang_dataloader`` has those).
    ``hang_busy``     stop making progress but spin one CPU and report the GPU 100% busy
                      at low power (a hung NCCL collective, FluxGym issue 426); the main
                      thread spins in ``all_reduce`` -> ``wait``.
    ``hang_dataloader`` a multiprocess DataLoader deadlock (sd-scripts issues 536, 1586):
                      the trainer has two real worker processes (FluxGym's
                      ``--max_data_loader_n_workers 2``, started before the first epoch);
                      the main thread waits in ``__next__`` -> ``_next_data`` -> ``_get_data``
                      -> ``_try_get_data`` -> ``get`` for a batch the worker asked for it
                      never delivers (the worker sleeps on a lock). CPU and GPU idle.
    ``hang_cuda_sync`` block swapping stuck on a CUDA stream (sd-scripts'
                      library/custom_offloading_utils.py): the main thread waits in
                      ``wait_for_block`` -> ``_wait_blocks_move`` -> ``result``; the offloader's
                      worker thread spins in ``move_blocks`` -> ``swap_weight_devices`` ->
                      ``swap_weight_devices_cuda`` -> ``synchronize``. GPU 100% busy.
    ``hang_dstate``   the main thread sits in uninterruptible sleep (state D) inside a C
                      call, ``hang_in_vfork`` of the library named by ``SIM_DSTATE_LIBRARY``
                      (built by tests/dstate/build.py); without it the trainer fails before
                      its first step. A vfork child (state S) keeps it there; it dies with
                      the trainer. CPU and GPU idle.
    ``hang_stopped``  the trainer stops itself with SIGSTOP (state T), as a debugger or a
                      cgroup freezer would; SIGCONT lets it go on training.
    ``hang_in_sample`` while sampling, after the "generating sample images at step" line:
                      hang in ``sample_images`` -> ``sample_image_inference`` -> ``denoise``
                      (library/flux_train_utils.py's names) with the GPU busy as in inference.
    ``gpu_lost``      the card falls off the bus: ``error=gpu_lost`` is added to the GPU state
                      file (``SIM_GPU_STATE_FILE``, read by the stand-in NVML library) and
                      the trainer hangs idle.
    ``crash``         print a traceback-like message and exit with ``code`` (default 1).
    ``hang_in_save``  during a state save, hang after ``files`` of its files are written
                      (default 2: ``train_state.json`` and the model weights): a half-written
                      state folder stays behind. sd-scripts saves into an existing folder in
                      place (step-numbered names come round again after a resume), so when
                      the folder existed it is left MIXED: new files beside the old ones.
                      The stack holds ``save_state`` (and ``save_and_remove_state_stepwise``
                      for step saves), as accelerate's and train_util's do.
    ``crash_in_save`` the same point, but the trainer crashes (exit ``code``, default 1).
    ``slow_save``     spend ``seconds`` more on a state save (spread between its files).
    ``slow_start``    spend ``seconds`` more in the silent start-up before step 1.

TRIGGER (at most one; ``step`` and ``save`` are counted within the current run)
    ``step=N``   after global step N has completed and been shown on the progress bar;
                 ``step=0`` fires before the run's first step, leaving the bar at ``0/total``.
                 N is this run's ``global_step``, as in step-numbered names: it restarts at 0
                 after a resume (at the discarded remainder with --skip_until_initial_step).
                 For ``hang_in_sample``: the first sampling at global step N or later.
    ``save=N``   at the Nth state save: ``*_in_save`` fire inside it, ``slow_save``
                 slows only it, the other ``hang_*``, ``gpu_lost`` and ``crash`` fire right
                 after it is complete (``hang_in_sample`` takes no ``save``).
    ``run=N``    only in the Nth run of this output folder (the trainer counts its runs).

Without a trigger, ``hang_*``, ``gpu_lost`` and ``crash`` fire at ``step=0``, ``*_in_save``
in the first save, ``hang_in_sample`` in the run's first sampling, and ``slow_save`` slows
every save.

Options
    ``code=N``      exit status of ``crash`` and ``crash_in_save`` (0-255).
    ``files=N``     for ``*_in_save``: how many of the save's files, in accelerate's order
                    (``train_state.json``, ``model.safetensors``, ``optimizer.bin``,
                    ``scheduler.bin``, ``random_states_0.pkl``), are written first (0-4).
    ``seconds=X``   required by ``slow_save`` and ``slow_start``; with a ``hang_*`` kind the
                    hang ends after X seconds and training goes on (a transient stall).
                    Not for ``hang_dstate``, ``hang_stopped`` and ``gpu_lost``: nothing inside
                    a process in D or T state can end its own hang, and a lost card stays
                    lost.
    ``run=N``       same as the ``run`` trigger, so it can be combined with ``step``/``save``.
    ``once``        only in the first run (shorthand for ``run=1``): lets a test check that
                    the restarted trainer gets past the point where the first one failed.

Examples: ``hang_idle@step=3``, ``crash@step=5:code=137:once``, ``hang_in_save@save=2``,
``slow_save:seconds=2``, ``hang_busy@step=0:run=2``, ``crash_in_save@save=3:files=4``,
``hang_dataloader@step=5:seconds=3``, ``hang_in_sample@step=10:once``, ``gpu_lost@save=1``.

Tests and demos build faults with :class:`Fault` and :func:`format_faults` rather than
writing strings, so a typo fails at construction instead of silently not firing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

FaultKind = Literal[
    "hang_idle",
    "hang_busy",
    "hang_dataloader",
    "hang_cuda_sync",
    "hang_dstate",
    "hang_stopped",
    "hang_in_sample",
    "gpu_lost",
    "crash",
    "hang_in_save",
    "crash_in_save",
    "slow_save",
    "slow_start",
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
_KINDS = ", ".join(FAULT_KINDS)

# Hangs that fire after a step or a save, like crash (not inside a save or a sampling).
_HANG_KINDS = frozenset(
    {"hang_idle", "hang_busy", "hang_dataloader", "hang_cuda_sync", "hang_dstate"}
    | {"hang_stopped", "gpu_lost"}
)
# Nothing inside a process in D or T state can end its own hang; a lost card stays lost.
_ENDLESS_KINDS = frozenset({"hang_dstate", "hang_stopped", "gpu_lost"})
_STOPPING_KINDS = _HANG_KINDS | {"crash"}
_NEEDS_SECONDS = frozenset({"slow_save", "slow_start"})
_TAKES_SECONDS = (
    _NEEDS_SECONDS | (_HANG_KINDS - _ENDLESS_KINDS) | {"hang_in_save", "hang_in_sample"}
)
_IN_SAVE_KINDS = frozenset({"hang_in_save", "crash_in_save"})
_CRASH_KINDS = frozenset({"crash", "crash_in_save"})
_TRIGGER_KEYS = ("step", "save", "run")
_OPTION_KEYS = ("code", "seconds", "run", "files")
# The files of one state save, in the order they are written (accelerate_state.StateSaver).
SAVE_FILE_COUNT = 5
DEFAULT_FILES_BEFORE_FAULT = 2


@dataclass(frozen=True)
class Fault:
    """One fault; construct it directly in Python, or parse it from ``SIM_FAULTS``.

    ``step`` and ``save`` are the trigger (at most one of them); ``run`` and ``once`` limit
    the fault to one run of the trainer.
    """

    kind: FaultKind
    step: int | None = None
    save: int | None = None
    run: int | None = None
    code: int | None = None
    seconds: float | None = None
    once: bool = False
    files: int | None = None

    def __post_init__(self) -> None:
        spec = self._raw_spec()
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"fault {spec!r}: unknown kind {self.kind!r}; expected one of {_KINDS}"
            )
        if self.step is not None and self.save is not None:
            raise ValueError(f"fault {spec!r}: give either step=N or save=N, not both")
        _check_count(spec, "step", self.step, minimum=0)
        _check_count(spec, "save", self.save, minimum=1)
        _check_count(spec, "run", self.run, minimum=1)
        self._check_trigger_fits_kind(spec)
        self._check_options_fit_kind(spec)

    def _check_trigger_fits_kind(self, spec: str) -> None:
        if self.kind in _IN_SAVE_KINDS | {"slow_save"} and self.step is not None:
            raise ValueError(f"fault {spec!r}: {self.kind} is triggered by save=N, not step=N")
        if self.kind == "slow_start" and (self.step is not None or self.save is not None):
            raise ValueError(f"fault {spec!r}: slow_start takes no step/save trigger (only run=N)")
        if self.kind == "hang_in_sample" and self.save is not None:
            raise ValueError(
                f"fault {spec!r}: hang_in_sample is triggered by step=N (the first sampling"
                " at or after global step N), not save=N"
            )

    def _check_options_fit_kind(self, spec: str) -> None:
        if self.code is not None:
            if self.kind not in _CRASH_KINDS:
                raise ValueError(f"fault {spec!r}: code= only applies to crash, crash_in_save")
            if not 0 <= self.code <= 255:
                raise ValueError(f"fault {spec!r}: code={self.code} is not an exit status 0-255")
        if self.seconds is not None:
            if self.kind in _ENDLESS_KINDS:
                raise ValueError(
                    f"fault {spec!r}: seconds= does not apply to {self.kind}: it lasts until"
                    " the trainer is killed"
                )
            if self.kind not in _TAKES_SECONDS:
                raise ValueError(f"fault {spec!r}: seconds= does not apply to {self.kind}")
            if not math.isfinite(self.seconds) or self.seconds < 0:
                raise ValueError(
                    f"fault {spec!r}: seconds={self.seconds} must be a finite number >= 0"
                )
        elif self.kind in _NEEDS_SECONDS:
            raise ValueError(f"fault {spec!r}: {self.kind} needs seconds=X")
        if self.files is not None:
            if self.kind not in _IN_SAVE_KINDS:
                raise ValueError(f"fault {spec!r}: files= only applies to *_in_save")
            _check_count(spec, "files", self.files, minimum=0)
            if self.files >= SAVE_FILE_COUNT:
                raise ValueError(
                    f"fault {spec!r}: files={self.files} must be below {SAVE_FILE_COUNT}"
                    " (a fault after the whole save is save=N on hang_*/crash)"
                )

    def to_spec(self) -> str:
        """The canonical ``SIM_FAULTS`` entry; ``parse_fault(f.to_spec()) == f``."""
        head: str = self.kind
        if self.step is not None:
            head += f"@step={self.step}"
        elif self.save is not None:
            head += f"@save={self.save}"
        elif self.run is not None:
            head += f"@run={self.run}"
        parts = [head]
        if self.run is not None and (self.step is not None or self.save is not None):
            parts.append(f"run={self.run}")
        if self.code is not None:
            parts.append(f"code={self.code}")
        if self.seconds is not None:
            parts.append(f"seconds={self.seconds!r}")  # shortest text that parses back exactly
        if self.files is not None:
            parts.append(f"files={self.files}")
        if self.once:
            parts.append("once")
        return ":".join(parts)

    def _raw_spec(self) -> str:
        # Validation runs before the fields are known to be sane, so to_spec() cannot be
        # trusted yet; this plain rendering only serves error messages.
        fields = {
            "step": self.step,
            "save": self.save,
            "run": self.run,
            "code": self.code,
            "seconds": self.seconds,
            "files": self.files,
        }
        options = [f"{key}={value}" for key, value in fields.items() if value is not None]
        return ":".join([str(self.kind), *options, *(["once"] if self.once else [])])

    def applies_to_run(self, run_number: int) -> bool:
        """Whether this fault is armed in the given run (1 = the first run of the folder)."""
        if self.once and run_number != 1:
            return False
        return self.run is None or self.run == run_number

    @property
    def is_hang(self) -> bool:
        return self.kind in _HANG_KINDS

    @property
    def files_before(self) -> int:
        """For ``*_in_save``: how many of the save's files are written before it fires."""
        return DEFAULT_FILES_BEFORE_FAULT if self.files is None else self.files

    @property
    def fire_step(self) -> int | None:
        """The step after which a hang or crash fires, or None when it waits for a save."""
        if self.kind not in _STOPPING_KINDS:
            return None
        if self.save is not None:
            return None
        return 0 if self.step is None else self.step


def _check_count(spec: str, key: str, value: int | None, *, minimum: int) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < minimum
    ):
        raise ValueError(f"fault {spec!r}: {key}={value!r} must be an integer >= {minimum}")


def parse_faults(text: str) -> list[Fault]:
    """Parse a whole ``SIM_FAULTS`` value; empty entries (``a;;b``, trailing ``;``) are skipped."""
    return [parse_fault(entry) for entry in text.split(";") if entry.strip()]


def parse_fault(entry: str) -> Fault:
    """Parse one ``KIND[@TRIGGER][:key=value...][:once]`` entry; ValueError names the bad part."""
    head, *options = [part.strip() for part in entry.strip().split(":")]
    kind, _, trigger = head.partition("@")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault {entry!r}: unknown kind {kind!r}; expected one of {_KINDS}")
    values: dict[str, int | float] = {}
    once = False
    if trigger:
        key, number = _split_pair(entry, trigger, allowed=_TRIGGER_KEYS, what="trigger")
        values[key] = _parse_int(entry, key, number)
    for option in options:
        if option == "once":
            once = True
            continue
        key, number = _split_pair(entry, option, allowed=_OPTION_KEYS, what="option")
        if key in values:
            raise ValueError(f"fault {entry!r}: {key} is given twice")
        values[key] = (
            _parse_seconds(entry, number) if key == "seconds" else _parse_int(entry, key, number)
        )
    return _build(cast(FaultKind, kind), values, once)


def _build(kind: FaultKind, values: dict[str, int | float], once: bool) -> Fault:
    def integer(key: str) -> int | None:
        value = values.get(key)
        return None if value is None else int(value)

    seconds = values.get("seconds")
    return Fault(
        kind,
        step=integer("step"),
        save=integer("save"),
        run=integer("run"),
        code=integer("code"),
        seconds=None if seconds is None else float(seconds),
        once=once,
        files=integer("files"),
    )


def _split_pair(entry: str, part: str, *, allowed: tuple[str, ...], what: str) -> tuple[str, str]:
    key, separator, value = part.partition("=")
    if not separator or key not in allowed:
        raise ValueError(
            f"fault {entry!r}: bad {what} {part!r}; "
            f"expected one of {', '.join(key + '=N' for key in allowed)}"
        )
    return key, value


def _parse_int(entry: str, key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"fault {entry!r}: {key}={text!r} is not an integer") from None


def _parse_seconds(entry: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"fault {entry!r}: seconds={text!r} is not a number") from None


def format_faults(faults: Iterable[Fault]) -> str:
    """Render faults as one ``SIM_FAULTS`` value."""
    return ";".join(fault.to_spec() for fault in faults)


@dataclass(frozen=True)
class FaultPlan:
    """The faults armed in one run, with the questions the trainer asks at each point."""

    faults: tuple[Fault, ...] = field(default_factory=tuple)

    @classmethod
    def for_run(cls, faults: Iterable[Fault], run_number: int) -> FaultPlan:
        return cls(tuple(fault for fault in faults if fault.applies_to_run(run_number)))

    def startup_delay(self) -> float:
        """Extra silent seconds before step 1 (``slow_start``)."""
        return sum(f.seconds or 0.0 for f in self.faults if f.kind == "slow_start")

    def after_step(self, step: int) -> Fault | None:
        """The hang or crash that fires once global step ``step`` is shown (0 = before any)."""
        return next((f for f in self.faults if f.fire_step == step), None)

    def after_save(self, save_number: int) -> Fault | None:
        """The hang or crash that fires right after the Nth state save is complete."""
        return next(
            (f for f in self.faults if f.kind in _STOPPING_KINDS and f.save == save_number), None
        )

    def in_sampling(self, step: int) -> Fault | None:
        """The ``hang_in_sample`` fault armed for a sampling at global step ``step``, if any.

        It is armed from its step on; the trainer fires it in the first such sampling only.
        """
        return next(
            (f for f in self.faults if f.kind == "hang_in_sample" and (f.step or 0) <= step),
            None,
        )

    def has(self, kind: FaultKind) -> bool:
        """Whether a fault of this kind is armed in this run (set-ups made at start-up)."""
        return any(f.kind == kind for f in self.faults)

    def inside_save(self, save_number: int) -> Fault | None:
        """The ``hang_in_save``/``crash_in_save`` fault for the Nth state save, if any."""
        return next(
            (f for f in self.faults if f.kind in _IN_SAVE_KINDS and (f.save or 1) == save_number),
            None,
        )

    def extra_save_seconds(self, save_number: int) -> float:
        """Extra seconds for the Nth state save (``slow_save``)."""
        return sum(
            f.seconds or 0.0
            for f in self.faults
            if f.kind == "slow_save" and (f.save is None or f.save == save_number)
        )
