"""A stand-in for a container runtime's ``on-failure`` restart policy, for signal-mode tests.

Runs ``bash $TRAIN_SCRIPT`` from ``$TRAINER_ROOT`` with its output appended to
``$TRAIN_LOG``, and starts it again after ``$RESTART_DELAY`` seconds whenever it
exits non-zero (as a container whose main process was killed would be restarted).
Exits when the trainer exits 0. Its own command line never names train.sh, so the
sidecar's trainer pattern does not match it — like the kubelet, it is out of reach.
"""

import os
import re
import subprocess
import sys
import time


def main() -> int:
    restarts = 0
    while True:
        with open(os.environ["TRAIN_LOG"], "ab") as log:
            code = subprocess.call(
                ["bash", os.environ["TRAIN_SCRIPT"]],
                cwd=os.environ["TRAINER_ROOT"],
                stdout=log,
                stderr=log,
            )
        if code == 0:
            return 0
        restarts += 1
        print(f"trainer exited {code}; restart {restarts}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("RESTART_DELAY", "0.5")))


def start_runtime(tree, simulation: dict) -> subprocess.Popen:
    """This stand-in running ``tree``'s train.sh with the simulator settings ``simulation``."""
    env = {
        **os.environ,
        **tree.env(simulation),
        "TRAIN_SCRIPT": str(tree.train_script),
        "TRAINER_ROOT": str(tree.root),
        "TRAIN_LOG": str(tree.output_dir / "train.log"),
    }
    return subprocess.Popen(
        [sys.executable, __file__], env=env, stderr=subprocess.PIPE, start_new_session=True
    )


def tree_pattern(tree) -> str:
    """A trainer pattern for this tree's processes only: other tests run trainers too."""
    return re.escape(str(tree.root)) + r"\S*(train\.sh|flux_train_network\.py)"


if __name__ == "__main__":
    raise SystemExit(main())
