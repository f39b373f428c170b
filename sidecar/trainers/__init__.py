"""What each trainer does its own way, one package per trainer, behind one seam.

The core (observe, checkpoints, decide, recover, run, surface) knows no trainer. It asks a
:class:`~sidecar.trainers.base.Trainer` for what differs, and this package finds the one
named in the settings. Adding a trainer is one new package here, ``sidecar/trainers/<name>/``,
whose ``__init__`` exposes one object satisfying ``Trainer``:

- ``name``: what ``trainer_named`` finds it by;
- ``state_naming(output_name)``: a :class:`~sidecar.checkpoints.naming.StateNaming` that
  reads its state folder names (accelerate's file set is shared, in ``sidecar.checkpoints``);
- ``step_bar(text)``: its step counter among its console output, read with the one tqdm
  parser in ``sidecar.observe.progress``;
- ``read_launch_script``, ``rewritten_launch_script``, ``rewrite_launch_script``,
  ``add_save_state`` and ``launch_script_diff``: its launch script dialect, and resuming it
  from a state folder
  (errors as a subclass of :class:`~sidecar.trainers.base.LaunchScriptError`);

and one line in ``_TRAINERS`` below.
"""

from __future__ import annotations

from sidecar.trainers.base import LaunchCommand, LaunchScriptError, Trainer
from sidecar.trainers.sd_scripts import SD_SCRIPTS

__all__ = [
    "LaunchCommand",
    "LaunchScriptError",
    "Trainer",
    "trainer_named",
    "trainer_names",
]

_TRAINERS: dict[str, Trainer] = {trainer.name: trainer for trainer in (SD_SCRIPTS,)}


def trainer_named(name: str) -> Trainer:
    """The trainer called ``name``; a KeyError listing the known ones otherwise."""
    try:
        return _TRAINERS[name]
    except KeyError:
        known = ", ".join(sorted(_TRAINERS))
        raise KeyError(f"unknown trainer {name!r}; known: {known}") from None


def trainer_names() -> tuple[str, ...]:
    """The names ``trainer_named`` knows, sorted."""
    return tuple(sorted(_TRAINERS))
