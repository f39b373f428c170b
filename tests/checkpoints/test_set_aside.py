"""Setting a state aside is a rename in its own folder, never over anything, and reversible."""

from __future__ import annotations

import pytest

from sidecar.checkpoints.set_aside import SetAsideError, aside_stamp, move_state, put_back


def test_a_state_is_renamed_beside_itself_and_back_with_its_files(tmp_path):
    """Nothing inside changes: the same files come back under the original name."""
    state = tmp_path / "checkpoint-30"
    state.mkdir()
    (state / "optimizer.pt").write_bytes(b"half")
    target = tmp_path / f"incomplete-{aside_stamp(0)}-checkpoint-30"
    move_state(state, target)
    assert not state.exists() and (target / "optimizer.pt").read_bytes() == b"half"
    put_back(target, state)
    assert (state / "optimizer.pt").read_bytes() == b"half" and not target.exists()


def test_an_existing_name_is_never_overwritten(tmp_path):
    """Both the state and what holds the name stay as they were; the error names both."""
    state, taken = tmp_path / "checkpoint-30", tmp_path / "taken"
    state.mkdir()
    taken.mkdir()
    (taken / "keep").write_text("x")
    with pytest.raises(SetAsideError, match="taken exists"):
        move_state(state, taken)
    assert state.is_dir() and (taken / "keep").read_text() == "x"


def test_put_back_refuses_when_the_name_was_taken_again(tmp_path):
    """A newer save under the old name is not replaced by the set-aside one."""
    moved, original = tmp_path / "aside", tmp_path / "checkpoint-30"
    moved.mkdir()
    original.mkdir()
    with pytest.raises(SetAsideError, match="checkpoint-30 exists"):
        put_back(moved, original)
    assert moved.is_dir()


def test_a_state_is_moved_beside_itself_or_one_folder_up_only(tmp_path):
    """One folder up (out of OneTrainer's backup/) is allowed, and back; elsewhere is not."""
    backups = tmp_path / "workspace" / "backup"
    state = backups / "2026-12-01_20-00-00-backup-30-1-2"
    state.mkdir(parents=True)
    up = tmp_path / "workspace" / f"{state.name}.incomplete-{aside_stamp(0)}"
    move_state(state, up)
    put_back(up, state)
    assert state.is_dir() and not up.exists()
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SetAsideError, match="neither beside it nor one folder up"):
        move_state(state, tmp_path / "elsewhere" / state.name)
    assert state.is_dir()


def test_the_stamp_is_utc_and_sortable():
    """2026-12-01 20:30:05 UTC reads as it is, with nothing a shell must quote."""
    assert aside_stamp(1796157005.0) == "20261201T203005Z"


def test_an_empty_folder_or_a_file_under_the_name_is_not_replaced(tmp_path):
    """rename(2) would silently replace an empty folder or a file: refused instead."""
    state = tmp_path / "checkpoint-30"
    state.mkdir()
    (state / "optimizer.pt").write_bytes(b"half")
    empty = tmp_path / "incomplete-x-checkpoint-30"
    empty.mkdir()
    with pytest.raises(SetAsideError, match="exists"):
        move_state(state, empty)
    save = tmp_path / "my-lora_000000015.safetensors"
    save.write_bytes(b"cut")
    other = tmp_path / ".incomplete-x-my-lora_000000015.safetensors"
    other.write_bytes(b"older")
    with pytest.raises(SetAsideError, match="exists"):
        move_state(save, other)
    assert (state / "optimizer.pt").read_bytes() == b"half" and empty.is_dir()
    assert save.read_bytes() == b"cut" and other.read_bytes() == b"older"
