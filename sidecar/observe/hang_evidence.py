"""What a hung trainer is doing, sampled twice: thread states and Python stacks.

Two looks ``window`` seconds apart tell a stuck process from a slow one: a thread's CPU time
between them says whether it spins or sleeps, and the same Python stacks in both say it did
not move. The kernel's view (``/proc``) needs no rights beyond the same UID; the stacks need
py-spy and ptrace rights, and their absence is said once and then only noted.

Runs on the incident's worker thread, which may be abandoned at its deadline: everything it
gathers is put into ``Gathered`` as soon as it is read, so what was read before a blocking
``/proc`` read (a process in uninterruptible sleep) is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.decide.diagnosis import Evidence, ProcessView, ThreadView, is_python
from sidecar.decide.sections import Section
from sidecar.observe.python_stacks import PySpyRuns, parse_dump, py_spy_dumps
from sidecar.observe.thread_states import describe_process, thread_rows, trainer_processes

MAX_PROCESSES = 64
MAX_PYSPY_PROCESSES = 8
_NOT_PERMITTED = ("permission denied", "operation not permitted", "not permitted", "ptrace")


@dataclass
class Gathered:
    """Filled in as it is read; a gatherer abandoned at its deadline leaves what it had."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # the first look, whole
    later_threads: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    window: float = 0.0  # seconds between the two looks
    more_processes: int = 0
    stacks: list[dict[int, str]] = field(default_factory=list)  # py-spy text per pid, per look
    stacks_missing: str | None = None
    flight_recorder: str | None = None  # the NCCL dumps' one-line summary
    flight_dumps: dict[str, bytes] = field(default_factory=dict)  # bundle path -> the dump


def gather(
    pids: Sequence[int],
    into: Gathered,
    *,
    py_spy: str | None,
    dumps: PySpyRuns,
    deadline: float,
    window: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    no_py_spy: str = "py-spy is not installed",
) -> None:
    """Two looks at the trainer's process tree, ``window`` apart, each with its stacks."""
    processes = trainer_processes(pids)
    into.more_processes = max(len(processes) - MAX_PROCESSES, 0)
    processes = processes[:MAX_PROCESSES]
    first_at = clock()
    for process in processes:
        into.rows.append(describe_process(process))
    pythons = [
        row["pid"]
        for row in into.rows
        if is_python(str(row.get("cmdline", "")), str(row.get("name", "")))
    ][:MAX_PYSPY_PROCESSES]
    if py_spy is None:
        into.stacks_missing = no_py_spy
    elif not pythons:
        into.stacks_missing = "no Python process in the trainer's tree"
    else:
        into.stacks.append(_dump(dumps, py_spy, pythons, deadline, clock, into))
    pause = window - (clock() - first_at)
    if pause > 0 and clock() + pause < deadline - 0.5:
        sleep(pause)
    into.window = clock() - first_at
    for row in into.rows:
        into.later_threads[row["pid"]] = thread_rows(row["pid"])
    if (
        py_spy is not None
        and into.stacks
        and into.stacks_missing is None
        and clock() < deadline - 0.5
    ):
        into.stacks.append(_dump(dumps, py_spy, pythons, deadline, clock, into))


def _dump(
    dumps: PySpyRuns,
    py_spy: str,
    pids: list[int],
    deadline: float,
    clock: Callable[[], float],
    into: Gathered,
) -> dict[int, str]:
    texts = dict(py_spy_dumps(dumps, py_spy, pids, deadline - 0.3, clock))
    if texts and all(_refused(text) for text in texts.values()):
        first = next(iter(texts.values())).strip().splitlines()
        into.stacks_missing = "py-spy may not attach (ptrace not permitted): " + (
            first[-1] if first else "no output"
        )
    return texts


def _refused(text: str) -> bool:
    """py-spy could not start, or exited saying it may not attach."""
    if text.startswith("py-spy could not start"):
        return True
    return text.startswith("py-spy exited") and any(w in text.lower() for w in _NOT_PERMITTED)


def evidence(
    gathered: Gathered,
    *,
    section: Section | None,
    gpu_error: str | None,
    gpu_busy: bool | None,
    ranks: int,
    flight_recorder: str | None = None,
) -> Evidence:
    """The gathered looks as the diagnosis reads them."""
    processes = tuple(_process_view(row, gathered) for row in gathered.rows)
    samples = tuple(
        tuple(stack for pid, text in sample.items() for stack in parse_dump(pid, text))
        for sample in gathered.stacks
    )
    samples = tuple(sample for sample in samples if sample)
    missing = gathered.stacks_missing
    if missing is None and not samples and gathered.stacks:
        missing = "py-spy printed no stacks"
    return Evidence(
        section=section,
        processes=processes,
        stack_samples=samples,
        stacks_missing=missing,
        gpu_error=gpu_error,
        gpu_busy=gpu_busy,
        ranks=ranks,
        flight_recorder=flight_recorder,
    )


def _process_view(row: dict[str, Any], gathered: Gathered) -> ProcessView:
    later = {thread["tid"]: thread for thread in gathered.later_threads.get(row["pid"], [])}
    threads = []
    for thread in row.get("threads", []):
        again = later.get(thread["tid"])
        share = None
        if again is not None and gathered.window > 0:
            before, after = thread.get("cpu_seconds"), again.get("cpu_seconds")
            if before is not None and after is not None:
                share = max(after - before, 0.0) / gathered.window
        state = thread.get("state")
        looked_again = row["pid"] in gathered.later_threads
        if (
            state in ("D", "T", "t")
            and looked_again
            and (again is None or again.get("state") != state)
        ):
            # D or T must hold in both looks: a thread seen in two states was moving, and
            # one gone by the second look is no evidence. (No second look at all: its /proc
            # read may be what blocked, itself a sign of uninterruptible sleep.)
            state = again.get("state") if again is not None else None
        threads.append(
            ThreadView(
                tid=thread["tid"],
                name=thread.get("name"),
                state=state,
                wchan=thread.get("wchan"),
                cpu_share=share,
            )
        )
    return ProcessView(
        pid=row["pid"],
        ppid=row.get("ppid"),
        name=str(row.get("name", "")),
        cmdline=str(row.get("cmdline", "")),
        state=row.get("status"),
        threads=tuple(threads),
    )
