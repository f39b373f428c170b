"""The parts that belong to one watched run, built together and replaced together when the
loop follows another run: where its files are, the sidecar's record of it, the observer of
its output and the pointer that writes its resume argument."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.observe.gpu import GpuMonitor
from sidecar.observe.observer import RunObserver
from sidecar.recover.resume_point import ResumeOptions, ResumePointer
from sidecar.run.paths import RunPaths
from sidecar.run.record import RunRecord


@dataclass
class WatchedRun:
    paths: RunPaths
    record: RunRecord
    observer: RunObserver
    pointer: ResumePointer

    @classmethod
    def open(
        cls, paths: RunPaths, *, gpu: GpuMonitor | None, resume: ResumeOptions, log: Any
    ) -> WatchedRun:
        """Raises LedgerError when the run's state.json exists but cannot be read."""
        return cls(
            paths=paths,
            record=RunRecord(paths, log),
            observer=RunObserver(paths, gpu),
            pointer=ResumePointer(paths, resume, log),
        )

    def note_resume_pointer(self) -> None:
        """Remember which checkpoint an attempt we did not launch resumes from."""
        resumed = self.pointer.resumed_checkpoint()
        ledger = self.record.ledger
        if resumed is not None and resumed != ledger.current_checkpoint:
            ledger.current_checkpoint = resumed
            ledger.current_checkpoint_completed_at = None
            self.record.save()
