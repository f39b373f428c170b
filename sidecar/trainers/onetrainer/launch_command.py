"""OneTrainer's command line in a launch script, and the one edit the sidecar makes to it.

``python scripts/train.py --config-path <config.json> [--config-value KEY=VALUE ...]``
(``scripts/train.py``, ``modules/util/args/TrainArgs.parse_args``: ``--config-path`` is
required; ``--preset-path``, ``--secrets-path``, ``--callback-path``, ``--command-path``;
``--config-value`` may repeat and is applied in order after the JSON files).

OneTrainer has no option that names a backup to resume from: ``continue_last_backup`` makes
``GenericTrainer.start`` take the newest-named folder in ``<workspace>/backup``. So the
sidecar's lever is ``--config-value continue_last_backup=true`` (false to start over), and
the backup it chose is made the newest by setting aside what sorts after it
(``backup_rules.picked_before``). Every other ``--config-value`` is the user's and is kept,
in place and in order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sidecar.trainers.base import LaunchCommand

# The shared editor's splicing, reused for one occurrence of a repeatable option (its own
# set_option keeps exactly one occurrence of a flag, which would drop the user's overrides).
from sidecar.trainers.shell.train_script import (
    TrainCommand,
    TrainScriptError,
    insert_trainer_argument,
    option_spans,
    parse_train_script,
    quote_word,
    remove_span,
)
from sidecar.trainers.shell.trainer_command import find_option, locate

__all__ = [
    "CONFIG_VALUE",
    "CONTINUE_KEY",
    "OneTrainerCommand",
    "OneTrainerScriptError",
    "as_onetrainer_command",
    "is_onetrainer",
    "read_command",
    "set_config_value",
    "without_config_value",
]

CONFIG_VALUE = "--config-value"
CONTINUE_KEY = "continue_last_backup"
_TRUE = ("true", "1", "yes")  # scripts/train.py main


class OneTrainerScriptError(TrainScriptError):
    """The launch script's OneTrainer command cannot be read or safely edited."""


@dataclass(frozen=True)
class OneTrainerCommand(TrainCommand):
    """A OneTrainer command: the shared reader's words plus what its options mean."""

    @property
    def config_path(self) -> str | None:
        return self.option("config-path")

    @property
    def preset_path(self) -> str | None:
        return self.option("preset-path")

    @property
    def config_values(self) -> tuple[str, ...]:
        """Every ``--config-value``'s KEY=VALUE, in the order OneTrainer applies them."""
        return tuple(found.value for found in find_option(self.trainer_args, CONFIG_VALUE))

    @property
    def continues_last_backup(self) -> bool | None:
        """What the last ``--config-value continue_last_backup=`` says; None: none does
        (the config file decides)."""
        said = [value for key, value in self._overrides() if key == CONTINUE_KEY]
        return said[-1].lower() in _TRUE if said else None

    @property
    def resume(self) -> str | None:
        return None  # OneTrainer's command names no backup (see the module's docstring)

    @property
    def output_dir(self) -> str | None:
        return None  # in the config file: OneTrainer.run_location reads it

    @property
    def output_name(self) -> str | None:
        return None

    @property
    def save_state(self) -> bool:
        return True  # every backup is resumable state (backup_after, in the config)

    def _overrides(self) -> list[tuple[str, str]]:
        return [(key, value) for key, _, value in (v.partition("=") for v in self.config_values)]


def is_onetrainer(command: LaunchCommand) -> bool:
    """Whether ``command`` runs OneTrainer's ``scripts/train.py``: that script, with the
    ``--config-path`` it requires and without Hydra's ``--config-name`` (Hydra applications
    take a ``--config-path`` too)."""
    parts = command.trainer_script.replace("\\", "/").split("/")
    if parts[-2:] != ["scripts", "train.py"]:
        return False
    return command.option("--config-path") is not None and command.option("--config-name") is None


def read_command(text: str) -> OneTrainerCommand:
    """The OneTrainer command in the launch script ``text``."""
    try:
        base = parse_train_script(text)
    except TrainScriptError as error:
        raise OneTrainerScriptError(str(error)) from None
    command = as_onetrainer_command(base)
    if not command.config_path:
        raise OneTrainerScriptError(
            f"`{command.trainer_script}` has no --config-path <config.json>; OneTrainer's "
            "scripts/train.py requires one (the run's settings and workspace are in it)"
        )
    return command


def as_onetrainer_command(command: TrainCommand) -> OneTrainerCommand:
    """The shared reader's ``command`` with OneTrainer's reading of its options."""
    fields = {field.name: getattr(command, field.name) for field in dataclasses.fields(command)}
    return OneTrainerCommand(**fields)


def set_config_value(text: str, key: str, value: str) -> str:
    """``text`` with exactly one ``--config-value key=value`` (the first occurrence of that
    key replaced where it stands, later ones removed; else added as the first trainer
    argument); every other ``--config-value`` stays. Unchanged text when it already says so."""
    located = locate(text)
    spans = [span for span in option_spans(located, CONFIG_VALUE) if _key(span.value) == key]
    wanted = f"{key}={value}"
    argument = f"{CONFIG_VALUE} {quote_word(wanted, what=f'value of {key}')}"
    if not spans:
        rewritten = insert_trainer_argument(text, located.script.word.end, argument)
    else:
        rewritten = text
        for extra in reversed(spans[1:]):
            rewritten = remove_span(rewritten, extra)
        first = spans[0]
        if first.value != wanted:
            rewritten = rewritten[: first.start] + argument + rewritten[first.end :]
    if rewritten != text:
        _verify(text, rewritten, key, expected=[wanted])
    return rewritten


def without_config_value(text: str, key: str) -> str:
    """``text`` without any ``--config-value key=...``; the other overrides stay."""
    located = locate(text)
    rewritten = text
    for span in reversed(option_spans(located, CONFIG_VALUE)):
        if _key(span.value) == key:
            rewritten = remove_span(rewritten, span)
    if rewritten != text:
        _verify(text, rewritten, key, expected=[])
    return rewritten


def _key(config_value: str) -> str:
    return config_value.partition("=")[0]


def _verify(before_text: str, after_text: str, key: str, *, expected: list[str]) -> None:
    # As the shared editor does: read the result again, and only ``key``'s override may differ.
    before, after = locate(before_text).command, locate(after_text).command
    said = [v for v in _values(after) if _key(v) == key]
    unchanged = (
        after.launcher_args == before.launcher_args
        and after.trainer_script == before.trainer_script
        and _others(after, key) == _others(before, key)
    )
    if said != expected or not unchanged:
        raise OneTrainerScriptError(
            f"internal error: editing the launch script would change more than its "
            f"--config-value {key}; refusing to write it"
        )


def _values(command: TrainCommand) -> list[str]:
    return [found.value for found in find_option(command.trainer_args, CONFIG_VALUE)]


def _others(command: TrainCommand, key: str) -> tuple[str, ...]:
    """The trainer's arguments without ``key``'s overrides."""
    dropped: set[int] = set()
    for found in find_option(command.trainer_args, CONFIG_VALUE):
        if _key(found.value) == key:
            dropped.update(range(found.first, found.last + 1))
    return tuple(w for i, w in enumerate(command.trainer_args) if i not in dropped)
