"""Noticing new or growing files in the output folder."""

from __future__ import annotations

import os

from sidecar.observe.output_activity import OutputWatcher


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


def _age(path, seconds=3600):
    old = path.stat().st_mtime - seconds
    os.utime(path, (old, old))


def test_old_file_rewritten_in_place_is_noticed_within_a_few_polls(tmp_path):
    """A cold file is checked in rotation, so an in-place rewrite is still seen."""
    files = []
    for index in range(10):
        files.append(tmp_path / f"f{index}")
        files[-1].write_text("x")
        _age(files[-1])
    watcher = OutputWatcher(tmp_path, cold_slice=3)
    watcher.poll()
    with files[7].open("a") as handle:
        handle.write("more")
    _age(files[7])  # even with an old mtime the size changed; the folder mtime did not
    assert any(watcher.poll() for _ in range(4))


def test_a_poll_does_not_stat_every_cold_file(tmp_path, monkeypatch):
    """With thousands of old files, a quiet poll stats only folders, hot files and a slice."""
    from sidecar.observe import output_activity

    for index in range(2000):
        path = tmp_path / f"sample-{index}.png"
        path.write_bytes(b"png")
        _age(path)
    watcher = OutputWatcher(tmp_path, cold_slice=100)
    watcher.poll()
    calls = []
    real = output_activity._stamp
    monkeypatch.setattr(output_activity, "_stamp", lambda path: calls.append(path) or real(path))
    assert not watcher.poll()
    assert len(calls) <= 100


def test_removed_state_folder_is_a_change(tmp_path):
    """sd-scripts pruning an old state folder is output activity too."""
    import shutil

    state = tmp_path / "my-lora-step00000010-state"
    state.mkdir()
    (state / "optimizer.bin").write_bytes(b"x")
    watcher = OutputWatcher(tmp_path)
    watcher.poll()
    shutil.rmtree(state)
    assert watcher.poll()
    assert not watcher.poll()
