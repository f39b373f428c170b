"""Command line: ``training-sidecar COMMAND``: run, check, checkpoints, resume, status, abandon,
healthcheck, demo.

Every setting is a flag whose default comes from its ``SIDECAR_*`` variable; the
flag, when given, wins. Parsing and validation happen here, once, before any
command runs: a bad value exits with status 2 and a message naming the variable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from sidecar import __version__
from sidecar.config import ConfigError, Settings, env_name, load_settings
from sidecar.log_setup import configure_logging

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    settings_flags = argparse.ArgumentParser(add_help=False)
    group = settings_flags.add_argument_group(
        "settings (each defaults to its SIDECAR_* environment variable)"
    )
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None or default == "" else default
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"setting_{name}",
            metavar=name.split("_")[-1].upper(),
            default=None,
            help=f"{field.description} [env {env_name(name)}; default: {shown}]",
        )

    parser = argparse.ArgumentParser(
        prog="training-sidecar",
        description="Keeps a long GPU training run alive: detects stalls and crashes, "
        "resumes from the newest complete checkpoint.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        parents=[settings_flags],
        help="watch the run and recover it (the main loop); `run -- <command ...>` launches "
        "and supervises that trainer command in process mode",
    )
    run.add_argument(
        "launch_command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the trainer command to launch and supervise (after --), instead of "
        "SIDECAR_TRAIN_SCRIPT",
    )
    commands.add_parser(
        "check", parents=[settings_flags], help="show what the sidecar sees; non-zero on a problem"
    )
    listing = commands.add_parser(
        "checkpoints", parents=[settings_flags], help="list checkpoint candidates and verdicts"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument(
        "--put-back",
        metavar="NAME",
        help="rename a state the sidecar set aside (its current name, as listed) back to "
        "its own name; the trainer may then resume from it again",
    )
    resume = commands.add_parser(
        "resume",
        parents=[settings_flags],
        help="point train.sh at the newest complete checkpoint now, without restarting",
    )
    resume.add_argument("--dry-run", action="store_true", help="print the diff, change nothing")
    status = commands.add_parser(
        "status",
        parents=[settings_flags],
        help="summarise the run: phase, step and ETA, last checkpoint, restarts, incidents",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    abandon = commands.add_parser(
        "abandon",
        parents=[settings_flags],
        help="mark the current run as abandoned: never resumed after an interruption, "
        "not recovered any more",
    )
    abandon.add_argument("--reason", default="", help="why; shown in the log and in status")
    commands.add_parser(
        "healthcheck",
        parents=[settings_flags],
        help="exit 0 when the loop of a running sidecar beat recently (for HEALTHCHECK/probes)",
    )
    demo = commands.add_parser(
        "demo", help="simulate a FluxGym run that hangs, and watch the sidecar recover it"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    return parser


def settings_overrides(arguments: argparse.Namespace) -> dict[str, Any]:
    return {
        key.removeprefix("setting_"): value
        for key, value in vars(arguments).items()
        if key.startswith("setting_") and value is not None
    }


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        from sidecar.demo import run_demo

        return run_demo(keep=arguments.keep)
    try:
        settings = load_settings(settings_overrides(arguments))
    except ConfigError as error:
        print(f"training-sidecar: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level)
    from sidecar import commands

    handler = {
        "run": commands.run,
        "check": commands.check,
        "checkpoints": commands.checkpoints,
        "resume": commands.resume,
        "healthcheck": commands.healthcheck,
        "status": commands.status,
        "abandon": commands.abandon,
    }[arguments.command]
    return handler(settings, arguments)
