"""What each trainer does its own way, one package per trainer, behind one seam.

The core (observe, checkpoints, decide, recover, run, surface) knows no trainer. It asks a
:class:`~sidecar.trainers.base.Trainer` for what differs, and this package finds the one
named in the settings (``SIDECAR_TRAINER``), or the one that recognises the launch command
(``auto``). Adding a trainer is one new package here, ``sidecar/trainers/<name>/``, whose
``__init__`` exposes one object satisfying ``Trainer`` (its docstrings say what each method
answers), and one line in ``_TRAINERS`` below. Reading and editing the launch script's
command is shared (``trainers.shell``); what its options mean is the trainer's.
"""

from __future__ import annotations

from sidecar.trainers.ai_toolkit import AI_TOOLKIT
from sidecar.trainers.base import LaunchCommand, LaunchScriptError, Trainer
from sidecar.trainers.diffusers import DIFFUSERS
from sidecar.trainers.hf_trainer import HF_TRAINER
from sidecar.trainers.onetrainer import ONETRAINER
from sidecar.trainers.sd_scripts import SD_SCRIPTS

__all__ = [
    "AUTO",
    "LaunchCommand",
    "LaunchScriptError",
    "Trainer",
    "UnknownTrainer",
    "detect_trainer",
    "trainer_for",
    "trainer_named",
    "trainer_names",
]

AUTO = "auto"

_TRAINERS: dict[str, Trainer] = {
    trainer.name: trainer for trainer in (SD_SCRIPTS, HF_TRAINER, DIFFUSERS, AI_TOOLKIT, ONETRAINER)
}


class UnknownTrainer(LaunchScriptError):
    """No trainer (or more than one) recognises the launch command; the message names
    ``SIDECAR_TRAINER`` and the values it takes."""


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


def detect_trainer(command: LaunchCommand) -> Trainer:
    """The one trainer that recognises ``command``; UnknownTrainer otherwise."""
    found = [trainer for trainer in _TRAINERS.values() if trainer.recognises(command)]
    if len(found) == 1:
        return found[0]
    shown = " ".join(command.words)
    values = ", ".join((AUTO, *trainer_names()))
    if not found:
        raise UnknownTrainer(
            f"no supported trainer recognises `{_shorten(shown)}`; set SIDECAR_TRAINER to the "
            f"trainer it runs (one of: {values})"
        )
    names = ", ".join(trainer.name for trainer in found)
    raise UnknownTrainer(
        f"`{_shorten(shown)}` reads like more than one trainer ({names}); set SIDECAR_TRAINER "
        f"to the one it runs (one of: {values})"
    )


def trainer_for(setting: str, command: LaunchCommand) -> Trainer:
    """The trainer ``SIDECAR_TRAINER`` names, or (``auto``) the one ``command`` starts."""
    if setting == AUTO:
        return detect_trainer(command)
    try:
        return trainer_named(setting)
    except KeyError:
        values = ", ".join((AUTO, *trainer_names()))
        raise UnknownTrainer(
            f"SIDECAR_TRAINER={setting!r} is not a supported trainer; expected one of: {values}"
        ) from None


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
