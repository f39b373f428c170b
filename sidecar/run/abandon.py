"""The user's "do not resume this run": ``<state dir>/abandoned``.

``training-sidecar abandon`` writes it (a line of JSON: when, why); ``touch
<run>/.sidecar/abandoned`` from the host does the same. A file rather than a ledger edit,
because a running sidecar holds the ledger and writes it whole: a second writer's change
would be lost at its next save. It applies to the run recorded when it was written, not to
a new run begun after it (the run boundary's start time), and it is never deleted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sidecar.atomic_files import replace_atomically

MARKER_NAME = "abandoned"


class AbandonMarker:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / MARKER_NAME

    def write(self, reason: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"at": time.time(), "reason": reason}
        replace_atomically(self.path, json.dumps(record) + "\n")
        os.utime(self.path)  # its time is what places it in the run's history

    def reason_for(self, run_started_at: float | None) -> str | None:
        """Why the run that began at ``run_started_at`` is abandoned; None when it is not."""
        try:
            written = self.path.stat().st_mtime
        except OSError:
            return None
        if run_started_at is not None and written < run_started_at:
            return None  # written for an earlier run of this folder
        try:
            reason = json.loads(self.path.read_text(encoding="utf-8")).get("reason")
        except (OSError, ValueError, AttributeError):
            reason = None  # `touch`ed: empty
        return str(reason) if reason else f"{self.path} exists"
