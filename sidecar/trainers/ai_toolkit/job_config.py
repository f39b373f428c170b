"""The job config an ai-toolkit command runs: which file, and what in it the sidecar needs.

``python run.py <config> [-n NAME] [-l LOG] [-r]`` (ai-toolkit ``run.py``, ``main``) runs each
config file in turn. ``toolkit/config.py`` ``get_config`` finds a config by trying
``<toolkit root>/config/<arg><ext>`` for ``.json .jsonc .yaml .yml`` (only when
``config/<arg>`` itself is absent), then ``<arg>`` as a path from the working directory;
it replaces ``${VAR}`` from the environment, then ``[name]`` with ``--name`` (or
``config.name``) (``preprocess_config``). A process's name is ``process[0].name`` or the job's
``config.name`` (``jobs/process/BaseProcess.py``), and its saves go to
``<training_folder>/<name>`` (``BaseTrainProcess.__init__``: ``save_root``), where
``training_folder`` is the process's own or the job's. ``SaveConfig`` and ``TrainConfig``
(``toolkit/config_modules.py``) give the defaults below.

Pure parsing here (text in, :class:`JobConfig` out); :func:`load_job_config` does the reading.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.trainers.base import LaunchScriptError

__all__ = [
    "CONFIG_SUFFIXES",
    "DEFAULT_MAX_STEP_SAVES_TO_KEEP",
    "DEFAULT_SAVE_EVERY",
    "DEFAULT_STEPS",
    "JobConfig",
    "JobConfigError",
    "config_arguments",
    "config_lookup",
    "load_job_config",
    "parse_job_config",
]

CONFIG_SUFFIXES = (".json", ".jsonc", ".yaml", ".yml")  # toolkit/config.py possible_extensions
DEFAULT_SAVE_EVERY = 1000  # SaveConfig.save_every
DEFAULT_MAX_STEP_SAVES_TO_KEEP = 5  # SaveConfig.max_step_saves_to_keep
DEFAULT_STEPS = 1000  # TrainConfig.steps
# run.py's own options that take a value (argparse: -n/--name, -l/--log); -r/--recover is bare.
VALUE_OPTIONS = ("-n", "--name", "-l", "--log")
BARE_OPTIONS = ("-r", "--recover")
_ENV_REFERENCE = re.compile(r"\$\{([^}]+)\}")  # toolkit/config.py replace_env_vars_in_string


class JobConfigError(LaunchScriptError):
    """The config file cannot be found or read; the message names it and what was expected."""


@dataclass(frozen=True)
class JobConfig:
    """What the sidecar needs from one ai-toolkit job config."""

    name: str  # the process's name: its saves are <name>_<step>.safetensors
    job_name: str  # config.name (or run.py --name): its step bar's description
    training_folder: str  # as the trainer sees it (relative to its working directory, or not)
    save_every: int
    max_step_saves_to_keep: int
    steps: int
    start_step: int | None  # train.start_step: overrides the step a save records

    @property
    def save_root(self) -> str:
        """Where the saves are, as the trainer sees it (``os.path.join`` as upstream does)."""
        return posixpath.join(self.training_folder, self.name)


@dataclass(frozen=True)
class ConfigArguments:
    files: tuple[str, ...]  # the positional config arguments, in order
    name: str | None  # -n/--name: replaces [name]


def config_arguments(trainer_args: Sequence[str]) -> ConfigArguments:
    """The config files and ``--name`` among run.py's arguments (argparse's reading)."""
    files: list[str] = []
    name = None
    index = 0
    while index < len(trainer_args):
        word = trainer_args[index]
        flag, has_value, value = word.partition("=")
        if flag in VALUE_OPTIONS and word.startswith("--") and has_value:
            name = value if flag == "--name" else name
        elif word in VALUE_OPTIONS:
            following = trainer_args[index + 1] if index + 1 < len(trainer_args) else None
            if word in ("-n", "--name"):
                name = following
            index += 1
        elif word.startswith("-n") and len(word) > 2:
            name = word[2:]  # argparse's glued short option: -nNAME
        elif word in BARE_OPTIONS or word.startswith("-l"):
            pass
        elif not word.startswith("-"):
            files.append(word)
        index += 1
    return ConfigArguments(tuple(files), name)


def config_lookup(argument: str, trainer_script: str) -> list[str]:
    """The paths ``get_config`` tries for ``argument``, in order, as the trainer sees them.

    The toolkit root is the folder of run.py (``toolkit/paths.py`` TOOLKIT_ROOT).
    """
    root = posixpath.dirname(trainer_script)
    in_config_folder = posixpath.join(root, "config", argument)
    tried = [in_config_folder + suffix for suffix in CONFIG_SUFFIXES]
    return [*tried, argument]


def parse_job_config(
    text: str,
    *,
    file_name: str,
    name_override: str | None,
    environment: Mapping[str, str],
    load_yaml: Callable[[str], Any] | None,
) -> JobConfig:
    """The job config in ``text`` (a ``.json``/``.jsonc`` or ``.yaml``/``.yml`` file)."""
    text = _ENV_REFERENCE.sub(lambda match: environment.get(match[1], match[0]), text)
    document = _load(text, file_name=file_name, load_yaml=load_yaml)
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise JobConfigError(f"{file_name}: expected a mapping with a `config` section")
    job_name = name_override if name_override is not None else config.get("name")
    if not isinstance(job_name, str) or not job_name:
        raise JobConfigError(f"{file_name}: expected `config.name` (or run.py --name)")
    # preprocess_config replaces [name] in the whole document; only these values matter here.
    processes = config.get("process")
    if not isinstance(processes, list) or not processes or not isinstance(processes[0], dict):
        raise JobConfigError(f"{file_name}: expected a `config.process` list of mappings")
    if len(processes) > 1:
        raise JobConfigError(
            f"{file_name}: {len(processes)} processes in `config.process`; the sidecar "
            "supervises one: give each its own config and launch script"
        )
    process = processes[0]
    name = _text(process.get("name", job_name), "config.process[0].name", file_name)
    name = name.replace("[name]", job_name)
    folder = process.get("training_folder", config.get("training_folder"))
    folder = _text(folder, "config.process[0].training_folder", file_name)
    folder = folder.replace("[name]", job_name)
    for value, where in ((name, "name"), (folder, "training_folder")):
        unset = _ENV_REFERENCE.search(value)
        if unset:
            raise JobConfigError(
                f"{file_name}: {where} uses ${{{unset[1]}}}, which the sidecar's environment "
                "does not set; set it for the sidecar too (ai-toolkit reads it from its own)"
            )
    save = _section(process, "save", file_name)
    train = _section(process, "train", file_name)
    return JobConfig(
        name=name,
        job_name=job_name,
        training_folder=folder,
        save_every=_count(save, "save_every", DEFAULT_SAVE_EVERY, file_name),
        max_step_saves_to_keep=_count(
            save, "max_step_saves_to_keep", DEFAULT_MAX_STEP_SAVES_TO_KEEP, file_name
        ),
        steps=_count(train, "steps", DEFAULT_STEPS, file_name),
        start_step=_optional_count(train, "start_step", file_name),
    )


def load_job_config(
    trainer_script: str,
    trainer_args: Sequence[str],
    sidecar_path: Callable[[str], Path],
    *,
    environment: Mapping[str, str] | None = None,
) -> tuple[JobConfig, Path]:
    """The job config run.py loads for these arguments, and where it is (sidecar view)."""
    arguments = config_arguments(trainer_args)
    if not arguments.files:
        raise JobConfigError("run.py is given no config file; expected `python run.py <job>.yaml`")
    if len(arguments.files) > 1:
        raise JobConfigError(
            f"run.py runs {len(arguments.files)} jobs one after another "
            f"({', '.join(arguments.files)}); the sidecar supervises one job: launch one config"
        )
    argument = arguments.files[0]
    lookup = config_lookup(argument, trainer_script)
    in_folder = sidecar_path(posixpath.join(posixpath.dirname(trainer_script), "config", argument))
    # get_config tries the suffixes only when config/<argument> itself is absent.
    candidates = lookup[-1:] if in_folder.exists() else lookup
    for trainer_view in candidates:
        path = sidecar_path(trainer_view)
        if path.is_file():
            break
    else:
        raise JobConfigError(
            f"config file {argument!r} not found (tried {', '.join(candidates)}, as ai-toolkit's "
            "get_config does, from the trainer's working directory)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise JobConfigError(f"config file {path} cannot be read: {error}") from None
    config = parse_job_config(
        text,
        file_name=str(path),
        name_override=arguments.name,
        environment=os.environ if environment is None else environment,
        load_yaml=_yaml_loader(),
    )
    return config, path


def _load(text: str, *, file_name: str, load_yaml: Callable[[str], Any] | None) -> Any:
    if file_name.endswith((".json", ".jsonc")):
        try:
            return json.loads(text)
        except ValueError as error:
            raise JobConfigError(f"{file_name}: not valid JSON ({error})") from None
    if file_name.endswith((".yaml", ".yml")):
        if load_yaml is None:
            raise JobConfigError(f"{file_name}: reading YAML needs PyYAML (pip install pyyaml)")
        try:
            return load_yaml(text)
        except ValueError as error:  # yaml.YAMLError is re-raised as ValueError by the loader
            raise JobConfigError(f"{file_name}: not valid YAML ({error})") from None
    raise JobConfigError(f"{file_name}: must be a json or yaml file, as get_config requires")


def _yaml_loader() -> Callable[[str], Any] | None:
    try:
        import yaml
    except ImportError:  # the JSON configs (the UI's .job_config.json) need no YAML
        return None

    def load(text: str) -> Any:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(str(error)) from None

    return load


def _section(process: dict[str, Any], key: str, file_name: str) -> dict[str, Any]:
    section = process.get(key) or {}
    if not isinstance(section, dict):
        raise JobConfigError(f"{file_name}: `config.process[0].{key}` must be a mapping")
    return section


def _text(value: object, where: str, file_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise JobConfigError(f"{file_name}: expected `{where}` to be a non-empty string")
    return value


def _count(section: dict[str, Any], key: str, default: int, file_name: str) -> int:
    value = _optional_count(section, key, file_name)
    return default if value is None else value


def _optional_count(section: dict[str, Any], key: str, file_name: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JobConfigError(f"{file_name}: `{key}` must be a whole number, not {value!r}")
    return value
