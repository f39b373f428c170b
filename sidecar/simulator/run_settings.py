"""What one simulated run is told: trainer flags from train.sh and the ``SIM_*`` cadence.

The variables are documented in :mod:`sidecar.simulator.trainer`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass

# What sd-scripts uses when neither --max_train_steps nor --max_train_epochs is given.
_DEFAULT_MAX_TRAIN_STEPS = 1600


@dataclass(frozen=True)
class SimulatedCadence:
    """How fast the simulated training goes (``SIM_*``; see :mod:`sidecar.simulator.trainer`)."""

    steps_per_epoch: int = 4
    step_seconds: float = 0.05
    step_jitter: float = 0.0
    startup_seconds: float = 0.2
    save_seconds: float = 0.0
    sample_seconds: float = 0.1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SimulatedCadence:
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


def build_trainer_parser() -> argparse.ArgumentParser:
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
    add("--save_last_n_epochs", type=int, default=None)
    add("--save_last_n_epochs_state", type=int, default=None)
    add("--resume", default=None)
    add("--initial_epoch", type=int, default=None)
    add("--initial_step", type=int, default=None)
    add("--skip_until_initial_step", action="store_true")
    add("--sample_prompts", default=None)
    add("--sample_every_n_steps", type=int, default=None)
    add("--sample_every_n_epochs", type=int, default=None)
    add("--sample_at_first", action="store_true")
    # train_network.py: DataLoader(num_workers=min(args.max_data_loader_n_workers,
    # os.cpu_count()), persistent_workers=args.persistent_data_loader_workers); 8 by default.
    add("--max_data_loader_n_workers", type=int, default=8)
    add("--persistent_data_loader_workers", action="store_true")
    add("--pretrained_model_name_or_path", default=None)
    add("--dataset_config", default=None)
    # Several values each; declared so those values are consumed here, not left dangling.
    add("--optimizer_args", nargs="*", default=None)
    add("--network_args", nargs="*", default=None)
    return parser


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = build_trainer_parser()
    args, _ignored = parser.parse_known_args(argv)
    if not args.output_dir:
        parser.error("--output_dir is required")
    return args
