"""Noticing new or growing files in the output folder."""

from __future__ import annotations

import os

from sidecar.output_activity import OutputWatcher


def test_new_file_and_growing_file_are_changes(tmp_path):
    """Creating a file, or appending to one, one level down is noticed."""
    watcher = OutputWatcher(tmp_path)
    assert not watcher.poll()  # first poll only takes the baseline
    state = tmp_path / "my-lora-step00000010-state"
    state.mkdir()
    assert watcher.poll()
    (state / "optimizer.bin").write_bytes(b"1234")
    assert watcher.poll()
    with (state / "optimizer.bin").open("ab") as handle:
        handle.write(b"5678")
    assert watcher.poll()
    assert not watcher.poll()


def test_same_size_rewrite_is_noticed_by_mtime(tmp_path):
    """A rewrite that keeps the size still moves the mtime."""
    target = tmp_path / "sample.png"
    target.write_bytes(b"a")
    watcher = OutputWatcher(tmp_path)
    watcher.poll()
    os.utime(target, ns=(0, target.stat().st_mtime_ns + 1_000_000))
    assert watcher.poll()


def test_ignored_paths_do_not_count(tmp_path):
    """The sidecar's own state folder and the trainer log are not output activity."""
    state_dir = tmp_path / ".sidecar"
    state_dir.mkdir()
    log = tmp_path / "train.log"
    watcher = OutputWatcher(tmp_path, ignore=[state_dir, log])
    watcher.poll()
    (state_dir / "state.json").write_text("{}")
    log.write_text("progress")
    assert not watcher.poll()


def test_missing_folder_is_quiet(tmp_path):
    """A folder that does not exist yet gives no change and no error."""
    watcher = OutputWatcher(tmp_path / "later")
    assert not watcher.poll()
    assert not watcher.poll()
