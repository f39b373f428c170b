"""The trainer's process tree: what it is doing (CPU, bytes written) and how to stop it.

psutil gives the tree, CPU times and ``/proc/<pid>/io`` counters portably and
copes with processes vanishing mid-walk, which a hand-written ``/proc`` parser
would have to re-learn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class TreeUsage:
    processes: int
    cpu_seconds: float
    write_bytes: int | None  # None when /proc/<pid>/io is not readable (another UID)


def tree_of(root_pid: int) -> list[psutil.Process]:
    """The root and all its descendants that are alive now."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class TreeWrites:
    """Notices when the trainer's processes write anything (``wchar`` in /proc/<pid>/io).

    That includes what they print into a pipe nobody lets us read — the progress bar of
    a run FluxGym's web UI started. A process seen for the first time sets its baseline.
    """

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def grew(self, root_pids: Sequence[int]) -> bool:
        current: dict[int, int] = {}
        for root in root_pids:
            for process in tree_of(root):
                try:
                    current[process.pid] = process.io_counters().write_chars
                except (psutil.Error, AttributeError):
                    continue
        grew = any(current[pid] > self._seen[pid] for pid in current.keys() & self._seen.keys())
        self._seen = current
        return grew


def group_members(process_group: int) -> list[psutil.Process]:
    """Every live process in a process group (children whose parent died are re-parented)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == process_group:
                members.append(process)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def usage_of(processes: Sequence[psutil.Process]) -> TreeUsage:
    cpu = 0.0
    written: int | None = 0
    alive = 0
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                cpu += times.user + times.system
                alive += 1
                if written is not None:
                    try:
                        written += process.io_counters().write_bytes
                    except (psutil.AccessDenied, AttributeError):
                        written = None
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return TreeUsage(processes=alive, cpu_seconds=round(cpu, 2), write_bytes=written)


def usage_figures(trainer_pids: Sequence[int]) -> dict[str, Any]:
    """CPU time and bytes written by the trainer's process trees, for a verdict's figures;
    empty where its processes are not visible (container mode without a shared namespace)."""
    if not trainer_pids:
        return {}
    trees = [process for pid in trainer_pids for process in tree_of(pid)]
    usage = usage_of(trees[: 4 * len(trainer_pids)])
    return {
        "trainer_processes": usage.processes,
        "trainer_cpu_seconds": usage.cpu_seconds,
        "trainer_write_bytes": usage.write_bytes,
    }


def terminate_tree(
    processes: Sequence[psutil.Process],
    *,
    grace: float,
    send_group_signal: Callable[[int], None] | None = None,
    on_kill: Callable[[list[psutil.Process]], None] | None = None,
) -> list[psutil.Process]:
    """SIGTERM every process, wait ``grace``, SIGKILL what remains, wait until all are gone.

    ``send_group_signal`` additionally signals a whole process group (catching
    children forked after the tree was listed). Returns processes that survived
    even SIGKILL (only possible for unkillable, e.g. D-state, processes).
    """
    _signal_all(processes, signal.SIGTERM, send_group_signal)
    alive = wait_until_gone(processes, timeout=grace)
    if not alive:
        return []
    if on_kill:
        on_kill(alive)
    _signal_all(alive, signal.SIGKILL, send_group_signal)
    return wait_until_gone(alive, timeout=10.0)


def kernel_view(processes: Sequence[psutil.Process]) -> list[dict[str, object]]:
    """Pid, state letter and wait channel of each process, as /proc shows them now."""
    rows: list[dict[str, object]] = []
    for process in processes:
        row: dict[str, object] = {"pid": process.pid}
        for key, path in (("stat", "stat"), ("wchan", "wchan")):
            try:
                with open(f"/proc/{process.pid}/{path}", encoding="utf-8", errors="replace") as f:
                    text = f.read(4096).strip()
            except OSError:
                continue
            if key == "stat":
                row["state"] = text[text.rfind(")") + 2 :].split(" ", 1)[0] if ")" in text else None
            else:
                row["wchan"] = text or None
        rows.append(row)
    return rows


def wait_until_gone(
    processes: Sequence[psutil.Process], *, timeout: float, interval: float = 0.05
) -> list[psutil.Process]:
    """Wait until every process has exited; the ones still alive at the timeout.

    A zombie counts as gone: it holds no GPU memory and runs no code, and when its
    parent is not us (the trainer's python under bash, re-parented to PID 1) only
    that parent can reap it — psutil.wait_procs would wait for the reaping.
    """
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while True:
        alive = [process for process in alive if _running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(interval)


def _running(process: psutil.Process) -> bool:
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(process.pid, os.WNOHANG)  # reap it if it is our own child
            return False
        return True
    except psutil.NoSuchProcess:
        return False


def _signal_all(
    processes: Sequence[psutil.Process],
    signum: signal.Signals,
    send_group_signal: Callable[[int], None] | None,
) -> None:
    if send_group_signal:
        send_group_signal(signum)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            process.send_signal(signum)
