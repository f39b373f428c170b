"""diffusers behind the trainer seam: recognition, checkpoint completeness, the rewrite,
set-aside names, console lines and position (fast; real files, the stand-in's own writer)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from state_factory import safetensors_bytes, tensor, torch_zip_bytes

from sidecar.checkpoints.scan import STILL_WRITTEN, Candidate
from sidecar.decide.sections import Section
from sidecar.run.ledger import Ledger
from sidecar.simulator.fluxgym_tree import FIXTURE_SCRIPTS, fixture_script
from sidecar.trainers.diffusers import DIFFUSERS
from sidecar.trainers.diffusers import state_naming as naming
from sidecar.trainers.sd_scripts import SD_SCRIPTS
from sidecar.trainers.shell.train_script import TrainScriptError, parse_train_script

STANDIN = Path(__file__).with_name("standin.py")
_spec = importlib.util.spec_from_file_location("diffusers_standin", STANDIN)
assert _spec is not None and _spec.loader is not None
standin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standin)

FLUX = (
    "#!/bin/bash\n"
    "accelerate launch examples/dreambooth/train_dreambooth_lora_flux.py \\\n"
    '  --pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev" \\\n'
    '  --instance_data_dir="dog" \\\n'
    '  --output_dir="/data/out" \\\n'
    "  --checkpointing_steps=100 \\\n"
    "  --max_train_steps=500\n"
)


def command(line: str):
    return parse_train_script(f"#!/bin/bash\n{line}\n")


# ----------------------------------------------------------------------------- recognition


@pytest.mark.parametrize(
    "line",
    [
        "accelerate launch examples/dreambooth/train_dreambooth_lora_flux.py --output_dir o",
        "accelerate launch train_dreambooth_lora_sdxl.py --output_dir o",
        "python diffusers/examples/text_to_image/train_text_to_image_lora.py --output_dir o",
        "accelerate launch examples/controlnet/train_controlnet.py --output_dir o",
        "accelerate launch train_controlnet.py --checkpointing_steps 50 --output_dir o",
        "accelerate launch textual_inversion_sdxl.py --output_dir o",
        "accelerate launch examples/instruct_pix2pix/train_instruct_pix2pix_sdxl.py --output_dir o",
        "python /opt/my_train.py --checkpoints_total_limit 3 --output_dir o",
    ],
)
def test_diffusers_scripts_are_recognised(line: str) -> None:
    """The example scripts by name, and any script by an option only diffusers has."""
    assert DIFFUSERS.recognises(command(line))
    assert not SD_SCRIPTS.recognises(command(line))
    from sidecar.trainers import detect_trainer, trainer_names

    if "diffusers" in trainer_names():  # and no other registered trainer claims it
        assert detect_trainer(command(line)) is DIFFUSERS


@pytest.mark.parametrize(
    "line",
    [
        "accelerate launch sd-scripts/flux_train_network.py --output_dir o --save_state",
        "accelerate launch sd-scripts/train_controlnet.py --output_dir o",
        "accelerate launch train_controlnet.py --dataset_config d.toml --output_dir o",
        "python sd-scripts/train_textual_inversion.py --output_dir o",
        "python run_clm.py --save_steps 10 --resume_from_checkpoint o/checkpoint-10",
        "accelerate launch run_clm_no_trainer.py --checkpointing_steps 10 --output_dir o",
        # diffusers examples whose resume differs (skip with resume_step, or a full path)
        "accelerate launch train_unconditional.py --checkpoints_total_limit 2 --output_dir o",
        "accelerate launch examples/instruct_pix2pix/train_instruct_pix2pix.py --output_dir o",
        "accelerate launch examples/amused/train_amused.py --output_dir o",
    ],
)
def test_other_trainers_are_not_recognised(line: str) -> None:
    """sd-scripts (same file name train_controlnet.py), HF Trainer and accelerate examples."""
    assert not DIFFUSERS.recognises(command(line))


@pytest.mark.parametrize("fixture", FIXTURE_SCRIPTS)
def test_fluxgym_scripts_are_not_diffusers(fixture: str) -> None:
    assert not DIFFUSERS.recognises(parse_train_script(fixture_script(fixture)))


def test_exactly_one_registered_trainer_recognises_a_diffusers_script() -> None:
    """Auto-detection lands on diffusers once it is registered (and on nothing else)."""
    from sidecar.trainers import detect_trainer, trainer_names

    if "diffusers" not in trainer_names():
        pytest.skip("diffusers is not registered yet")
    assert detect_trainer(DIFFUSERS.read_launch_script(FLUX)) is DIFFUSERS
    resumed = DIFFUSERS.rewritten_launch_script(
        FLUX, resume_from="/data/out/checkpoint-100", ensure_save_state=True
    )
    assert detect_trainer(DIFFUSERS.read_launch_script(resumed)) is DIFFUSERS


# ----------------------------------------------------------------------------- completeness

# One save's files in the order accelerate.save_state writes them (hook first).
SAVE_ORDER = (standin.LORA_WEIGHTS, "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def save_contents(step: int) -> dict[str, bytes]:
    return {
        standin.LORA_WEIGHTS: standin.lora_bytes(step),
        "optimizer.bin": torch_zip_bytes(),
        "scheduler.bin": torch_zip_bytes({"archive/data.pkl": pickle.dumps({"e": step})}),
        "random_states_0.pkl": pickle.dumps({"step": step}),
    }


def write_first(folder: Path, count: int, *, step: int, at: float) -> None:
    """The first ``count`` files of one save, a millisecond apart from ``at`` on."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, data) in enumerate(list(save_contents(step).items())[:count]):
        (folder / name).write_bytes(data)
        os.utime(folder / name, ns=(int((at + index * 0.001) * 1e9),) * 2)


def scan(output_dir: Path, *, settle: float = 0.0, now: float | None = None) -> list[Candidate]:
    return DIFFUSERS.find_states(
        output_dir, now=now or time.time(), settle_seconds=settle, output_name=None
    )


@pytest.mark.parametrize("written", range(len(SAVE_ORDER) + 1))
def test_a_save_killed_after_each_file_is_incomplete(tmp_path: Path, written: int) -> None:
    """Only the folder holding every file of the save counts; each earlier stop names what is
    missing."""
    write_first(tmp_path / "checkpoint-20", written, step=20, at=time.time() - 60)
    [found] = scan(tmp_path)
    assert (found.kind, found.number) == ("step", 20)
    assert found.complete is (written == len(SAVE_ORDER)), found.problems
    if written < len(SAVE_ORDER):
        missing = SAVE_ORDER[written]
        assert any(missing in problem for problem in found.problems), found.problems


def test_a_file_cut_short_makes_the_checkpoint_incomplete(tmp_path: Path) -> None:
    write_first(tmp_path / "checkpoint-20", 4, step=20, at=time.time() - 60)
    scheduler = tmp_path / "checkpoint-20" / "scheduler.bin"
    scheduler.write_bytes(scheduler.read_bytes()[:-7])
    [found] = scan(tmp_path)
    assert not found.complete and any("scheduler.bin" in p for p in found.problems)


def test_a_broken_lora_file_makes_the_checkpoint_incomplete(tmp_path: Path) -> None:
    write_first(tmp_path / "checkpoint-20", 4, step=20, at=time.time() - 60)
    lora = tmp_path / "checkpoint-20" / standin.LORA_WEIGHTS
    lora.write_bytes(lora.read_bytes()[:-4])
    [found] = scan(tmp_path)
    assert not found.complete and any(standin.LORA_WEIGHTS in p for p in found.problems)


def test_an_unfinished_overwrite_in_place_is_mixed(tmp_path: Path) -> None:
    """A resumed run saving into a stale checkpoint-30 again, killed after the hook's file."""
    folder = tmp_path / "checkpoint-30"
    write_first(folder, 4, step=30, at=time.time() - 120)
    write_first(folder, 1, step=30, at=time.time() - 60)  # the new save's weights only
    [found] = scan(tmp_path)
    assert not found.complete and found.mixed, found.problems


def test_a_save_under_way_is_still_written(tmp_path: Path) -> None:
    now = time.time()
    write_first(tmp_path / "checkpoint-20", 4, step=20, at=now - 0.2)
    [found] = scan(tmp_path, settle=5.0, now=now)
    assert not found.complete and found.problems[0].startswith(STILL_WRITTEN)
    assert scan(tmp_path, settle=5.0, now=now + 10)[0].complete


def test_full_fine_tune_and_hookless_weights_count(tmp_path: Path) -> None:
    """train_controlnet.py's hook writes controlnet/diffusion_pytorch_model.safetensors; a
    script without a hook leaves accelerate's model.safetensors."""
    weights = safetensors_bytes([tensor("w", "F32", [2, 2])])
    for name, where in (("checkpoint-10", "controlnet/"), ("checkpoint-20", "")):
        folder = tmp_path / name
        write_first(folder, 4, step=1, at=time.time() - 60)
        (folder / standin.LORA_WEIGHTS).unlink()
        target = folder / (
            f"{where}diffusion_pytorch_model.safetensors" if where else "model.safetensors"
        )
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(weights)
        os.utime(target, (time.time() - 61,) * 2)
    found = {candidate.path.name: candidate for candidate in scan(tmp_path)}
    assert found["checkpoint-10"].complete, found["checkpoint-10"].problems
    assert found["checkpoint-20"].complete, found["checkpoint-20"].problems


def test_sharded_full_model_weights_need_every_shard(tmp_path: Path) -> None:
    """save_pretrained writes the shards, then the index naming them (modeling_utils)."""
    folder = tmp_path / "checkpoint-10"
    write_first(folder, 4, step=10, at=time.time() - 60)
    (folder / standin.LORA_WEIGHTS).unlink()
    model = folder / "transformer"
    model.mkdir()
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for shard in shards:
        (model / shard).write_bytes(safetensors_bytes([tensor("w", "F32", [2, 2])]))
        os.utime(model / shard, (time.time() - 61,) * 2)
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
    (model / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert scan(tmp_path)[0].complete, scan(tmp_path)[0].problems
    (model / shards[1]).unlink()
    [found] = scan(tmp_path)
    assert not found.complete and any(shards[1] in p for p in found.problems), found.problems


def test_newest_completion_first_and_other_folders_refused(tmp_path: Path) -> None:
    write_first(tmp_path / "checkpoint-10", 4, step=10, at=time.time() - 30)
    write_first(tmp_path / "checkpoint-9", 4, step=9, at=time.time() - 20)  # resumed later
    write_first(tmp_path / "incomplete-20261201T000000Z-checkpoint-30", 4, step=30, at=0)
    found = scan(tmp_path)
    assert [c.path.name for c in found][:2] == ["checkpoint-9", "checkpoint-10"]
    aside = found[2]
    assert aside.kind == "accelerate" and not aside.complete
    assert naming.NOT_RESUMABLE in aside.problems


# ----------------------------------------------------------------------------- set aside


def test_the_aside_name_is_invisible_to_diffusers_listing_and_pruning(tmp_path: Path) -> None:
    """Upstream's int(name.split("-")[1]) over names starting "checkpoint": a suffix would
    crash it, the prefix is never listed."""
    aside = DIFFUSERS.aside_path(tmp_path / "checkpoint-30", "20261201T202241Z")
    assert aside.parent == tmp_path
    assert not naming.listed_by_upstream(aside.name)
    names = ["checkpoint-10", "checkpoint-20", aside.name]
    assert naming.upstream_latest(names) == "checkpoint-20"
    assert naming.upstream_pruned(names, 2) == ["checkpoint-10"]
    with pytest.raises(ValueError):
        naming.upstream_latest(["checkpoint-10", "checkpoint-30.incomplete-20261201T202241Z"])
    # The stand-in's own listing (the one the scenarios run) agrees.
    for name in names:
        (tmp_path / name).mkdir()
    standin.prune_before_save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", aside.name]


def candidate(name: str, *, complete: bool) -> Candidate:
    number = naming.step_in_name(name)
    return Candidate(
        Path("/o") / name, "step", number, complete, () if complete else ("x",), 1.0, None, None
    )


def test_incomplete_checkpoints_above_the_chosen_one_are_in_the_way() -> None:
    chosen = candidate("checkpoint-20", complete=True)
    states = [
        candidate("checkpoint-30", complete=False),
        candidate("checkpoint-40", complete=False),
        candidate("checkpoint-10", complete=False),
        chosen,
    ]
    assert [c.path.name for c in DIFFUSERS.in_the_way(states, chosen)] == [
        "checkpoint-30",
        "checkpoint-40",
    ]
    assert len(DIFFUSERS.in_the_way(states, None)) == 3  # a fresh start: all of them


# ----------------------------------------------------------------------------- the rewrite


def test_the_rewrite_adds_replaces_and_removes_the_resume(tmp_path: Path) -> None:
    script = tmp_path / "train.sh"
    script.write_text(FLUX)
    changed, old, _ = DIFFUSERS.rewrite_launch_script(
        script, resume_from="/data/out/checkpoint-100", ensure_save_state=True, initial_step=7
    )
    assert changed and old == FLUX
    parsed = DIFFUSERS.read_launch_script(script.read_text())
    assert parsed.option("resume_from_checkpoint") == "checkpoint-100"  # the basename
    assert parsed.resume == "/data/out/checkpoint-100"  # as diffusers resolves it
    assert (tmp_path / "train.sh.orig").read_text() == FLUX
    before = script.stat().st_mtime_ns
    changed, _, _ = DIFFUSERS.rewrite_launch_script(
        script, resume_from="/data/out/checkpoint-100", ensure_save_state=True
    )
    assert not changed and script.stat().st_mtime_ns == before  # unchanged: not rewritten
    DIFFUSERS.rewrite_launch_script(
        script, resume_from="/data/out/checkpoint-200", ensure_save_state=True
    )
    assert (
        DIFFUSERS.read_launch_script(script.read_text()).option("resume_from_checkpoint")
        == "checkpoint-200"
    )
    DIFFUSERS.rewrite_launch_script(script, resume_from=None, ensure_save_state=True)
    assert script.read_text() == FLUX
    assert (tmp_path / "train.sh.orig").read_text() == FLUX  # kept once


def test_latest_is_replaced_by_the_named_checkpoint() -> None:
    text = FLUX.replace(
        "--max_train_steps=500", "--max_train_steps=500 --resume_from_checkpoint latest"
    )
    assert DIFFUSERS.expected_resume(DIFFUSERS.read_launch_script(text)) is None
    new = DIFFUSERS.rewritten_launch_script(
        text, resume_from="/data/out/checkpoint-300", ensure_save_state=False
    )
    resumed = DIFFUSERS.read_launch_script(new)
    assert resumed.option("resume_from_checkpoint") == "checkpoint-300"
    assert DIFFUSERS.expected_resume(resumed).state == "checkpoint-300"
    assert DIFFUSERS.launch_initial_step(resumed, state_step=300, steps_per_epoch=None) == 300


def test_a_state_outside_output_dir_is_refused() -> None:
    """diffusers would load /data/out/checkpoint-100 for it, not the folder asked for."""
    with pytest.raises(TrainScriptError, match="not in --output_dir"):
        DIFFUSERS.rewritten_launch_script(
            FLUX, resume_from="/elsewhere/checkpoint-100", ensure_save_state=True
        )


def test_save_cadence_and_run_identity(tmp_path: Path) -> None:
    script = tmp_path / "train.sh"
    script.write_text(FLUX)
    changed, _, new = DIFFUSERS.add_save_cadence(script, every_n_steps=20, keep_last_steps=40)
    parsed = DIFFUSERS.read_launch_script(new)
    assert changed and parsed.option("checkpointing_steps") == "20"
    # pruning runs before the save: one more than the steps need, at least 2
    assert parsed.option("checkpoints_total_limit") == "3"
    assert DIFFUSERS.state_cadence(parsed, None) == 20
    changed, _, _ = DIFFUSERS.add_save_cadence(script, every_n_steps=50, keep_last_steps=40)
    assert not changed  # the denser cadence and the bound now in the script stay
    resumed = DIFFUSERS.rewritten_launch_script(
        new, resume_from="/data/out/checkpoint-20", ensure_save_state=True
    )
    assert DIFFUSERS.run_identity(resumed) == DIFFUSERS.run_identity(FLUX)
    other = FLUX.replace("--max_train_steps=500", "--max_train_steps=900")
    assert DIFFUSERS.run_identity(other) != DIFFUSERS.run_identity(FLUX)
    assert DIFFUSERS.add_save_state(script)[0] is False  # diffusers always saves state


# ----------------------------------------------------------------------------- console, position


def test_the_standin_console_reads_as_a_resumed_diffusers_run(tmp_path: Path) -> None:
    """A real stand-in run resumed from checkpoint-4: its bar, start-up lines and sections."""
    args = [sys.executable, str(STANDIN), "--output_dir", str(tmp_path), "--max_train_steps", "8"]
    environment = {**os.environ, "STANDIN_STEP_SECONDS": "0"}
    subprocess.run(
        [*args, "--checkpointing_steps", "4"], env=environment, check=True, capture_output=True
    )
    resumed = subprocess.run(
        [*args, "--max_train_steps", "12", "--resume_from_checkpoint", "checkpoint-8"],
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    )
    report = DIFFUSERS.read_startup(resumed.stderr)  # stderr alone: the print may come late
    assert report.resumed_from == "checkpoint-8" and report.train_state_loaded
    assert (report.steps_per_epoch, report.gradient_accumulation, report.total_steps) == (4, 1, 12)
    assert DIFFUSERS.read_startup(resumed.stdout).resumed_from == "checkpoint-8"
    bar = DIFFUSERS.step_bar(resumed.stderr)
    assert bar is not None and (bar.n, bar.total) == (12, 12)
    first = DIFFUSERS.step_bar(resumed.stderr.split("Loading states", 1)[1].split("it/s", 1)[0])
    assert first is not None and first.n == 8  # the bar starts at the checkpoint's step


def test_sections_follow_the_save_lines() -> None:
    prefix = "12/01/2026 20:00:00 - INFO - "
    bar = "\rSteps:  50%|█| 4/8 [00:01<00:01]\n"
    saving = f"{bar}{prefix}accelerate.accelerator - Saving current state to o/checkpoint-4\n"
    assert DIFFUSERS.section_at_end(saving) is Section.SAVING
    assert (
        DIFFUSERS.section_at_end(saving + f"{prefix}__main__ - Saved state to o/checkpoint-4\n")
        is Section.TRAINING
    )
    assert (
        DIFFUSERS.section_at_end(f"{prefix}__main__ - removing checkpoints: checkpoint-2\n")
        is Section.SAVING
    )
    assert (
        DIFFUSERS.section_at_end(f"{prefix}__main__ - Running validation... \n") is Section.SAMPLING
    )
    assert (
        DIFFUSERS.section_at_end(f"{prefix}__main__ - ***** Running training *****\n")
        is Section.STARTUP
    )
    assert DIFFUSERS.section_at_end("nothing known\n") is None


def test_the_position_is_exact_and_says_what_is_replayed() -> None:
    ledger = Ledger()
    ledger.steps_per_epoch, ledger.gradient_accumulation = 8, 2  # 4 updates per epoch
    position = DIFFUSERS.resume_position(candidate("checkpoint-10", complete=True), ledger)
    assert position.initial_step is None
    assert "restarts epoch 2" in position.reason and "first 2 update(s)" in position.reason
    assert DIFFUSERS.resumed_state_step(Path("/o/checkpoint-10")) == 10
    assert DIFFUSERS.resumed_state_step(Path("/o/incomplete-x-checkpoint-10")) is None
