"""Reports of state files already checked, so that polling a folder of many states stays
cheap: only files that are new or changed since the last scan are opened again.

A report is kept under the file's identity and everything that changes when it is written
or replaced (device, inode, size, modification and change time in nanoseconds), so a file
rewritten in place, truncated, replaced by a rename or given other permissions is checked
afresh. The memo is bounded; the oldest reports go first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

from sidecar.checkpoints.file_checks import FileReport, inspect_state_file

_Key = tuple[Callable[[str], Any], str, int, int, int, int, int]
_Report = TypeVar("_Report")

# A few hundred state folders of a long run, each of a handful of files, many times over.
DEFAULT_LIMIT = 50_000


class FileReportMemo:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._reports: dict[_Key, Any] = {}

    def inspect(self, entry: os.DirEntry[str]) -> FileReport:
        """The report of the file ``entry`` names: from memory when it has not changed."""
        try:
            status = entry.stat()  # follows links, as opening the file for the check does
        except OSError:
            return inspect_state_file(entry.path)  # gone or unreadable: the check says which
        return self.recall(entry.path, status, inspect_state_file)

    def recall(self, path: str, status: os.stat_result, read: Callable[[str], _Report]) -> _Report:
        """``read(path)``, from memory when the file has not changed since ``status`` was
        taken of it by the last read of the same kind. ``status`` must follow links, as
        opening the file does."""
        key = (
            read,
            path,
            status.st_dev,
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
            status.st_ctime_ns,
        )
        if key in self._reports:
            return cast(_Report, self._reports[key])
        report = read(path)
        if len(self._reports) >= self.limit:
            del self._reports[next(iter(self._reports))]
        self._reports[key] = report
        return report

    def __len__(self) -> int:
        return len(self._reports)
