"""OneTrainer behind the trainer seam: recognition, run location from its config, backup
completeness per write-order position, the rewrite, set-aside names against its own listing
and pruning rules, console lines (fast; real files, real stand-in processes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.checkpoints.accelerate_files import MIXED
from sidecar.checkpoints.scan import STILL_WRITTEN, Candidate
from sidecar.decide.sections import Section
from sidecar.trainers import detect_trainer, trainer_for
from sidecar.trainers.onetrainer import ONETRAINER
from sidecar.trainers.onetrainer import backup_scan as scan
from sidecar.trainers.onetrainer.launch_command import OneTrainerScriptError
from sidecar.trainers.shell.train_script import parse_train_script

STANDIN = Path(__file__).with_name("standin.py")
_spec = importlib.util.spec_from_file_location("onetrainer_standin", STANDIN)
assert _spec is not None and _spec.loader is not None
standin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standin)

NAME = "2026-12-01_20-30-00-backup-10-2-0"


def shell(line: str):
    return parse_train_script(f"#!/bin/bash\n{line}\n")


# ----------------------------------------------------------------------------- recognition


@pytest.mark.parametrize(
    "line",
    [
        "python scripts/train.py --config-path training_presets/my.json",
        "/opt/OneTrainer/venv/bin/python /opt/OneTrainer/scripts/train.py --config-path=/c.json",
        "exec env PYTHONUNBUFFERED=1 python3 scripts/train.py --config-path c.json "
        "--config-value continue_last_backup=true",
        "python scripts/train.py --preset-path p.json --config-path c.json --secrets-path s.json",
    ],
)
def test_onetrainer_command_lines_are_recognised_by_it_alone(line):
    """Each OneTrainer launch is recognised, and auto-detection picks OneTrainer for it."""
    command = shell(line)
    assert ONETRAINER.recognises(command)
    assert detect_trainer(command) is ONETRAINER
    assert trainer_for("auto", command) is ONETRAINER


@pytest.mark.parametrize(
    "line",
    [
        "accelerate launch sd-scripts/flux_train_network.py --config_file c.toml",
        "python scripts/train.py --config-path conf --config-name llama",  # Hydra
        "python train.py --config-path c.json",  # not OneTrainer's scripts/train.py
        "python scripts/train_ui.py --config-path c.json",
        "python scripts/train.py --output_dir out",
        "accelerate launch examples/dreambooth/train_dreambooth_lora_flux.py --output_dir o",
    ],
)
def test_other_command_lines_are_not_onetrainer(line):
    """A command line of another trainer, or a Hydra app's --config-path, is not OneTrainer's."""
    assert not ONETRAINER.recognises(shell(line))


def test_a_command_without_config_path_is_refused_with_the_reason():
    """--config-path is required by OneTrainer; the error says so."""
    with pytest.raises(OneTrainerScriptError, match="--config-path"):
        ONETRAINER.read_launch_script("#!/bin/bash\npython scripts/train.py\n")


# ----------------------------------------------------------------------------- run location


def test_run_location_layers_preset_config_and_overrides(tmp_path):
    """Workspace and final model come from the config over the preset, an override winning,
    relative paths resolved as OneTrainer's working directory sees them."""
    (tmp_path / "preset.json").write_text(json.dumps({"workspace_dir": "preset/ws"}))
    (tmp_path / "c.json").write_text(json.dumps({"output_model_destination": "m/x.safetensors"}))
    command = ONETRAINER.read_launch_script(
        "python scripts/train.py --preset-path preset.json --config-path c.json\n"
    )
    location = ONETRAINER.run_location(command, lambda path: tmp_path / path)
    assert location.output_dir == tmp_path / "preset/ws"
    assert location.output_name == str(tmp_path / "m/x.safetensors")
    overridden = ONETRAINER.read_launch_script(
        "python scripts/train.py --config-path c.json --config-value workspace_dir=/w1 "
        "--config-value workspace_dir=/w2\n"
    )
    location = ONETRAINER.run_location(overridden, lambda path: tmp_path / path)
    assert location.output_dir == Path("/w2")  # an absolute path stays what it is


def test_run_location_names_what_hides_the_workspace(tmp_path):
    """A config path from an unset variable, or a missing config file, is named, not guessed."""
    hidden = ONETRAINER.read_launch_script('python scripts/train.py --config-path "$CONFIG"\n')
    location = ONETRAINER.run_location(hidden, lambda path: tmp_path / path)
    assert location.output_dir is None and "CONFIG" in (location.why_unknown or "")
    missing = ONETRAINER.read_launch_script("python scripts/train.py --config-path none.json\n")
    location = ONETRAINER.run_location(missing, lambda path: tmp_path / path)
    assert location.output_dir is None and "none.json" in (location.why_unknown or "")


def test_final_model_paths_follow_output_model_destination(tmp_path):
    """A file destination is the final model; a folder gets a timestamped file inside it."""
    assert ONETRAINER.final_model_paths(tmp_path, str(tmp_path / "m.safetensors")) == [
        tmp_path / "m.safetensors"
    ]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "2026-12-01_20-30-00.safetensors").write_bytes(b"x")
    assert ONETRAINER.final_model_paths(tmp_path, str(tmp_path / "models")) == [
        tmp_path / "models" / "2026-12-01_20-30-00.safetensors"
    ]


# ----------------------------------------------------------------------------- completeness


def upstream_order(progress=(10, 2, 0), *, ema=False) -> list[tuple[str, bytes]]:
    """A LoRA backup's files in the order OneTrainer writes them (see backup_files)."""
    step, epoch, epoch_step = progress
    meta = {"epoch": epoch, "epoch_step": epoch_step, "epoch_sample": epoch_step}
    files = [("lora/lora.safetensors", safetensors()), ("optimizer/optimizer.pt", torch_zip())]
    if ema:
        files.append(("ema/ema.pt", torch_zip()))
    files.append(("meta.json", json.dumps({"train_progress": {**meta, "global_step": step}})))
    files.append(("onetrainer_config/args.json", b"{}"))
    return [(name, data.encode() if isinstance(data, str) else data) for name, data in files]


def safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(16)


def torch_zip() -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"zip-{os.getpid()}-{time.monotonic_ns()}"
    standin.write_torch_zip(str(path), "optimizer/data.pkl")
    data = path.read_bytes()
    path.unlink()
    return data


def write_backup(workspace: Path, name: str, files: list[tuple[str, bytes]], *, at: float):
    folder = workspace / "backup" / name
    for index, (relative, data) in enumerate(files):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (at + index, at + index))  # written one after another
    return folder


def only(workspace: Path, *, settle: float = 0.0) -> Candidate:
    (found,) = ONETRAINER.find_states(
        workspace, now=time.time(), settle_seconds=settle, output_name=None
    )
    return found


@pytest.mark.parametrize(
    ("written", "complete", "missing"),
    [
        (1, False, ["optimizer/optimizer.pt missing", "meta.json missing"]),
        (2, False, ["meta.json missing"]),
        (3, True, []),  # meta.json written: resumable, the config copies are never loaded
        (4, True, []),
    ],
)
def test_completeness_at_each_write_order_position(tmp_path, written, complete, missing):
    """A backup killed after each file is complete exactly once meta.json is written."""
    write_backup(tmp_path, NAME, upstream_order()[:written], at=time.time() - 100)
    found = only(tmp_path)
    assert found.complete is complete, found.problems
    for text in missing:
        assert any(problem.startswith(text) for problem in found.problems), found.problems
    assert found.kind == "step" and found.number == 10
    if complete:
        assert (found.step, found.epoch) == (10, 2)


@pytest.mark.parametrize("cut", ["lora/lora.safetensors", "optimizer/optimizer.pt", "meta.json"])
def test_a_file_cut_short_makes_the_backup_incomplete(tmp_path, cut):
    """A truncated weights, optimizer or meta.json file is named among the problems."""
    files = [
        (name, data[: len(data) // 2] if name == cut else data) for name, data in upstream_order()
    ]
    write_backup(tmp_path, NAME, files, at=time.time() - 100)
    found = only(tmp_path)
    assert not found.complete
    assert any(problem.startswith(cut) for problem in found.problems), found.problems


def test_meta_json_that_contradicts_the_name_is_refused(tmp_path):
    """meta.json must record the step, epoch and epoch step the folder is named for."""
    write_backup(tmp_path, NAME, upstream_order((12, 2, 2)), at=time.time() - 100)
    found = only(tmp_path)
    assert not found.complete
    assert any("named for step 10" in problem for problem in found.problems)


def test_meta_json_older_than_the_optimizer_is_a_mixed_save(tmp_path):
    """meta.json is written after the optimizer: an optimizer newer than it is another save."""
    folder = write_backup(tmp_path, NAME, upstream_order(), at=time.time() - 100)
    os.utime(folder / "optimizer" / "optimizer.pt", (time.time() - 10, time.time() - 10))
    found = only(tmp_path)
    assert not found.complete and found.mixed
    assert any(problem.startswith(MIXED + "optimizer/optimizer.pt") for problem in found.problems)


def test_ema_folder_without_its_file_is_incomplete(tmp_path):
    """With EMA on, ema/ema.pt comes before meta.json; an ema/ folder without it is cut short."""
    files = upstream_order(ema=True)
    folder = write_backup(tmp_path, NAME, files, at=time.time() - 100)
    assert only(tmp_path).complete
    (folder / "ema" / "ema.pt").unlink()
    assert not only(tmp_path).complete


def test_a_backup_still_written_is_incomplete_until_it_settles(tmp_path):
    """Its newest file changed within the settle time: still being written."""
    write_backup(tmp_path, NAME, upstream_order(), at=time.time() - 2)
    found = only(tmp_path, settle=30)
    assert not found.complete
    assert any(problem.startswith(STILL_WRITTEN) for problem in found.problems)
    assert only(tmp_path, settle=0).complete


def test_every_folder_onetrainer_lists_is_a_candidate(tmp_path):
    """Any directory in backup/ is one OneTrainer could resume from; files are not."""
    write_backup(tmp_path, NAME, upstream_order(), at=time.time() - 100)
    (tmp_path / "backup" / "old").mkdir()
    (tmp_path / "backup" / "notes.txt").write_text("x")
    found = ONETRAINER.find_states(tmp_path, now=time.time(), settle_seconds=0, output_name=None)
    assert [c.path.name for c in found] == [NAME, "old"]
    assert found[0].complete and not found[1].complete
    assert "not named" in found[1].problems[0]


def test_a_backup_pruned_while_it_is_read_is_left_out(tmp_path):
    """Rolling pruning deleting a backup between the listing and the read is no problem."""
    write_backup(tmp_path, NAME, upstream_order(), at=time.time() - 100)
    (entry,) = scan._listed_folders(tmp_path / "backup")
    import shutil

    shutil.rmtree(entry.path)
    assert scan._examine(entry, now=time.time(), settle_seconds=0, memo=None) is None


def test_complete_backups_come_newest_first(tmp_path):
    """Newest completion first, then the incomplete ones."""
    now = time.time()
    write_backup(
        tmp_path, "2026-12-01_20-00-00-backup-5-1-0", upstream_order((5, 1, 0)), at=now - 200
    )
    write_backup(tmp_path, NAME, upstream_order(), at=now - 100)
    write_backup(
        tmp_path, "2026-12-01_20-40-00-backup-15-3-0", upstream_order((15, 3, 0))[:2], at=now - 50
    )
    found = ONETRAINER.find_states(tmp_path, now=now, settle_seconds=0, output_name=None)
    assert [(c.number, c.complete) for c in found] == [(10, True), (5, True), (15, False)]
    assert ONETRAINER.resumed_state_step(found[0].path) == 10


def test_complete_backups_follow_onetrainers_name_order_within_one_second(tmp_path):
    """Two backups in one second: OneTrainer prefers backup-9 to backup-13 (the step compares
    as a string), so that is the one offered first, though backup-13 completed later."""
    now = time.time()
    stamp = "2026-12-01_20-30-00"
    write_backup(tmp_path, f"{stamp}-backup-9-1-4", upstream_order((9, 1, 4)), at=now - 100)
    write_backup(tmp_path, f"{stamp}-backup-13-2-3", upstream_order((13, 2, 3)), at=now - 50)
    found = ONETRAINER.find_states(tmp_path, now=now, settle_seconds=0, output_name=None)
    assert [c.number for c in found] == [9, 13]
    assert standin.last_backup_path(str(tmp_path)) == str(found[0].path)


@pytest.mark.parametrize(
    ("kill_after", "complete"), [("weights", False), ("optimizer", False), ("meta", True)]
)
def test_the_stand_in_killed_mid_backup(tmp_path, kill_after, complete):
    """SIGKILLed after each part of a backup, the backup is complete only with meta.json."""
    workspace = tmp_path / "ws"
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "workspace_dir": str(workspace),
                "epochs": 1,
                "backup_after": 3,
                "backup_after_unit": "STEP",
                "output_model_destination": str(tmp_path / "m"),
            }
        )
    )
    env = {
        **os.environ,
        "STANDIN_STEP_SECONDS": "0",
        "STANDIN_KILL_MID_SAVE_AT_STEP": "2",
        "STANDIN_KILL_AFTER": kill_after,
    }
    result = subprocess.run(
        [sys.executable, str(STANDIN), "--config-path", str(config)], env=env, timeout=30
    )
    assert result.returncode == -9
    found = only(workspace)
    assert found.number == 2 and found.complete is complete, found.problems


# ----------------------------------------------------------------------------- the rewrite

SCRIPT = (
    "#!/bin/bash\n"
    "cd /opt/OneTrainer\n"
    "python scripts/train.py \\\n"
    "  --config-path /data/run.json \\\n"
    "  --config-value ema.decay=0.999 \\\n"
    "  --config-value epochs=4\n"
)


def test_resume_adds_continue_last_backup_and_keeps_the_users_overrides(tmp_path):
    """Resuming adds one --config-value continue_last_backup=true; the others stay in order."""
    script = tmp_path / "train.sh"
    script.write_text(SCRIPT)
    changed, old, new = ONETRAINER.rewrite_launch_script(
        script, resume_from="/data/ws/backup/x", ensure_save_state=True
    )
    assert changed and old == SCRIPT and script.read_text() == new
    command = ONETRAINER.read_launch_script(new)
    assert command.config_values == ("continue_last_backup=true", "ema.decay=0.999", "epochs=4")
    assert command.continues_last_backup is True
    assert (tmp_path / "train.sh.orig").read_text() == SCRIPT
    before = script.stat().st_mtime_ns
    again = ONETRAINER.rewrite_launch_script(script, resume_from="/other", ensure_save_state=True)
    assert again[0] is False and script.stat().st_mtime_ns == before


def test_resume_replaces_an_existing_setting_where_it_stands(tmp_path):
    """A user's continue_last_backup=false is replaced in place, duplicates removed."""
    text = SCRIPT.replace(
        "epochs=4\n",
        "epochs=4 \\\n  --config-value continue_last_backup=false \\\n"
        "  --config-value=continue_last_backup=no\n",
    )
    new = ONETRAINER.rewritten_launch_script(text, resume_from="/x", ensure_save_state=False)
    command = ONETRAINER.read_launch_script(new)
    assert command.config_values == ("ema.decay=0.999", "epochs=4", "continue_last_backup=true")


def test_no_resume_turns_continuing_off(tmp_path):
    """Starting over sets continue_last_backup=false, whatever the config file says."""
    resumed = ONETRAINER.rewritten_launch_script(SCRIPT, resume_from="/x", ensure_save_state=False)
    over = ONETRAINER.rewritten_launch_script(resumed, resume_from=None, ensure_save_state=False)
    assert ONETRAINER.read_launch_script(over).continues_last_backup is False
    assert ONETRAINER.run_identity(over) == ONETRAINER.run_identity(SCRIPT)
    assert ONETRAINER.run_identity(SCRIPT.replace("epochs=4", "epochs=5")) != (
        ONETRAINER.run_identity(SCRIPT)
    )


def test_the_exact_position_needs_nothing_added():
    """The position is exact: no initial step is asked for, and none is written."""
    command = ONETRAINER.read_launch_script(SCRIPT)
    assert ONETRAINER.expected_resume(command) is None
    assert ONETRAINER.launch_initial_step(command, state_step=9, steps_per_epoch=5) == 0
    resumed = ONETRAINER.read_launch_script(
        ONETRAINER.rewritten_launch_script(SCRIPT, resume_from="/x", ensure_save_state=False)
    )
    assert ONETRAINER.launch_initial_step(resumed, state_step=9, steps_per_epoch=5) == 9


# ----------------------------------------------------------------------------- set aside


def candidate(path: Path, *, complete: bool) -> Candidate:
    return Candidate(path, "step", None, complete, () if complete else ("x",), None, None, None)


def test_in_the_way_is_every_name_upstream_would_take_first(tmp_path):
    """Whatever sorts after the chosen backup's name is taken by continue_last_backup first."""
    backups = tmp_path / "backup"
    older = candidate(backups / "2026-12-01_20-00-00-backup-5-1-0", complete=True)
    chosen = candidate(backups / NAME, complete=True)
    newer = candidate(backups / "2026-12-01_20-40-00-backup-15-3-0", complete=False)
    stray = candidate(backups / "old", complete=False)
    picked = ONETRAINER.in_the_way([newer, chosen, older, stray], chosen)
    assert picked == [newer, stray]
    assert ONETRAINER.in_the_way([newer], None) == []


def test_a_set_aside_backup_is_neither_resumed_nor_pruned(tmp_path):
    """Moved aside, upstream's listing takes the chosen backup and its pruning never sees the
    one set aside; a suffix inside backup/ would have been taken instead."""
    workspace = tmp_path / "ws"
    chosen = write_backup(workspace, NAME, upstream_order(), at=time.time() - 100)
    partial = write_backup(
        workspace,
        "2026-12-01_20-40-00-backup-15-3-0",
        upstream_order((15, 3, 0))[:2],
        at=time.time() - 50,
    )
    in_place = partial.with_name(partial.name + ".incomplete-20261201T204100Z")
    assert in_place.name > chosen.name  # why the name cannot stay in backup/
    aside = ONETRAINER.aside_path(partial, "20261201T204100Z")
    partial.rename(aside)
    assert aside.parent == workspace and aside.is_dir()
    assert standin.last_backup_path(str(workspace)) == str(chosen)
    trainer = standin.Trainer({**standin.DEFAULTS, "workspace_dir": str(workspace)}, 1)
    trainer.prune(0)  # rolling pruning deletes everything in backup/ past the newest N
    assert aside.is_dir()
    found = ONETRAINER.find_states(workspace, now=time.time(), settle_seconds=0, output_name=None)
    assert found == []  # nothing left in backup/, and the aside one is not listed


# ----------------------------------------------------------------------------- console


def test_console_lines():
    """The step bar, the backup it continued from and what it does last are read."""
    text = (
        "Continuing training from backup 'workspace/run/backup/" + NAME + "'...\n"
        "\repoch:  40%|####      | 2/5 [00:00<00:00, 1.00it/s]"
        "\rstep:   0%|          | 0/4 [00:00<?, ?it/s]"
        "\rstep:  50%|#####     | 2/4 [00:01<00:01, 2.00it/s, loss=0.1, smooth loss=0.1]"
    )
    bar = ONETRAINER.step_bar(text)
    assert bar is not None and (bar.n, bar.total) == (2, 4)
    report = ONETRAINER.read_startup(text)
    assert report.resumed_from == f"workspace/run/backup/{NAME}"
    assert (report.steps_per_epoch, report.total_steps) == (4, 20)
    assert ONETRAINER.section_at_end(text) is Section.TRAINING
    assert ONETRAINER.section_at_end(text + "\nCreating Backup workspace/run/backup/x\n") is (
        Section.SAVING
    )
    assert ONETRAINER.section_at_end("No backup found, continuing without backup...\n") is (
        Section.STARTUP
    )
    assert ONETRAINER.section_at_end("loading\n") is None
