"""Reports of state files already checked, so that polling a folder of many states stays
cheap: only files that are new or changed since the last scan are opened again.

A report is kept under the file's identity and everything that changes when it is written
or replaced (device, inode, size, modification and change time in nanoseconds), so a file
rewritten in place, truncated, replaced by a rename or given other permissions is checked
afresh. The memo is bounded; the oldest reports go first.
"""

from __future__ import annotations

import os

from sidecar.checkpoints.file_checks import FileReport, inspect_state_file

_Key = tuple[str, int, int, int, int, int]

# A few hundred state folders of a long run, each of a handful of files, many times over.
DEFAULT_LIMIT = 50_000


class FileReportMemo:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._reports: dict[_Key, FileReport] = {}

    def inspect(self, entry: os.DirEntry[str]) -> FileReport:
        """The report of the file ``entry`` names: from memory when it has not changed."""
        try:
            status = entry.stat()  # follows links, as opening the file for the check does
        except OSError:
            return inspect_state_file(entry.path)  # gone or unreadable: the check says which
        return self._report(entry.path, status)

    def inspect_path(self, path: str | os.PathLike[str]) -> FileReport:
        """The report of the file at ``path``, as ``inspect`` (for scans that list names)."""
        path = os.fspath(path)
        try:
            status = os.stat(path)
        except OSError:
            return inspect_state_file(path)
        return self._report(path, status)

    def _report(self, path: str, status: os.stat_result) -> FileReport:
        key = (
            path,
            status.st_dev,
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
            status.st_ctime_ns,
        )
        report = self._reports.get(key)
        if report is None:
            report = inspect_state_file(path)
            if len(self._reports) >= self.limit:
                del self._reports[next(iter(self._reports))]
            self._reports[key] = report
        return report

    def __len__(self) -> int:
        return len(self._reports)
