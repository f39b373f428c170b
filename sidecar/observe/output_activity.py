"""Notices files being created or written in the run's output folder.

States, models and samples all land in the output folder (samples one level down
in ``sample/``, state files one level down in their state folder). A long run
leaves thousands of files there, so a poll does not stat them all:

- every folder (the top level and each subfolder) is stat'ed: a file created,
  renamed or removed changes its folder's mtime, and only then is that folder
  listed again;
- files seen changing recently ("hot": new, or changed within ``hot_seconds``) are
  stat'ed each poll, because a file being written grows;
- a rotating slice of the other files is stat'ed each poll, so an old file
  rewritten in place is still noticed within a few polls.

Cost grows with the number of folders and hot files, never with file sizes. The
sidecar's own entries (hidden ones such as ``.sidecar``, the watched log) are left out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

_Stamp = tuple[int, int]  # (mtime_ns, size)


class OutputWatcher:
    def __init__(
        self,
        output_dir: Path,
        *,
        ignore: Iterable[Path] = (),
        hot_seconds: float = 30.0,
        cold_slice: int = 256,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.output_dir = output_dir
        self._ignore = {os.path.abspath(path) for path in ignore}
        self._hot_seconds = hot_seconds
        self._cold_slice = cold_slice
        self._wall = wall
        self._monotonic = monotonic
        self._folders: dict[str, int] = {}  # folder -> its mtime_ns when last listed
        self._files: dict[str, _Stamp] = {}
        self._children: dict[str, set[str]] = {}  # folder -> its files we track
        self._hot: dict[str, float] = {}  # path -> when we last saw it change (monotonic)
        self._cold_cursor = 0
        self._started = False
        self._initial_listing = False

    def poll(self) -> bool:
        """True when something in the output folder changed since the previous poll."""
        if not self._started:
            self._started = self._initial_listing = True
            self._list_folder(str(self.output_dir), top=True)
            self._initial_listing = False
            return False
        changed = self._check_folders()
        changed |= self._check_files(list(self._hot))
        changed |= self._check_files(self._next_cold_slice())
        return changed

    # -- folders -----------------------------------------------------------------------------

    def _check_folders(self) -> bool:
        changed = False
        for folder, listed_at in list(self._folders.items()):
            try:
                mtime = os.stat(folder).st_mtime_ns
            except OSError:  # removed (sd-scripts prunes old states)
                self._forget_folder(folder)
                changed = True
                continue
            if mtime != listed_at:
                # Only entries we track count: the sidecar's own files come and go too.
                changed |= self._list_folder(folder, top=folder == str(self.output_dir))
        return changed

    def _list_folder(self, folder: str, *, top: bool) -> bool:
        """(Re)list a folder; True when a tracked file or subfolder appeared or went."""
        try:
            self._folders[folder] = os.stat(folder).st_mtime_ns
            with os.scandir(folder) as iterator:
                entries = list(iterator)
        except OSError:  # missing, unreadable or vanished: nothing to see there
            return False
        changed = False
        present = set()
        for entry in entries:
            if entry.name.startswith(".") or os.path.abspath(entry.path) in self._ignore:
                continue
            present.add(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if top and entry.path not in self._folders:
                    self._list_folder(entry.path, top=False)
                    changed = True
            elif entry.path not in self._files:
                self._remember(entry.path, folder)
                changed = True
        for path in self._children.get(folder, set()) - present:
            self._drop(path)
            changed = True
        if top:
            for sub in [f for f in self._folders if f != folder and f not in present]:
                self._forget_folder(sub)
                changed = True
        return changed

    def _forget_folder(self, folder: str) -> None:
        self._folders.pop(folder, None)
        for path in self._children.pop(folder, set()):
            self._files.pop(path, None)
            self._hot.pop(path, None)

    # -- files -------------------------------------------------------------------------------

    def _remember(self, path: str, folder: str) -> None:
        stamp = _stamp(path)
        if stamp is None:
            return
        self._files[path] = stamp
        self._children.setdefault(folder, set()).add(path)
        # New since we started watching, or written just before: it may still be growing.
        if not self._initial_listing or self._wall() * 1e9 - stamp[0] < self._hot_seconds * 1e9:
            self._hot[path] = self._monotonic()

    def _drop(self, path: str) -> None:
        self._files.pop(path, None)
        self._hot.pop(path, None)
        self._children.get(os.path.dirname(path), set()).discard(path)

    def _check_files(self, paths: Iterable[str]) -> bool:
        changed = False
        for path in paths:
            if path not in self._files:
                continue
            stamp = _stamp(path)
            if stamp is None:
                self._drop(path)
                changed = True
                continue
            if stamp != self._files[path]:
                self._files[path] = stamp
                self._hot[path] = self._monotonic()
                changed = True
            elif path in self._hot and self._monotonic() - self._hot[path] > self._hot_seconds:
                del self._hot[path]  # finished writing
        return changed

    def _next_cold_slice(self) -> list[str]:
        cold = [path for path in self._files if path not in self._hot]
        if not cold:
            return []
        start = self._cold_cursor % len(cold)
        self._cold_cursor = start + self._cold_slice
        return cold[start : start + self._cold_slice]


def _stamp(path: str) -> _Stamp | None:
    try:
        status = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size)
