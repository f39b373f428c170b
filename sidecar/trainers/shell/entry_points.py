"""Trainer commands that name no ``*.py`` script: a module, or a console-script entry point.

Besides ``accelerate launch ... script.py`` and ``python script.py``, a launch script may run
its trainer as

- a module: ``python -m pkg.train ...``, ``accelerate launch -m pkg.train ...``,
  ``torchrun --nproc_per_node 2 -m pkg.train ...`` (python's own ``-m``; accelerate's and
  torchrun's ``-m`` / ``--module`` are flags that make their script word a module name:
  accelerate/commands/launch.py ``launch_command_parser``, torch/distributed/run.py
  ``get_args_parser``). The command's ``trainer_script`` is then the module name and its
  launcher arguments end with the ``-m``. A launcher module (``python -m
  torch.distributed.run``, ``python -m accelerate.commands.launch``) is part of the
  launcher, and the trainer script comes after its own options;
- a console-script entry point with a ``train`` subcommand: ``axolotl train cfg.yml ...``
  (axolotl's ``cli/main.py``, a click group) and ``llamafactory-cli train cfg.yaml ...``
  (LLaMA-Factory's ``cli.py``), and TRL's ``trl sft|dpo|grpo|kto|reward|rloo ...``. The
  command's ``trainer_script`` is the two words joined by
  one space (``"axolotl train"``), ``launcher_args`` is empty, ``script_words`` holds the
  two words, and the trainer's arguments are what follows the subcommand. Another
  subcommand (``axolotl preprocess``, ``llamafactory-cli export``) is no trainer command.

Python's tool modules (``python -m pip install ...``, ``python -m venv``) never count: a
launch script that installs something before it trains still has exactly one trainer.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ENTRY_POINTS",
    "LAUNCHER_MODULES",
    "MODULE_FLAGS",
    "entry_point_subcommands",
    "module_role",
]

# The flags after which a launcher's next word is a module name, not a script path.
MODULE_FLAGS = ("-m", "--module")
# Modules that launch another script (torch/distributed/run.py and launch.py; accelerate's
# launch command module): what follows them is read as a launcher's arguments.
LAUNCHER_MODULES = (
    "torch.distributed.run",
    "torch.distributed.launch",
    "accelerate.commands.launch",
)
# Console scripts that train through the HF Trainer, and the subcommand that trains.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "axolotl": ("train",),
    "llamafactory-cli": ("train",),
    # TRL's console script (trl/cli.py): each trainer a subcommand, TrainingArguments' flags.
    "trl": ("sft", "dpo", "grpo", "kto", "reward", "rloo"),
}
# Modules python runs as tools, never as the trainer (their top-level package).
_TOOL_PACKAGES = frozenset(
    {
        "pip",
        "pip3",
        "venv",
        "ensurepip",
        "site",
        "compileall",
        "json",
        "http",
        "pytest",
        "uv",
        "huggingface_hub",
        "wandb",
        "nvitop",
        "torch.utils.collect_env",
        "accelerate.commands.config",
        "accelerate.commands.env",
    }
)

ModuleRole = Literal["trainer", "launcher", "tool"]


def module_role(previous: str | None, word: str) -> ModuleRole | None:
    """What ``word`` is when it follows ``previous`` among a launcher's words: the trainer
    module, a launcher module, a tool module, or None (not a module name at all)."""
    if previous not in MODULE_FLAGS or not word or word.startswith("-"):
        return None
    if word in LAUNCHER_MODULES:
        return "launcher"
    top = word.split(".", 1)[0]
    if top in _TOOL_PACKAGES or any(
        word == tool or word.startswith(tool + ".") for tool in _TOOL_PACKAGES if "." in tool
    ):
        return "tool"
    return "trainer"


def entry_point_subcommands(program: str) -> tuple[str, ...]:
    """The training subcommands of console script ``program`` (a name or a path to it);
    empty for a program that is no known entry point."""
    return ENTRY_POINTS.get(program.rsplit("/", 1)[-1], ())
