"""A launch script captured from a trainer someone else started: the kohya_ss GUI's.

The GUI (bmaltais/kohya_ss) writes no train.sh. Each "Start training" click writes
``<output_dir>/config_lora-<YYYYmmdd-HHMMSS>.toml`` and starts
``accelerate launch <its flags> <scriptdir>/sd-scripts/<x>_train_network.py --config_file
<that toml> <additional parameters>`` with ``subprocess.Popen(run_cmd, env=env)``
(``kohya_gui/lora_gui.py`` ``train_model``, ``kohya_gui/class_command_executor.py``
``CommandExecutor.execute_command``): no shell, no ``cwd`` (the GUI's own), and an
environment that is the GUI's plus ``PYTHONPATH`` (its folder and ``sd-scripts``) and
``TF_ENABLE_ONEDNN_OPTS=0`` (``kohya_gui/common_gui.py`` ``setup_environment``).

To relaunch that run the sidecar needs the same three things: the process's own argv
(``/proc/<pid>/cmdline``), working directory and environment (``/proc/<pid>/environ``, as
it was at exec). This module writes them as a bash script that the shell reader
(``sidecar.trainers.shell.train_script``) understands and the sd-scripts rewrite can edit:

    #!/usr/bin/env bash
    # (where it came from)
    cd -- '/the/cwd' || exit 1
    export NAME='value'
    exec '/venv/bin/accelerate' \\
      'launch' \\
      ...

The environment is kept whole but for the per-process variables
``sidecar.observe.trainer_processes.launch_environment`` drops (``_``, ``SHLVL``, ``PWD``,
``OLDPWD``, a worker's rank and rendezvous): which of a user's variables matter cannot be
guessed, and a token the trainer uploads with is one of them. So the script can hold secrets:
it is written with mode 0600 into a 0700 folder (``<output_dir>/.sidecar``), and only its
trainer command should ever be logged (``script_diff`` shows changed lines only).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import psutil

from sidecar.atomic_files import replace_atomically
from sidecar.observe.trainer_processes import (
    LaunchNotVisible,
    find_trainer_processes,
    launch_context,
    tree_roots,
)
from sidecar.trainers.shell.trainer_command import find_option

__all__ = [
    "CAPTURED_SCRIPT_NAME",
    "CaptureError",
    "CapturedLaunch",
    "capture_process",
    "captured_script_path",
    "find_gui_trainer",
    "is_gui_trainer_command",
    "launch_script_text",
    "write_launch_script",
]

CAPTURED_SCRIPT_NAME = "kohya_gui_launch.sh"
# The LoRA tab's file name (lora_gui.py train_model: f"config_lora-{formatted_datetime}.toml").
GUI_CONFIG_PATTERN = "config_lora-*.toml"
# sd-scripts' network trainers: train_network.py and the <model>_train_network.py ones.
_NETWORK_TRAINER = re.compile(r"(?:[A-Za-z0-9]+_)*train_network\.py")
# A first pass over the joined command line; is_gui_trainer_command decides.
_SEARCH = re.compile(r"train_network\.py")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CaptureError(Exception):
    """The trainer's process cannot be captured into a launch script; says why."""


@dataclass(frozen=True)
class CapturedLaunch:
    """How one trainer process was started, as far as a relaunch must repeat it."""

    pid: int
    argv: tuple[str, ...]
    workdir: str
    environment: dict[str, str]
    started_at: float  # the process's start, seconds since the epoch


def is_gui_trainer_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is a network trainer started with a GUI ``config_lora-*.toml``."""
    if not any(_NETWORK_TRAINER.fullmatch(os.path.basename(word)) for word in argv):
        return False
    found = find_option(argv, "--config_file")
    return bool(found) and fnmatch(os.path.basename(found[-1].value), GUI_CONFIG_PATTERN)


def find_gui_trainer(
    processes: Iterable[psutil.Process] | None = None, *, not_under: Iterable[int] = ()
) -> psutil.Process | None:
    """The newest launch of a GUI-started trainer: the root of its process tree.

    ``accelerate launch`` and the ``python <x>_train_network.py`` it starts (and that one's
    dataloader workers) all carry the trainer's command line; the root is what the GUI
    started and what a relaunch must repeat. ``processes`` defaults to every live process
    but the sidecar itself and its ancestors. ``not_under``: pids whose descendants are left
    out, e.g. the ``bash <captured script>`` the sidecar relaunched, which carries the same
    ``--config_file`` and would otherwise be the newest.
    """
    if processes is None:
        processes = find_trainer_processes(_SEARCH)
    excluded = set(not_under)
    matching = []
    for process in processes:
        try:
            if excluded & {parent.pid for parent in process.parents()}:
                continue
            if is_gui_trainer_command(process.cmdline()):
                matching.append(process)
        except psutil.Error:
            continue  # ended meanwhile, or not ours to read
    roots = tree_roots(matching)  # oldest first
    return roots[-1] if roots else None


def capture_process(process: psutil.Process) -> CapturedLaunch:
    """``process``'s argv, working directory and environment; CaptureError when unreadable.

    A console script started through its shebang (``/venv/bin/python /venv/bin/accelerate
    launch ...`` in ``/proc``) is written back as the script (``/venv/bin/accelerate launch
    ...``): the kernel turns that into the same argv, and the launcher then reads as
    ``accelerate launch`` (its process count included).
    """
    try:
        argv = tuple(process.cmdline())
        started_at = process.create_time()
    except psutil.Error as error:
        raise CaptureError(f"process {process.pid}: {type(error).__name__}") from error
    if not argv:
        raise CaptureError(f"process {process.pid} shows no command line (a zombie?)")
    try:
        context = launch_context(process)
    except LaunchNotVisible as error:
        raise CaptureError(str(error)) from error
    if context.workdir is None:
        raise CaptureError(
            f"process {process.pid}: its working directory is gone (deleted), so relative "
            "paths on its command line (the --config_file among them) cannot be repeated"
        )
    return CapturedLaunch(
        pid=process.pid,
        argv=_through_shebang(argv),
        workdir=context.workdir,
        environment=context.environment,
        started_at=started_at,
    )


def launch_script_text(launch: CapturedLaunch, *, leave_out: Iterable[str] = ()) -> str:
    """The bash script that repeats ``launch``: its directory, environment and argv.

    ``leave_out``: variables the relauncher sets itself (the exports would override them).
    Variables whose names bash cannot export (``BASH_FUNC_x%%``, a ``-`` in the name) are
    left out and named in a comment. Every word is quoted with ``shlex.quote``, so it
    reaches the trainer byte for byte.
    """
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(launch.started_at))
    lines = [
        "#!/usr/bin/env bash",
        f"# Captured by the training sidecar from process {launch.pid} (started {started}),",
        "# a trainer the kohya_ss GUI launched: its working directory, environment and",
        "# command line. The sidecar edits only the trainer's --resume and position flags;",
        "# the settings stay in the --config_file TOML. Holds the environment: keep it 0600.",
    ]
    dropped = set(leave_out)
    environment = {name: value for name, value in launch.environment.items() if name not in dropped}
    skipped = sorted(name for name in environment if not _SHELL_NAME.fullmatch(name))
    if skipped:
        lines.append(f"# Not exportable from bash, so left out: {', '.join(skipped)}")
    lines.append(f"cd -- {shlex.quote(launch.workdir)} || exit 1")
    for name in sorted(environment):
        if _SHELL_NAME.fullmatch(name):
            lines.append(f"export {name}={shlex.quote(environment[name])}")
    lines.append(" \\\n".join(_command_lines(launch.argv)))
    return "\n".join(lines) + "\n"


def _command_lines(argv: Sequence[str]) -> list[str]:
    """``exec <program>``, then one argument per line, a ``--flag`` with its value beside it.

    Only the layout: bash joins the lines into the same words either way. The ``*.py`` word
    stays alone on its line, so the sd-scripts rewrite puts ``--resume`` on a line of its own.
    """
    program, *arguments = argv
    lines = [f"exec {shlex.quote(program)}"]
    index = 0
    while index < len(arguments):
        word = arguments[index]
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        pairs = (
            word.startswith("--")
            and "=" not in word
            and following is not None
            and not following.startswith("-")
            and not following.endswith(".py")
        )
        taken = [word, following] if pairs and following is not None else [word]
        lines.append("  " + " ".join(shlex.quote(part) for part in taken))
        index += len(taken)
    return lines


def captured_script_path(state_dir: Path) -> Path:
    """Where the captured script lives: in the run's sidecar folder (``<output_dir>/.sidecar``)."""
    return state_dir / CAPTURED_SCRIPT_NAME


def write_launch_script(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically, mode 0600, its folder created 0700.

    Returns False when the file already held exactly ``text``. A folder that exists keeps
    its mode: it may be shared with the ledger and the user's tools.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return replace_atomically(path, text, mode=0o600)


def _through_shebang(argv: tuple[str, ...]) -> tuple[str, ...]:
    if len(argv) < 2:
        return argv
    interpreter = _shebang(argv[1])
    if interpreter is None:
        return argv
    words = interpreter.split()
    direct = words[:1] == [argv[0]] and len(words) == 1
    via_env = len(words) == 2 and os.path.basename(words[0]) == "env" and words[1] == argv[0]
    return argv[1:] if direct or via_env else argv


def _shebang(path: str) -> str | None:
    """The ``#!`` line of an executable file, without ``#!``; None for anything else."""
    if not os.path.isabs(path) or not os.access(path, os.X_OK):
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!") or b"\n" not in head:
        return None
    try:
        return head[2 : head.index(b"\n")].decode().strip()
    except UnicodeDecodeError:
        return None
