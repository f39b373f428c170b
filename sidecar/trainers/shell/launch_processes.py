"""How many training processes a train.sh launch line starts.

More than one means torch.distributed, and so collectives that can hang and a flight recorder
worth turning on (``sidecar.observe.flight_recorder``). The launch line is read as its launcher
reads it:

- ``accelerate launch`` (accelerate/commands/launch.py): ``--num_processes`` is the total
  across machines; hyphens and underscores are interchangeable (``--num-processes=2``), and
  abbreviations are refused (``allow_abbrev=False``). ``--multi_gpu`` (or ``--num_machines`` > 1,
  or DeepSpeed, FSDP, Megatron-LM, tensor parallelism) without a count takes the count from the
  accelerate config file or the visible GPUs: more than one, number unknown.
- ``torchrun`` and ``python -m torch.distributed.run`` / ``.launch`` (torch/distributed/run.py):
  ``--nproc-per-node`` / ``--nproc_per_node`` (default 1; ``gpu``, ``auto``, ``cpu``, ``xpu``:
  a device count, unknown here) times the largest ``--nnodes`` (``N`` or ``MIN:MAX``).
- ``python script.py`` and any other ``python -m`` module: one process.

Unknown counts are reported as 2, "more than one": what callers decide on. What the line
cannot show is not guessed at: a bare ``accelerate launch`` is one process unless accelerate's
default config file says otherwise, and torchrun's ``PET_*`` environment defaults are not read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["MORE_THAN_ONE", "launch_process_count"]

MORE_THAN_ONE = 2  # the count of a distributed launch whose exact size the line does not say
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
_PYTHON = re.compile(r"python(?:[0-9]+(?:\.[0-9]+)?)?")
_PREFIX_COMMANDS = ("exec", "env", "nohup")
# python's own options that take a value (``python -W ignore -m ...``).
_PYTHON_VALUE_OPTIONS = ("-W", "-X", "-c")
_TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")
_ACCELERATE_MODULE = "accelerate.commands.launch"
# accelerate options (underscore spelling) that alone make a launch distributed.
_ACCELERATE_DISTRIBUTED = ("multi_gpu", "use_deepspeed", "use_fsdp", "use_megatron_lm", "use_tp")
_NUMBER = re.compile(r"[0-9]+")
_DEVICE_COUNT = re.compile(r"[a-z][a-z0-9_]*")  # torchrun's gpu/auto/cpu/xpu/<backend>


def launch_process_count(argv: Sequence[str]) -> int:
    """The number of processes ``argv`` (the launch command's words, as bash passes them)
    starts: 1, the exact count, or ``MORE_THAN_ONE`` when distributed with an unknown count.

    Raises ValueError for an empty line, a command that is not a Python launch, and an
    option value that is not a count.
    """
    words = list(argv)
    index = 0
    while index < len(words) and (
        words[index] in _PREFIX_COMMANDS or _ASSIGNMENT.fullmatch(words[index])
    ):
        index += 1
    if index >= len(words):
        raise ValueError("empty launch line: expected accelerate launch, torchrun or python")
    program = words[index].rsplit("/", 1)[-1]
    rest = words[index + 1 :]
    if program == "accelerate":
        if not rest or rest[0] != "launch":
            shown = rest[0] if rest else "nothing"
            raise ValueError(f"accelerate {shown}: expected 'accelerate launch ...'")
        return _accelerate(rest[1:])
    if program == "torchrun":
        return _torchrun(rest)
    if _PYTHON.fullmatch(program):
        module, after = _python_module(rest)
        if module in _TORCHRUN_MODULES:
            return _torchrun(after)
        if module == _ACCELERATE_MODULE:
            return _accelerate(after)
        return 1
    raise ValueError(
        f"{words[index]!r} is not a training launcher: expected accelerate launch, torchrun, "
        "python -m torch.distributed.run or python <script>.py"
    )


def _python_module(words: list[str]) -> tuple[str | None, list[str]]:
    """The ``-m`` module of a python command line and the words after it (None: a script)."""
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-m":
            if index + 1 >= len(words):
                raise ValueError("python -m: the module name is missing")
            return words[index + 1], words[index + 2 :]
        if word.startswith("-m") and len(word) > 2:
            return word[2:], words[index + 1 :]
        if not word.startswith("-") or word == "-":
            return None, []  # the script: everything after it is the script's
        index += 2 if word in _PYTHON_VALUE_OPTIONS else 1
    return None, []


def _options(words: list[str], value_options: Sequence[str]) -> dict[str, str]:
    """The launcher's own ``--name value`` / ``--name=value`` options (last one wins) and its
    flags (value ""), up to the training script (``*.py``, or the module after ``-m``)."""
    found: dict[str, str] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--" or (word.endswith(".py") and not word.startswith("-")):
            break
        if word in ("-m", "--module"):
            break  # the next word is the training module; the rest is its own
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            if name in value_options and not equals:
                if index + 1 >= len(words):
                    raise ValueError(f"--{name} needs a value")
                value = words[index + 1]
                index += 1
            found[name] = value
        index += 1
    return found


def _accelerate(words: list[str]) -> int:
    # accelerate's parser accepts --num-processes for --num_processes: normalise to one spelling.
    normalised = [_underscored(word) for word in words]
    options = _options(normalised, ("num_processes", "num_machines"))
    processes = _count(options, "num_processes")
    machines = _count(options, "num_machines")
    if processes is not None:
        return max(processes, machines or 1)
    if (machines or 1) > 1 or any(name in options for name in _ACCELERATE_DISTRIBUTED):
        return MORE_THAN_ONE
    return 1


def _underscored(word: str) -> str:
    if not word.startswith("--"):
        return word
    name, equals, value = word[2:].partition("=")
    return "--" + name.replace("-", "_") + equals + value


def _torchrun(words: list[str]) -> int:
    # --nproc_per_node is an alias of --nproc-per-node in torchrun's parser: one spelling here.
    normalised = [
        "--nproc-per-node" + word[len("--nproc_per_node") :]
        if word.partition("=")[0] == "--nproc_per_node"
        else word
        for word in words
    ]
    options = _options(normalised, ("nproc-per-node", "nnodes"))
    per_node = options.get("nproc-per-node", "1")
    maximum_nodes = _maximum_nodes(options.get("nnodes", "1"))
    if _NUMBER.fullmatch(per_node):
        count = int(per_node)
        if count < 1:
            raise ValueError(f"--nproc-per-node {per_node}: expected a count of at least 1")
        return count * maximum_nodes
    if _DEVICE_COUNT.fullmatch(per_node):
        return MORE_THAN_ONE  # one per device of that kind: a count this line does not show
    raise ValueError(
        f"--nproc-per-node {per_node!r}: expected a number or one of gpu, auto, cpu, xpu"
    )


def _maximum_nodes(nodes: str) -> int:
    parts = nodes.split(":")
    if len(parts) not in (1, 2) or not all(
        _NUMBER.fullmatch(part) and int(part) >= 1 for part in parts
    ):
        raise ValueError(f"--nnodes {nodes!r}: expected N or MIN:MAX, whole numbers >= 1")
    return int(parts[-1])


def _count(options: dict[str, str], name: str) -> int | None:
    if name not in options:
        return None
    value = options[name]
    if not _NUMBER.fullmatch(value) or int(value) < 1:
        raise ValueError(f"--{name} {value!r}: expected a whole number of at least 1")
    return int(value)
