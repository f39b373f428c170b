"""Notices files being created or written in the run's output folder.

States, models and samples all land in the output folder (samples one level down
in ``sample/``, state files one level down in their state folder). A poll stats
the top level and one level into each subfolder: cost grows with the number of
entries, never with file sizes. The sidecar's own files (its state folder and
the trainer log, which is watched separately) are left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputFingerprint:
    entries: int
    total_bytes: int
    newest_mtime_ns: int


class OutputWatcher:
    def __init__(self, output_dir: Path, *, ignore: Iterable[Path] = ()):
        self.output_dir = output_dir
        self._ignore = {os.path.abspath(path) for path in ignore}
        self._last: OutputFingerprint | None = None

    def poll(self) -> bool:
        """True when something in the output folder changed since the previous poll."""
        current = self.fingerprint()
        changed = self._last is not None and current != self._last
        self._last = current
        return changed

    def fingerprint(self) -> OutputFingerprint:
        entries = total = newest = 0
        for entry in self._entries():
            try:
                status = entry.stat(follow_symlinks=False)
            except OSError:  # vanished between listing and stat (sd-scripts prunes old states)
                continue
            entries += 1
            newest = max(newest, status.st_mtime_ns)
            if not entry.is_dir(follow_symlinks=False):
                total += status.st_size
        return OutputFingerprint(entries, total, newest)

    def _entries(self) -> Iterable[os.DirEntry[str]]:
        for entry in _scan(self.output_dir):
            # Hidden entries are bookkeeping (the sidecar's own .sidecar folder), not training.
            if entry.name.startswith(".") or os.path.abspath(entry.path) in self._ignore:
                continue
            yield entry
            if entry.is_dir(follow_symlinks=False):
                yield from _scan(Path(entry.path))


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as iterator:
            return list(iterator)
    except OSError:  # missing, unreadable or vanished: nothing to see there
        return []
