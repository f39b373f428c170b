"""A state is complete only when one save wrote all of it (the in-place overwrite).

After a resume sd-scripts' step names come round again and accelerate's save_state
rewrites the existing folder file by file, in a fixed order (REFERENCE sections 2 and 3).
A save that hangs or crashes half-way leaves new files beside the previous save's, all
whole and all present: only their times, against the write order, give it away.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from state_factory import STATE_FILES, write_state_folder

from sidecar.checkpoints.accelerate_files import MIXED, mixed_save_problem, write_position
from sidecar.checkpoints.choice import choose_resume_point
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import Candidate, choose_checkpoint, find_candidates
from sidecar.run.ledger import Ledger
from sidecar.trainers.sd_scripts.state_naming import state_naming

# The scan as sd-scripts' runs see it: its state folder names.
sd_states = partial(find_candidates, naming=state_naming)

T = 1_750_000_000.0  # the earlier save
NEW = T + 600  # the save that did not finish
LATER = NEW + 3600
FOLDER = "my-lora-step00000010-state"


def state(output_dir: Path, name: str = FOLDER, **options: Any) -> Path:
    options.setdefault("mtime", T)
    return write_state_folder(output_dir / name, **options)


def only(candidates: list[Candidate]) -> Candidate:
    assert len(candidates) == 1, candidates
    return candidates[0]


def in_order(names: tuple[str, ...], start: float) -> dict[str, float]:
    """The times one save gives ``names``, one second apart in accelerate's order."""
    return {name: start + index for index, name in enumerate(names)}


def test_new_train_state_and_weights_over_old_optimizer_scheduler_and_random_states(
    tmp_path: Path,
) -> None:
    """The hang came after the weights: optimizer, scheduler and random states are the old ones."""
    folder = state(tmp_path, mtimes=in_order(("train_state.json", "model.safetensors"), NEW))

    candidate = only(sd_states(tmp_path, now=LATER))

    assert not candidate.complete and candidate.mixed
    assert candidate.problems == (
        "mixed: optimizer.bin is older than model.safetensors — left by an earlier save; "
        "a save into this folder did not finish "
        "(also older than files written before them: scheduler.bin, random_states_0.pkl)",
    )
    assert candidate.completed_at == NEW + 1  # the newest file, as for any folder
    assert all((folder / name).exists() for name in STATE_FILES)  # evidence, never deleted


def test_only_train_state_rewritten(tmp_path: Path) -> None:
    """sd-scripts' pre-save hook wrote train_state.json, then the save died."""
    state(tmp_path, mtimes={"train_state.json": NEW})

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.mixed
    assert candidate.problems[0].startswith(
        "mixed: model.safetensors is older than train_state.json — left by an earlier save;"
    )


def test_everything_new_but_the_random_states(tmp_path: Path) -> None:
    """random_states_<i>.pkl comes last: the save stopped just before it."""
    state(tmp_path, mtimes=in_order(STATE_FILES[:-1], NEW))

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.mixed and not candidate.complete
    assert candidate.problems == (
        "mixed: random_states_0.pkl is older than scheduler.bin — left by an earlier save; "
        "a save into this folder did not finish",
    )


@pytest.mark.parametrize(
    ("extra", "source"),
    [("scaler.pt", "optimizer.bin"), ("custom_checkpoint_0.pkl", "random_states_0.pkl")],
)
def test_optional_files_keep_their_place_in_the_order(
    tmp_path: Path, extra: str, source: str
) -> None:
    """scaler.pt comes before the random states, custom checkpoints after them."""
    folder = state(tmp_path, mtimes=in_order(STATE_FILES, NEW))
    (folder / extra).write_bytes((folder / source).read_bytes())
    os.utime(folder / extra, (T, T))  # the earlier save's copy

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.mixed
    assert candidate.problems[0].startswith(f"{MIXED}{extra} is older than ")


def test_a_whole_save_with_one_coarse_time_is_complete(tmp_path: Path) -> None:
    """A filesystem clock of seconds (or two, on FAT) gives a whole save one mtime."""
    state(tmp_path, mtime=NEW)

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.complete and not candidate.mixed


def test_a_whole_save_in_order_is_complete_to_the_nanosecond(tmp_path: Path) -> None:
    """Times that only grow along the write order, however close, are one save."""
    folder = state(tmp_path)
    base = int(NEW) * 1_000_000_000
    for index, name in enumerate(STATE_FILES):
        os.utime(folder / name, ns=(base + index * 100, base + index * 100))

    assert only(sd_states(tmp_path, now=LATER)).complete


def test_nanoseconds_tell_files_apart_that_seconds_would_not(tmp_path: Path) -> None:
    """100 ns backwards is still backwards: st_mtime as a float cannot hold that."""
    folder = state(tmp_path)
    base = int(NEW) * 1_000_000_000
    for name in STATE_FILES:
        os.utime(folder / name, ns=(base + 200, base + 200))
    os.utime(folder / "optimizer.bin", ns=(base + 100, base + 100))

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.mixed
    assert candidate.problems[0].startswith("mixed: optimizer.bin is older than model.safetensors")


def test_other_processes_random_states_have_no_place_in_the_order(tmp_path: Path) -> None:
    """Process 1 writes random_states_1.pkl itself, while process 0 may still write weights."""
    folder = state(tmp_path, mtimes=in_order(STATE_FILES, NEW))
    (folder / "random_states_1.pkl").write_bytes((folder / "random_states_0.pkl").read_bytes())
    os.utime(folder / "random_states_1.pkl", (NEW, NEW))  # before the model, one second on

    assert only(sd_states(tmp_path, now=LATER)).complete


def test_a_folder_being_rewritten_is_still_being_written(tmp_path: Path) -> None:
    """While the save goes on, its order is unfinished, not wrong; once stopped, it is mixed."""
    state(tmp_path, mtimes={"train_state.json": NEW, "model.safetensors": NEW})

    writing = only(sd_states(tmp_path, now=NEW + 2, settle_seconds=10.0))
    stalled = only(sd_states(tmp_path, now=NEW + 2, settle_seconds=0.0))

    assert writing.problems == ("still being written (last change 2.0 s ago)",)
    assert not writing.mixed
    assert stalled.mixed and stalled.problems[0].startswith(MIXED)


def test_the_older_whole_state_is_chosen_over_the_mixed_one(tmp_path: Path) -> None:
    """The mixed folder is the newest; the recovery resumes from the last whole save."""
    older = state(tmp_path, "my-lora-step00000500-state", mtime=T - 600)
    state(tmp_path, mtimes=in_order(("train_state.json", "model.safetensors"), NEW))

    candidates = sd_states(tmp_path, now=LATER)
    choice = choose_resume_point(candidates, Ledger(), allow_scratch=False)

    assert [c.path.name for c in candidates] == ["my-lora-step00000500-state", FOLDER]
    assert choice.checkpoint is not None and choice.checkpoint.path == older
    assert choose_checkpoint(candidates) == choice.checkpoint


def test_the_memo_sees_the_order_too(tmp_path: Path) -> None:
    """Remembered reports carry their nanosecond times: a poll judges the order alike."""
    state(tmp_path, mtimes={"train_state.json": NEW})
    memo = FileReportMemo()

    first = only(sd_states(tmp_path, now=LATER, memo=memo))
    again = only(sd_states(tmp_path, now=LATER, memo=memo))

    assert first == again and again.mixed


def order_problem(*times: tuple[str, int]) -> str | None:
    ordered = []
    for name, mtime_ns in times:
        position = write_position(name)
        if position is not None:
            ordered.append((position, mtime_ns, name))
    return mixed_save_problem(ordered)


def test_the_order_rule_itself() -> None:
    """Names outside accelerate's order are ignored; equal times pass; the first break is named."""
    assert write_position("notes.txt") is None and write_position("random_states_1.pkl") is None
    assert order_problem() is None
    assert order_problem(("notes.txt", 1), ("train_state.json", 5)) is None
    assert order_problem(("model.safetensors", 5), ("model_1.safetensors", 4)) is None
    assert order_problem(("train_state.json", -5), ("optimizer.bin", -3)) is None  # before 1970
    problem = order_problem(("optimizer_1.bin", 3), ("pytorch_model.bin", 4))
    assert problem is not None
    assert problem.startswith("mixed: optimizer_1.bin is older than pytorch_model.bin")
