"""The HF Trainer's checkpoint-<N> folders: completeness per write-order position, set-aside."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from state_factory import safetensors_bytes, tensor, torch_zip_bytes

from sidecar.checkpoints.scan import STILL_WRITTEN, Candidate
from sidecar.trainers.hf_trainer import HF_TRAINER
from sidecar.trainers.hf_trainer.checkpoints import MAX_TRAINER_STATE_BYTES

NOW = 1_800_000_000.0


def trainer_state(step: int, *, history: int = 3) -> bytes:
    log = [{"step": s, "loss": 1.0, "epoch": s / 10} for s in range(1, history + 1)]
    return json.dumps({"global_step": step, "epoch": step / 10, "log_history": log}).encode()


def save_files(step: int) -> list[tuple[str, bytes]]:
    """One save, in Trainer._save_checkpoint's order (save_model, optimizer and scheduler,
    RNG state, then trainer_state.json)."""
    return [
        ("model.safetensors", safetensors_bytes([tensor("wte", "F32", [4, 2])])),
        ("config.json", b'{"model_type": "gpt2"}'),
        ("generation_config.json", b"{}"),
        ("training_args.bin", torch_zip_bytes()),
        ("optimizer.pt", torch_zip_bytes()),
        ("scheduler.pt", torch_zip_bytes()),
        ("rng_state.pth", torch_zip_bytes()),
        ("trainer_state.json", trainer_state(step)),
    ]


def write_checkpoint(
    output_dir: Path, step: int, *, files: list[tuple[str, bytes]] | None = None, at: float = NOW
) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, data) in enumerate(save_files(step) if files is None else files):
        path = folder / name
        path.write_bytes(data)
        stamp = at - 100 + index * 0.01  # written one after another, in order
        os.utime(path, (stamp, stamp))
    return folder


def scan(output_dir: Path, *, settle: float = 0.0) -> list[Candidate]:
    return HF_TRAINER.find_states(output_dir, now=NOW, settle_seconds=settle, output_name=None)


def test_a_whole_save_is_complete_with_its_step(tmp_path: Path) -> None:
    """All files of a save, trainer_state.json last: complete, step and epoch read."""
    write_checkpoint(tmp_path, 20)
    (found,) = scan(tmp_path)
    assert found.complete, found.problems
    assert (found.kind, found.number, found.step, found.epoch) == ("step", 20, 20, 2)
    assert HF_TRAINER.resumed_state_step(found.path) == 20


@pytest.mark.parametrize("written", range(len(save_files(5))))
def test_a_save_killed_after_any_file_is_incomplete(tmp_path: Path, written: int) -> None:
    """Killed after each file of the write order: never complete, the problem names what."""
    write_checkpoint(tmp_path, 5, files=save_files(5)[:written])
    (found,) = scan(tmp_path)
    assert not found.complete
    assert any("missing" in problem for problem in found.problems)
    if written < len(save_files(5)):
        assert any("trainer_state.json missing" in problem for problem in found.problems)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng_state.pth"])
def test_a_truncated_file_makes_it_incomplete(tmp_path: Path, name: str) -> None:
    """A file cut short (structurally broken) is named, even with trainer_state.json there."""
    files = [(n, d[: len(d) // 2] if n == name else d) for n, d in save_files(7)]
    write_checkpoint(tmp_path, 7, files=files)
    (found,) = scan(tmp_path)
    assert not found.complete
    assert any(problem.startswith(name) for problem in found.problems)


def test_a_step_other_than_the_folder_number_is_incomplete(tmp_path: Path) -> None:
    """trainer_state.json of step 10 in checkpoint-15: not the save this folder claims."""
    files = [(n, trainer_state(10) if n == "trainer_state.json" else d) for n, d in save_files(15)]
    write_checkpoint(tmp_path, 15, files=files)
    (found,) = scan(tmp_path)
    assert any("global_step 10 is not the folder's 15" in p for p in found.problems)


def test_a_later_unfinished_save_into_the_folder_is_incomplete(tmp_path: Path) -> None:
    """trainer_state.json older than optimizer.pt: a second save reused it and was cut short."""
    folder = write_checkpoint(tmp_path, 25)
    later = NOW - 10
    os.utime(folder / "optimizer.pt", (later, later))
    (found,) = scan(tmp_path)
    assert not found.complete
    assert any("older than optimizer.pt" in problem for problem in found.problems)


def test_cut_json_and_huge_history(tmp_path: Path) -> None:
    """A cut trainer_state.json is refused; one with megabytes of log_history is read."""
    files = save_files(3)
    files[-1] = ("trainer_state.json", trainer_state(3)[:-5])
    write_checkpoint(tmp_path, 3, files=files)
    big = save_files(4)
    big[-1] = ("trainer_state.json", trainer_state(4, history=40_000))
    assert 1024 * 1024 < len(big[-1][1]) < MAX_TRAINER_STATE_BYTES
    write_checkpoint(tmp_path, 4, files=big)
    by_number = {candidate.number: candidate for candidate in scan(tmp_path)}
    assert by_number[4].complete
    assert any("not valid JSON" in p for p in by_number[3].problems)


def test_a_save_still_changing_is_being_written(tmp_path: Path) -> None:
    """While its newest file is younger than the settle time, it is not complete."""
    write_checkpoint(tmp_path, 9, at=NOW + 99.5)
    (found,) = scan(tmp_path, settle=5)
    assert found.problems[-1].startswith(STILL_WRITTEN)
    (settled,) = scan(tmp_path, settle=0)
    assert settled.complete


def test_peft_and_sharded_weights(tmp_path: Path) -> None:
    """An adapter needs its config; a sharded model needs every shard its index lists."""
    adapter = [(n, d) for n, d in save_files(2) if n != "model.safetensors"]
    adapter.insert(0, ("adapter_model.safetensors", safetensors_bytes([tensor("a", "F16", [2])])))
    write_checkpoint(tmp_path, 2, files=adapter)
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    sharded = [(n, d) for n, d in save_files(6) if n != "model.safetensors"]
    sharded.insert(
        0, ("model-00001-of-00002.safetensors", safetensors_bytes([tensor("a", "F32", [1])]))
    )
    sharded.insert(1, ("model.safetensors.index.json", json.dumps(index).encode()))
    write_checkpoint(tmp_path, 6, files=sharded)
    by_number = {candidate.number: candidate for candidate in scan(tmp_path)}
    assert by_number[2].problems == ("adapter_config.json missing",)
    assert by_number[6].problems == (
        "model-00002-of-00002.safetensors missing (listed in model.safetensors.index.json)",
    )


def test_complete_newest_first_and_other_folders_ignored(tmp_path: Path) -> None:
    """Only checkpoint-<N> folders count (runs/, set-aside ones do not); newest complete first."""
    write_checkpoint(tmp_path, 10, at=NOW - 50)
    write_checkpoint(tmp_path, 20, at=NOW - 20)
    write_checkpoint(tmp_path, 30, files=save_files(30)[:5])
    (tmp_path / "runs").mkdir()
    write_checkpoint(tmp_path / "x", 1).rename(
        tmp_path / "incomplete-20261201T000000Z-checkpoint-40"
    )
    found = scan(tmp_path)
    assert [(c.number, c.complete) for c in found] == [(20, True), (10, True), (30, False)]
    assert scan(tmp_path / "absent") == []


def test_in_the_way_are_the_incomplete_ones_numbered_higher(tmp_path: Path) -> None:
    """get_last_checkpoint takes the highest number: each incomplete one above the chosen."""
    for step in (5, 10):
        write_checkpoint(tmp_path, step)
    for step in (3, 15, 20):
        write_checkpoint(tmp_path, step, files=save_files(step)[:4])
    found = scan(tmp_path)
    chosen = next(c for c in found if c.number == 10)
    assert sorted(c.number for c in HF_TRAINER.in_the_way(found, chosen)) == [15, 20]
    assert sorted(c.number for c in HF_TRAINER.in_the_way(found, None)) == [3, 15, 20]


def test_the_aside_name_escapes_the_trainer_listing_resume_and_rotation(tmp_path: Path) -> None:
    """transformers' own get_last_checkpoint and rotation never see a set-aside checkpoint."""
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    write_checkpoint(tmp_path, 10)
    partial = write_checkpoint(tmp_path, 15, files=save_files(15)[:5])
    aside = HF_TRAINER.aside_path(partial, "20261201T101500Z")
    assert aside.parent == partial.parent
    assert trainer_utils.get_last_checkpoint(str(tmp_path)) == str(partial)
    partial.rename(aside)
    assert trainer_utils.get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert trainer_utils.sort_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-10")]
    trainer_utils.rotate_checkpoints(str(tmp_path), save_total_limit=1)
    assert aside.is_dir()
    # A suffix would not do: the rotation glob checkpoint-* still matches it.
    suffixed = tmp_path / "checkpoint-15.incomplete"
    suffixed.mkdir()
    assert str(suffixed) in trainer_utils.sort_checkpoints(str(tmp_path))


def test_files_written_after_the_state_by_design_do_not_make_it_incomplete(tmp_path: Path) -> None:
    """LLaMA-Factory's on_save callbacks write the processor after _save_checkpoint, and other
    ranks' RNG state is not ordered before rank 0's trainer_state.json: still complete. A
    newer optimizer.pt (a later save cut short) still is not."""
    folder = write_checkpoint(tmp_path, 10)
    later = NOW - 1
    for name in ("preprocessor_config.json", "rng_state_1.pth"):
        (folder / name).write_bytes(torch_zip_bytes() if name.endswith(".pth") else b"{}")
        os.utime(folder / name, (later, later))
    (only,) = scan(tmp_path)
    assert only.complete, only.problems
    os.utime(folder / "optimizer.pt", (later, later))
    (only,) = scan(tmp_path)
    assert not only.complete and "optimizer.pt" in " ".join(only.problems)


def test_polling_with_a_memo_opens_only_new_or_changed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sidecar polls the folder: a second scan opens no file again; a file cut short in
    place (same name and mtime, another size) is opened again and caught."""
    from sidecar.checkpoints.file_memo import FileReportMemo
    from sidecar.trainers.hf_trainer import checkpoints

    opened: list[str] = []
    real = checkpoints.inspect_state_file

    def counting(path: str):  # type: ignore[no-untyped-def]
        opened.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(checkpoints, "inspect_state_file", counting)
    parsed: list[str] = []
    real_state = checkpoints._read_trainer_state

    def parsing(path):  # type: ignore[no-untyped-def]
        parsed.append(str(path))
        return real_state(path)

    monkeypatch.setattr(checkpoints, "_read_trainer_state", parsing)
    for step in (10, 20):
        write_checkpoint(tmp_path, step)
    memo = FileReportMemo()

    def polled() -> list[Candidate]:
        return HF_TRAINER.find_states(
            tmp_path, now=NOW, settle_seconds=0.0, output_name=None, memo=memo
        )

    first = polled()
    checked = len(opened)
    assert checked == 2 * 5  # per folder: weights, training_args, optimizer, scheduler, RNG
    assert len(parsed) == 2
    assert polled() == first and len(opened) == checked
    assert len(parsed) == 2, "an unchanged trainer_state.json is not parsed again"
    optimizer = tmp_path / "checkpoint-20" / "optimizer.pt"
    stamp = optimizer.stat().st_mtime
    with optimizer.open("r+b") as handle:
        handle.truncate(optimizer.stat().st_size // 2)
    os.utime(optimizer, (stamp, stamp))
    opened.clear()
    by_number = {candidate.number: candidate for candidate in polled()}
    assert opened == ["optimizer.pt"]
    assert by_number[10].complete and not by_number[20].complete
