"""A stand-in for a container runtime's ``on-failure`` restart policy, for signal-mode tests.

Runs ``bash $TRAIN_SCRIPT`` from ``$TRAINER_ROOT`` with its output appended to
``$TRAIN_LOG``, and starts it again after ``$RESTART_DELAY`` seconds whenever it
exits non-zero (as a container whose main process was killed would be restarted).
Exits when the trainer exits 0. Its own command line never names train.sh, so the
sidecar's trainer pattern does not match it — like the kubelet, it is out of reach.
"""

import os
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


if __name__ == "__main__":
    raise SystemExit(main())
