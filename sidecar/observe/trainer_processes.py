"""Finding the trainer's processes by command line, in a PID namespace we share with it.

In exec and signal modes the trainer was not started by the sidecar: FluxGym's web
UI or a container runtime started it. With a shared PID namespace its processes
are visible in ``/proc``; they are recognised by a pattern over the command line
that matches the training processes and never the web UI itself.

The root of the training process tree (the ``bash train.sh`` the UI started) also tells how
the run was launched: its environment and working directory, which a relaunch must repeat.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

# bash running a train.sh, the accelerate launcher, sd-scripts' trainer and its
# dataloader workers (forked, so they carry the trainer's command line).
DEFAULT_TRAINER_PATTERN = r"(^|[ /])train\.sh( |$)|accelerate launch|flux_train_network\.py"

# Everything else the original process had is copied: a venv's PATH and VIRTUAL_ENV, HOME,
# PYTHON*, HF_*, CUDA_*, LD_LIBRARY_PATH and whatever else the UI exported are exactly what
# FluxGym's train.sh inherits, and guessing which of them matter would miss someone's install.
# Not copied, because they describe one process rather than the launch:
# - what a shell sets about itself: ``_`` (its last command), SHLVL (its nesting depth), PWD
#   and OLDPWD (its directories; bash sets PWD afresh from the working directory it is given,
#   and a stale one would be wrong whenever the relaunch falls back to another directory);
# - what a distributed launcher (accelerate, torchrun) sets for each worker it spawns. The root
#   of the tree never has them; should only a worker be left to read, copying its rank and
#   rendezvous would make the new launcher believe it is one of its own workers.
_PER_PROCESS_VARIABLES = frozenset({"_", "SHLVL", "PWD", "OLDPWD"})
_PER_WORKER_VARIABLES = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_NAME",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_WORLD_SIZE",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
)
_PER_WORKER_PREFIXES = ("TORCHELASTIC_",)


class LaunchNotVisible(Exception):
    """The original process's environment or working directory cannot be read; says why."""


@dataclass(frozen=True)
class LaunchContext:
    """How one training process was started: its environment and working directory."""

    pid: int
    environment: dict[str, str]
    workdir: str | None  # None when its directory is gone (deleted after it started)


def find_trainer_processes(pattern: re.Pattern[str]) -> list[psutil.Process]:
    """Live processes whose command line matches, the sidecar's own process tree excluded."""
    own = {os.getpid(), *_ancestors()}
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.pid in own or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(process.info["cmdline"] or ())
        if cmdline and pattern.search(cmdline):
            found.append(process)
    return found


def executing_scripts(processes: Iterable[psutil.Process]) -> list[str]:
    """The ``*.sh`` scripts that bash processes among ``processes`` are executing."""
    scripts = []
    for process in processes:
        try:
            arguments = process.cmdline()
        except psutil.Error:
            continue
        if arguments and os.path.basename(arguments[0]) in ("bash", "sh"):
            scripts += [argument for argument in arguments[1:] if argument.endswith(".sh")]
    return scripts


def script_runner(script: str) -> psutil.Process | None:
    """A live bash process executing exactly this train.sh, if there is one."""
    for process in psutil.process_iter(["cmdline", "status"]):
        arguments = process.info["cmdline"] or []
        if (
            process.info["status"] != psutil.STATUS_ZOMBIE
            and len(arguments) >= 2
            and os.path.basename(arguments[0]) == "bash"
            and script in arguments[1:]
        ):
            return process
    return None


def tree_roots(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` whose parent is not among them, oldest first: one per launch."""
    processes = list(processes)
    pids = {process.pid for process in processes}
    roots = []
    for process in processes:
        try:
            if process.ppid() not in pids:
                roots.append((process.create_time(), process.pid, process))
        except psutil.Error:
            continue  # ended meanwhile
    return [root[2] for root in sorted(roots, key=lambda root: root[:2])]


def launched_with(process: psutil.Process, name: str, value: str) -> bool | None:
    """Whether ``process`` was started with ``name=value`` in its environment (None: unreadable)."""
    try:
        return process.environ().get(name) == value
    except psutil.Error:
        return None


def tree_root(processes: Iterable[psutil.Process]) -> psutil.Process | None:
    """The oldest of ``processes`` whose parent is not among them: who the launcher started."""
    roots = tree_roots(processes)
    return roots[0] if roots else None


def launch_context(process: psutil.Process) -> LaunchContext:
    """``process``'s environment (``/proc/<pid>/environ``, as it was at exec) and directory.

    Both need the process's UID (or CAP_SYS_PTRACE): raises LaunchNotVisible otherwise, and
    when the process has ended or shows no environment at all (a zombie, a kernel thread).
    """
    try:
        environment = process.environ()
        workdir: str | None = process.cwd()
    except psutil.Error as error:
        raise LaunchNotVisible(f"process {process.pid}: {type(error).__name__}") from error
    if not environment:
        raise LaunchNotVisible(f"process {process.pid} shows an empty environment")
    if workdir is not None and (not workdir.startswith("/") or workdir.endswith(" (deleted)")):
        workdir = None
    return LaunchContext(process.pid, launch_environment(environment), workdir)


def launch_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environment`` worth giving a relaunch (see _PER_PROCESS_VARIABLES)."""
    return {
        name: value
        for name, value in environment.items()
        if name not in _PER_PROCESS_VARIABLES
        and name not in _PER_WORKER_VARIABLES
        and not name.startswith(_PER_WORKER_PREFIXES)
        and _encodable(name, value)
    }


def _encodable(name: str, value: str) -> bool:
    # /proc gives bytes; psutil keeps undecodable ones as surrogates, which the Engine API's
    # JSON cannot carry faithfully. Such a variable is left out rather than passed mangled.
    try:
        f"{name}={value}".encode()
    except UnicodeEncodeError:
        return False
    return True


def attempt_key(processes: Iterable[psutil.Process]) -> str | None:
    """Identifies one run of the trainer: the start time of its oldest process."""
    times = []
    for process in processes:
        try:
            times.append(process.create_time())
        except psutil.Error:
            continue
    return f"{min(times):.2f}" if times else None


def _ancestors() -> list[int]:
    try:
        return [parent.pid for parent in psutil.Process().parents()]
    except psutil.Error:
        return []
