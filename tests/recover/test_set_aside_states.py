"""Setting incomplete states aside happens only while the trainer is stopped, is recorded,
and is undone by ``checkpoints --put-back`` — never while a sidecar supervises the run.

The states are the HF Trainer's ``checkpoint-<N>`` folders (its ``get_last_checkpoint``
takes the highest number unchecked), written file by file in ``_save_checkpoint``'s order.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest
import structlog
from state_factory import safetensors_bytes, tensor, torch_zip_bytes
from structlog.testing import capture_logs

from sidecar import commands
from sidecar.config import load_settings
from sidecar.recover.resume_point import ResumeOptions, ResumePointer
from sidecar.run.ledger import Ledger, LedgerStore
from sidecar.run.lock import RunLock
from sidecar.run.paths import resolve_run_paths


def write_checkpoint(out: Path, step: int, *, cut_before: str | None = None) -> Path:
    """One save in the Trainer's order; ``cut_before``: killed before that file."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    state = {"global_step": step, "epoch": 1.0, "log_history": []}
    files = [
        ("model.safetensors", safetensors_bytes([tensor("wte", "F32", [4, 2])])),
        ("training_args.bin", torch_zip_bytes()),
        ("optimizer.pt", torch_zip_bytes()),
        ("scheduler.pt", torch_zip_bytes()),
        ("rng_state.pth", torch_zip_bytes()),
        ("trainer_state.json", json.dumps(state).encode()),
    ]
    written_at = time.time() - 600 + step
    for index, (name, data) in enumerate(files):
        if name == cut_before:
            break
        (folder / name).write_bytes(data)
        os.utime(folder / name, (written_at + index * 0.01,) * 2)
    return folder


@pytest.fixture
def run(tmp_path: Path):
    out = tmp_path / "out"
    write_checkpoint(out, 10)
    cut = write_checkpoint(out, 15, cut_before="trainer_state.json")
    script = tmp_path / "train.sh"
    script.write_text(
        f"python tiny_clm.py --output_dir {out} --per_device_train_batch_size 2 --save_steps 5\n"
    )
    settings = load_settings({"train_script": str(script), "trainer": "hf-trainer"})
    paths = resolve_run_paths(settings)
    pointer = ResumePointer(paths, ResumeOptions(False, False), log=structlog.get_logger())
    return settings, paths, pointer, out, cut


def test_nothing_is_moved_while_the_trainer_may_still_write(run):
    """A stalled trainer a rewrite-first restarter stops later: its save is left alone."""
    _, _, pointer, out, cut = run
    choice = pointer.choose_and_point(Ledger(), now=time.time(), settle=0.0)
    assert choice.path == str(out / "checkpoint-10")
    assert cut.is_dir() and choice.ledger.set_aside == []


def test_a_cut_newer_state_is_set_aside_once_the_trainer_is_stopped(run):
    """Renamed beside itself, recorded with its problems, logged; the chosen one resumes."""
    _, _, pointer, out, cut = run
    with capture_logs() as logs:
        choice = pointer.choose_and_point(
            Ledger(), now=time.time(), settle=0.0, trainer_stopped=True
        )
    assert choice.path == str(out / "checkpoint-10")
    (moved,) = choice.ledger.set_aside
    assert moved.original == str(cut) and not cut.exists()
    assert Path(moved.moved_to).parent == out and Path(moved.moved_to).is_dir()
    assert Path(moved.moved_to).name.startswith("incomplete-")
    assert any("trainer_state.json" in problem for problem in moved.problems)
    (event,) = [e for e in logs if e["event"] == "checkpoint_set_aside"]
    assert event["checkpoint"] == str(cut) and event["moved_to"] == moved.moved_to


def test_nothing_is_hidden_when_there_is_nothing_to_resume_instead(run):
    """Only cut states: the trainer's own view is left as it is."""
    _, paths, _, out, cut = run
    pointer = ResumePointer(paths, ResumeOptions(False, True), log=structlog.get_logger())
    for name in ("model.safetensors", "optimizer.pt"):
        (out / "checkpoint-10" / name).unlink()
    choice = pointer.choose_and_point(Ledger(), now=time.time(), settle=0.0, trainer_stopped=True)
    assert choice.path is None and choice.ledger.set_aside == []
    assert cut.is_dir() and (out / "checkpoint-10").is_dir()


def put_back(settings, name: str) -> int:
    arguments = argparse.Namespace(json=False, put_back=name)
    return commands.checkpoints(settings, arguments)


def test_put_back_renames_it_back_and_records_it_but_not_under_a_live_sidecar(run, capsys):
    """Refused while the run's lock is held; afterwards the state has its own name again."""
    settings, paths, pointer, _, cut = run
    choice = pointer.choose_and_point(Ledger(), now=time.time(), settle=0.0, trainer_stopped=True)
    LedgerStore(paths.state_dir).save(choice.ledger)
    name = Path(choice.ledger.set_aside[0].moved_to).name
    held = RunLock(paths.state_dir)
    held.acquire()
    try:
        assert put_back(settings, name) == commands.EXIT_PROBLEM
    finally:
        held.release()
    assert "stop it first" in capsys.readouterr().err and not cut.exists()
    assert put_back(settings, name) == 0
    assert cut.is_dir()
    said = capsys.readouterr().out
    assert f"as {cut}" in said and "it was set aside as incomplete: " in said
    (record,) = LedgerStore(paths.state_dir).load().set_aside
    assert record.put_back_at is not None
    assert put_back(settings, name) == commands.EXIT_PROBLEM  # nothing set aside any more
