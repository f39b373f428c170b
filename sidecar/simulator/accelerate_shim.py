"""A stand-in for the ``accelerate`` command, enough for ``accelerate launch ... script.py ...``.

FluxGym's train.sh starts the trainer with ``accelerate launch <launcher flags> script.py
<trainer flags>``. This shim skips the launcher flags and replaces itself with
``python script.py <trainer flags>`` through ``execv``, so the simulated trainer's pid is the
one bash started and the process tree is shell -> python. (The real launcher, for a single
process, keeps a parent python process that waits for the trainer and exits 1 whenever the
trainer fails; the sidecar sees that difference only in the tree and the exit status.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

Execute = Callable[[str, list[str]], object]

USAGE = "usage: accelerate launch [launcher flags] script.py [script arguments]\n"

# accelerate prints this when these launcher flags are left to their defaults; FluxGym's
# scripts never pass them, so the real trainer's output always starts with it.
_DEFAULTED_FLAGS = {
    "--num_processes": "`1`",
    "--num_machines": "`1`",
    "--dynamo_backend": "`'no'`",
}


def split_launch_arguments(arguments: Sequence[str]) -> tuple[list[str], str, list[str]]:
    """Split ``launch``'s arguments into (launcher flags, script, script arguments).

    A flag takes the next token as its value unless that token is itself a flag or the
    script (the first non-flag token ending in ``.py``); ``--flag=value`` is one token.
    Raises ValueError when no script is given.
    """
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if not token.startswith("-"):
            if token.endswith(".py"):
                return list(arguments[:index]), token, list(arguments[index + 1 :])
            raise ValueError(f"expected a launcher flag or a .py script, got {token!r}")
        index += 1
        takes_value = "=" not in token and index < len(arguments)
        if takes_value and not _is_flag_or_script(arguments[index]):
            index += 1
    raise ValueError("no training script (*.py) given")


def _is_flag_or_script(token: str) -> bool:
    return token.startswith("-") or token.endswith(".py")


def defaults_warning(launcher_flags: Sequence[str]) -> str:
    """accelerate's notice about launcher flags it filled in, or '' when all were given."""
    given = {flag.split("=", 1)[0] for flag in launcher_flags if flag.startswith("--")}
    missing = [flag for flag in _DEFAULTED_FLAGS if flag not in given]
    if not missing:
        return ""
    lines = [
        "The following values were not passed to `accelerate launch` and had defaults used instead:"
    ]
    lines += [f"\t`{flag}` was set to a value of {_DEFAULTED_FLAGS[flag]}" for flag in missing]
    lines.append(
        "To avoid this warning pass in values for each of the problematic parameters "
        "or run `accelerate config`."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, *, execute: Execute = os.execv) -> int:
    """Run ``accelerate launch``; returns only on a usage error (2) or if ``execute`` returns.

    ``execute`` is ``os.execv`` in real use; tests pass a recorder instead.
    """
    arguments = sys.argv[1:] if argv is None else argv
    if not arguments or arguments[0] != "launch":
        sys.stderr.write(USAGE)
        sys.stderr.write("(sidecar.simulator stand-in: only 'launch' is supported)\n")
        return 2
    try:
        launcher_flags, script, script_arguments = split_launch_arguments(arguments[1:])
    except ValueError as error:
        sys.stderr.write(USAGE + f"accelerate launch: error: {error}\n")
        return 2
    sys.stderr.write(defaults_warning(launcher_flags))
    sys.stderr.flush()
    sys.stdout.flush()
    execute(sys.executable, [sys.executable, script, *script_arguments])
    return 0
