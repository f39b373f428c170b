"""Incident bundles: what a hung trainer looked like, saved before it is killed.

After the restart nobody can ask the hung processes anything any more, so the
``before_stop`` hook saves ``<state dir>/incidents/<UTC timestamp>/`` first:

- ``verdict.json``   the verdict, its reason and figures;
- ``train.log.tail`` the end of the trainer's log;
- ``processes.json`` / ``processes.txt``  the trainer's process tree: state and kernel wait
  channel of every process and thread (a dataloader worker blocked on a pipe, a thread in a
  futex, a process in uninterruptible I/O), CPU times and I/O counters;
- ``gpu.json``       an NVML reading, when NVML is there;
- ``stacks/<pid>.txt`` the Python stacks of the trainer's Python processes, from
  ``py-spy dump``, when py-spy is installed and allowed to attach (same UID and ptrace
  permitted; in a container, CAP_SYS_PTRACE);
- ``manifest.json``  what was captured, what was not and why, how long it took.

It costs recovery at most ``budget`` seconds (5 s): the slow parts (reading /proc of a
process in uninterruptible sleep can block, py-spy can take seconds) run on a worker thread
that is abandoned at the deadline, and what it gathered so far is written; the py-spy
processes it started are killed and reaped then, and it starts no more. Every file has a
size cap, so a bundle stays under ~3 MB, and only the newest ``keep`` bundles are kept.
A bundle appears under its final name only when complete (written as a hidden folder,
then renamed), so ``status`` never lists half a bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from sidecar import __version__, events
from sidecar.decide.decision import Verdict
from sidecar.observe.gpu import GpuMonitor
from sidecar.observe.log_follower import tail_text
from sidecar.observe.python_stacks import PySpyRuns, py_spy_dumps
from sidecar.observe.thread_states import describe_process, trainer_processes

INCIDENTS_FOLDER = "incidents"
LOG_TAIL_BYTES = 256 * 1024
STACK_BYTES = 256 * 1024
MAX_PROCESSES = 64
MAX_PYSPY_PROCESSES = 8


@dataclass(frozen=True)
class IncidentSources:
    """Where to look, resolved when a stall happens (the watched run can change)."""

    state_dir: Path
    train_log: Path
    pids: Sequence[int]


class IncidentRecorder:
    """The watchdog's ``before_stop`` hook."""

    def __init__(
        self,
        sources: Callable[[], IncidentSources | None],
        *,
        keep: int,
        gpu: GpuMonitor | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
        budget: float = 5.0,
        py_spy: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``py_spy``: the py-spy executable (``shutil.which("py-spy")``), or None."""
        self._sources = sources
        self.keep = keep
        self._gpu = gpu
        self._log = log or structlog.get_logger("sidecar")
        self.budget = budget
        self._py_spy = py_spy
        self._clock = clock

    def __call__(self, verdict: Verdict, figures: dict[str, Any]) -> None:
        self.save(verdict, figures)

    def save(self, verdict: Verdict, figures: dict[str, Any]) -> Path | None:
        """The bundle's folder; None when bundles are off or no run is watched."""
        if self.keep <= 0:
            return None
        sources = self._sources()
        if sources is None:
            return None
        started = self._clock()
        deadline = started + self.budget
        pieces: dict[str, str] = {}
        skipped: dict[str, str] = {}
        pieces["verdict.json"] = _json(
            {
                "kind": verdict.kind.value,
                "reason": verdict.reason,
                "figures": figures,
                "saved_at": _utc_now().isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "sidecar_version": __version__,
                "pids": list(sources.pids),
            }
        )
        # NVML on this (the loop's) thread: its handles are the loop's, and it answers in ms.
        self._gpu_piece(pieces, skipped)
        dumps = PySpyRuns()
        worker = threading.Thread(
            target=self._gather,
            args=(sources, deadline, pieces, skipped, dumps),
            name="incident",
            daemon=True,
        )
        worker.start()
        worker.join(max(deadline - self._clock(), 0.0))
        if worker.is_alive():
            skipped["unfinished"] = f"still gathering at the {self.budget:g} s deadline"
        # The worker may be abandoned mid-dump (or before its first): no py-spy of this
        # bundle may outlive it, attached to the trainer or left unreaped.
        dumps.end_all()
        folder = self._write(
            sources.state_dir / INCIDENTS_FOLDER, dict(pieces), dict(skipped), started
        )
        return folder

    # -- gathering (worker thread; may be abandoned) ---------------------------------------

    def _gather(
        self,
        sources: IncidentSources,
        deadline: float,
        pieces: dict[str, str],
        skipped: dict[str, str],
        dumps: PySpyRuns,
    ) -> None:
        try:
            pieces["train.log.tail"] = tail_text(sources.train_log, LOG_TAIL_BYTES)
        except OSError as error:
            skipped["train.log.tail"] = str(error)
        processes = trainer_processes(sources.pids)
        table = [describe_process(process) for process in processes[:MAX_PROCESSES]]
        pieces["processes.json"] = _json(table)
        pieces["processes.txt"] = _process_table(table)
        if len(processes) > MAX_PROCESSES:
            skipped["processes"] = f"{len(processes) - MAX_PROCESSES} more processes not shown"
        if self._py_spy is None:
            skipped["stacks"] = "py-spy is not installed"
            return
        pythons = [row["pid"] for row in table if _is_python(row)][:MAX_PYSPY_PROCESSES]
        if not pythons:
            skipped["stacks"] = "no Python process in the trainer's tree"
            return
        for pid, text in py_spy_dumps(dumps, self._py_spy, pythons, deadline - 0.3, self._clock):
            pieces[f"stacks/{pid}.txt"] = text[-STACK_BYTES:]

    def _gpu_piece(self, pieces: dict[str, str], skipped: dict[str, str]) -> None:
        reading = None
        if self._gpu is not None:
            try:
                reading = self._gpu.sample()
            except Exception as error:  # a report must not fail on a GPU glitch
                skipped["gpu.json"] = repr(error)
                return
        if reading is None:
            skipped["gpu.json"] = "NVML unavailable"
            return
        pieces["gpu.json"] = _json(
            {"error": reading.error, "samples": [asdict(sample) for sample in reading.samples]}
        )

    # -- writing (the hook's own thread) -----------------------------------------------------

    def _write(
        self, incidents: Path, pieces: dict[str, str], skipped: dict[str, str], started: float
    ) -> Path:
        name = _unique_name(incidents)
        work = incidents / f".{name}.partial"
        (work / "stacks").mkdir(parents=True, exist_ok=True)
        for relative, text in pieces.items():
            (work / relative).write_text(text, encoding="utf-8", errors="replace")
        if not any((work / "stacks").iterdir()):
            (work / "stacks").rmdir()
        files = {
            str(path.relative_to(work)): path.stat().st_size
            for path in sorted(work.rglob("*"))
            if path.is_file()
        }
        seconds = round(self._clock() - started, 3)
        manifest = {"files": files, "skipped": skipped, "seconds": seconds}
        (work / "manifest.json").write_text(_json(manifest), encoding="utf-8")
        folder = incidents / name
        os.replace(work, folder)
        pruned = prune(incidents, self.keep)
        self._log.info(
            events.INCIDENT_SAVED,
            path=str(folder),
            seconds=seconds,
            bytes=sum(files.values()),
            files=sorted(files),
            skipped=skipped or None,
            pruned=len(pruned) or None,
        )
        return folder


def prune(incidents: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` bundles, and any half-written leftovers."""
    try:
        leftovers = [p for p in incidents.iterdir() if p.is_dir() and p.name.startswith(".")]
    except FileNotFoundError:
        return []
    bundles = list_bundles(incidents)
    removed = leftovers + bundles[: max(len(bundles) - keep, 0)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def list_bundles(incidents: Path) -> list[Path]:
    """Complete bundles, oldest first (their names are UTC timestamps)."""
    try:
        found = [p for p in incidents.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except FileNotFoundError:
        return []
    return sorted(found, key=_bundle_order)


def _bundle_order(folder: Path) -> tuple[str, int]:
    """``20250101T031502Z-10`` after ``-2``: a second bundle in one second gets a number."""
    stamp, _, number = folder.name.partition("-")
    return stamp, int(number) if number.isdigit() else 1


# -- processes -------------------------------------------------------------------------------


def _process_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'PID':>7} {'PPID':>7} {'STATUS':<10} {'WCHAN':<24} {'CPU s':>8} "
        f"{'READ B':>12} {'WRITE B':>12}  COMMAND"
    ]
    for row in rows:
        io = row.get("io") or {}
        cpu = row.get("cpu_user_seconds", 0.0) + row.get("cpu_system_seconds", 0.0)
        lines.append(
            f"{row['pid']:>7} {row.get('ppid', '?'):>7} {row.get('status', '?'):<10} "
            f"{(row.get('wchan') or '-')[:24]:<24} {cpu:>8.2f} "
            f"{io.get('read_bytes', '-'):>12} {io.get('write_bytes', '-'):>12}  "
            f"{row.get('cmdline', row.get('name', ''))[:120]}"
        )
        for thread in row.get("threads", []):
            lines.append(
                f"{'':>7} {'':>7}   thread {thread['tid']} {thread['state'] or '?'} "
                f"{thread['wchan'] or '-'} {thread['name'] or ''}"
            )
    return "\n".join(lines) + "\n"


def _is_python(row: dict[str, Any]) -> bool:
    first = str(row.get("cmdline", "")).split(" ", 1)[0]
    return "python" in Path(first).name or "python" in str(row.get("name", ""))


# -- helpers -----------------------------------------------------------------------------------


def _unique_name(incidents: Path) -> str:
    base = _utc_now().strftime("%Y%m%dT%H%M%SZ")
    name, number = base, 1
    while (incidents / name).exists():
        number += 1
        name = f"{base}-{number}"
    return name


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str) + "\n"
