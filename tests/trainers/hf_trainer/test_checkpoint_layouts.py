"""DeepSpeed and FSDP saves of the HF Trainer: what makes them whole, by their write order.

The folders are laid out file by file as transformers 5.24 (``_save_checkpoint``,
``_save_optimizer_and_scheduler``), DeepSpeed (``engine.save_checkpoint``) and accelerate 1.6
(``save_fsdp_model`` / ``save_fsdp_optimizer``) write them; see
``sidecar/trainers/hf_trainer/layouts.py`` for the rules and where they were read. Neither
DeepSpeed nor a multi-GPU FSDP run can exist here, so the files are the boundary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from state_factory import safetensors_bytes, tensor, torch_zip_bytes

from sidecar.checkpoints.scan import Candidate
from sidecar.trainers.hf_trainer import HF_TRAINER

NOW = 1_800_000_000.0
STEP = 20
TAG = f"global_step{STEP}"


def trainer_state(step: int) -> bytes:
    return json.dumps({"global_step": step, "epoch": 1.0, "log_history": []}).encode()


def deepspeed_save(
    *, ranks: int = 2, zero3: bool = False, bf16: bool = True
) -> list[tuple[str, bytes]]:
    """A ZeRO save of ``ranks`` data-parallel processes, in write order. ZeRO-3 without
    gathering the 16-bit weights: no top-level weights (save_model removes its dummy files)."""
    files: list[tuple[str, bytes]] = [("config.json", b'{"model_type": "llama"}')]
    if not zero3:
        files.insert(0, ("model.safetensors", safetensors_bytes([tensor("w", "BF16", [2, 2])])))
        files.append((f"{TAG}/mp_rank_00_model_states.pt", torch_zip_bytes()))
    prefix = "bf16_" if bf16 else ""
    for rank in range(ranks):
        if zero3:
            files.append(
                (f"{TAG}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt", torch_zip_bytes())
            )
        files.append(
            (f"{TAG}/{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", torch_zip_bytes())
        )
    files += [
        ("zero_to_fp32.py", b"# DeepSpeed's recovery script\n"),
        ("latest", TAG.encode()),
        *((f"rng_state_{rank}.pth", torch_zip_bytes()) for rank in range(ranks)),
        ("trainer_state.json", trainer_state(STEP)),
    ]
    return files


def fsdp_save(*, sharded: bool = True, ranks: int = 2) -> list[tuple[str, bytes]]:
    """An FSDP save in write order: the model, the optimizer, the scheduler, RNG, state."""
    files: list[tuple[str, bytes]] = [("config.json", b'{"model_type": "llama"}')]
    if sharded:
        for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
            files += [(f"{folder}/__{rank}_0.distcp", b"\x00" * 64) for rank in range(ranks)]
            files.append((f"{folder}/.metadata", b"\x80\x04metadata."))
    else:
        files += [
            ("pytorch_model_fsdp.bin", torch_zip_bytes()),
            ("optimizer.bin", torch_zip_bytes()),
        ]
    files += [
        ("scheduler.pt", torch_zip_bytes()),
        *((f"rng_state_{rank}.pth", torch_zip_bytes()) for rank in range(ranks)),
        ("trainer_state.json", trainer_state(STEP)),
    ]
    return files


def write(output_dir: Path, files: list[tuple[str, bytes]]) -> Path:
    folder = output_dir / f"checkpoint-{STEP}"
    folder.mkdir(parents=True)  # created before its first file
    for index, (name, data) in enumerate(files):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        stamp = NOW - 100 + index * 0.01  # one after another, in order
        os.utime(path, (stamp, stamp))
    return folder


def scan(output_dir: Path) -> Candidate:
    (found,) = HF_TRAINER.find_states(output_dir, now=NOW, settle_seconds=0.0, output_name=None)
    return found


def without(files: list[tuple[str, bytes]], name: str) -> list[tuple[str, bytes]]:
    assert name in dict(files), name
    return [(n, d) for n, d in files if n != name]


@pytest.mark.parametrize(
    "files",
    [
        deepspeed_save(),
        deepspeed_save(bf16=False, ranks=4),
        deepspeed_save(zero3=True),
        fsdp_save(),
        fsdp_save(sharded=False),
    ],
    ids=["zero2-bf16", "zero2-fp16-4-ranks", "zero3-no-gather", "fsdp-sharded", "fsdp-full"],
)
def test_a_whole_save_of_each_layout_is_complete(
    tmp_path: Path, files: list[tuple[str, bytes]]
) -> None:
    """No optimizer.pt, and for ZeRO-3 or FSDP no top-level weights: complete all the same."""
    write(tmp_path, files)
    found = scan(tmp_path)
    assert found.complete, found.problems
    assert (found.number, found.step) == (STEP, STEP)


@pytest.mark.parametrize("kept", range(len(deepspeed_save())))
def test_a_deepspeed_save_cut_after_any_file_is_incomplete(tmp_path: Path, kept: int) -> None:
    write(tmp_path, deepspeed_save()[:kept])
    assert not scan(tmp_path).complete


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        ("latest", "latest missing"),
        (f"{TAG}/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank(s) 0 missing"),
        (f"{TAG}/mp_rank_00_model_states.pt", "no *_model_states.pt"),
    ],
)
def test_a_deepspeed_save_lacking_a_file_names_it(tmp_path: Path, removed: str, named: str) -> None:
    """trainer_state.json is there (written after DeepSpeed's closing barrier), but a file
    the resume loads is not (deleted since, or a rank that never wrote it)."""
    write(tmp_path, without(deepspeed_save(), removed))
    found = scan(tmp_path)
    assert not found.complete
    assert any(named in problem for problem in found.problems), found.problems


def test_a_gap_in_the_zero3_model_states_is_named(tmp_path: Path) -> None:
    files = without(
        deepspeed_save(zero3=True, ranks=3), f"{TAG}/zero_pp_rank_1_mp_rank_00_model_states.pt"
    )
    write(tmp_path, files)
    assert any(
        "model states of data-parallel rank(s) 1 missing" in p for p in scan(tmp_path).problems
    )


def test_latest_naming_no_folder_of_the_checkpoint_is_incomplete(tmp_path: Path) -> None:
    files = [(n, b"global_step19" if n == "latest" else d) for n, d in deepspeed_save()]
    write(tmp_path, files)
    assert any("names 'global_step19'" in p for p in scan(tmp_path).problems)


def test_a_truncated_optimizer_state_in_the_tag_folder_is_named(tmp_path: Path) -> None:
    name = f"{TAG}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    files = [(n, d[: len(d) // 2] if n == name else d) for n, d in deepspeed_save()]
    write(tmp_path, files)
    found = scan(tmp_path)
    assert not found.complete
    assert any(problem.startswith(name) for problem in found.problems), found.problems


def test_a_later_cut_save_into_the_tag_folder_is_incomplete(tmp_path: Path) -> None:
    """Resumed from an older checkpoint, the Trainer saves into this folder again, file by
    file: a model state newer than trainer_state.json is from a save that did not finish."""
    folder = write(tmp_path, deepspeed_save())
    later = NOW - 10
    os.utime(folder / TAG / "mp_rank_00_model_states.pt", (later, later))
    found = scan(tmp_path)
    assert not found.complete
    assert any("older than" in p and "model_states.pt" in p for p in found.problems)


@pytest.mark.parametrize("kept", range(len(fsdp_save())))
def test_an_fsdp_save_cut_after_any_file_is_incomplete(tmp_path: Path, kept: int) -> None:
    write(tmp_path, fsdp_save()[:kept])
    assert not scan(tmp_path).complete


def test_a_sharded_fsdp_folder_without_its_metadata_is_named(tmp_path: Path) -> None:
    """The coordinator writes .metadata after every rank's shards: without it, not whole."""
    write(tmp_path, without(fsdp_save(), "optimizer_0/.metadata"))
    found = scan(tmp_path)
    assert any("optimizer_0/.metadata missing" in p for p in found.problems), found.problems


def test_an_fsdp_save_without_an_optimizer_is_named(tmp_path: Path) -> None:
    write(tmp_path, without(fsdp_save(sharded=False), "optimizer.bin"))
    assert any("optimizer missing" in p for p in scan(tmp_path).problems)


def test_a_plain_save_still_needs_its_optimizer(tmp_path: Path) -> None:
    """Without a DeepSpeed or FSDP sign, a save without optimizer.pt is not whole."""
    files = [
        (n, d)
        for n, d in fsdp_save(sharded=False)
        if n not in ("pytorch_model_fsdp.bin", "optimizer.bin")
    ]
    files.insert(0, ("model.safetensors", safetensors_bytes([tensor("w", "F32", [2])])))
    write(tmp_path, files)
    assert "optimizer.pt missing" in scan(tmp_path).problems
