"""The file-report memo: a file is opened again only when it changed."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
from state_factory import write_state_folder

from sidecar.checkpoints import file_memo
from sidecar.checkpoints.file_memo import FileReportMemo
from sidecar.checkpoints.scan import find_candidates
from sidecar.trainers.sd_scripts.state_naming import state_naming

# The scan as sd-scripts' runs see it: its state folder names.
sd_states = partial(find_candidates, naming=state_naming)

LATER = 1_750_000_000.0 + 3600


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the memo had to check (a spy on the real check)."""
    names: list[str] = []
    real = file_memo.inspect_state_file

    def counting(path: str):  # type: ignore[no-untyped-def]
        names.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(file_memo, "inspect_state_file", counting)
    return names


def test_an_unchanged_folder_is_not_read_again(tmp_path: Path, opened: list[str]) -> None:
    """Second scan: same verdict, no file opened."""
    write_state_folder(tmp_path / "my-lora-000004-state", mtime=1_750_000_000.0)
    memo = FileReportMemo()
    first = sd_states(tmp_path, now=LATER, memo=memo)
    checked = len(opened)
    second = sd_states(tmp_path, now=LATER, memo=memo)
    assert checked == 5 and len(opened) == checked
    assert first == second and first[0].complete


def test_a_file_truncated_in_place_is_checked_again(tmp_path: Path, opened: list[str]) -> None:
    """A truncated optimizer.bin (same name, new size) is read again and caught."""
    folder = write_state_folder(tmp_path / "my-lora-000004-state", mtime=1_750_000_000.0)
    memo = FileReportMemo()
    assert sd_states(tmp_path, now=LATER, memo=memo)[0].complete
    optimizer = folder / "optimizer.bin"
    with optimizer.open("r+b") as handle:
        handle.truncate(optimizer.stat().st_size // 2)
    os.utime(optimizer, (1_750_000_000.0, 1_750_000_000.0))  # even with the old mtime
    opened.clear()
    (candidate,) = sd_states(tmp_path, now=LATER, memo=memo)
    assert opened == ["optimizer.bin"]
    assert not candidate.complete and any("optimizer.bin" in p for p in candidate.problems)


def test_the_memo_is_bounded(tmp_path: Path) -> None:
    """Past its limit the oldest reports are dropped."""
    for index in range(3):
        write_state_folder(tmp_path / f"my-lora-00000{index}-state", mtime=1_750_000_000.0)
    memo = FileReportMemo(limit=4)
    sd_states(tmp_path, now=LATER, memo=memo)
    assert len(memo) == 4
