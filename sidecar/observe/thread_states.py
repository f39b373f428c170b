"""What the kernel says a trainer's processes and threads are doing, read from /proc.

Readable for a process of the same UID without ptrace rights: status, kernel wait channel
(``wchan``), CPU times and I/O counters, per process and per thread. A dataloader worker
blocked on a pipe, a thread in a futex, a process in uninterruptible I/O: the kernel often
knows where a hang is when Python cannot be asked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import psutil

from sidecar.observe.process_tree import tree_of

MAX_THREADS = 32  # per process; a trainer has a few dozen (CUDA, dataloader, pin-memory)
_CMDLINE_CHARS = 1000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def trainer_processes(pids: Sequence[int]) -> list[psutil.Process]:
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        for process in tree_of(pid):
            seen.setdefault(process.pid, process)
    return list(seen.values())


def describe_process(process: psutil.Process) -> dict[str, Any]:
    row: dict[str, Any] = {"pid": process.pid}
    try:
        with process.oneshot():
            row["ppid"] = process.ppid()
            row["name"] = process.name()
            row["status"] = process.status()
            row["cmdline"] = " ".join(process.cmdline())[:_CMDLINE_CHARS]
            times = process.cpu_times()
            row["cpu_user_seconds"] = times.user
            row["cpu_system_seconds"] = times.system
            row["memory_rss_bytes"] = process.memory_info().rss
            row["num_threads"] = process.num_threads()
            row["io"] = _io(process)
            row["context_switches"] = process.num_ctx_switches()._asdict()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        row["status"] = "gone"
        return row
    except psutil.AccessDenied as error:
        row["access_denied"] = str(error)
    row["wchan"] = _proc_text(f"/proc/{process.pid}/wchan")
    row["threads"] = thread_rows(process.pid)
    return row


def _io(process: psutil.Process) -> dict[str, int] | None:
    try:
        return dict(process.io_counters()._asdict())
    except (psutil.AccessDenied, AttributeError):
        return None  # another UID, or a platform without /proc/<pid>/io


def thread_rows(pid: int) -> list[dict[str, Any]]:
    """State and wait channel of each thread: where a hang is, the kernel often knows."""
    try:
        tids = sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return []
    threads = []
    for tid in tids[:MAX_THREADS]:
        stat = _proc_text(f"/proc/{pid}/task/{tid}/stat") or ""
        # "tid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ")"
        name = stat[stat.find("(") + 1 : stat.rfind(")")] if ")" in stat else None
        state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0] if ")" in stat else None
        fields = stat[stat.rfind(")") + 2 :].split(" ") if ")" in stat else []
        threads.append(
            {
                "tid": tid,
                "name": name,
                "state": state,
                "wchan": _proc_text(f"/proc/{pid}/task/{tid}/wchan"),
                "cpu_seconds": _cpu_seconds(fields),
            }
        )
    return threads


def _cpu_seconds(fields: list[str]) -> float | None:
    """utime + stime (fields 14 and 15 of stat, 12th and 13th after the state) in seconds."""
    try:
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def _proc_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(4096).strip() or None
    except OSError:
        return None
