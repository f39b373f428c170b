"""States the sidecar may not read stop the recovery; they never count as "no checkpoint yet".

safetensors 0.8+ writes each file through a 0600 temporary file (REFERENCE section 3),
so a sidecar with another UID than the trainer can meet a state it cannot open. The
tests that need a real other UID fork a child that drops to one (CI runs as root, and
root reads everything); the rest refuse access at the lowest boundary, ``os.open``.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from state_factory import write_state_folder

from sidecar.checkpoints import file_checks
from sidecar.checkpoints.access import UnreadableFile, describe_denial
from sidecar.checkpoints.choice import CheckpointUnreadable, NoCheckpointLeft, choose_resume_point
from sidecar.checkpoints.scan import Candidate, find_candidates
from sidecar.run.ledger import Ledger
from sidecar.trainers.sd_scripts.state_naming import state_naming

# The scan as sd-scripts' runs see it: its state folder names.
sd_states = partial(find_candidates, naming=state_naming)

T = 1_750_000_000.0
LATER = T + 3600
OTHER_UID = 4242  # no passwd entry here: the message must do without a name
OLD = "my-lora-step00000100-state"
NEW = "my-lora-step00000200-state"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another UID needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """An output folder another UID can reach (pytest's own tmp_path is 0700 root's)."""
    with tempfile.TemporaryDirectory(prefix="sidecar-uid-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def state(output_dir: Path, name: str, mtime: float) -> Path:
    folder = write_state_folder(output_dir / name, mtime=mtime)
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def as_other_user(action: Callable[[], Any]) -> Any:
    """``action``'s result (or the exception it raised, as a dict) in a child of OTHER_UID."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            try:
                outcome: Any = ("returned", action())
            except Exception as error:  # reported to the parent, which asserts on it
                outcome = ("raised", _exception_facts(error))
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child failed"
    kind, value = pickle.loads(data)
    return value if kind == "returned" else {"raised": value}


def _exception_facts(error: Exception) -> dict[str, Any]:
    facts: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, CheckpointUnreadable):
        facts["files"] = error.files
        facts["checkpoint"] = error.checkpoint.path
        facts["is_no_checkpoint_left"] = isinstance(error, NoCheckpointLeft)
    return facts


def scan_and_choose(output_dir: Path) -> Callable[[], Any]:
    def action() -> Any:
        candidates = sd_states(output_dir, now=LATER)
        choice = choose_resume_point(candidates, Ledger(), allow_scratch=True)
        return choice.checkpoint.path if choice.checkpoint else choice.reason

    return action


@needs_root
def test_a_0600_state_newer_than_the_readable_one_stops_the_recovery(shared_dir: Path) -> None:
    """The newest state's weights are the trainer's 0600 file: no silent step back."""
    state(shared_dir, OLD, T)
    new = state(shared_dir, NEW, T + 600)
    (new / "model.safetensors").chmod(0o600)

    outcome = as_other_user(scan_and_choose(shared_dir))

    raised = outcome["raised"]
    assert raised["type"] == "CheckpointUnreadable" and raised["is_no_checkpoint_left"]
    assert raised["checkpoint"] == new
    (file,) = raised["files"]
    assert (file.path, file.uid, file.mode, file.errno) == (
        str(new / "model.safetensors"),
        0,
        0o600,
        errno.EACCES,
    )
    message = raised["message"]
    assert message.startswith(
        f"checkpoint {new} is newer than the newest readable one ({shared_dir / OLD}) "
        "but cannot be read; recovery stops rather than resume from the older one "
        f"and lose its progress: state file {new / 'model.safetensors'} cannot be read "
        "(Permission denied): owned by uid 0 (root), gid 0, mode 0600; "
        f"the sidecar runs as uid {OTHER_UID}. Run the sidecar with the trainer's UID (0)"
    )
    assert f"chmod -R g+rX {new})" in message


@needs_root
def test_only_unreadable_states_are_not_no_checkpoint_yet(shared_dir: Path) -> None:
    """Hours of progress the sidecar cannot read must not become a restart from step 0."""
    new = state(shared_dir, NEW, T)
    for path in new.iterdir():
        path.chmod(0o600)

    raised = as_other_user(scan_and_choose(shared_dir))["raised"]

    assert raised["type"] == "CheckpointUnreadable"
    assert raised["message"].startswith(
        f"checkpoint {new} cannot be read and no other checkpoint can; recovery stops "
        "rather than restart from the beginning and lose its progress: state file "
    )
    assert len(raised["files"]) == 5
    assert "; also unreadable: " in raised["message"]


@needs_root
def test_a_folder_that_cannot_be_listed_stops_the_recovery(shared_dir: Path) -> None:
    """A 0700 state folder of another user is as unreadable as a 0600 file."""
    state(shared_dir, OLD, T)
    new = state(shared_dir, NEW, T + 600)
    os.utime(new, (T + 600, T + 600))
    new.chmod(0o700)

    raised = as_other_user(scan_and_choose(shared_dir))["raised"]

    (folder,) = raised["files"]
    assert (folder.path, folder.is_folder, folder.mode) == (str(new), True, 0o700)
    assert f"state folder {new} cannot be read (Permission denied): " in raised["message"]
    assert "mode 0700" in raised["message"]


@needs_root
def test_an_older_unreadable_state_does_not_block_a_newer_readable_one(shared_dir: Path) -> None:
    """Nothing is lost by passing over a state older than the chosen one."""
    old_file = state(shared_dir, "my-lora-step00000050-state", T - 600)
    (old_file / "optimizer.bin").chmod(0o600)
    old_folder = state(shared_dir, OLD, T - 300)
    os.utime(old_folder, (T - 300, T - 300))
    old_folder.chmod(0o700)
    newest = state(shared_dir, NEW, T)

    assert as_other_user(scan_and_choose(shared_dir)) == newest


@needs_root
def test_the_scan_reports_owner_and_mode_as_another_user(shared_dir: Path) -> None:
    """As the other UID: the old problem texts, plus who owns the refused file and how."""
    new = state(shared_dir, NEW, T)
    (new / "optimizer.bin").chmod(0)

    candidate = as_other_user(lambda: sd_states(shared_dir, now=LATER)[0])

    assert candidate.problems == ("optimizer.bin: unreadable: Permission denied",)
    assert candidate.unreadable_only and not candidate.complete
    (file,) = candidate.unreadable
    assert (file.uid, file.gid, file.mode, file.mtime) == (0, 0, 0, T)
    assert candidate.completed_at == T  # a refused file still dates its folder


def refuse(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> None:
    """``os.open`` refuses these paths, as the kernel does for another UID's 0600 file."""
    real_open = os.open
    refused = {str(path) for path in paths}

    def open_or_refuse(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) in refused:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(file_checks.os, "open", open_or_refuse)


def test_a_refused_open_is_recorded_with_owner_and_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs as any user: the refusal comes from os.open, the facts from the file's status."""
    state(tmp_path, OLD, T)
    new = state(tmp_path, NEW, T + 600)
    refuse(monkeypatch, new / "scheduler.bin")

    candidates = sd_states(tmp_path, now=LATER)
    with pytest.raises(CheckpointUnreadable) as raised:
        choose_resume_point(candidates, Ledger(), allow_scratch=True)

    (file,) = raised.value.files
    status = (new / "scheduler.bin").stat()
    assert (file.uid, file.mode) == (status.st_uid, 0o644)
    assert raised.value.checkpoint.path == new
    assert f"owned by uid {status.st_uid}" in str(raised.value)
    assert f"the sidecar runs as uid {os.geteuid()}" in str(raised.value)


def test_other_errors_are_broken_files_not_refusals(tmp_path: Path) -> None:
    """A dangling link is damage (even root cannot open it): it blocks nothing."""
    folder = state(tmp_path, NEW, T)
    (folder / "optimizer.bin").unlink()
    (folder / "optimizer.bin").symlink_to(tmp_path / "gone.bin")

    (candidate,) = sd_states(tmp_path, now=LATER)

    assert candidate.unreadable == () and not candidate.unreadable_only
    choice = choose_resume_point([candidate], Ledger(), allow_scratch=False)
    assert choice.reason == "no checkpoint written yet"


# ----------------------------------------------------------------------------- the choice alone


def refused(path: str, mtime: float | None) -> UnreadableFile:
    return UnreadableFile(path, errno.EACCES, 4343, 4343, 0o600, mtime, None)


def candidate(
    name: str,
    completed_at: float | None,
    *,
    unreadable: bool = False,
    problems: tuple[str, ...] = (),
) -> Candidate:
    files = (refused(f"/out/{name}/model.safetensors", completed_at),) if unreadable else ()
    all_problems = problems + tuple("model.safetensors: unreadable" for _ in files)
    return Candidate(
        path=Path("/out") / name,
        kind="step",
        number=None,
        complete=not all_problems,
        problems=all_problems,
        completed_at=completed_at,
        step=None,
        epoch=None,
        unreadable=files,
    )


READABLE = candidate("a-state", 100.0)


@pytest.mark.parametrize("when", [200.0, 100.0, None])
def test_a_newer_equal_or_undated_unreadable_state_blocks(when: float | None) -> None:
    """Newer, a tie (coarse clock) or unknown: it may be the progress, so the choice stops."""
    hidden = candidate("b-state", when, unreadable=True)
    with pytest.raises(CheckpointUnreadable) as raised:
        choose_resume_point([READABLE, hidden], Ledger(), allow_scratch=True)
    assert raised.value.checkpoint == hidden


def test_an_older_unreadable_state_does_not_block() -> None:
    hidden = candidate("b-state", 50.0, unreadable=True)
    choice = choose_resume_point([READABLE, hidden], Ledger(), allow_scratch=False)
    assert choice.checkpoint == READABLE


def test_an_unreadable_state_broken_in_other_ways_does_not_block() -> None:
    """Missing files, a mixed save or a final state: not resumable even if it were readable."""
    hidden = candidate("b-state", 200.0, unreadable=True, problems=("optimizer.bin missing",))
    choice = choose_resume_point([READABLE, hidden], Ledger(), allow_scratch=False)
    assert choice.checkpoint == READABLE


def test_a_quarantined_unreadable_state_does_not_block() -> None:
    hidden = candidate("b-state", 200.0, unreadable=True)
    ledger = Ledger(quarantined=[str(hidden.path)])
    assert choose_resume_point([READABLE, hidden], ledger, allow_scratch=False).checkpoint == (
        READABLE
    )


def test_the_exception_carries_the_ledger_with_its_quarantine() -> None:
    """Quarantining the readable one leaves the unreadable newer than nothing: it raises."""
    hidden = candidate("b-state", 50.0, unreadable=True)
    ledger = Ledger(current_checkpoint=str(READABLE.path), current_checkpoint_completed_at=100.0)
    first = choose_resume_point([READABLE, hidden], ledger, allow_scratch=True)
    with pytest.raises(CheckpointUnreadable) as raised:
        choose_resume_point([READABLE, hidden], first.ledger, allow_scratch=True)
    assert raised.value.ledger.quarantined == [str(READABLE.path)]
    assert ledger.quarantined == []  # the caller's ledger is left alone


def test_the_description_without_a_user_name() -> None:
    """Container UIDs often have no passwd entry: the number alone is named."""
    text = describe_denial(refused("/out/x/model.safetensors", 1.0), sidecar_uid=OTHER_UID)
    assert text.startswith(
        "state file /out/x/model.safetensors cannot be read (Permission denied): "
        f"owned by uid 4343, gid 4343, mode 0600; the sidecar runs as uid {OTHER_UID}."
    )
