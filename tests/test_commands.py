"""The inspection commands: check, checkpoints, resume [--dry-run], --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from state_factory import write_state_folder

from sidecar import __version__
from sidecar.trainers.shell.train_script import parse_train_script


def sidecar(tree, *args, **env):
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env={**os.environ, "SIDECAR_TRAIN_SCRIPT": str(tree.train_script), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version():
    """--version prints the package version."""
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True
    )
    assert result.stdout.strip() == f"training-sidecar {__version__}"


def test_check_reports_paths_candidates_and_the_missing_save_state(fluxgym):
    """check shows the derived paths and candidates; a missing --save_state is noted."""
    write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=1000.0)
    result = sidecar(fluxgym, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"trainer_workdir:   {fluxgym.root}" in result.stdout
    assert "my-lora-000004-state" in result.stdout and "complete" in result.stdout
    assert "no --save_state (added at launch)" in result.stdout
    assert "NVML unavailable" in result.stdout or "GPU" in result.stdout


def test_check_fails_on_a_missing_script(tmp_path):
    """A train.sh that does not exist is a problem with exit 1."""
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check"],
        env={**os.environ, "SIDECAR_TRAIN_SCRIPT": str(tmp_path / "nope.sh")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stdout


def test_check_fails_when_nothing_is_resumable(fluxgym):
    """With SIDECAR_ENSURE_SAVE_STATE off, a script without --save_state is a problem."""
    result = sidecar(fluxgym, "check", SIDECAR_ENSURE_SAVE_STATE="false")
    assert result.returncode == 1
    assert "nothing will be resumable" in result.stdout


def test_checkpoints_json_marks_the_chosen_one(fluxgym):
    """checkpoints --json lists every candidate with its verdict and the choice."""
    write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=1000.0)
    write_state_folder(fluxgym.output_dir / "my-lora-000008-state", omit={"optimizer.bin"})
    result = sidecar(fluxgym, "checkpoints", "--json")
    listing = {Path_name(item["path"]): item for item in json.loads(result.stdout)}
    assert listing["my-lora-000004-state"]["chosen"] is True
    assert listing["my-lora-000008-state"]["complete"] is False
    assert any("optimizer.bin" in p for p in listing["my-lora-000008-state"]["problems"])


def test_resume_dry_run_prints_the_diff_and_changes_nothing(fluxgym):
    """resume --dry-run shows the edit and leaves train.sh alone."""
    write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=1000.0)
    before = fluxgym.train_script.read_bytes()
    result = sidecar(fluxgym, "resume", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f'+  --resume "{fluxgym.output_dir}/my-lora-000004-state" \\' in result.stdout
    assert "+  --save_state \\" in result.stdout
    assert fluxgym.train_script.read_bytes() == before


def test_resume_rewrites_with_the_trainer_view_path(fluxgym):
    """resume writes the path as the trainer sees it, through SIDECAR_PATH_MAP."""
    write_state_folder(fluxgym.output_dir / "my-lora-000004-state", mtime=1000.0)
    result = sidecar(
        fluxgym,
        "resume",
        SIDECAR_PATH_MAP=f"{fluxgym.root}/outputs:/app/fluxgym/outputs",
        SIDECAR_OUTPUT_DIR=str(fluxgym.output_dir),
    )
    assert result.returncode == 0, result.stderr
    command = parse_train_script(fluxgym.train_script.read_text())
    assert command.resume == "/app/fluxgym/outputs/my-lora/my-lora-000004-state"
    assert (fluxgym.output_dir / "train.sh.orig").is_file()


def test_resume_without_a_complete_checkpoint_fails(fluxgym):
    """With nothing complete, resume refuses and leaves train.sh alone."""
    write_state_folder(fluxgym.output_dir / "my-lora-000004-state", truncate="optimizer.bin")
    before = fluxgym.train_script.read_bytes()
    result = sidecar(fluxgym, "resume")
    assert result.returncode == 1
    assert "no complete checkpoint" in result.stderr
    assert fluxgym.train_script.read_bytes() == before


def Path_name(path):
    return os.path.basename(path)


def test_healthcheck_follows_the_heartbeat(tmp_path):
    """healthcheck fails with no or a stale heartbeat and passes with a fresh one."""
    beat = tmp_path / "beat"
    env = {
        **os.environ,
        "SIDECAR_HEARTBEAT_FILE": str(beat),
        "SIDECAR_POLL_INTERVAL": "1s",
        "SIDECAR_HTTP_PORT": "0",  # no endpoint: the file itself is read
    }
    command = [sys.executable, "-m", "sidecar", "healthcheck"]
    assert subprocess.run(command, env=env, capture_output=True).returncode == 1
    beat.touch()
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    os.utime(beat, (1, 1))
    stale = subprocess.run(command, env=env, capture_output=True, text=True)
    assert stale.returncode == 1 and "last heartbeat" in stale.stdout


def test_abandon_marks_the_run_and_status_shows_it(fluxgym):
    """abandon writes the marker the running sidecar reads; status says so at once, and
    removing the marker undoes it."""
    result = sidecar(fluxgym, "abandon", "--reason", "wrong dataset")
    assert result.returncode == 0, result.stdout + result.stderr
    marker = fluxgym.output_dir / ".sidecar" / "abandoned"
    assert json.loads(marker.read_text())["reason"] == "wrong dataset"
    assert f"rm {marker}" in result.stdout
    status = json.loads(sidecar(fluxgym, "status", "--json").stdout)
    assert status["phase"] == "abandoned"
    assert "wrong dataset" in status["phase_detail"]
    marker.unlink()
    assert json.loads(sidecar(fluxgym, "status", "--json").stdout)["phase"] != "abandoned"


def test_an_abandon_written_before_the_run_began_does_not_apply(fluxgym):
    """A marker older than the recorded run's start belongs to an earlier run of the folder."""
    state_dir = fluxgym.output_dir / ".sidecar"
    state_dir.mkdir()
    marker = state_dir / "abandoned"
    marker.touch()
    os.utime(marker, (1000.0, 1000.0))
    (state_dir / "state.json").write_text(json.dumps({"version": 2, "run_started_at": 2000.0}))
    assert json.loads(sidecar(fluxgym, "status", "--json").stdout)["phase"] != "abandoned"


def test_status_shows_an_interruption_and_its_resume(fluxgym):
    state_dir = fluxgym.output_dir / ".sidecar"
    state_dir.mkdir()
    interrupted = {"at": 1000.0, "how": "unclean", "resumed_at": None, "down_seconds": None}
    ledger = {"version": 2, "interruptions": [interrupted]}
    (state_dir / "state.json").write_text(json.dumps(ledger))
    text = sidecar(fluxgym, "status").stdout
    assert "interrupted: the sidecar or the machine went away (unclean)" in text
    assert "1 time(s), 0 resumed after interruption (last: unclean, not resumed yet)" in text
    ledger["interruptions"][0].update(resumed_at=1042.0, down_seconds=42.0)
    (state_dir / "state.json").write_text(json.dumps(ledger))
    text = sidecar(fluxgym, "status").stdout
    assert "interrupted: the sidecar" not in text
    assert "1 resumed after interruption (last: unclean, down 42s)" in text
