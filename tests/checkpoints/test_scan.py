"""Finding resumable state folders in a real output folder, and choosing one."""

from __future__ import annotations

import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytest
from state_factory import STATE_FILES, set_mtime, state_file_contents, write_state_folder

from sidecar.checkpoints import scan
from sidecar.checkpoints.file_checks import inspect_state_file
from sidecar.checkpoints.scan import Candidate, choose_checkpoint, find_candidates
from sidecar.trainers.sd_scripts.state_naming import FINAL_STATE_PROBLEM, state_naming

# The scan as sd-scripts' runs see it: its state folder names.
sd_states = partial(find_candidates, naming=state_naming)

# A fixed wall clock: files are given mtimes around it, so no test depends on real time.
T = 1_750_000_000.0
LATER = T + 3600


def state(output_dir: Path, name: str, **options: Any) -> Path:
    """A state folder in ``output_dir``, its files dated T unless told otherwise."""
    options.setdefault("mtime", T)
    return write_state_folder(output_dir / name, **options)


def only(candidates: list[Candidate]) -> Candidate:
    assert len(candidates) == 1, candidates
    return candidates[0]


def test_complete_step_folder_is_accepted(tmp_path: Path) -> None:
    """A folder with every file whole and quiet for long enough is a complete candidate."""
    folder = state(tmp_path, "my-lora-step00000500-state", step=500, epoch=2)

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate == Candidate(
        path=folder,
        kind="step",
        number=500,
        complete=True,
        problems=(),
        completed_at=T,
        step=500,
        epoch=2,
    )
    assert choose_checkpoint([candidate]) == candidate


def test_epoch_and_final_names_are_recognised(tmp_path: Path) -> None:
    """sd-scripts' three namings give the three kinds, with the number from the name."""
    state(tmp_path, "my-lora-000004-state", mtime=T)
    state(tmp_path, "my-lora-state", mtime=T + 1)

    kinds = {c.path.name: (c.kind, c.number) for c in sd_states(tmp_path, now=LATER)}

    assert kinds == {"my-lora-000004-state": ("epoch", 4), "my-lora-state": ("final", None)}


@pytest.mark.parametrize(
    ("omitted", "problem"),
    [
        ("model.safetensors", "model weights missing (model.safetensors or pytorch_model.bin)"),
        ("optimizer.bin", "optimizer.bin missing"),
        ("scheduler.bin", "scheduler.bin missing"),
        ("random_states_0.pkl", "random_states_0.pkl missing"),
    ],
)
def test_missing_required_file_is_named(tmp_path: Path, omitted: str, problem: str) -> None:
    """Without any one of the files accelerate's load_state needs, the folder is incomplete."""
    state(tmp_path, "my-lora-step00000500-state", omit={omitted})

    candidate = only(sd_states(tmp_path, now=LATER))

    assert not candidate.complete
    assert candidate.problems == (problem,)
    assert choose_checkpoint([candidate]) is None


def test_missing_train_state_is_not_required(tmp_path: Path) -> None:
    """train_state.json is optional to accelerate; without it the numbers are simply unknown."""
    state(tmp_path, "my-lora-step00000500-state", omit={"train_state.json"})

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.complete
    assert (candidate.step, candidate.epoch) == (None, None)


def test_pytorch_model_bin_stands_in_for_safetensors(tmp_path: Path) -> None:
    """With safe serialization off, accelerate writes pytorch_model.bin (a torch zip) instead."""
    folder = state(tmp_path, "my-lora-step00000500-state", omit={"model.safetensors"})
    (folder / "pytorch_model.bin").write_bytes((folder / "optimizer.bin").read_bytes())
    set_mtime(folder, T)

    assert only(sd_states(tmp_path, now=LATER)).complete


@pytest.mark.parametrize("name", STATE_FILES)
def test_empty_file_is_named(tmp_path: Path, name: str) -> None:
    """A file created but never written makes the folder incomplete, with the file named."""
    state(tmp_path, "my-lora-step00000500-state", empty=name)

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.problems == (f"{name}: empty file",)


@pytest.mark.parametrize("name", STATE_FILES)
@pytest.mark.parametrize("cut", [1, 7])
def test_truncated_file_is_named(tmp_path: Path, name: str, cut: int) -> None:
    """A file missing its last bytes (a torn write) makes the folder incomplete."""
    state(tmp_path, "my-lora-step00000500-state", truncate=name, truncate_by=cut)

    candidate = only(sd_states(tmp_path, now=LATER))

    assert not candidate.complete
    assert len(candidate.problems) == 1
    assert candidate.problems[0].startswith(f"{name}: ")


def test_truncated_safetensors_problem_says_how_much(tmp_path: Path) -> None:
    """The reason carries the sizes, so a log line tells a torn write from other damage."""
    state(tmp_path, "my-lora-step00000500-state", truncate="model.safetensors", truncate_by=10)

    (problem,) = only(sd_states(tmp_path, now=LATER)).problems

    assert problem.startswith("model.safetensors: truncated: header says ")


def test_torch_style_random_states_are_accepted_and_checked(tmp_path: Path) -> None:
    """accelerate writes random_states_<i>.pkl with torch.save, i.e. as a zip archive."""
    state(tmp_path, "a-step00000001-state", random_states_as_zip=True)
    state(
        tmp_path, "b-step00000001-state", random_states_as_zip=True, truncate="random_states_0.pkl"
    )

    by_name = {c.path.name: c for c in sd_states(tmp_path, now=LATER)}

    assert by_name["a-step00000001-state"].complete
    assert by_name["b-step00000001-state"].problems == (
        "random_states_0.pkl: no zip end-of-central-directory record (truncated?)",
    )


@pytest.mark.parametrize(
    ("extra", "source"),
    [
        ("model_1.safetensors", "model.safetensors"),
        ("optimizer_1.bin", "optimizer.bin"),
        ("sampler.bin", "optimizer.bin"),
        ("dl_state_dict.bin", "optimizer.bin"),
        ("scaler.pt", "optimizer.bin"),
        ("random_states_1.pkl", "random_states_0.pkl"),
    ],
)
def test_optional_and_extra_files_are_checked_when_present(
    tmp_path: Path, extra: str, source: str
) -> None:
    """Files accelerate writes only in some setups count too: whole passes, cut fails."""
    whole = state(tmp_path, "a-step00000001-state")
    cut = state(tmp_path, "b-step00000001-state")
    (whole / extra).write_bytes((whole / source).read_bytes())
    (cut / extra).write_bytes((cut / source).read_bytes()[:-1])
    set_mtime(whole, T)
    set_mtime(cut, T)

    by_name = {c.path.name: c for c in sd_states(tmp_path, now=LATER)}

    assert by_name["a-step00000001-state"].complete
    (problem,) = by_name["b-step00000001-state"].problems
    assert problem.startswith(f"{extra}: ")


def test_half_written_newest_folder_is_passed_over(tmp_path: Path) -> None:
    """A newer folder holding only train_state.json and the model loses to an older whole one."""
    older = state(tmp_path, "my-lora-step00000500-state", mtime=T)
    state(
        tmp_path,
        "my-lora-step00000600-state",
        omit={"optimizer.bin", "scheduler.bin", "random_states_0.pkl"},
        mtime=T + 100,
    )

    candidates = sd_states(tmp_path, now=LATER)

    assert [c.path.name for c in candidates] == [
        "my-lora-step00000500-state",
        "my-lora-step00000600-state",
    ]
    assert candidates[1].problems == (
        "optimizer.bin missing",
        "scheduler.bin missing",
        "random_states_0.pkl missing",
    )
    chosen = choose_checkpoint(candidates)
    assert chosen is not None
    assert chosen.path == older


def test_recently_changed_folder_is_not_complete_until_it_settles(tmp_path: Path) -> None:
    """Whole-looking files still count as being written until the settle time has passed."""
    state(tmp_path, "my-lora-step00000500-state", mtime=T)

    early = only(sd_states(tmp_path, now=T + 2.0, settle_seconds=10.0))
    settled = only(sd_states(tmp_path, now=T + 10.0, settle_seconds=10.0))

    assert early.problems == ("still being written (last change 2.0 s ago)",)
    assert settled.complete


def test_one_fresh_file_keeps_the_whole_folder_unsettled(tmp_path: Path) -> None:
    """The newest file decides; the rest having settled long ago does not matter."""
    folder = state(tmp_path, "my-lora-step00000500-state", mtime=T - 3600)
    os.utime(folder / "random_states_0.pkl", (T - 1, T - 1))

    candidate = only(sd_states(tmp_path, now=T))

    assert candidate.completed_at == T - 1
    assert candidate.problems == ("still being written (last change 1.0 s ago)",)


def test_file_dated_in_the_future_is_not_settled(tmp_path: Path) -> None:
    """A clock step or filesystem skew must not make a folder look settled early."""
    state(tmp_path, "my-lora-step00000500-state", mtime=T + 5)

    candidate = only(sd_states(tmp_path, now=T))

    assert candidate.problems == ("still being written (last change 5.0 s in the future)",)


def test_lower_numbered_but_newer_folder_wins(tmp_path: Path) -> None:
    """After a resume sd-scripts counts steps from 0 again, so completion time decides."""
    state(tmp_path, "my-lora-step00000500-state", step=500, mtime=T)
    newer = state(tmp_path, "my-lora-step00000010-state", step=10, mtime=T + 600)

    candidates = sd_states(tmp_path, now=LATER)

    assert [c.number for c in candidates] == [10, 500]
    chosen = choose_checkpoint(candidates)
    assert chosen is not None
    assert chosen.path == newer


def test_incomplete_folders_come_after_complete_ones(tmp_path: Path) -> None:
    """Order: complete newest first, then incomplete newest first."""
    state(tmp_path, "x-step00000001-state", mtime=T)
    state(tmp_path, "x-step00000002-state", mtime=T + 10, empty="optimizer.bin")
    state(tmp_path, "x-step00000003-state", mtime=T + 20)
    state(tmp_path, "x-step00000004-state", mtime=T + 30, omit={"scheduler.bin"})

    order = [(c.number, c.complete) for c in sd_states(tmp_path, now=LATER)]

    assert order == [(3, True), (1, True), (4, False), (2, False)]


def test_equal_completion_times_prefer_the_later_name(tmp_path: Path) -> None:
    """Coarse mtimes can tie; the order is then stable and favours the later save of a run."""
    state(tmp_path, "x-step00000001-state", mtime=T)
    state(tmp_path, "x-step00000002-state", mtime=T)

    assert [c.number for c in sd_states(tmp_path, now=LATER)] == [2, 1]


def test_folder_deleted_before_it_is_read_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--save_last_n_steps_state deletes an old folder after the output folder was listed."""
    state(tmp_path, "x-step00000001-state")
    keep = state(tmp_path, "x-step00000002-state")
    list_output_dir = scan._state_folder_entries

    def list_then_delete(output_dir: Path) -> list[os.DirEntry[str]]:
        entries = list_output_dir(output_dir)
        shutil.rmtree(tmp_path / "x-step00000001-state")
        return entries

    monkeypatch.setattr(scan, "_state_folder_entries", list_then_delete)

    assert [c.path for c in sd_states(tmp_path, now=LATER)] == [keep]


def test_folder_deleted_while_its_files_are_checked_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that vanishes half-way through its own check is dropped, not reported broken."""
    state(tmp_path, "x-step00000001-state")
    keep = state(tmp_path, "x-step00000002-state")
    doomed = tmp_path / "x-step00000001-state"
    check_file = inspect_state_file

    def check_then_delete(path: str) -> object:
        report = check_file(path)
        if doomed.exists() and Path(path).parent == doomed:
            shutil.rmtree(doomed)
        return report

    monkeypatch.setattr(scan, "inspect_state_file", check_then_delete)

    assert [c.path for c in sd_states(tmp_path, now=LATER)] == [keep]


def test_final_state_is_listed_but_never_complete(tmp_path: Path) -> None:
    """sd-scripts cannot resume from its end-of-training state, however whole it is."""
    state(tmp_path, "my-lora-state", mtime=T + 100)
    earlier = state(tmp_path, "my-lora-000004-state", mtime=T)

    candidates = sd_states(tmp_path, now=LATER, output_name="my-lora")

    final = next(c for c in candidates if c.kind == "final")
    assert final.problems == (FINAL_STATE_PROBLEM,)
    assert not final.complete
    chosen = choose_checkpoint(candidates)
    assert chosen is not None
    assert chosen.path == earlier


def test_only_a_final_state_gives_nothing_to_resume(tmp_path: Path) -> None:
    """A finished run has no resumable state, so nothing is chosen."""
    state(tmp_path, "my-lora-state")

    assert choose_checkpoint(sd_states(tmp_path, now=LATER)) is None


def test_excluded_folders_are_not_chosen(tmp_path: Path) -> None:
    """A quarantined folder (its resume failed) is skipped in favour of the next complete one."""
    newest = state(tmp_path, "x-step00000003-state", mtime=T + 20)
    middle = state(tmp_path, "x-step00000002-state", mtime=T + 10)
    oldest = state(tmp_path, "x-step00000001-state", mtime=T)
    candidates = sd_states(tmp_path, now=LATER)

    first = choose_checkpoint(candidates, exclude=[newest])
    assert first is not None
    assert first.path == middle
    assert choose_checkpoint(candidates, exclude={newest, middle, oldest}) is None


def test_output_name_limits_the_sd_scripts_names(tmp_path: Path) -> None:
    """With an output_name, another prefix is no sd-scripts state of ours: only content counts."""
    state(tmp_path, "my-lora-step00000002-state")
    state(tmp_path, "other-step00000001-state")
    (tmp_path / "other-step00000009-state").mkdir()  # named like state, but holds nothing

    kinds = {
        c.path.name: (c.kind, c.number)
        for c in sd_states(tmp_path, now=LATER, output_name="my-lora")
    }

    assert kinds == {
        "my-lora-step00000002-state": ("step", 2),
        "other-step00000001-state": ("accelerate", None),
    }


def test_output_name_with_regex_characters_is_taken_literally(tmp_path: Path) -> None:
    """A LoRA name like 'a.b+c' must not be read as a pattern."""
    state(tmp_path, "a.b+c-step00000002-state")
    state(tmp_path, "aXbbc-step00000003-state", omit=set(STATE_FILES))

    kinds = {c.path.name: c.kind for c in sd_states(tmp_path, now=LATER, output_name="a.b+c")}

    assert kinds == {"a.b+c-step00000002-state": "step"}


def test_unnamed_folder_with_accelerate_files_is_a_candidate(tmp_path: Path) -> None:
    """A folder saved by accelerate under any name (e.g. a hand-made copy) still counts."""
    folder = state(tmp_path, "before-upgrade")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "image.png").write_bytes(b"png")

    candidate = only(sd_states(tmp_path, now=LATER))

    assert (candidate.path, candidate.kind, candidate.number) == (folder, "accelerate", None)
    assert candidate.complete


def test_named_state_folder_without_files_is_listed_incomplete(tmp_path: Path) -> None:
    """A state folder sd-scripts has only just created is reported with everything missing."""
    (tmp_path / "x-step00000007-state").mkdir()

    candidate = only(sd_states(tmp_path, now=LATER))

    assert (candidate.kind, candidate.number, candidate.completed_at) == ("step", 7, None)
    assert len(candidate.problems) == 4


def test_hidden_and_sample_folders_are_ignored(tmp_path: Path) -> None:
    """The sidecar's own .sidecar folder and FluxGym's sample images are never state."""
    state(tmp_path, ".sidecar")
    state(tmp_path, "sample")
    state(tmp_path, ".x-step00000001-state")

    assert sd_states(tmp_path, now=LATER) == []


def test_plain_files_in_the_output_folder_are_ignored(tmp_path: Path) -> None:
    """LoRA files, train.sh and a file named like a state folder are not candidates."""
    (tmp_path / "my-lora-000004.safetensors").write_bytes(b"x")
    (tmp_path / "train.sh").write_text("accelerate launch ...")
    (tmp_path / "my-lora-step00000001-state").write_bytes(b"not a folder")

    assert sd_states(tmp_path, now=LATER) == []


def test_missing_output_folder_means_no_state_yet(tmp_path: Path) -> None:
    """Before sd-scripts has created its output folder there is simply nothing."""
    assert sd_states(tmp_path / "not-yet", now=LATER) == []


def test_symlinked_folders_are_not_followed(tmp_path: Path) -> None:
    """A link loop, a link to / and a link to state elsewhere are neither entered nor hung on."""
    output_dir = tmp_path / "out"
    real = state(output_dir, "x-step00000001-state")
    elsewhere = state(tmp_path / "elsewhere", "x-step00000009-state")
    (output_dir / "x-step00000002-state").symlink_to(elsewhere, target_is_directory=True)
    (output_dir / "loop").symlink_to(output_dir, target_is_directory=True)
    (output_dir / "root").symlink_to("/", target_is_directory=True)
    (output_dir / "self-loop").symlink_to(output_dir / "self-loop")

    started = time.perf_counter()
    candidates = sd_states(output_dir, now=LATER)

    assert time.perf_counter() - started < 1.0
    assert [c.path for c in candidates] == [real]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """A file the sidecar may not read makes the folder incomplete, with the reason."""
    folder = state(tmp_path, "x-step00000001-state")
    (folder / "optimizer.bin").chmod(0)

    try:
        candidate = only(sd_states(tmp_path, now=LATER))
    finally:
        (folder / "optimizer.bin").chmod(0o644)

    assert candidate.problems == ("optimizer.bin: unreadable: Permission denied",)


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists folders whatever their mode")
def test_unreadable_folder_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """A state folder the sidecar may not list is reported as unreadable."""
    folder = state(tmp_path, "x-step00000001-state")
    folder.chmod(0)

    try:
        candidate = only(sd_states(tmp_path, now=LATER))
    finally:
        folder.chmod(0o755)

    assert (candidate.kind, candidate.complete) == ("step", False)
    assert candidate.problems == ("unreadable: Permission denied",)


def test_dangling_link_in_place_of_a_file_is_a_problem(tmp_path: Path) -> None:
    """An optimizer.bin that points nowhere cannot be opened, even by root."""
    folder = state(tmp_path, "x-step00000001-state", omit={"optimizer.bin"})
    (folder / "optimizer.bin").symlink_to(tmp_path / "gone.bin")

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.problems == ("optimizer.bin: unreadable: No such file or directory",)


def test_fifo_in_place_of_a_file_does_not_block(tmp_path: Path) -> None:
    """A named pipe where scheduler.bin should be is refused at once, not waited on."""
    folder = state(tmp_path, "x-step00000001-state", omit={"scheduler.bin"})
    os.mkfifo(folder / "scheduler.bin")
    os.utime(folder / "scheduler.bin", (T, T))

    candidate = only(sd_states(tmp_path, now=LATER))

    assert candidate.problems == ("scheduler.bin: not a regular file",)


def test_thousand_folders_among_ten_thousand_files_resolve_fast(tmp_path: Path) -> None:
    """Only listings, stats and header reads: 1,000 folders are checked well within a second."""
    contents = state_file_contents(step=1, epoch=1, random_states_as_zip=True)
    for index in range(1000):
        folder = tmp_path / f"my-lora-step{index:08d}-state"
        folder.mkdir()
        for name, data in contents.items():
            (folder / name).write_bytes(data)
    for index in range(10_000):
        (tmp_path / f"my-lora-{index:06d}.png").write_bytes(b"")
    now = time.time() + 60

    started = time.perf_counter()
    candidates = sd_states(tmp_path, now=now)
    elapsed = time.perf_counter() - started

    assert len(candidates) == 1000
    assert all(candidate.complete for candidate in candidates)
    assert elapsed < 1.0, f"{elapsed:.3f} s"


def test_another_runs_final_state_is_never_chosen(tmp_path):
    """An end-of-training state of another output_name is rejected like our own."""
    write_state_folder(tmp_path / "other-lora-state", step=10, epoch=2, mtime=1000.0)
    write_state_folder(tmp_path / "my-lora-step00000004-state", step=4, epoch=1, mtime=500.0)
    found = sd_states(tmp_path, now=5000.0, settle_seconds=1, output_name="my-lora")
    by_name = {candidate.path.name: candidate for candidate in found}
    assert by_name["other-lora-state"].kind == "final"
    assert not by_name["other-lora-state"].complete
    assert choose_checkpoint(found).path.name == "my-lora-step00000004-state"


class _OtherTrainerNaming:
    """Another trainer's names ("checkpoint-<step>"), to show the scan knows none of its own."""

    ignored_folders = frozenset({"logs"})

    def classify(self, folder_name: str) -> tuple[Literal["step"], int] | None:
        prefix, _, number = folder_name.partition("-")
        return ("step", int(number)) if prefix == "checkpoint" and number.isdigit() else None

    def refusal(self, kind: str) -> str | None:
        return None


def test_the_naming_is_the_trainers(tmp_path: Path) -> None:
    """Given another trainer's naming, its names count and sd-scripts' are only accelerate's."""
    state(tmp_path, "checkpoint-500", mtime=T + 10)
    state(tmp_path, "my-lora-state", mtime=T)  # sd-scripts' final state: not refused here
    state(tmp_path, "logs")

    candidates = sd_states(tmp_path, now=LATER, naming=lambda _: _OtherTrainerNaming())

    assert [(c.path.name, c.kind, c.number, c.complete) for c in candidates] == [
        ("checkpoint-500", "step", 500, True),
        ("my-lora-state", "accelerate", None, True),
    ]
