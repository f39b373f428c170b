"""The TOML the kohya_ss GUI hands sd-scripts as ``--config_file``, read as sd-scripts reads it.

The GUI (bmaltais/kohya_ss ``kohya_gui/lora_gui.py`` ``train_model``) writes almost every
setting into ``<output_dir>/config_lora-<YYYYmmdd-HHMMSS>.toml`` and starts
``accelerate launch ... sd-scripts/<x>_train_network.py --config_file <that file>`` plus the
user's "additional parameters". So ``--output_dir``, ``--save_state`` or ``--max_train_steps``
are usually nowhere on the command line, and the sidecar must read them from the file.

sd-scripts (kohya-ss/sd-scripts ``library/train_util.py`` ``read_config_from_file``):

- parses the command line first, then appends ``.toml`` to ``--config_file`` unless it ends
  so, and opens it relative to the trainer's working directory;
- flattens one level: a top-level ``key = value`` is kept as it is, and the keys of each
  table (``[section]``) are lifted to the top, a later one replacing an earlier one;
- builds ``argparse.Namespace(**flattened)`` and parses the command line again *into* it.
  argparse fills in a default only for a destination the namespace does not already have
  (CPython ``argparse.ArgumentParser.parse_known_args``), and then sets whatever the command
  line gives. So the command line beats the TOML and the TOML beats the parser's defaults.
  A ``store_true`` flag the TOML sets cannot be turned off from the command line, and a TOML
  value is never passed through the option's ``type`` (``"100"`` stays a string).

Everything here but :func:`read_config_text` is pure.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from sidecar.trainers.base import LaunchScriptError
from sidecar.trainers.shell.trainer_command import TrainCommand, find_option

__all__ = [
    "CONFIG_FILE",
    "SIDECAR_OPTIONS",
    "ConfigFileError",
    "config_path",
    "effective_command",
    "effective_options",
    "flattened_config",
    "read_config_text",
]

CONFIG_FILE = "--config_file"

Kind = Literal["str", "int", "flag"]


@dataclass(frozen=True)
class Option:
    kind: Kind
    default: object = None


# The options the sidecar acts on, with the type and default sd-scripts' argparse gives them
# (library/train_util.py add_training_arguments / add_sd_saving_arguments; train_network.py
# setup_parser for the position flags). Only these are typed and defaulted; every other key
# of the TOML comes back exactly as the file has it.
SIDECAR_OPTIONS: Mapping[str, Option] = {
    "output_dir": Option("str"),
    "output_name": Option("str"),
    "resume": Option("str"),
    "save_state": Option("flag", False),
    "save_state_on_train_end": Option("flag", False),
    "save_every_n_steps": Option("int"),
    "save_every_n_epochs": Option("int"),
    "save_last_n_steps": Option("int"),
    "save_last_n_epochs": Option("int"),
    "save_last_n_steps_state": Option("int"),
    "save_last_n_epochs_state": Option("int"),
    "max_train_steps": Option("int", 1600),
    "max_train_epochs": Option("int"),
    "train_batch_size": Option("int", 1),
    "gradient_accumulation_steps": Option("int", 1),
    "initial_step": Option("int"),
    "initial_epoch": Option("int"),
    "skip_until_initial_step": Option("flag", False),
    "logging_dir": Option("str"),
    "dataset_config": Option("str"),
    "save_model_as": Option("str"),
}


class ConfigFileError(LaunchScriptError):
    """The ``--config_file`` TOML cannot be read or holds a value of the wrong type."""


def config_path(command_args: Sequence[str], workdir: str | None = None) -> str | None:
    """The file sd-scripts opens for ``--config_file`` (last one wins, as in argparse), or None.

    ``.toml`` is appended unless the value ends with it; a relative value is joined to
    ``workdir`` (the trainer's working directory) when that is known.
    """
    found = find_option(command_args, CONFIG_FILE)
    if not found or not found[-1].value:
        return None
    value = found[-1].value
    path = value if value.endswith(".toml") else value + ".toml"
    if workdir and not PurePosixPath(path).is_absolute():
        path = str(PurePosixPath(workdir) / path)
    return path


def read_config_text(path: str | Path) -> str:
    """The TOML's text (UTF-8, as sd-scripts opens it); ConfigFileError naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as error:
        # sd-scripts logs "<path> not found." and exits 1: the run never started from it.
        raise ConfigFileError(f"{path}: --config_file not found") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: cannot read --config_file ({error})") from error


def flattened_config(toml_text: str, *, source: str = "--config_file") -> dict[str, object]:
    """The TOML's keys as sd-scripts sees them: one level of tables lifted to the top.

    ``source`` names the file in errors. A file that does not parse raises ConfigFileError
    naming the file, the line and the key on that line.
    """
    try:
        parsed = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(_parse_error(source, toml_text, error)) from error
    flat: dict[str, object] = {}
    for name, value in parsed.items():
        if isinstance(value, dict):
            flat.update(value)  # a later table replaces an earlier key, as in sd-scripts
        else:
            flat[name] = value
    return flat


def effective_options(
    command_args: Sequence[str], toml_text: str, *, source: str = "--config_file"
) -> dict[str, object]:
    """Every option sd-scripts ends up with, as far as the sidecar needs them.

    ``command_args``: the trainer's arguments (after the ``*.py`` word). Returns the TOML's
    flattened keys, with the :data:`SIDECAR_OPTIONS` among them replaced by the command
    line's value where it gives one, converted to their type (``int``, ``str``, ``bool`` for
    a flag), and filled with sd-scripts' default where neither gives one. Other command-line
    options are not merged: their type is only known to sd-scripts' parser.
    """
    values = flattened_config(toml_text, source=source)
    values.pop("config_file", None)  # set again from the command line by sd-scripts
    for name, option in SIDECAR_OPTIONS.items():
        found = find_option(command_args, f"--{name}")
        if found:
            values[name] = _from_command_line(name, option, found[-1].value)
        elif name in values:
            values[name] = _from_toml(name, option, values[name], source)
        else:
            values[name] = option.default
    return values


def effective_command(
    command: TrainCommand, toml_text: str, *, source: str = "--config_file"
) -> TrainCommand:
    """``command`` as if the TOML's options were written on its command line, before its own.

    ``option`` (last one wins) and ``has_option`` then answer as sd-scripts would: the
    command line beats the TOML. A TOML ``true`` becomes a bare flag, ``false`` nothing, a
    list its items after the flag, a table deeper than sd-scripts lifts nothing. For reading
    only: the launch script to edit is still the captured command line itself.
    """
    values = flattened_config(toml_text, source=source)
    words: list[str] = []
    for name, value in values.items():
        if name == "config_file" or isinstance(value, dict):
            continue
        flag = f"--{name}"
        if isinstance(value, bool):
            words.extend([flag] if value else [])
        elif isinstance(value, list):
            words.extend([flag, *(str(item) for item in value)])
        else:
            words.append(f"{flag}={value}")
    return TrainCommand(
        trainer_script=command.trainer_script,
        launcher_args=command.launcher_args,
        trainer_args=(*words, *command.trainer_args),
        unknown_values=command.unknown_values,
    )


def _from_command_line(name: str, option: Option, value: str) -> object:
    if option.kind == "flag":
        return True
    if option.kind == "int":
        try:
            return int(value)
        except ValueError as error:
            raise ConfigFileError(
                f"command line: --{name} {value!r} is not a whole number"
            ) from error
    return value


def _from_toml(name: str, option: Option, value: object, source: str) -> object:
    expected = {"str": str, "int": int, "flag": bool}[option.kind]
    # bool is an int in Python; a TOML `true` where sd-scripts expects a count is an error.
    if isinstance(value, expected) and not (option.kind == "int" and isinstance(value, bool)):
        return value
    shown = {"str": "a string", "int": "a whole number", "flag": "true or false"}[option.kind]
    raise ConfigFileError(
        f"{source}: key `{name}` = {value!r} should be {shown}; sd-scripts would use it "
        "as it is (it does not convert TOML values), so fix it in the file"
    )


def _parse_error(source: str, text: str, error: tomllib.TOMLDecodeError) -> str:
    # tomllib ends its message with "(at line N, column M)"; name the key that line sets.
    message = str(error)
    line_number = _line_of_error(message)
    key = ""
    if line_number is not None:
        lines = text.splitlines()
        if 0 < line_number <= len(lines):
            line = lines[line_number - 1]
            name, equals, _ = line.partition("=")
            if equals and name.strip():
                key = f", key `{name.strip()}`"
    where = f"line {line_number}{key}: " if line_number is not None else ""
    return f"{source}: {where}not valid TOML ({message})"


def _line_of_error(message: str) -> int | None:
    marker = "(at line "
    at = message.rfind(marker)
    if at < 0:
        return None
    digits = message[at + len(marker) :].split(",", 1)[0]
    return int(digits) if digits.isdigit() else None
