"""Incident bundles: what a hung trainer looked like, and what kind of hang it is.

After the restart nobody can ask the hung processes anything any more, so the
``before_stop`` hook looks at them twice (``observe/hang_evidence``), classifies the hang
(``decide/diagnosis``: the class goes into the ``stall_detected`` line) and saves
``<state dir>/incidents/<UTC timestamp>/``:

- ``verdict.json``   the verdict, its reason and figures, the diagnosis among them;
- ``diagnosis.json`` the hang's class, its evidence, what it was based on, the mitigation;
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
from sidecar.decide.diagnosis import Diagnosis, diagnose
from sidecar.decide.sections import Section
from sidecar.observe.flight_recorder import request_dumps
from sidecar.observe.gpu import GpuMonitor, GpuReading
from sidecar.observe.hang_evidence import Gathered, evidence, gather
from sidecar.observe.log_follower import tail_text
from sidecar.observe.python_stacks import PySpyRuns

INCIDENTS_FOLDER = "incidents"
LOG_TAIL_BYTES = 256 * 1024
STACK_BYTES = 256 * 1024
FLIGHT_RECORDER_WAIT = 2.0  # seconds for the ranks' heartbeat threads (1 s polls) to dump
FLIGHT_DUMP_BYTES = 8 * 1024 * 1024
_BUSY_PERCENT = 90  # NVML's coarse utilisation: a GPU this busy runs kernels all the time


@dataclass(frozen=True)
class IncidentSources:
    """Where to look, resolved when a stall happens (the watched run can change)."""

    state_dir: Path
    train_log: Path
    pids: Sequence[int]
    ranks: int = 1  # processes the launch starts (more than one: collectives between them)
    flight_recorder: Path | None = None  # the ranks' NCCL dump FIFOs, when they made them


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
        window: float = 0.5,
        no_py_spy: str = "py-spy is not installed",
    ):
        """``window``: seconds between the two looks at the trainer; ``py_spy``: the py-spy
        executable (``shutil.which("py-spy")``), or None."""
        self._sources = sources
        self.keep = keep
        self._gpu = gpu
        self._log = log or structlog.get_logger("sidecar")
        self.budget = budget
        self._py_spy = py_spy
        self._clock = clock
        self.window = window
        self._no_py_spy = no_py_spy  # why py_spy is None
        self._said_stacks_missing = False

    def __call__(self, verdict: Verdict, figures: dict[str, Any]) -> dict[str, Any]:
        """Diagnose the hang and save its bundle; the diagnosis goes into the verdict's line."""
        diagnosis, _ = self.inspect(verdict, figures)
        return diagnosis.figures() if diagnosis is not None else {}

    def save(self, verdict: Verdict, figures: dict[str, Any]) -> Path | None:
        """The bundle's folder; None when bundles are off or no run is watched."""
        return self.inspect(verdict, figures)[1]

    def inspect(
        self, verdict: Verdict, figures: dict[str, Any]
    ) -> tuple[Diagnosis | None, Path | None]:
        """Look at the hung trainer (bounded by ``budget``), classify the hang, and save the
        bundle (unless bundles are off). None for both when no run is watched."""
        sources = self._sources()
        if sources is None:
            return None, None
        started = self._clock()
        deadline = started + self.budget
        pieces: dict[str, str] = {}
        skipped: dict[str, str] = {}
        # NVML on this (the loop's) thread: its handles are the loop's, and it answers in ms.
        reading = self._gpu_piece(pieces, skipped)
        dumps = PySpyRuns()
        gathered = Gathered()
        worker = threading.Thread(
            target=self._gather,
            args=(sources, deadline, pieces, skipped, dumps, gathered),
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
        diagnosis = self._diagnose(gathered, figures, reading, sources.ranks)
        if self.keep <= 0:
            return diagnosis, None
        self._bundle_pieces(gathered, pieces, skipped)
        pieces["verdict.json"] = _json(
            {
                "kind": verdict.kind.value,
                "reason": verdict.reason,
                "figures": {**figures, **diagnosis.figures()},
                "saved_at": _utc_now().isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "sidecar_version": __version__,
                "pids": list(sources.pids),
            }
        )
        pieces["diagnosis.json"] = _json(diagnosis.record())
        folder = self._write(
            sources.state_dir / INCIDENTS_FOLDER,
            {**pieces, **dict(gathered.flight_dumps)},
            dict(skipped),
            started,
        )
        return diagnosis, folder

    def _diagnose(
        self,
        gathered: Gathered,
        figures: dict[str, Any],
        reading: GpuReading | None,
        ranks: int,
    ) -> Diagnosis:
        named = str(figures.get("section"))
        seen = evidence(
            gathered,
            section=Section(named) if named in Section._value2member_map_ else None,
            gpu_error=reading.error if reading is not None else None,
            gpu_busy=(
                any(s.utilization_percent >= _BUSY_PERCENT for s in reading.samples)
                if reading is not None and reading.samples
                else None
            ),
            ranks=ranks,
            flight_recorder=gathered.flight_recorder,
        )
        if seen.stacks_missing and not self._said_stacks_missing:
            self._said_stacks_missing = True  # said once; every diagnosis notes it
            self._log.info(
                events.STACKS_UNAVAILABLE,
                reason=seen.stacks_missing,
                falls_back_to="thread states from /proc and the trainer's output",
            )
        return diagnose(seen)

    # -- gathering (worker thread; may be abandoned) ---------------------------------------

    def _gather(
        self,
        sources: IncidentSources,
        deadline: float,
        pieces: dict[str, str],
        skipped: dict[str, str],
        dumps: PySpyRuns,
        gathered: Gathered,
    ) -> None:
        try:
            pieces["train.log.tail"] = tail_text(sources.train_log, LOG_TAIL_BYTES)
        except OSError as error:
            skipped["train.log.tail"] = str(error)
        if sources.flight_recorder is not None:
            # First, while the hung ranks' heartbeat threads still answer: which is behind.
            self._flight_dumps(sources.flight_recorder, deadline, pieces, skipped, gathered)
        gather(
            sources.pids,
            gathered,
            py_spy=self._py_spy,
            dumps=dumps,
            deadline=deadline,
            window=self.window,
            clock=self._clock,
            no_py_spy=self._no_py_spy,
        )

    def _flight_dumps(
        self,
        folder: Path,
        deadline: float,
        pieces: dict[str, str],
        skipped: dict[str, str],
        gathered: Gathered,
    ) -> None:
        wait = min(FLIGHT_RECORDER_WAIT, max(deadline - self._clock() - 2.0, 0.0))
        dumps = request_dumps(folder, wait=wait, clock=self._clock)
        if dumps is None:
            return  # no rank made a FIFO: one process, or a trainer without the recorder
        gathered.flight_recorder = dumps.summary
        pieces["flight-recorder/summary.txt"] = dumps.summary + "\n"
        for rank, path in sorted(dumps.dumped.items()):
            try:
                data = path.read_bytes()[:FLIGHT_DUMP_BYTES]
            except OSError as error:
                skipped[f"flight-recorder/rank{rank}"] = str(error)
                continue
            gathered.flight_dumps[f"flight-recorder/rank{rank}.pickle"] = data
        if dumps.missing:
            skipped["flight-recorder"] = f"no dump from ranks {dumps.missing}"

    @staticmethod
    def _bundle_pieces(gathered: Gathered, pieces: dict[str, str], skipped: dict[str, str]) -> None:
        table = list(gathered.rows)
        pieces["processes.json"] = _json(table)
        pieces["processes.txt"] = _process_table(table)
        if gathered.more_processes:
            skipped["processes"] = f"{gathered.more_processes} more processes not shown"
        if gathered.stacks_missing:
            skipped["stacks"] = gathered.stacks_missing
        if gathered.stacks:
            for pid, text in gathered.stacks[-1].items():
                pieces[f"stacks/{pid}.txt"] = text[-STACK_BYTES:]

    def _gpu_piece(self, pieces: dict[str, str], skipped: dict[str, str]) -> GpuReading | None:
        reading = None
        if self._gpu is not None:
            try:
                reading = self._gpu.sample()
            except Exception as error:  # a report must not fail on a GPU glitch
                skipped["gpu.json"] = repr(error)
                return None
        if reading is None:
            skipped["gpu.json"] = "NVML unavailable"
            return None
        pieces["gpu.json"] = _json(
            {"error": reading.error, "samples": [asdict(sample) for sample in reading.samples]}
        )
        return reading

    # -- writing (the hook's own thread) -----------------------------------------------------

    def _write(
        self,
        incidents: Path,
        pieces: dict[str, str | bytes],
        skipped: dict[str, str],
        started: float,
    ) -> Path:
        name = _unique_name(incidents)
        work = incidents / f".{name}.partial"
        (work / "stacks").mkdir(parents=True, exist_ok=True)
        for relative, content in pieces.items():
            target = work / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8", errors="replace")
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
