"""Python stacks of a hung trainer, from ``py-spy dump``, bounded in time.

py-spy attaches from outside (same UID and ptrace permitted; in a container,
CAP_SYS_PTRACE), so the trainer's code is never touched. Every process started here ends,
killed and reaped, on every path: a dump cut off at the deadline, a start that fails, or a
gathering thread abandoned by its caller.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sidecar.decide.diagnosis import ThreadStack


def find_py_spy() -> str | None:
    """py-spy beside this interpreter (the same virtualenv, activated or not), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


class PySpyRuns:
    """The py-spy processes of one bundle, so that every one of them ends, killed and reaped.

    The gathering thread starts them; :meth:`end_all` (at the bundle's deadline, from the
    hook's thread) ends those still running and lets no new one start, because an abandoned
    gatherer could otherwise go on to start dumps nobody waits for.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: list[subprocess.Popen[str]] = []
        self._ended = False

    def start(self, command: list[str]) -> subprocess.Popen[str] | None:
        """The started process; None once the bundle's deadline has ended the dumps.
        Raises OSError when it cannot start."""
        with self._lock:
            if self._ended:
                return None
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            self._started.append(process)
            return process

    def end_all(self) -> None:
        with self._lock:
            self._ended = True
            started = list(self._started)
        _end(started)


def _end(processes: Sequence[subprocess.Popen[str]], reap_within: float = 1.0) -> None:
    """Kill those still running, then reap them all. The wait is bounded: a process in
    uninterruptible sleep dies only when it leaves it, and recovery must not wait for that."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    until = time.monotonic() + reap_within
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(until - time.monotonic(), 0.01))


def py_spy_dumps(
    dumps: PySpyRuns,
    executable: str,
    pids: list[int],
    deadline: float,
    clock: Callable[[], float],
) -> list[tuple[int, str]]:
    """``py-spy dump --pid`` for each process at once, each cut off at the deadline.

    ``--nonblocking``: the trainer is not paused (ptrace-stopped) to be read. A paused
    process in uninterruptible sleep would keep py-spy waiting, and a stopped one cannot be
    paused; a hung process's stacks do not move anyway."""
    running: list[tuple[int, subprocess.Popen[str]]] = []
    try:
        for pid in pids:
            try:
                process = dumps.start([executable, "dump", "--nonblocking", "--pid", str(pid)])
            except OSError as error:
                return [(pid, f"py-spy could not start: {error}\n")]
            if process is None:
                return []  # the bundle was written without this thread's dumps
            running.append((pid, process))
        results = []
        for pid, process in running:
            try:
                output, _ = process.communicate(timeout=max(deadline - clock(), 0.05))
                if process.returncode != 0:
                    output = (
                        f"py-spy exited {process.returncode} (not permitted to attach?)\n{output}"
                    )
            except subprocess.TimeoutExpired:
                process.kill()
                output = ""
                # A py-spy stuck in the kernel dies only when it leaves it: never wait for that.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    output, _ = process.communicate(timeout=1.0)
                output = f"py-spy cut off at the incident deadline\n{output or ''}"
            results.append((pid, output))
        return results
    finally:
        # Every path (a later start failing, an exception) ends the dumps already started.
        _end([process for _, process in running])


_THREAD_LINE = re.compile(r'^Thread (?P<id>\S+) \((?P<status>[^)]*)\)(?::\s*"(?P<name>.*)")?\s*$')
_FRAME_LINE = re.compile(r"^\s+(?P<function>\S+) \((?P<file>[^()]*?)(?::\d+)?\)\s*$")


def parse_dump(pid: int, text: str) -> tuple[ThreadStack, ...]:
    """The threads of one ``py-spy dump`` and their frames, innermost first.

    py-spy prints ``Thread 4242 (idle): "MainThread"`` and then one indented
    ``function (file:line)`` line per frame; anything else (its header, an error) is skipped.
    """
    stacks: list[ThreadStack] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            stacks.append(
                ThreadStack(
                    pid=pid,
                    thread=current["id"],
                    name=current["name"],
                    active=current["active"],
                    frames=tuple(current["frames"]),
                    files=tuple(current["files"]),
                )
            )

    for line in text.splitlines():
        thread = _THREAD_LINE.match(line)
        if thread is not None:
            close()
            current = {
                "id": thread["id"],
                "name": thread["name"],
                "active": "active" in thread["status"],
                "frames": [],
                "files": [],
            }
            continue
        frame = _FRAME_LINE.match(line)
        if frame is not None and current is not None:
            current["frames"].append(frame["function"])
            current["files"].append(frame["file"])
    close()
    return tuple(stacks)
