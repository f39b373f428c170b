"""ai-toolkit behind the trainer seam: its launch line, job config, saves and their order."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ai_toolkit_tree import build_toolkit_tree, load_standin

from sidecar.checkpoints.file_checks import FileReport, inspect_state_file
from sidecar.checkpoints.scan import STILL_WRITTEN, Candidate
from sidecar.trainers.ai_toolkit import AI_TOOLKIT, AiToolkit
from sidecar.trainers.ai_toolkit import save_names as names
from sidecar.trainers.ai_toolkit.job_config import load_job_config
from sidecar.trainers.ai_toolkit.save_scan import (
    NOT_A_SAVE,
    OPTIMIZER_NOT_RESTORABLE,
    find_saves,
)
from sidecar.trainers.sd_scripts import SD_SCRIPTS
from sidecar.trainers.shell.train_script import parse_train_script

standin = load_standin()
NAME = "my-lora"

RECOGNISED = [
    "python run.py config/my-lora.yaml",
    "python3 /opt/ai-toolkit/run.py /data/output/my-lora/.job_config.json",  # its UI's launch
    "/venv/bin/python ai-toolkit/run.py person_v1",  # a name in its config folder
    "python run.py config/a.yml --recover -n my-lora --log /tmp/log.txt",
    "accelerate launch run.py config/job.jsonc",
    "python run.py -nmy-lora config/job.yaml",
]
NOT_RECOGNISED = [
    "python run.py person_v1",  # a bare name outside an ai-toolkit folder: too vague
    "python run.py --output_dir /out --model_name_or_path gpt2",  # an HF example script
    "python run.py config/job.yaml --resume /out/x",  # an option run.py does not have
    "python train.py config/job.yaml",
    "python run.py",
    "accelerate launch train_dreambooth_lora.py --output_dir /out --checkpointing_steps 100",
    "python scripts/train.py --config-path /cfg/one.json",
    "accelerate launch sd-scripts/flux_train_network.py --config_file /out/config.toml",
]


def command(line: str):
    return AI_TOOLKIT.read_launch_script(line + "\n")


@pytest.mark.parametrize("line", RECOGNISED)
def test_its_launch_lines_are_recognised_and_only_by_it(line: str) -> None:
    """ai-toolkit's launch lines are ai-toolkit's, and sd-scripts does not claim them."""
    parsed = parse_train_script(line + "\n")
    assert AI_TOOLKIT.recognises(parsed)
    assert not SD_SCRIPTS.recognises(parsed)


@pytest.mark.parametrize("line", NOT_RECOGNISED)
def test_other_launch_lines_are_not_recognised(line: str) -> None:
    """A line that is not ``run.py`` with a job config (and only run.py's options) is not it."""
    assert not AI_TOOLKIT.recognises(parse_train_script(line + "\n"))


def test_the_command_names_no_resume_and_always_saves_state() -> None:
    parsed = command("python run.py config/my-lora.yaml")
    assert (parsed.resume, parsed.output_dir, parsed.save_state) == (None, None, True)
    assert AI_TOOLKIT.launch_ranks(parsed) == 1
    assert (
        AI_TOOLKIT.launch_ranks(command("accelerate launch --num_processes 2 run.py a.yaml")) == 2
    )


# ----------------------------------------------------------------------------- job config


def locate(tree_root: Path, line: str, trainer: AiToolkit | None = None):
    trainer = trainer or AiToolkit()
    parsed = trainer.read_launch_script(line + "\n")
    toolkit = tree_root / "ai-toolkit"
    location = trainer.run_location(
        parsed, lambda path: Path(path) if Path(path).is_absolute() else toolkit / path
    )
    return trainer, parsed, location


@pytest.mark.parametrize("config_format", ["yaml", "json"])
def test_the_save_root_comes_from_the_job_config(tmp_path: Path, config_format: str) -> None:
    """``<training_folder>/<name>`` from YAML or JSON; the name is the save files' name."""
    tree = build_toolkit_tree(tmp_path, config_format=config_format, save_every=250)
    line = f"python run.py config/{tree.config.name}"
    trainer, parsed, location = locate(tmp_path, line)
    assert (location.output_dir, location.output_name) == (tree.save_root, NAME)
    assert location.why_unknown is None
    assert trainer.state_cadence(parsed, None) == 250
    # get_config also finds it by the bare name, trying the suffixes in its config folder.
    _, _, by_name = locate(tmp_path, f"python run.py {NAME}")
    assert by_name.output_dir == tree.save_root


def test_name_tags_environment_and_process_names_are_applied(tmp_path: Path) -> None:
    """``[name]`` (from --name), ``${VAR}`` and a process's own name, as ai-toolkit applies them."""
    config = tmp_path / "ai-toolkit" / "config" / "shared.json"
    config.parent.mkdir(parents=True)
    document = {
        "config": {
            "name": "[name]",
            "training_folder": "${OUT_ROOT}/[name]-runs",
            "process": [{"type": "sd_trainer", "name": "[name]_v2", "train": {"start_step": 7}}],
        }
    }
    config.write_text(json.dumps(document))
    job, _ = load_job_config(
        "run.py",
        ("config/shared.json", "--name", "cat"),
        lambda path: tmp_path / "ai-toolkit" / path,
        environment={"OUT_ROOT": "/data"},
    )
    assert (job.name, job.job_name, job.save_root) == ("cat_v2", "cat", "/data/cat-runs/cat_v2")
    assert job.start_step == 7 and job.save_every == 1000 and job.max_step_saves_to_keep == 5


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("python run.py config/missing.yaml", "not found"),
        ("python run.py config/a.yaml config/b.yaml", "2 jobs"),
        ("python run.py config/env.yaml", "UNSET_ROOT"),
    ],
)
def test_an_unknown_save_root_says_why(tmp_path: Path, line: str, expected: str) -> None:
    build_toolkit_tree(tmp_path)
    (tmp_path / "ai-toolkit" / "config" / "env.yaml").write_text(
        "config:\n  name: x\n  process:\n    - training_folder: ${UNSET_ROOT}/out\n"
    )
    _, _, location = locate(tmp_path, line)
    assert location.output_dir is None
    assert location.why_unknown is not None and expected in location.why_unknown


# ----------------------------------------------------------------------------- saves on disk


def write_save(root: Path, step: int | None, *, cut: bool = False) -> Path:
    file_name = names.save_name(NAME, step) if step is not None else names.final_name(NAME)
    path = root / file_name
    info = json.dumps({"step": step or 0, "epoch": 0})
    standin.write_safetensors(str(path), {"training_info": info}, 4096, False)
    if cut:
        os.truncate(path, path.stat().st_size // 2)  # killed half-way through the write
    return path


def write_optimizer(root: Path, *, cut: bool = False) -> Path:
    path = root / names.OPTIMIZER_FILE
    standin.write_in_place(str(path), standin.optimizer_bytes({"state": {"step": 1}}), False)
    if cut:
        os.truncate(path, path.stat().st_size - 10)
    return path


def scan(root: Path, *, now: float | None = None, settle: float = 0) -> dict[str, Candidate]:
    found = find_saves(root, name=NAME, now=now or time.time(), settle_seconds=settle)
    return {candidate.path.name: candidate for candidate in found}


def two_saves(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_save(root, 5)
    write_optimizer(root)


def test_killed_inside_the_save_file(tmp_path: Path) -> None:
    """A cut ``.safetensors`` is incomplete; the save before it is whole, optimizer.pt its own."""
    two_saves(tmp_path)
    write_save(tmp_path, 10, cut=True)
    found = scan(tmp_path)
    assert not found[names.save_name(NAME, 10)].complete
    assert "truncated" in found[names.save_name(NAME, 10)].problems[0]
    previous = found[names.save_name(NAME, 5)]
    assert previous.complete and previous.problems == () and previous.step == 5


def test_killed_before_optimizer_pt(tmp_path: Path) -> None:
    """A whole save with an older optimizer.pt is complete, and says it cannot restore it."""
    two_saves(tmp_path)
    time.sleep(0.01)
    write_save(tmp_path, 10)
    newest = scan(tmp_path)[names.save_name(NAME, 10)]
    assert newest.complete
    assert newest.problems[0].startswith(OPTIMIZER_NOT_RESTORABLE)
    assert "older than this save" in newest.problems[0] and "ONE optimizer.pt" in newest.problems[0]


def test_killed_inside_optimizer_pt(tmp_path: Path) -> None:
    """A cut optimizer.pt: the newest save stays the one to resume (no older save can do
    better, the file is shared), and says so; older saves carry no note."""
    two_saves(tmp_path)
    write_save(tmp_path, 10)
    write_optimizer(tmp_path, cut=True)
    found = scan(tmp_path)
    newest, older = found[names.save_name(NAME, 10)], found[names.save_name(NAME, 5)]
    assert newest.complete and "is broken" in newest.problems[0]
    assert older.complete and older.problems == ()


def test_a_missing_optimizer_pt_is_said(tmp_path: Path) -> None:
    write_save(tmp_path, 5)
    (only,) = scan(tmp_path).values()
    assert only.complete and "optimizer.pt is missing" in only.problems[0]


def test_a_finished_save_and_its_pruning(tmp_path: Path) -> None:
    """After optimizer.pt, and after clean_up_saves removed the oldest: all whole, no notes."""
    two_saves(tmp_path)
    write_save(tmp_path, 10)
    write_optimizer(tmp_path)
    assert all(c.complete and not c.problems for c in scan(tmp_path).values())
    (tmp_path / names.save_name(NAME, 5)).unlink()
    assert list(scan(tmp_path)) == [names.save_name(NAME, 10)]


def test_a_save_or_optimizer_pt_still_written_is_not_complete(tmp_path: Path) -> None:
    two_saves(tmp_path)
    write_save(tmp_path, 10)
    now = (tmp_path / names.save_name(NAME, 10)).stat().st_mtime
    newest = scan(tmp_path, now=now + 0.2, settle=1.0)[names.save_name(NAME, 10)]
    assert not newest.complete and newest.problems[-1].startswith(STILL_WRITTEN)
    write_optimizer(tmp_path)
    later = (tmp_path / names.OPTIMIZER_FILE).stat().st_mtime
    os.utime(tmp_path / names.save_name(NAME, 10), (later - 5, later - 5))  # it settled first
    newest = scan(tmp_path, now=later + 0.2, settle=1.0)[names.save_name(NAME, 10)]
    assert not newest.complete and "optimizer.pt" in newest.problems[-1]
    assert scan(tmp_path, now=later + 5, settle=1.0)[names.save_name(NAME, 10)].complete


def test_the_final_model_and_strays_the_resume_would_load(tmp_path: Path) -> None:
    """``<name>.safetensors`` is a save; any other ``<name>*`` entry is listed as incomplete
    (ai-toolkit would load it when newest); other files and hidden ones are not listed."""
    two_saves(tmp_path)
    write_save(tmp_path, None)
    (tmp_path / f"{NAME}_notes.txt").write_text("x")
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / f".incomplete-20261201T000000Z-{names.save_name(NAME, 10)}").write_text("x")
    found = scan(tmp_path)
    assert set(found) == {names.save_name(NAME, 5), names.final_name(NAME), f"{NAME}_notes.txt"}
    assert found[names.final_name(NAME)].kind == "final" and found[names.final_name(NAME)].complete
    assert NOT_A_SAVE in found[f"{NAME}_notes.txt"].problems[0]


class _PruningMemo:
    """A file memo during whose check ``clean_up_saves`` removes the file being checked."""

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def inspect(self, entry: os.DirEntry[str]) -> FileReport:
        if entry.name == self.victim:
            os.unlink(entry.path)
        return inspect_state_file(entry.path)


def test_a_save_pruned_while_it_is_read_is_left_out(tmp_path: Path) -> None:
    two_saves(tmp_path)
    write_save(tmp_path, 10)
    write_optimizer(tmp_path)
    memo = _PruningMemo(names.save_name(NAME, 5))
    found = find_saves(tmp_path, name=NAME, now=time.time(), settle_seconds=0, memo=memo)  # type: ignore[arg-type]
    assert [c.path.name for c in found] == [names.save_name(NAME, 10)]
    assert find_saves(tmp_path / "gone", name=NAME, now=time.time(), settle_seconds=0) == []


# ----------------------------------------------------------------------------- what resume takes


def test_renaming_changes_the_ctime_of_the_renamed_file_only(tmp_path: Path) -> None:
    """The fact in_the_way relies on: setting one file aside does not reorder the others."""
    first, second = write_save(tmp_path, 5), write_save(tmp_path, 10)
    before = {path: os.lstat(path).st_ctime_ns for path in (first, second)}
    time.sleep(0.02)
    moved = first.rename(tmp_path / "moved")
    assert os.lstat(second).st_ctime_ns == before[second]
    assert os.lstat(moved).st_ctime_ns > before[first]


def test_in_the_way_is_everything_newer_by_ctime_than_the_choice(tmp_path: Path) -> None:
    two_saves(tmp_path)
    write_save(tmp_path, 10)  # whole, but passed over (say, quarantined)
    write_save(tmp_path, 15, cut=True)
    candidates = list(scan(tmp_path).values())
    by_name = {c.path.name: c for c in candidates}
    chosen = by_name[names.save_name(NAME, 5)]
    way = AI_TOOLKIT.in_the_way(candidates, chosen)
    assert {c.path.name for c in way} == {names.save_name(NAME, 10), names.save_name(NAME, 15)}
    newest_whole = by_name[names.save_name(NAME, 10)]
    assert [c.path.name for c in AI_TOOLKIT.in_the_way(candidates, newest_whole)] == [
        names.save_name(NAME, 15)
    ]
    assert [c.path.name for c in AI_TOOLKIT.in_the_way(candidates, None)] == [
        names.save_name(NAME, 15)
    ]


def test_a_set_aside_save_is_invisible_to_resume_and_pruning(tmp_path: Path) -> None:
    """The aside name matches none of get_latest_save_path's and clean_up_saves' globs
    (checked with Python's own glob on disk), and the stand-in resumes past it."""
    two_saves(tmp_path)
    cut = write_save(tmp_path, 10, cut=True)
    aside = AI_TOOLKIT.aside_path(cut, "20261201T203000Z")
    assert aside.parent == tmp_path and aside.name.startswith(".") and cut.name in aside.name
    cut.rename(aside)
    patterns = [f"{NAME}*.safetensors", f"{NAME}*.pt", f"{NAME}*", f"{NAME}_*"]
    matched = {Path(p).name for pattern in patterns for p in glob.glob(str(tmp_path / pattern))}
    assert aside.name not in matched and names.save_name(NAME, 5) in matched
    assert not names.latest_rule_sees(str(tmp_path), NAME, aside.name)
    assert not names.pruned_by_clean_up(NAME, aside.name)
    assert names.aside_name("x", "S", [".incomplete-S"]).startswith("..incomplete-")


def test_the_latest_rule_filters_the_whole_path() -> None:
    """get_latest_save_path drops a path holding ``_cn`` (etc.) anywhere, its folders too."""
    assert names.latest_rule_sees("/data/out/my-lora", NAME, names.save_name(NAME, 5))
    assert not names.latest_rule_sees("/data/my_cnet/my-lora", NAME, names.save_name(NAME, 5))
    assert not names.latest_rule_sees("/out/my-lora", NAME, f"{NAME}_LoRA_000000005.safetensors")
    assert names.step_of_save(names.save_name(NAME, 1_234_567_890), NAME) == 1_234_567_890


def test_expected_resume_and_position_follow_the_newest_whole_save(tmp_path: Path) -> None:
    tree = build_toolkit_tree(tmp_path)
    trainer, parsed, _ = locate(tmp_path, "python run.py config/my-lora.yaml")
    assert trainer.expected_resume(parsed) is None
    assert trainer.launch_initial_step(parsed, state_step=None, steps_per_epoch=None) == 0
    two_saves(tree.save_root)
    write_save(tree.save_root, 10, cut=True)  # newest by ctime, but cut: not what it must load
    expected = trainer.expected_resume(parsed)
    assert expected is not None and expected.initial_step is None
    assert expected.state == str(tree.save_root / names.save_name(NAME, 5))
    assert trainer.launch_initial_step(parsed, state_step=None, steps_per_epoch=None) == 5
    assert trainer.resumed_state_step(tree.save_root / names.save_name(NAME, 5)) == 5
    position = trainer.resume_position(scan(tree.save_root)[names.save_name(NAME, 5)], None)  # type: ignore[arg-type]
    assert position.initial_step is None and "once more" in position.reason


def test_train_start_step_overrides_the_saves_step(tmp_path: Path) -> None:
    tree = build_toolkit_tree(tmp_path)
    tree.config.write_text(
        tree.config.read_text().replace("steps: 30", "start_step: 3\n    steps: 30")
    )
    trainer, parsed, _ = locate(tmp_path, "python run.py config/my-lora.yaml")
    assert trainer.launch_initial_step(parsed, state_step=10, steps_per_epoch=None) == 3


# ----------------------------------------------------------------------------- script and output


def test_the_launch_script_is_never_rewritten(tmp_path: Path) -> None:
    """No option picks a save: every edit request leaves the file alone, without error."""
    script = tmp_path / "train.sh"
    text = "exec python run.py config/my-lora.yaml\n"
    script.write_text(text)
    before = script.stat().st_mtime_ns
    resume = "/out/my-lora/my-lora_000000005.safetensors"
    assert AI_TOOLKIT.rewrite_launch_script(script, resume_from=resume, ensure_save_state=True) == (
        False,
        text,
        text,
    )
    assert (
        AI_TOOLKIT.rewrite_launch_script(script, resume_from=None, ensure_save_state=False)[0]
        is False
    )
    assert (
        AI_TOOLKIT.rewritten_launch_script(text, resume_from=resume, ensure_save_state=True) == text
    )
    assert AI_TOOLKIT.add_save_state(script)[0] is False
    assert AI_TOOLKIT.add_save_cadence(script, every_n_steps=5, keep_last_steps=10)[0] is False
    assert AI_TOOLKIT.remedy(script, "dataloader")[0] is False
    assert script.stat().st_mtime_ns == before and not (tmp_path / "train.sh.orig").exists()
    assert AI_TOOLKIT.run_identity(text) == AI_TOOLKIT.run_identity(text)
    assert AI_TOOLKIT.run_identity(text) != AI_TOOLKIT.run_identity(text.replace("my", "our"))


def test_its_step_bar_is_described_by_the_job_name(tmp_path: Path) -> None:
    build_toolkit_tree(tmp_path)
    trainer, _, _ = locate(tmp_path, "python run.py config/my-lora.yaml")
    output = (
        "\rCaching latents:  50%|█| 5/10 [00:01<00:01]"
        "\rmy-lora:  42%|████▏     | 420/1000 [03:10<04:23, 2.20it/s, lr: 1.0e-04 loss: 3.1e-01]"
    )
    bar = trainer.step_bar(output)
    assert bar is not None and (bar.n, bar.total) == (420, 1000)
    assert AiToolkit().step_bar(output) is None  # the job's name not known yet
    startup = trainer.read_startup(
        "#### IMPORTANT RESUMING FROM /out/my-lora/my-lora_000000005.safetensors ####\n"
        "Found step 5 in metadata, starting from there\n"
        "\rmy-lora:   0%|          | 5/1000 [00:00<?, ?it/s]"
    )
    assert startup.resumed_from == "/out/my-lora/my-lora_000000005.safetensors"
    assert startup.train_state_loaded and startup.total_steps == 1000
    assert trainer.section_at_end(output) is None


def test_without_the_sidecar_a_kill_mid_save_fails_every_retry(tmp_path: Path) -> None:
    """The stand-in reproduces the upstream failure the set-aside step exists for."""
    tree = build_toolkit_tree(tmp_path, steps=12, save_every=5)
    env = tree.env({"STANDIN_KILL_MID_SAVE_AT_STEP": "10"})
    run = [sys.executable, "run.py", f"config/{tree.config.name}"]
    first = subprocess.run(run, cwd=tree.toolkit, env=env, capture_output=True, text=True)
    assert first.returncode == -9
    for _ in range(2):
        retry = subprocess.run(run, cwd=tree.toolkit, env=env, capture_output=True, text=True)
        assert retry.returncode == 1 and "Error running job" in retry.stdout
        assert f"RESUMING FROM {tree.save_root / names.save_name(NAME, 10)}" in retry.stdout
