"""Where this run begins: one run per name.

FluxGym reuses ``outputs/<name>`` for a new run of the same LoRA name, so states and a
final model of an earlier run can lie in the folder. A new run begins when its launch
script (without the sidecar's own edits) differs from the recorded run's, or when the
script was written anew after the recorded run completed (FluxGym writes it at every
Start), or — with no record yet — when the script is newer than a final model already
there. From then on only files written after the boundary belong to the run. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScriptSeen:
    digest: str  # the launch script's identity, without the sidecar's own edits
    mtime: float  # wall clock of its last write
    mtime_ns: int


@dataclass(frozen=True)
class RunBoundary:
    new_run: bool
    started_at: float | None  # files written before this belong to an earlier run
    reason: str


def run_boundary(
    *,
    script: ScriptSeen,
    recorded_digest: str | None,
    recorded_started_at: float | None,
    recorded_script_mtime_ns: int | None,
    completed: bool,
    final_model_mtime: float | None,
) -> RunBoundary:
    if recorded_digest is None:
        if final_model_mtime is not None and final_model_mtime < script.mtime:
            return RunBoundary(
                True, script.mtime, "train.sh was written after the final model of an earlier run"
            )
        return RunBoundary(True, recorded_started_at, "first sight of this run")
    if script.digest != recorded_digest:
        return RunBoundary(True, script.mtime, "train.sh has other settings than the recorded run")
    if completed and recorded_script_mtime_ns not in (None, script.mtime_ns):
        return RunBoundary(
            True, script.mtime, "train.sh was written again after the recorded run completed"
        )
    return RunBoundary(False, recorded_started_at, "the recorded run")


def written_by_this_run(file_time: float | None, started_at: float | None) -> bool:
    """Whether a file completed at ``file_time`` belongs to the run that began then."""
    return started_at is None or (file_time is not None and file_time >= started_at)
