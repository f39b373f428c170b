"""The HF Trainer's launch commands and their resume lever, one dialect per front end.

- A TrainingArguments script (``python|torchrun|accelerate launch train.py`` or ``-m pkg``,
  TRL's scripts included): ``--resume_from_checkpoint <dir>`` and ``--output_dir``
  (``HfArgumentParser`` accepts the hyphen spelling too: ``hf_argparser._parse_dataclass_field``
  adds ``--resume-from-checkpoint``). A script reads the field itself
  (``trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)``, as the examples'
  ``run_clm.py`` does; without it they fall back to ``get_last_checkpoint``).
- Axolotl's click CLI, ``axolotl train cfg.yml``: options are the config's fields spelled
  with hyphens (``cli/utils.add_options_from_config``: ``--{name.replace('_', '-')}``), so
  ``--resume-from-checkpoint <dir>`` and ``--output-dir``; click does not accept the
  underscore spelling. The older fire entry, ``-m axolotl.cli.train cfg.yml``, takes
  ``--resume_from_checkpoint`` (fire reads either spelling).
- LLaMA-Factory, ``llamafactory-cli train cfg.yaml key=value ...``: ``cli.main`` pops the
  subcommand; ``hparams/parser.read_args`` then reads ``argv[1]`` as the config when it ends
  in ``.yaml``/``.yml``/``.json`` and the rest with ``OmegaConf.from_cli`` (dotlist
  ``key=value`` overrides, merged over the file): ``resume_from_checkpoint=<dir>`` after the
  config. Without a config file it is a TrainingArguments command line.

Where the output folder is in the config file only, it is read from there (the command's
own override wins, as in both merges).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from sidecar.trainers.base import LaunchCommand, LaunchScriptError
from sidecar.trainers.shell.train_script import (
    TrainCommand,
    parse_train_script,
    quote_word,
    remove_option,
    set_option,
)
from sidecar.trainers.shell.trainer_command import find_option, locate

__all__ = [
    "Dialect",
    "HfLaunchError",
    "HfTrainerCommand",
    "as_hf_command",
    "config_value",
    "dialect_of",
    "read_command",
    "with_resume",
]

RESUME_KEY = "resume_from_checkpoint"
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class HfLaunchError(LaunchScriptError):
    """A launch script the hf-trainer support cannot read or edit; the message says where."""


@dataclass(frozen=True)
class Dialect:
    """How one front end spells the options the sidecar reads and writes."""

    name: str
    resume_flags: tuple[str, ...]  # every spelling it accepts; the first is written
    output_flags: tuple[str, ...]
    config: str | None = None  # its config file (the trainer's view), where it has one
    key_value: bool = False  # overrides are ``key=value`` words after the config


_ARGUMENTS = ("--resume_from_checkpoint", "--resume-from-checkpoint")
_OUTPUT = ("--output_dir", "--output-dir")


def dialect_of(command: TrainCommand) -> Dialect:
    script = command.trainer_script
    config = next((arg for arg in command.trainer_args if arg.endswith(_CONFIG_SUFFIXES)), None)
    if script == "axolotl train":
        return Dialect("axolotl", ("--resume-from-checkpoint",), ("--output-dir",), config)
    if script.startswith("axolotl.cli"):
        return Dialect("axolotl-fire", _ARGUMENTS, _OUTPUT, config)
    if _is_llamafactory(command):
        first = _first_llamafactory_arg(command)
        if first is not None and first.endswith(_CONFIG_SUFFIXES):
            return Dialect("llamafactory", (), (), first, key_value=True)
        return Dialect("llamafactory-arguments", _ARGUMENTS, _OUTPUT)
    return Dialect("arguments", _ARGUMENTS, _OUTPUT)


def _is_llamafactory(command: TrainCommand) -> bool:
    script = command.trainer_script.replace("\\", "/")
    return (
        script == "llamafactory-cli train"
        or script in ("llamafactory.cli", "llamafactory.launcher")
        or script.endswith("llamafactory/launcher.py")
    )


def _first_llamafactory_arg(command: TrainCommand) -> str | None:
    args = list(command.trainer_args)
    if command.trainer_script == "llamafactory.cli":
        if not args or args[0] != "train":
            return None
        args = args[1:]
    return args[0] if args else None


@dataclass(frozen=True)
class HfTrainerCommand(TrainCommand):
    """A TrainCommand whose resume and output options are read in its front end's dialect."""

    @property
    def dialect(self) -> Dialect:
        return dialect_of(self)

    @property
    def resume(self) -> str | None:
        dialect = self.dialect
        if dialect.key_value:
            return _key_value(self.trainer_args, RESUME_KEY)
        return _last_option(self, dialect.resume_flags)

    @property
    def output_dir(self) -> str | None:
        dialect = self.dialect
        if dialect.key_value:
            return _key_value(self.trainer_args, "output_dir")
        return _last_option(self, dialect.output_flags)

    @property
    def output_name(self) -> str | None:
        return None  # checkpoint-<N> carries no run name

    @property
    def save_state(self) -> bool:
        # Every checkpoint holds the optimizer, scheduler and RNG state unless the run says
        # otherwise (TrainingArguments.save_only_model, save_strategy "no").
        strategy = self.option("save_strategy") or self.option("save-strategy")
        only_model = self.option("save_only_model")
        return strategy != "no" and only_model not in ("", "true", "True", "1")


def read_command(text: str) -> HfTrainerCommand:
    """The launch script's trainer command, read in its front end's dialect."""
    try:
        command = parse_train_script(text)
    except LaunchScriptError as error:
        raise HfLaunchError(str(error)) from error
    return as_hf_command(command)


def as_hf_command(command: LaunchCommand) -> HfTrainerCommand:
    """``command`` (read by the shared shell reader) read in its front end's dialect."""
    if isinstance(command, HfTrainerCommand):
        return command
    assert isinstance(command, TrainCommand), "the shell reader's command is expected"
    values = {field.name: getattr(command, field.name) for field in fields(command)}
    return HfTrainerCommand(**values)


def with_resume(text: str, resume_from: str | None) -> str:
    """``text`` resuming from ``resume_from`` (None: not resuming), every other byte kept."""
    command = read_command(text)
    dialect = command.dialect
    if resume_from is not None and (not resume_from or resume_from.startswith("-")):
        raise HfLaunchError(f"checkpoint path {resume_from!r} cannot be passed to the trainer")
    try:
        if dialect.key_value:
            assert dialect.config is not None
            return _set_key_value(text, RESUME_KEY, resume_from, after=dialect.config)
        written, *others = dialect.resume_flags
        for other in others:
            if find_option(command.trainer_args, other):
                text = remove_option(text, other)
        if resume_from is None:
            return remove_option(text, written) if command.has_option(written) else text
        if command.trainer_script == "llamafactory.cli" and not command.has_option(written):
            raise HfLaunchError(
                "`python -m llamafactory.cli train` without a config file: add "
                f"{written} <dir> yourself, or launch it as `llamafactory-cli train cfg.yaml`"
            )
        return set_option(text, written, resume_from)
    except HfLaunchError:
        raise
    except LaunchScriptError as error:
        raise HfLaunchError(str(error)) from error


def config_value(
    command: HfTrainerCommand, key: str, sidecar_path: Callable[[str], Path]
) -> tuple[str | None, str | None]:
    """(``key``'s value in the command's config file, why it cannot be read); (None, None)
    when the command has no config file or the file does not set it."""
    config = command.dialect.config
    if config is None:
        return None, None
    path = sidecar_path(config)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as error:
        return None, f"config file {path} cannot be read ({error.strerror or error})"
    try:
        import yaml  # PyYAML: JSON is YAML too

        data = yaml.safe_load(raw)
    except ImportError:
        return None, "PyYAML is not installed, so the config file cannot be read"
    except yaml.YAMLError as error:
        return None, f"config file {path} is not valid YAML ({error})"
    value = data.get(key) if isinstance(data, dict) else None
    return (str(value) if value is not None else None), None


def _last_option(command: TrainCommand, flags: tuple[str, ...]) -> str | None:
    found = [(o.first, o.value) for flag in flags for o in find_option(command.trainer_args, flag)]
    return max(found)[1] if found else None


def _key_value(args: tuple[str, ...], key: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(key + "=")]
    return values[-1] if values else None


def _set_key_value(text: str, key: str, value: str | None, *, after: str) -> str:
    """``text`` with exactly one ``key=value`` override (none when ``value`` is None): an
    existing one replaced where it stands, else one added right after the config file."""
    located = locate(text)
    args = located.args
    at = [i for i, arg in enumerate(args) if arg.text.startswith(key + "=")]
    for index in at:
        if not args[index].single or not args[index].word.literal:
            raise HfLaunchError(
                f"{key}= comes from an expansion, where the sidecar cannot edit it; write it "
                "literally on the trainer command"
            )
    replacement = None if value is None else f"{key}={quote_word(value, what='checkpoint path')}"
    rewritten = text
    keep_first = replacement is not None and bool(at)
    for index in reversed(at[1:] if keep_first else at):
        previous_end = (located.script if index == 0 else args[index - 1]).word.end
        word = args[index].word
        rewritten = rewritten[:previous_end] + rewritten[word.end :]
    if keep_first and replacement is not None:
        word = args[at[0]].word
        if args[at[0]].text != f"{key}={value}":
            rewritten = rewritten[: word.start] + replacement + rewritten[word.end :]
    elif replacement is not None:
        config_at = next((i for i, arg in enumerate(args) if arg.text == after), None)
        if config_at is None:
            raise HfLaunchError(f"the config file {after} is not a word of its own")
        end = args[config_at].word.end
        rewritten = f"{rewritten[:end]} {replacement}{rewritten[end:]}"
    if rewritten != text:
        _verify(located.command, rewritten, key, value)
    return rewritten


def _verify(before: TrainCommand, rewritten: str, key: str, value: str | None) -> None:
    # As the shell editor does: read the result again; only the override may have changed.
    after = locate(rewritten).command
    mine = [arg for arg in after.trainer_args if arg.startswith(key + "=")]
    expected = [] if value is None else [f"{key}={value}"]

    def rest(command: TrainCommand) -> list[str]:
        return [arg for arg in command.trainer_args if not arg.startswith(key + "=")]

    if (
        mine != expected
        or rest(after) != rest(before)
        or after.launcher_args != before.launcher_args
        or after.trainer_script != before.trainer_script
    ):
        raise HfLaunchError(
            f"internal error: editing the launch script would change more than its {key}; "
            "refusing to write it"
        )
