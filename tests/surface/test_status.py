"""`training-sidecar status`: the run's story from its ledger, outputs, log and incidents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from state_factory import write_state_folder

from sidecar.config import Settings
from sidecar.decide.decision import Verdict, VerdictKind
from sidecar.run.ledger import Ledger, LedgerStore
from sidecar.run.paths import resolve_run_paths
from sidecar.simulator.fluxgym_tree import FluxgymTree
from sidecar.surface.health import Heartbeat
from sidecar.surface.incidents import IncidentRecorder, IncidentSources
from sidecar.surface.status_report import (
    StatusReport,
    build_status_report,
    parse_progress,
    render_text,
)

BAR = "steps:  30%|███       | 120/400 [1:40:00<3:53:20, 50.00s/it, avr_loss=0.41]"


def write_story(tree: FluxgymTree, now: float) -> None:
    """A run that stalled once, crashed once, quarantined a checkpoint and trains on."""
    out = tree.output_dir
    write_state_folder(out / "my-lora-step00000100-state", step=100, mtime=now - 900)
    write_state_folder(out / "my-lora-step00000110-state", step=110, mtime=now - 600)
    write_state_folder(out / "my-lora-step00000118-state", step=118, mtime=now - 120)
    ledger = Ledger()
    ledger.record_recovery(
        "stall", "no progress for 902 s (stall timeout 900 s)", None, diagnosis="dataloader_wait"
    )
    ledger.record_recovery(
        "crash", "trainer exited with code 7", str(out / "my-lora-step00000110-state")
    )
    ledger.quarantined.append(str(out / "my-lora-step00000118-state"))
    ledger.current_checkpoint = str(out / "my-lora-step00000110-state")
    LedgerStore(out / ".sidecar").save(ledger)
    log = out / "train.log"
    log.write_text("epoch 1/16\n" + "\r".join([BAR.replace("120/400", "119/400"), BAR]))
    os.utime(log, (now - 30, now - 30))
    sources = IncidentSources(state_dir=out / ".sidecar", train_log=log, pids=[])
    IncidentRecorder(lambda: sources, keep=5).save(
        Verdict(VerdictKind.STALL, "no progress for 902 s (stall timeout 900 s)", {}),
        {"section": "saving"},
    )


def build_report(settings: Settings, now: float | None = None) -> StatusReport:
    """The report with the values ``commands.status`` passes from the settings."""
    return build_status_report(
        resolve_run_paths(settings),
        heartbeat=Heartbeat(
            settings.heartbeat_file,
            poll_interval=settings.poll_interval,
            kill_grace=settings.kill_grace,
        ),
        max_restarts=settings.max_restarts,
        stall_after=settings.stall_timeout_bound,
        checkpoint_settle=settings.checkpoint_settle,
        now=now,
    )


def status(tree: FluxgymTree, *arguments: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "status", *arguments],
        env={
            **os.environ,
            "SIDECAR_TRAIN_SCRIPT": str(tree.train_script),
            "SIDECAR_HEARTBEAT_FILE": str(tree.root / "heartbeat"),
            "SIDECAR_MAX_RESTARTS": "5",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_tells_the_story_in_a_terminal(fluxgym):
    """Phase, step N/M with rate and ETA, checkpoint age, restarts, quarantine, incidents."""
    write_story(fluxgym, time.time())
    result = status(fluxgym)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"run          my-lora  ({fluxgym.output_dir})"
    assert lines[1].startswith("phase        training: last output 3")
    assert lines[2].startswith("sidecar      not seen here: no heartbeat at")
    assert lines[3] == "step         120/400 (30%), 50.0 s/step, ETA 3h53m"
    # The newest one is quarantined: the next older is what would be resumed.
    assert lines[4].startswith("checkpoint   my-lora-step00000110-state, step 110, 10m0")
    assert lines[5] == "resumes from my-lora-step00000110-state"
    assert lines[6] == "restarts     2 of 5 (1 crash, 1 stall)"
    assert lines[7].endswith(
        "stall  [dataloader_wait] no progress for 902 s (stall timeout 900 s) -> from scratch"
    )
    assert lines[8].endswith("crash  trainer exited with code 7 -> my-lora-step00000110-state")
    assert lines[9] == "quarantined  my-lora-step00000118-state"
    assert lines[10] == "interrupted  never"
    assert lines[11].startswith("incidents    1 in ") and lines[11].endswith("incidents")
    assert "stall  no progress for 902 s" in lines[12]
    # No process to look at: the section the output announced places the hang.
    assert lines[13].startswith("    diagnosis hang_in_save: ")


def test_status_json_has_the_same_facts(fluxgym):
    write_story(fluxgym, time.time())
    (fluxgym.root / "heartbeat").touch()
    result = status(fluxgym, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["phase"] == "training"
    assert report["sidecar_alive"] is True
    assert report["progress"] == {
        "step": 120,
        "total": 400,
        "steps_per_second": 0.02,
        "eta_seconds": 3 * 3600 + 53 * 60 + 20,
    }
    assert report["last_checkpoint"]["name"] == "my-lora-step00000110-state"
    assert report["restarts"] == 2 and report["max_restarts"] == 5
    assert report["restarts_by_reason"] == {"stall": 1, "crash": 1}
    assert [r["kind"] for r in report["recoveries"]] == ["stall", "crash"]
    assert report["quarantined"] == [str(fluxgym.output_dir / "my-lora-step00000118-state")]
    (incident,) = report["incidents"]
    assert incident["kind"] == "stall" and incident["bytes"] > 0
    assert incident["diagnosis"] == "hang_in_save" and incident["mitigation"]
    assert report["recoveries"][0]["diagnosis"] == "dataloader_wait"


@pytest.mark.parametrize(
    ("setup", "phase", "detail"),
    [
        ("nothing", "not_started", "no trainer log"),
        ("quiet", "quiet", "no output for 2h00m (a stall after 15m00s)"),
        ("final", "completed", "the final model is in the output folder"),
        ("gave_up", "gave_up", "gave up after 0 restart(s)"),
    ],
)
def test_phase_comes_from_files(fluxgym, setup, phase, detail):
    now = 1_800_000_000.0
    log = fluxgym.output_dir / "train.log"
    if setup != "nothing":
        log.write_text(BAR)
        os.utime(log, (now - 7200, now - 7200))
    if setup == "final":
        (fluxgym.output_dir / "my-lora.safetensors").write_bytes(b"x")
    if setup == "gave_up":
        LedgerStore(fluxgym.output_dir / ".sidecar").save(Ledger(gave_up=True))
    settings = Settings(train_script=fluxgym.train_script)
    report = build_report(settings, now=now)
    assert report.phase == phase
    assert detail in report.phase_detail
    text = render_text(report, now=now)
    assert "ETA" not in text, "no time-left estimate for a run that is not training"


def test_a_missing_run_is_a_problem(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "status"],
        env={**os.environ, "SIDECAR_TRAIN_SCRIPT": str(tmp_path / "nope" / "train.sh")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (BAR, (120, 400, 0.02, 14000.0)),
        ("steps:  50%|█████     | 2/4 [00:04<00:04,  2.44it/s, avr_loss=0.4]", (2, 4, 2.44, 4.0)),
        ("steps:   0%|          | 0/40 [00:00<?, ?it/s]", (0, 40, None, None)),
        ("caching latents: 100%|██████████| 10/10 [00:01<00:00]", None),
    ],
)
def test_progress_is_read_from_the_last_bar(tail, expected):
    progress = parse_progress("noise\r" + tail)
    if expected is None:
        assert progress is None
        return
    assert progress is not None
    step, total, rate, eta = expected
    assert (progress.step, progress.total, progress.eta_seconds) == (step, total, eta)
    assert progress.steps_per_second == (pytest.approx(rate) if rate else None)


def test_status_ignores_half_written_incidents(fluxgym):
    """A bundle still being written (hidden folder) is not listed."""
    incidents = fluxgym.output_dir / ".sidecar" / "incidents"
    (incidents / ".20250101T000000Z.partial").mkdir(parents=True)
    settings = Settings(train_script=fluxgym.train_script)
    report = build_report(settings)
    assert report.incidents == []
    assert Path(report.incidents_dir) == incidents


def test_a_bar_cut_after_its_total_is_not_read():
    """The log's last redraw may be half written: the last whole bar counts, as for the loop."""
    progress = parse_progress("noise\r" + BAR + "\rsteps:  30%|███       | 121/4")
    assert progress is not None and (progress.step, progress.total) == (120, 400)
