"""A stand-in for the kohya_ss GUI's "Start training" click, with the programs it starts.

Run as ``python kohya_gui_standin.py <scriptdir> <output_dir> [--launcher accelerate|python]``
from the directory the GUI runs in. Like bmaltais/kohya_ss ``kohya_gui/lora_gui.py``
``train_model`` it writes ``<output_dir>/config_lora-<YYYYmmdd-HHMMSS>.toml`` (sorted keys,
settings the user left empty dropped), builds ``[accelerate, "launch", <flags>,
<scriptdir>/sd-scripts/flux_train_network.py, "--config_file", <toml>, <additional
parameters>]`` and starts it with ``subprocess.Popen(run_cmd, env=env)``, no shell and no cwd,
its output piped back (``class_command_executor.py`` ``CommandExecutor.execute_command``);
``env`` is its own plus PYTHONPATH and TF_ENABLE_ONEDNN_OPTS (``common_gui.py``
``setup_environment``). Then it waits for the run to end (``wait_for_training_to_end``).

:func:`install` writes the programs into a temporary tree:

- ``<scriptdir>/sd-scripts/flux_train_network.py``, a trainer that reads its options the way
  sd-scripts does (``library/train_util.py`` ``read_config_from_file``: parse the command
  line, then parse it again into a namespace made of the TOML), appends what it got (argv,
  cwd, chosen variables, effective options) to ``<output_dir>/invocations.jsonl``, and then
  holds (sleeps, as a hung run would) unless its command line has ``--resume``;
- ``<venv>/bin/accelerate``, a console script with a ``#!<python>`` line that, like
  accelerate's ``simple_launcher`` (accelerate/commands/launch.py, with
  ``utils/launch.py`` ``prepare_simple_launcher_cmd_env``), runs ``[sys.executable, script,
  *args]`` as a child with the environment copied and ``ACCELERATE_MIXED_PRECISION`` set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

# Written into the stand-in's environment by the GUI; the relaunch must see them unchanged.
MARK = "KOHYA_STANDIN_MARK"
AWKWARD = "KOHYA_STANDIN_AWKWARD"
AWKWARD_VALUE = 'it\'s $HOME "quoted" `date` \\ back\nsecond line ünïcode'
REPORTED = (MARK, AWKWARD, "PYTHONPATH", "TF_ENABLE_ONEDNN_OPTS", "SHLVL", "OLDPWD")

TRAINER = '''"""Stand-in for sd-scripts' flux_train_network.py: report its options, then hold."""
import argparse, json, os, sys, time, tomllib

parser = argparse.ArgumentParser()
parser.add_argument("--config_file", type=str, default=None)
parser.add_argument("--output_dir", type=str, default=None)
parser.add_argument("--output_name", type=str, default=None)
parser.add_argument("--resume", type=str, default=None)
parser.add_argument("--save_state", action="store_true")
parser.add_argument("--save_every_n_steps", type=int, default=None)
parser.add_argument("--max_train_steps", type=int, default=1600)
parser.add_argument("--initial_step", type=int, default=None)
parser.add_argument("--skip_until_initial_step", action="store_true")
parser.add_argument("--max_data_loader_n_workers", type=int, default=8)
args = parser.parse_args()
if args.config_file:
    # sd-scripts: command line first, then again into a namespace made of the TOML.
    with open(args.config_file, "rb") as handle:
        flat = {}
        for key, value in tomllib.load(handle).items():
            flat.update(value if isinstance(value, dict) else {key: value})
    args = parser.parse_args(namespace=argparse.Namespace(**flat))
record = {
    "pid": os.getpid(),
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "environment": {name: os.environ.get(name) for name in %(reported)r},
    "accelerate": os.environ.get("ACCELERATE_MIXED_PRECISION"),
    "effective": {
        name: getattr(args, name)
        for name in ("output_dir", "resume", "save_state", "initial_step", "max_train_steps")
    },
}
os.makedirs(args.output_dir, exist_ok=True)
with open(os.path.join(args.output_dir, "invocations.jsonl"), "a") as log:
    log.write(json.dumps(record) + "\\n")
if not any(word.split("=")[0] == "--resume" for word in sys.argv[1:]):
    time.sleep(120)  # a first run (the TOML's stale resume aside) that hangs: the test stops it
'''

ACCELERATE = '''#!%(python)s
"""Stand-in for accelerate's console script: `accelerate launch [flags] script args`."""
import os, subprocess, sys

words = sys.argv[1:]
assert words[:1] == ["launch"], words
words = words[1:]
environment = dict(os.environ)
while words and words[0].startswith("--"):
    flag, value = words[0], words[1]
    if flag == "--mixed_precision":
        environment["ACCELERATE_MIXED_PRECISION"] = value
    words = words[2:]
sys.exit(subprocess.call([sys.executable, *words], env=environment))
'''


def install(scriptdir: Path, venv: Path) -> tuple[Path, Path]:
    """Write the trainer and the accelerate stand-ins; return their paths."""
    trainer = scriptdir / "sd-scripts" / "flux_train_network.py"
    trainer.parent.mkdir(parents=True, exist_ok=True)
    trainer.write_text(TRAINER % {"reported": REPORTED})
    accelerate = venv / "bin" / "accelerate"
    accelerate.parent.mkdir(parents=True, exist_ok=True)
    accelerate.write_text(ACCELERATE % {"python": sys.executable})
    accelerate.chmod(0o755)
    return trainer, accelerate


def write_config(output_dir: str, settings: dict[str, object]) -> str:
    """The GUI's TOML: sorted keys, "", False and None dropped (lora_gui.py train_model)."""
    kept = {key: value for key, value in settings.items() if value not in ("", False, None)}
    path = os.path.join(output_dir, f"config_lora-{datetime.now():%Y%m%d-%H%M%S}.toml")
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for key, value in sorted(kept.items()):
            shown = str(value).lower() if isinstance(value, bool) else value
            shown = f'"{value}"' if isinstance(value, str) else shown
            handle.write(f"{key} = {shown}\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scriptdir")
    parser.add_argument("output_dir")
    parser.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate")
    parser.add_argument("--accelerate", default="accelerate")
    options = parser.parse_args()
    config = write_config(
        options.output_dir,
        {
            "output_dir": options.output_dir,
            "output_name": "my-lora",
            "save_state": True,
            "save_every_n_steps": 50,
            "max_train_steps": 400,
            "resume": f"{options.output_dir}/stale-state",  # the user's old resume field
            "sample_prompts": "",  # empty in the GUI: not written
        },
    )
    script = f"{options.scriptdir}/sd-scripts/flux_train_network.py"
    if options.launcher == "accelerate":
        run_cmd = [options.accelerate, "launch", "--mixed_precision", "bf16", script]
    else:
        run_cmd = [sys.executable, script]
    run_cmd += ["--config_file", config, "--max_data_loader_n_workers", "0"]
    env = os.environ.copy()
    env["PYTHONPATH"] = f"{options.scriptdir}:{options.scriptdir}/sd-scripts:"
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env[MARK] = "from-the-gui"
    env[AWKWARD] = AWKWARD_VALUE
    env["SHLVL"] = "7"  # per-session: the capture must not repeat it
    env["OLDPWD"] = "/somewhere/else"
    process = subprocess.Popen(
        run_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    drain = threading.Thread(target=lambda: sys.stdout.write(process.stdout.read()))
    drain.start()
    return process.wait()


if __name__ == "__main__":
    sys.exit(main())
