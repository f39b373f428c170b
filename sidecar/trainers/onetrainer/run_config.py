"""The few settings of a OneTrainer run the sidecar needs, as ``scripts/train.py`` builds them.

``scripts/train.py`` (``main``) starts from ``TrainConfig.default_values()``, applies the
``--preset-path`` JSON, then the ``--config-path`` JSON, then each ``--config-value
KEY=VALUE`` in order (a bool is true for ``true``/``1``/``yes``, any case). The defaults
below are ``TrainConfig.default_values``' own. Pure, except :func:`read_run_config`, which
opens the JSON files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunConfig", "RunConfigError", "overrides", "read_run_config", "run_config"]

# TrainConfig.default_values (modules/util/config/TrainConfig.py).
DEFAULTS: Mapping[str, Any] = {
    "workspace_dir": "workspace/run",
    "output_model_destination": "models/model.safetensors",
    "continue_last_backup": False,
    "backup_after": 30,
    "backup_after_unit": "MINUTE",
    "rolling_backup": False,
    "rolling_backup_count": 3,
    "backup_before_save": True,
}
_TRUE = ("true", "1", "yes")  # scripts/train.py main, for a bool --config-value


class RunConfigError(ValueError):
    """A config file the command names cannot be read; the message names it."""


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it backs up (the trainer's view of paths)."""

    workspace_dir: str
    output_model_destination: str
    continue_last_backup: bool
    backup_after: float
    backup_after_unit: str  # TimeUnit: STEP, EPOCH, SECOND, MINUTE, HOUR, NEVER, ALWAYS
    rolling_backup: bool
    rolling_backup_count: int
    backup_before_save: bool

    def backup_every_steps(self, steps_per_epoch: int | None) -> int | None:
        """Steps between two backups (TimedActionMixin.repeating_action_needed); None
        when backups are timed, off, or the epoch length is not known."""
        every = int(self.backup_after)
        if every <= 0:
            return None
        if self.backup_after_unit == "STEP":
            return every
        if self.backup_after_unit == "EPOCH" and steps_per_epoch:
            return every * steps_per_epoch
        return None


def overrides(config_values: Sequence[str]) -> dict[str, str]:
    """The ``--config-value`` overrides of top-level keys, the last of each key winning."""
    found: dict[str, str] = {}
    for config_value in config_values:
        key, _, value = config_value.partition("=")
        if "." not in key:
            found[key] = value
    return found


def run_config(layers: Sequence[Mapping[str, Any]], config_values: Sequence[str]) -> RunConfig:
    """The run's settings from the JSON files (preset first) and the command's overrides."""
    merged: dict[str, Any] = dict(DEFAULTS)
    for layer in layers:
        merged.update({key: layer[key] for key in DEFAULTS if key in layer})
    for key, value in overrides(config_values).items():
        if key in DEFAULTS:
            merged[key] = _typed(key, value)
    return RunConfig(
        workspace_dir=str(merged["workspace_dir"]),
        output_model_destination=str(merged["output_model_destination"]),
        continue_last_backup=bool(merged["continue_last_backup"]),
        backup_after=float(merged["backup_after"]),
        backup_after_unit=str(merged["backup_after_unit"]),
        rolling_backup=bool(merged["rolling_backup"]),
        rolling_backup_count=int(merged["rolling_backup_count"]),
        backup_before_save=bool(merged["backup_before_save"]),
    )


def read_run_config(
    config_path: str,
    preset_path: str | None,
    config_values: Sequence[str],
    sidecar_path: Callable[[str], Path],
) -> RunConfig:
    """:func:`run_config` of the files the command names, opened where the sidecar sees them."""
    layers = [_read_json(sidecar_path(path)) for path in (preset_path, config_path) if path]
    return run_config(layers, config_values)


def _typed(key: str, value: str) -> Any:
    default = DEFAULTS[key]
    if isinstance(default, bool):
        return value.lower() in _TRUE
    if isinstance(default, int):
        try:
            return float(value) if key == "backup_after" else int(value)
        except ValueError:
            return default  # OneTrainer's from_dict would refuse it at launch
    return value


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise RunConfigError(f"OneTrainer config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunConfigError(f"OneTrainer config {path} cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise RunConfigError(f"OneTrainer config {path} is not a JSON object")
    return data
