"""Finding the trainer's processes by command line, in a PID namespace we share with it.

In exec and signal modes the trainer was not started by the sidecar: FluxGym's web
UI or a container runtime started it. With a shared PID namespace its processes
are visible in ``/proc``; they are recognised by a pattern over the command line
that matches the training processes and never the web UI itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import psutil

# bash running a train.sh, the accelerate launcher, sd-scripts' trainer and its
# dataloader workers (forked, so they carry the trainer's command line).
DEFAULT_TRAINER_PATTERN = r"(^|[ /])train\.sh( |$)|accelerate launch|flux_train_network\.py"


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
