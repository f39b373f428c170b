"""The fault-injection matrix: train.sh, the volume and the inputs going wrong, nothing lost.

"Nothing lost", in every row: train.sh and every checkpoint are intact or correctly rewritten,
never half-written, never deleted. Each row drives the real sidecar (``python -m sidecar``) on
a simulated FluxGym tree, except the wall-clock rows, which run the real loop in-process so
that its wall clock can be made to jump (the trainer is still a real process).

Rows, and the tests that cover them:

- train.sh missing, unreadable, not understood: test_missing_train_script_stops_the_start_
  with_exit_2, test_unreadable_train_script_stops_the_start_with_exit_2,
  test_train_script_without_a_trainer_names_what_was_expected
- train.sh a symlink: test_replacing_through_a_symlink_edits_the_target_and_keeps_the_link,
  test_symlinked_train_script_is_rewritten_through_its_link
- train.sh edited by the user between the verdict and the rewrite:
  test_user_edit_made_while_the_trainer_hangs_survives_the_rewrite; half-edited (unparseable)
  for many polls of a retried recovery: test_a_retried_recovery_counts_the_failed_resume_once
- checkpoint names with spaces, quotes, $, backticks:
  test_checkpoint_named_with_shell_characters_is_resumed_from_exactly; with a newline:
  test_checkpoint_named_with_a_newline_is_never_written_into_train_sh,
  test_resume_command_refuses_a_checkpoint_named_with_a_newline
- disk full / read-only during the rewrite:
  test_rewrite_on_a_full_or_read_only_volume_is_refused_cleanly_and_retried; during the
  state-file write: test_state_file_write_on_a_full_or_read_only_state_folder
- the sidecar SIGKILLed during recovery: tests/hardening/test_kill_during_recovery.py;
  restarted onto a ledger that quarantined everything:
  test_sidecar_starting_with_every_checkpoint_quarantined_gives_up_cleanly
- the sidecar restarted while its trainer runs: tests/test_process_mode.py::
  test_restarted_sidecar_adopts_its_running_trainer_instead_of_starting_a_second
- hostile or broken inputs: test_checkpoints_command_survives_hostile_state_files,
  test_checkpoints_command_survives_link_loops_and_unreadable_entries,
  test_path_map_through_dot_dot_is_refused_with_exit_2,
  test_output_folder_in_a_system_folder_is_refused_and_nothing_is_written_there
- wall-clock jumps: test_wall_clock_jumps_cause_no_false_stall,
  test_hang_after_a_backward_wall_clock_jump_is_detected_on_time
- the progress-line parser, property-based: the last four tests

How failures that root would not see are made real (these tests run as root in CI):

- *unreadable*: the sidecar runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from
  its bounding set before it is exec'd), so root obeys a mode of 000 like any user; a folder, a
  FIFO and invalid UTF-8 in place of train.sh fail for anyone.
- *disk full*: the run's folder is a small tmpfs, filled until write(2) answers ENOSPC.
- *read-only*: the folder is bind-mounted onto itself and that mount remounted read-only
  (EROFS). A plain ``remount,ro`` of the tmpfs is refused (EBUSY) while any file on it is open
  for writing, as the ledger lock and the trainer's log are; the bind mount carries its own
  read-only flag, and unmounting it gives the writable folder back.

Both need mount(2), i.e. root with CAP_SYS_ADMIN: the tests skip, saying so, where that is
missing, and fail in CI (``CI`` set), whose machines run them as root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import run_sidecar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from state_factory import write_state_folder

from sidecar.checkpoints.scan import find_candidates
from sidecar.config import load_settings
from sidecar.loop_options import Clocks
from sidecar.observe.log_follower import LogFollower
from sidecar.run.ledger import LedgerStore
from sidecar.run.locator import RunLocator
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.simulator.harness import event_time, sidecar_environment
from sidecar.trainers.sd_scripts.progress_lines import parse_step
from sidecar.trainers.sd_scripts.state_naming import state_naming
from sidecar.trainers.shell.train_script import (
    parse_train_script,
    remove_option,
    remove_resume,
)
from sidecar.watchdog import Watchdog
from sidecar.wiring import build_restarter, loop_options_of

# The scan as sd-scripts' runs see it: its state folder names.
sd_states = partial(find_candidates, naming=state_naming)

FREQUENT_SAVES = "--save_every_n_steps 6"  # states at steps 6, 12, 18, ...
HANG_AT_STEP_20 = "hang_idle@step=20:once"
STEP_18 = "my-lora-step00000018-state"

# Starts a Python program as root without the two capabilities that let root ignore
# permission bits. They leave the bounding set, so the exec'd program never regains them.
_WITHOUT_PERMISSION_OVERRIDE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH\n"
    "    if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP\n"
    "        raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def sidecar_command(*arguments: str, obey_permissions: bool = False) -> list[str]:
    """``python -m sidecar ARGUMENTS``; with ``obey_permissions``, as root that cannot bypass
    file permissions (a non-root user always obeys them)."""
    command = [sys.executable, "-m", "sidecar", *arguments]
    if obey_permissions and os.geteuid() == 0:
        return [sys.executable, "-c", _WITHOUT_PERMISSION_OVERRIDE, *command[1:]]
    return command


def run_command(
    tree: FluxgymTree,
    *arguments: str,
    settings: dict[str, str] | None = None,
    obey_permissions: bool = False,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sidecar_command(*arguments, obey_permissions=obey_permissions),
        env=sidecar_environment(tree, settings=settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def events_of(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def trainer_processes(tree: FluxgymTree) -> list[psutil.Process]:
    """Live (non-zombie) processes of this tree's trainer: bash, the launcher, the trainer."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(tree.root) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def trainer_groups(tree: FluxgymTree) -> set[int]:
    """Process groups running this tree's trainer; the sidecar starts each trainer in its own."""
    groups = set()
    for process in trainer_processes(tree):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(process.pid))
    return groups


def kill_trainers(tree: FluxgymTree) -> None:
    for process in trainer_processes(tree):
        with contextlib.suppress(psutil.Error):
            process.kill()


class TrainerCensus(threading.Thread):
    """Counts the trainers of a tree every 50 ms and keeps the most seen at once."""

    def __init__(self, tree: FluxgymTree):
        super().__init__(name="trainer-census", daemon=True)
        self.tree = tree
        self.most = 0
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.wait(0.05):
            self.most = max(self.most, len(trainer_groups(self.tree)))

    def stop(self) -> int:
        self._stop_requested.set()
        self.join(timeout=5)
        return self.most


class LiveSidecar:
    """``python -m sidecar run`` in its own session, its JSON events read as they come."""

    def __init__(
        self,
        tree: FluxgymTree,
        *,
        settings: dict[str, str] | None = None,
        simulation: dict[str, str] | None = None,
        obey_permissions: bool = False,
    ):
        self.tree = tree
        self.events: list[dict[str, Any]] = []
        self._closed = False
        self._changed = threading.Condition()
        self._stderr = (tree.root / "sidecar.stderr").open("wb")
        self.process = subprocess.Popen(
            sidecar_command("run", obey_permissions=obey_permissions),
            env=sidecar_environment(tree, settings=settings, simulation=simulation),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="sidecar-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                with self._changed:
                    self.events.append(json.loads(line))
                    self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._changed:
            return [event for event in self.events if event["event"] == name]

    def names(self) -> list[str]:
        with self._changed:
            return [event["event"] for event in self.events]

    def wait_for(self, name: str, *, timeout: float = 60.0) -> dict[str, Any]:
        """The first event called ``name``, waiting for it up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if event["event"] == name:
                        return event
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    raise AssertionError(
                        f"no {name} within {timeout} s (exit {self.process.poll()}); saw "
                        f"{[e['event'] for e in self.events]}\n{self.stderr_tail()}"
                    )
                self._changed.wait(remaining)

    def finish(self, timeout: float = 60.0) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the sidecar did not finish in {timeout} s; its last events: {self.names()[-30:]}"
            ) from None
        self._reader.join(timeout=10)
        return code

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return (self.tree.root / "sidecar.stderr").read_text(errors="replace")[-2000:]

    def close(self) -> None:
        """Stop the sidecar (it stops its trainer) and make sure nothing of either is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        kill_trainers(self.tree)
        self._reader.join(timeout=10)
        self._stderr.close()


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_step(log: Path, step: int, *, after: int = 0, timeout: float = 30) -> None:
    """Until the trainer's progress bar in ``log`` (past byte ``after``) shows ``step``."""
    shown = re.compile(rf"\| {step}/\d+ ")

    def reached() -> bool:
        try:
            with log.open("rb") as handle:
                handle.seek(after)
                return bool(shown.search(handle.read().decode(errors="replace")))
        except FileNotFoundError:
            return False

    wait_until(reached, timeout=timeout, what=f"step {step} in {log}")


def wait_for_polls(heartbeat: Path, count: int, *, timeout: float = 30) -> None:
    """Until the loop has beaten its heartbeat ``count`` more times (about one per poll)."""
    seen: set[int] = set()

    def beaten() -> bool:
        with contextlib.suppress(FileNotFoundError):
            seen.add(heartbeat.stat().st_mtime_ns)
        return len(seen) > count

    wait_until(beaten, timeout=timeout, what=f"{count} polls")


def complete_checkpoints(output_dir: Path) -> set[str]:
    """Names of the complete state folders, judged as a stopped run's (no settling)."""
    candidates = sd_states(output_dir, now=time.time(), settle_seconds=0)
    return {candidate.path.name for candidate in candidates if candidate.complete}


def temporary_leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob(".*.tmp"))


# -- train.sh at start -----------------------------------------------------------------------


def test_missing_train_script_stops_the_start_with_exit_2(fluxgym: FluxgymTree) -> None:
    """No train.sh: exit 2 with configuration_invalid naming the path and the setting."""
    fluxgym.train_script.unlink()
    result = run_command(fluxgym, "run")
    assert result.returncode == 2, result.stdout + result.stderr
    [event] = [e for e in events_of(result.stdout) if e["event"] == "configuration_invalid"]
    assert f"train script {fluxgym.train_script} does not exist" in event["reason"]
    assert "SIDECAR_TRAIN_SCRIPT" in event["reason"]
    assert not fluxgym.train_script.exists()
    assert not (fluxgym.output_dir / ".sidecar").exists()


def _mode_000(script: Path) -> bytes:
    content = script.read_bytes()
    script.chmod(0)
    return content


def _folder(script: Path) -> bytes:
    script.unlink()
    script.mkdir()
    return b""


def _fifo(script: Path) -> bytes:
    # Opening a FIFO for reading blocks until a writer comes: a naive read would hang forever.
    script.unlink()
    os.mkfifo(script)
    return b""


def _invalid_utf8(script: Path) -> bytes:
    content = script.read_bytes().replace(b"--seed 42", b"--seed \xff\xfe42")
    script.write_bytes(content)
    return content


UNREADABLE = {
    "mode 000": (_mode_000, "Permission denied"),
    "a folder": (_folder, "not a regular file"),
    "a FIFO": (_fifo, "not a regular file"),
    "invalid UTF-8": (_invalid_utf8, "can't decode byte 0xff"),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_train_script_stops_the_start_with_exit_2(
    fluxgym: FluxgymTree, kind: str
) -> None:
    """train.sh that cannot be read (mode 000 with root's override dropped, a folder, a FIFO,
    invalid UTF-8): exit 2 within seconds, with the reason; train.sh left as it was."""
    make_unreadable, reason = UNREADABLE[kind]
    content = make_unreadable(fluxgym.train_script)
    try:
        result = run_command(fluxgym, "run", obey_permissions=True, timeout=20)
    finally:
        if kind == "mode 000":
            fluxgym.train_script.chmod(0o644)
    assert result.returncode == 2, result.stdout + result.stderr
    [event] = [e for e in events_of(result.stdout) if e["event"] == "configuration_invalid"]
    assert str(fluxgym.train_script) in event["reason"]
    assert reason in event["reason"]
    if fluxgym.train_script.is_file():
        assert fluxgym.train_script.read_bytes() == content
    assert not (fluxgym.output_dir / "train.sh.orig").exists()


def test_train_script_without_a_trainer_names_what_was_expected(fluxgym: FluxgymTree) -> None:
    """A train.sh with no *.py trainer argument is refused (exit 2), saying what was expected."""
    script = "#!/bin/bash\naccelerate launch --mixed_precision bf16 --num_processes 1\n"
    fluxgym.train_script.write_text(script)
    result = run_command(fluxgym, "run")
    assert result.returncode == 2, result.stdout + result.stderr
    [event] = [e for e in events_of(result.stdout) if e["event"] == "configuration_invalid"]
    assert "is not understood" in event["reason"]
    assert "*.py" in event["reason"] and "flux_train_network.py" in event["reason"]
    assert fluxgym.train_script.read_text() == script


# -- train.sh a symlink ------------------------------------------------------------------------


def test_replacing_through_a_symlink_edits_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    """A user who links train.sh expects the script they keep elsewhere edited, the link kept."""
    from sidecar.atomic_files import replace_atomically

    target = tmp_path / "kept" / "train.sh"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o750)
    link = tmp_path / "run" / "train.sh"
    link.parent.mkdir()
    link.symlink_to(target)

    assert replace_atomically(link, "new\n")

    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert temporary_leftovers(tmp_path) == []


@pytest.mark.slow
def test_symlinked_train_script_is_rewritten_through_its_link(fluxgym: FluxgymTree) -> None:
    """Process mode on a train.sh that is a symlink: the recovery edits the linked file, the
    link stays a link, and the original is kept beside the link."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    kept = tree.root / "my-scripts" / "lora.sh"
    kept.parent.mkdir()
    original = tree.train_script.read_text()
    kept.write_text(original)
    tree.train_script.unlink()
    tree.train_script.symlink_to(kept)

    run = run_sidecar(tree, simulation={"SIM_FAULTS": HANG_AT_STEP_20})

    assert run.exit_code == 0, run.stderr[-2000:]
    assert len(run.named("trainer_restarted")) == 1
    assert tree.train_script.is_symlink() and tree.train_script.resolve() == kept
    command = parse_train_script(kept.read_text())
    assert command.resume == str(tree.output_dir / STEP_18)
    assert command.save_state
    assert (tree.output_dir / "train.sh.orig").read_text() == original
    assert temporary_leftovers(tree.root) == []


# -- train.sh edited by the user between the verdict and the rewrite ---------------------------


@pytest.mark.slow
def test_user_edit_made_while_the_trainer_hangs_survives_the_rewrite(
    fluxgym: FluxgymTree,
) -> None:
    """A flag the user adds while the trainer hangs is still there after the recovery's rewrite,
    which only adds --resume and its exact position; train.sh.orig keeps what FluxGym wrote."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    original = tree.train_script.read_text()
    sidecar = LiveSidecar(
        tree,
        settings={"SIDECAR_STALL_TIMEOUT": "4s"},
        simulation={"SIM_FAULTS": HANG_AT_STEP_20},
    )
    try:
        wait_for_step(tree.output_dir / "train.log", 20)
        current = tree.train_script.read_text()
        anchor = "  --output_name my-lora \\\n"
        assert current.count(anchor) == 1
        edited = current.replace(anchor, anchor + '  --user_flag "kept by the user" \\\n')
        with tree.train_script.open("w") as handle:  # in place, as `cat >` or an editor would
            handle.write(edited)
        edited_at = time.time()
        assert sidecar.named("stall_detected") == [], "the edit must come before the verdict"
        code = sidecar.finish(timeout=60)
    finally:
        sidecar.close()
    assert code == 0
    stalled_at = event_time(sidecar.named("stall_detected")[0])
    assert edited_at < stalled_at
    final = tree.train_script.read_text()
    bare = remove_option(
        remove_option(remove_resume(final), "--initial_step"), "--skip_until_initial_step"
    )
    assert bare == edited, "the rewrite changed more than --resume and its position"
    command = parse_train_script(final)
    assert command.option("user_flag") == "kept by the user"
    assert command.resume == str(tree.output_dir / STEP_18)
    assert command.option("initial_step") == "18"
    assert (tree.output_dir / "train.sh.orig").read_text() == original


# -- checkpoint folder names -----------------------------------------------------------------

# Spaces, both quotes, $, backticks, a backslash: each special to bash somewhere. Were any
# of them interpreted, the trainer would get another path (or run `touch`).
HOSTILE_NAME = 'it\'s "my" $HOME `touch pwned` \\ lora'


@pytest.mark.slow
def test_checkpoint_named_with_shell_characters_is_resumed_from_exactly(
    fluxgym: FluxgymTree,
) -> None:
    """State folders named after an --output_name full of shell syntax: the rewritten train.sh,
    run by bash, makes the real simulator resume from exactly the chosen folder."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    text = tree.train_script.read_text()
    tree.train_script.write_text(
        text.replace("--output_name my-lora", f"--output_name {shlex.quote(HOSTILE_NAME)}")
    )

    run = run_sidecar(tree, simulation={"SIM_FAULTS": HANG_AT_STEP_20})

    assert run.exit_code == 0, run.stderr[-2000:]
    chosen = tree.output_dir / f"{HOSTILE_NAME}-step00000018-state"
    assert run.named("checkpoint_selected")[-1]["checkpoint"] == str(chosen)
    assert parse_train_script(tree.train_script.read_text()).resume == str(chosen)
    log = (tree.output_dir / "train.log").read_text()
    resumed = re.findall(r"^resuming from (.*) \(epoch \d+, step \d+\)$", log, re.MULTILINE)
    assert resumed == [str(chosen)]
    assert (tree.output_dir / f"{HOSTILE_NAME}.safetensors").is_file()
    assert list(tree.root.rglob("pwned")) == []


def _copy_with_a_newline_in_its_name(state: Path) -> Path:
    """A complete copy of ``state`` whose name would run ``touch pwned`` (in the trainer's
    working directory) if bash read it raw."""
    copy = state.parent / "copy\n$(touch pwned)\n`touch pwned`\n"
    shutil.copytree(state, copy)
    for file in copy.iterdir():
        os.utime(file)  # newer than any other state: the first choice, were it usable
    return copy


@pytest.mark.slow
def test_checkpoint_named_with_a_newline_is_never_written_into_train_sh(
    fluxgym: FluxgymTree, tmp_path: Path
) -> None:
    """The newest complete state folder has a newline in its name: it is rejected with the
    reason, train.sh never names it, and the run resumes from the newest usable one."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    sidecar = LiveSidecar(
        tree,
        settings={"SIDECAR_STALL_TIMEOUT": "3s"},
        simulation={"SIM_FAULTS": HANG_AT_STEP_20},
    )
    try:
        wait_for_step(tree.output_dir / "train.log", 20)
        copy = _copy_with_a_newline_in_its_name(tree.output_dir / STEP_18)
        code = sidecar.finish(timeout=60)
    finally:
        sidecar.close()
    assert code == 0, sidecar.stderr_tail()
    selected = sidecar.named("checkpoint_selected")[-1]
    assert selected["checkpoint"] == str(tree.output_dir / STEP_18)
    rejected = {item["checkpoint"]: item["problems"] for item in selected["rejected"]}
    assert any("newline" in problem for problem in rejected[str(copy)])
    assert "copy" not in tree.train_script.read_text()
    assert list(tmp_path.rglob("pwned")) == []
    assert (copy / "optimizer.bin").is_file(), "the odd folder is left alone"


def test_resume_command_refuses_a_checkpoint_named_with_a_newline(
    fluxgym: FluxgymTree, tmp_path: Path
) -> None:
    """`resume` with only a newline-named state folder: refused with the reason, exit 1,
    train.sh byte for byte as it was."""
    state = write_state_folder(tmp_path / "elsewhere" / "state")
    copy = _copy_with_a_newline_in_its_name(state)
    shutil.move(copy, fluxgym.output_dir / copy.name)
    before = fluxgym.train_script.read_bytes()

    listed = run_command(fluxgym, "checkpoints", "--json")
    result = run_command(fluxgym, "resume")

    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["complete"] is False and not entry["chosen"]
    assert any("newline" in problem for problem in entry["problems"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no complete checkpoint" in result.stderr
    assert fluxgym.train_script.read_bytes() == before
    assert not (fluxgym.output_dir / "train.sh.orig").exists()
    assert list(tmp_path.rglob("pwned")) == []


# -- a full or read-only volume --------------------------------------------------------------


def _mount_unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the volume faults cannot be made: {reason}")
    pytest.skip(reason)


class Volumes:
    """Small tmpfs volumes that a test fills up or makes read-only, all unmounted at the end."""

    def __init__(self) -> None:
        self._mounted: list[Path] = []

    def mount(self, folder: Path, *, size: str = "8m") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            _mount_unavailable(
                f"cannot mount a tmpfs (root and CAP_SYS_ADMIN needed): {result.stderr.strip()}"
            )
        self._mounted.append(folder)
        return folder

    def fill(self, volume: Path) -> Callable[[], None]:
        """Fill ``volume`` until it has no byte left (ENOSPC); returns what frees it again."""
        filler = volume / "filler"
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            chunk = b"\0" * 65536
            while True:
                try:
                    os.write(descriptor, chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(descriptor)
        with pytest.raises(OSError) as refused, (volume / "probe").open("wb") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
        assert refused.value.errno == errno.ENOSPC, "the volume is not full"
        (volume / "probe").unlink(missing_ok=True)
        return filler.unlink

    def make_read_only(self, folder: Path) -> Callable[[], None]:
        """Put a read-only bind mount over ``folder``; returns what takes it away again."""
        for command in (
            ["mount", "--bind", str(folder), str(folder)],
            ["mount", "-o", "remount,bind,ro", str(folder)],
        ):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                _mount_unavailable(f"{' '.join(command)} failed: {result.stderr.strip()}")
            if command[1] == "--bind":
                self._mounted.append(folder)
        with pytest.raises(OSError) as refused:
            (folder / "probe").write_text("x")
        assert refused.value.errno == errno.EROFS, "the folder is not read-only"

        def restore() -> None:
            subprocess.run(["umount", str(folder)], check=True)
            del self._mounted[len(self._mounted) - 1 - self._mounted[::-1].index(folder)]

        return restore

    def unmount_all(self) -> None:
        for folder in reversed(self._mounted):
            subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)
        self._mounted.clear()


@pytest.fixture
def volumes() -> Iterator[Volumes]:
    if shutil.which("mount") is None:
        _mount_unavailable("no mount command")
    made = Volumes()
    try:
        yield made
    finally:
        made.unmount_all()


VOLUME_FAILURES = {"disk full": "No space left on device", "read-only": "Read-only file system"}


def _break(volumes: Volumes, folder: Path, failure: str) -> Callable[[], None]:
    return volumes.fill(folder) if failure == "disk full" else volumes.make_read_only(folder)


@pytest.mark.slow
@pytest.mark.parametrize("failure", VOLUME_FAILURES)
def test_rewrite_on_a_full_or_read_only_volume_is_refused_cleanly_and_retried(
    tmp_path: Path, volumes: Volumes, failure: str
) -> None:
    """The run's folder is full (ENOSPC) or read-only (EROFS) when the recovery rewrites
    train.sh: train.sh and every state stay as they were, restart_failed says why (once), the
    sidecar keeps polling with no trainer, and the recovery completes once writes work again."""
    root = tmp_path / "fluxgym"
    volume = volumes.mount(root / "outputs" / "my-lora")
    tree = build_fluxgym_tree(root, extra_trainer_args=FREQUENT_SAVES)
    original = tree.train_script.read_text()
    census = TrainerCensus(tree)
    sidecar = LiveSidecar(
        tree,
        settings={"SIDECAR_STALL_TIMEOUT": "3s"},
        simulation={"SIM_FAULTS": HANG_AT_STEP_20},
    )
    census.start()
    try:
        wait_for_step(tree.output_dir / "train.log", 20)
        before = tree.train_script.read_bytes()
        states_before = complete_checkpoints(tree.output_dir)
        restore = _break(volumes, volume, failure)
        assert sidecar.named("stall_detected") == [], "the failure must come before the verdict"

        failed = sidecar.wait_for("restart_failed", timeout=30)
        assert VOLUME_FAILURES[failure] in failed["reason"]
        assert failed["retrying"] == "every poll"
        wait_for_polls(tree.root / "heartbeat", 5)
        assert sidecar.process.poll() is None, "the sidecar keeps running"
        assert len(sidecar.named("restart_failed")) == 1, "logged once, not every poll"
        assert sidecar.named("trainer_restarted") == []
        assert trainer_groups(tree) == set(), "the hung trainer was stopped"
        assert tree.train_script.read_bytes() == before
        assert complete_checkpoints(tree.output_dir) == states_before

        restore()
        code = sidecar.finish(timeout=60)
    finally:
        sidecar.close()
        most = census.stop()
    assert code == 0, sidecar.stderr_tail()
    assert len(sidecar.named("trainer_restarted")) == 1
    assert sidecar.named("training_completed")
    assert parse_train_script(tree.train_script.read_text()).resume == str(
        tree.output_dir / STEP_18
    )
    assert (tree.output_dir / "train.sh.orig").read_text() == original
    assert states_before <= complete_checkpoints(tree.output_dir)
    assert {"my-lora-step00000006-state", "my-lora-step00000012-state", STEP_18} <= states_before
    assert temporary_leftovers(tree.output_dir) == []
    assert LedgerStore(tree.output_dir / ".sidecar").load().restarts == 1
    assert most == 1, "never two trainers at once"


@pytest.mark.slow
def test_a_retried_recovery_counts_the_failed_resume_once(fluxgym: FluxgymTree) -> None:
    """A resumed attempt hangs before saving anything new, and train.sh is half-edited (cannot
    be parsed) for many polls, so the recovery retries every poll: the failed resume still
    counts once, the checkpoint is not quarantined by the retries, and once the edit is done
    the run resumes from that checkpoint again."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    log = tree.output_dir / "train.log"
    step_12 = str(tree.output_dir / "my-lora-step00000012-state")
    sidecar = LiveSidecar(
        tree,
        settings={"SIDECAR_STALL_TIMEOUT": "3s", "SIDECAR_MAX_RESTARTS": "5"},
        # Run 1 crashes after the state of step 12; run 2 resumes from it and hangs at once.
        simulation={"SIM_FAULTS": "crash@step=14:once;hang_idle@step=1:run=2"},
    )
    try:
        sidecar.wait_for("trainer_restarted")
        wait_until(lambda: b"resuming from" in log.read_bytes(), timeout=30, what="the resume")
        wait_for_step(log, 1, after=log.read_bytes().rindex(b"resuming from"))
        finished = tree.train_script.read_text()
        tree.train_script.write_text(finished + ' \\\n  --caption_extension ".tx')
        failed = sidecar.wait_for("restart_failed", timeout=30)
        assert "unterminated" in failed["reason"]
        wait_for_polls(tree.root / "heartbeat", 8)
        assert len(sidecar.named("restart_failed")) == 1, "logged once, not every poll"
        tree.train_script.write_text(finished)
        code = sidecar.finish(timeout=60)
    finally:
        sidecar.close()
    assert code == 0, sidecar.stderr_tail()
    assert sidecar.named("checkpoint_quarantined") == []
    chosen = {event["checkpoint"] for event in sidecar.named("checkpoint_selected")}
    assert chosen == {step_12}
    ledger = LedgerStore(tree.output_dir / ".sidecar").load()
    assert ledger.resume_failures == {step_12: 1}
    assert ledger.quarantined == []
    assert ledger.restarts == 2


@pytest.mark.slow
@pytest.mark.parametrize("failure", VOLUME_FAILURES)
def test_state_file_write_on_a_full_or_read_only_state_folder(
    tmp_path: Path, volumes: Volumes, failure: str
) -> None:
    """The state folder (ledger, trainer.pid, incidents) is full or read-only during a
    recovery: state.json keeps its last complete content, the failure is reported, the
    trainer is still restarted exactly once, and the next ledger write records everything."""
    tree = build_fluxgym_tree(tmp_path / "fluxgym", extra_trainer_args=FREQUENT_SAVES)
    state_dir = volumes.mount(tmp_path / "state", size="4m")
    store = LedgerStore(state_dir)
    census = TrainerCensus(tree)
    sidecar = LiveSidecar(
        tree,
        settings={"SIDECAR_STALL_TIMEOUT": "3s", "SIDECAR_STATE_DIR": str(state_dir)},
        simulation={"SIM_FAULTS": HANG_AT_STEP_20},
    )
    census.start()
    try:
        wait_for_step(tree.output_dir / "train.log", 20)
        ledger_before = store.path.read_bytes()
        restore = _break(volumes, state_dir, failure)
        assert sidecar.named("stall_detected") == [], "the failure must come before the verdict"
        failed = sidecar.wait_for("ledger_write_failed", timeout=30)
        assert VOLUME_FAILURES[failure] in failed["error"]
        sidecar.wait_for("trainer_restarted", timeout=30)
        assert store.path.read_bytes() == ledger_before, "state.json never half-written"
        assert store.load().restarts == 0
        restore()
        code = sidecar.finish(timeout=60)
    finally:
        sidecar.close()
        most = census.stop()
    assert code == 0, sidecar.stderr_tail()
    assert len(sidecar.named("trainer_restarted")) == 1
    ledger = store.load()
    assert ledger.restarts == 1 and ledger.completed
    assert parse_train_script(tree.train_script.read_text()).resume == str(
        tree.output_dir / STEP_18
    )
    assert temporary_leftovers(state_dir) == []
    assert most == 1, "never two trainers at once"


# -- the sidecar restarted ---------------------------------------------------------------------


def test_sidecar_starting_with_every_checkpoint_quarantined_gives_up_cleanly(
    fluxgym: FluxgymTree,
) -> None:
    """A sidecar restarted onto a ledger that quarantined every complete checkpoint gives up
    with exit 3 and gave_up (not a traceback), leaving train.sh and the states alone."""
    from sidecar.run.ledger import Ledger

    state = write_state_folder(fluxgym.output_dir / "my-lora-step00000006-state", mtime=1e9)
    LedgerStore(fluxgym.output_dir / ".sidecar").save(Ledger(quarantined=[str(state)]))
    before = fluxgym.train_script.read_bytes()

    result = run_command(fluxgym, "run")

    assert result.returncode == 3, result.stdout + result.stderr
    [gave_up] = [e for e in events_of(result.stdout) if e["event"] == "gave_up"]
    assert "every complete checkpoint is quarantined" in gave_up["reason"]
    assert "Traceback" not in result.stderr
    assert fluxgym.train_script.read_bytes() == before
    assert complete_checkpoints(fluxgym.output_dir) == {state.name}
    assert trainer_processes(fluxgym) == []


# -- hostile or broken inputs ------------------------------------------------------------------


# The command's own peak memory, from a small process that starts it: a child of pytest
# itself would report pytest's resident set, which exec carries over into ru_maxrss (after
# the e2e and real-training tiers have run in this process, that is hundreds of MB).
_MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:], stderr=subprocess.DEVNULL).returncode
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def _run_measured(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, int]:
    """Run ``command``; its exit code, stdout and peak memory (KiB) of its own."""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        result = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(peak_file), *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            timeout=timeout,
        )
        return result.returncode, result.stdout, int(peak_file.read_text())


def test_checkpoints_command_survives_hostile_state_files(fluxgym: FluxgymTree) -> None:
    """Garbage and oversized train_state.json, safetensors headers claiming a petabyte:
    `checkpoints --json` answers in seconds with little memory, names each problem, and
    chooses the one sound folder."""
    out = fluxgym.output_dir
    good = write_state_folder(out / "my-lora-step00000006-state", step=6, mtime=1e9)
    garbage = write_state_folder(out / "my-lora-step00000012-state", step=12, mtime=1e9 + 10)
    (garbage / "train_state.json").write_bytes(b"\x00\xffnot json{{{" * 100)
    huge = write_state_folder(out / "my-lora-step00000018-state", step=18, mtime=1e9 + 20)
    with (huge / "train_state.json").open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: 64 MiB claimed, nothing on disk
    claim_length = write_state_folder(out / "my-lora-step00000024-state", mtime=1e9 + 30)
    (claim_length / "model.safetensors").write_bytes((2**50).to_bytes(8, "little") + b"{}" * 8)
    claim_data = write_state_folder(out / "my-lora-step00000030-state", mtime=1e9 + 40)
    # A well-formed header whose one tensor claims a petabyte of data that is not there.
    tensor = {"dtype": "F32", "shape": [2**48], "data_offsets": [0, 2**50]}
    header = json.dumps({"w": tensor}).encode()
    header += b" " * (-len(header) % 8)
    (claim_data / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)

    env = sidecar_environment(fluxgym)
    started = time.monotonic()
    code, stdout, peak_kib = _run_measured(sidecar_command("checkpoints", "--json"), env, 30)
    elapsed = time.monotonic() - started

    assert code == 0
    listed = {Path(entry["path"]).name: entry for entry in json.loads(stdout)}
    assert [name for name, entry in listed.items() if entry["chosen"]] == [good.name]
    problems = {name: " ".join(entry["problems"]) for name, entry in listed.items()}
    assert "train_state.json: not valid JSON" in problems[garbage.name]
    assert "train_state.json: 67108864 bytes is too large" in problems[huge.name]
    assert "model.safetensors" in problems[claim_length.name]
    assert "exceeds the 100 MiB limit" in problems[claim_length.name]
    assert "model.safetensors" in problems[claim_data.name]
    assert not any(listed[name]["complete"] for name in problems if name != good.name)
    assert elapsed < 10
    assert peak_kib < 300 * 1024, f"{peak_kib} KiB: something was read whole"


def test_checkpoints_command_survives_link_loops_and_unreadable_entries(
    fluxgym: FluxgymTree,
) -> None:
    """Link loops, links to / and to the folder itself, a folder the sidecar may not list
    (root without its override), a FIFO and a link loop in place of state files: the real
    command answers in seconds and chooses the sound folder."""
    out = fluxgym.output_dir
    good = write_state_folder(out / "my-lora-step00000006-state", step=6, mtime=1e9)
    (out / "loop").symlink_to(out, target_is_directory=True)
    (out / "root").symlink_to("/", target_is_directory=True)
    (out / "self-loop").symlink_to(out / "self-loop")
    (out / "my-lora-step00000007-state").symlink_to(good, target_is_directory=True)
    locked = write_state_folder(out / "my-lora-step00000012-state", step=12, mtime=1e9 + 10)
    fifo = write_state_folder(out / "my-lora-step00000018-state", mtime=1e9 + 20)
    (fifo / "optimizer.bin").unlink()
    os.mkfifo(fifo / "optimizer.bin")
    looped = write_state_folder(out / "my-lora-step00000024-state", mtime=1e9 + 30)
    (looped / "scheduler.bin").unlink()
    (looped / "scheduler.bin").symlink_to(looped / "scheduler.bin")
    locked.chmod(0)
    try:
        result = run_command(fluxgym, "checkpoints", "--json", obey_permissions=True, timeout=20)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stderr
    listed = {Path(entry["path"]).name: entry for entry in json.loads(result.stdout)}
    assert [name for name, entry in listed.items() if entry["chosen"]] == [good.name]
    assert set(listed) == {good.name, locked.name, fifo.name, looped.name}
    assert listed[locked.name]["problems"] == ["unreadable: Permission denied"]
    assert any("optimizer.bin" in p for p in listed[fifo.name]["problems"])
    assert any("scheduler.bin" in p for p in listed[looped.name]["problems"])


def test_path_map_through_dot_dot_is_refused_with_exit_2(fluxgym: FluxgymTree) -> None:
    """A SIDECAR_PATH_MAP prefix with '..' could aim writes anywhere: refused at start, exit 2."""
    before = fluxgym.train_script.read_bytes()
    result = run_command(
        fluxgym, "run", settings={"SIDECAR_PATH_MAP": "/outputs/../etc:/app/fluxgym/outputs"}
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SIDECAR_PATH_MAP" in result.stderr and "'..'" in result.stderr
    assert fluxgym.train_script.read_bytes() == before
    assert not (fluxgym.output_dir / ".sidecar").exists()


def _aim_at_etc_by_output_dir(tree: FluxgymTree) -> dict[str, str]:
    text = tree.train_script.read_text()
    tree.train_script.write_text(
        text.replace(f'--output_dir "{tree.output_dir}"', '--output_dir "/etc"')
    )
    return {}


def _aim_at_etc_by_path_map(tree: FluxgymTree) -> dict[str, str]:
    text = tree.train_script.read_text()
    tree.train_script.write_text(
        text.replace(f'--output_dir "{tree.output_dir}"', '--output_dir "/app/outputs/x"')
    )
    return {"SIDECAR_PATH_MAP": "/etc:/app/outputs/x"}


def _aim_at_etc_by_a_link(tree: FluxgymTree) -> dict[str, str]:
    link = tree.root / "innocent-looking"
    link.symlink_to("/etc", target_is_directory=True)
    return {"SIDECAR_OUTPUT_DIR": str(link)}


@pytest.mark.parametrize(
    "aim", [_aim_at_etc_by_output_dir, _aim_at_etc_by_path_map, _aim_at_etc_by_a_link]
)
def test_output_folder_in_a_system_folder_is_refused_and_nothing_is_written_there(
    fluxgym: FluxgymTree, aim: Callable[[FluxgymTree], dict[str, str]]
) -> None:
    """An output folder that is /etc (named, mapped or linked): refused, exit 2, /etc untouched."""
    settings = aim(fluxgym)
    listing = sorted(os.listdir("/etc"))
    result = run_command(fluxgym, "run", settings=settings)
    assert result.returncode == 2, result.stdout + result.stderr
    [event] = [e for e in events_of(result.stdout) if e["event"] == "configuration_invalid"]
    assert "refusing output folder" in event["reason"] and "/etc" in event["reason"]
    assert sorted(os.listdir("/etc")) == listing
    assert not Path("/etc/.sidecar").exists()
    assert trainer_processes(fluxgym) == []


# -- wall-clock jumps --------------------------------------------------------------------------

HOURS = 3600.0


class RecordingLog:
    """Stands in for the structlog logger handed to the loop; keeps every event in order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _record(self, level: str, event: str, **fields: Any) -> None:
        self.events.append({"event": event, "level": level, "at": time.monotonic(), **fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._record("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._record("error", event, **fields)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == name]


class JumpingWallClock:
    """The real wall clock plus an offset the test moves by hours (an NTP step, a VM resume)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.jumps: list[float] = []

    def jump(self, seconds: float) -> None:
        self.offset += seconds
        self.jumps.append(seconds)

    def __call__(self) -> float:
        return time.time() + self.offset


def run_watchdog_in_process(
    tree: FluxgymTree,
    monkeypatch: pytest.MonkeyPatch,
    *,
    wall: JumpingWallClock,
    on_poll: Callable[[Watchdog], None],
    simulation: dict[str, str],
    deadline: float = 60,
) -> tuple[int, RecordingLog]:
    """Build the loop the way `run` does (process mode), with ``wall`` as its wall clock."""
    environment = sidecar_environment(tree, simulation=simulation)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)  # the trainer inherits PATH and SIM_* from here
    settings_ = load_settings()
    locator = RunLocator(settings_, re.compile(settings_.trainer_pattern))
    log = RecordingLog()
    stop_event = threading.Event()
    watchdog: Watchdog | None = None

    def poll_hook() -> None:
        assert watchdog is not None
        on_poll(watchdog)

    watchdog = Watchdog(
        options=loop_options_of(settings_),
        locator=locator,
        restarter=build_restarter(settings_, locator.current(), log),
        gpu=None,
        log=log,
        stop_event=stop_event,
        heartbeat=lambda: None,
        clocks=Clocks(wall=wall),
        on_poll=poll_hook,
    )
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        stop_event.set()

    guard = threading.Timer(deadline, expire)  # a wedged loop fails, never hangs
    guard.start()
    try:
        code = watchdog.run()
    finally:
        guard.cancel()
        stop_event.set()
        kill_trainers(tree)
        if watchdog.run_lock is not None:
            watchdog.run_lock.release()  # in a process of its own, exiting would release it
    assert not expired.is_set(), f"the loop ran into the test's {deadline} s deadline"
    return code, log


@pytest.mark.slow
def test_wall_clock_jumps_cause_no_false_stall(
    fluxgym: FluxgymTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock jumps 3 h forward, 6 h back, 6 h forward... through a healthy run: no
    stall, no restart, completion (durations run on the monotonic clock)."""
    wall = JumpingWallClock()
    steps = [3 * HOURS, -6 * HOURS, 6 * HOURS, -3 * HOURS, 12 * HOURS, -12 * HOURS]
    polls = 0

    def jump_every_fourth_poll(watchdog: Watchdog) -> None:
        nonlocal polls
        polls += 1
        running = watchdog.snapshot()["phase"] == "running"
        if running and polls % 4 == 0 and len(wall.jumps) < len(steps):
            wall.jump(steps[len(wall.jumps)])

    code, log = run_watchdog_in_process(
        fluxgym,
        monkeypatch,
        wall=wall,
        on_poll=jump_every_fourth_poll,
        simulation={"SIM_STEP_SECONDS": "0.1"},
    )
    assert code == 0, [e["event"] for e in log.events]
    assert len(wall.jumps) >= 4, "the run ended before the clock jumped enough"
    assert log.named("stall_detected") == [] and log.named("trainer_crashed") == []
    assert log.named("trainer_restarted") == []
    assert log.named("training_completed")
    assert (fluxgym.output_dir / "my-lora.safetensors").is_file()


@pytest.mark.slow
def test_hang_after_a_backward_wall_clock_jump_is_detected_on_time(
    fluxgym: FluxgymTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock jumps 3 h forward mid-run, then 6 h back just as the trainer hangs: the
    hang is still detected one stall timeout after the last progress, and the newest complete
    state is chosen as without any jump."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    wall = JumpingWallClock()
    hang_seen_at: list[float] = []

    def jump_around_the_hang(watchdog: Watchdog) -> None:
        step = watchdog.snapshot()["last_step"] or 0
        if step >= 8 and not wall.jumps:
            wall.jump(3 * HOURS)
        if step >= 20 and not hang_seen_at and wall.jumps:
            hang_seen_at.append(time.monotonic())
            wall.jump(-6 * HOURS)

    code, log = run_watchdog_in_process(
        tree,
        monkeypatch,
        wall=wall,
        on_poll=jump_around_the_hang,
        simulation={"SIM_FAULTS": HANG_AT_STEP_20},
    )
    assert code == 0, [e["event"] for e in log.events]
    assert wall.jumps == [3 * HOURS, -6 * HOURS]
    [stall] = log.named("stall_detected")
    assert stall["last_step"] == 20
    timeout = 2.0  # FAST_SETTINGS' SIDECAR_STALL_TIMEOUT
    assert timeout <= stall["seconds_since_progress"] < timeout + 1.0
    assert stall["at"] - hang_seen_at[0] < timeout + 1.0, "detected late"
    [selected] = log.named("checkpoint_selected")
    assert selected["checkpoint"] == str(tree.output_dir / STEP_18)
    assert all(
        "still being written" not in problem
        for item in selected["rejected"]
        for problem in item["problems"]
    )
    assert len(log.named("trainer_restarted")) == 1


# -- the progress-line parser (property-based) -------------------------------------------------

BLOCKS = " ▏▎▍▌▋▊▉█#"
# A postfix never holds a bar of its own; anything else a trainer could put there.
POSTFIX = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r\n"),
    max_size=40,
).filter(lambda text: "steps:" not in text)
OTHER_BAR_NAMES = st.sampled_from(
    ["caching latents", "validation steps", "epoch validation steps", "", "epoch 1/16", "x"]
)
NOISE_LINES = st.sampled_from(
    [
        "epoch 2/16",
        "INFO     saving checkpoint: /out/my-lora-000004.safetensors",
        "Traceback (most recent call last):",
        "100%|██████████| 20/20 [00:03<00:00]",
        "steps",
        "steps: loading",
        "",
    ]
)
SEPARATORS = st.sampled_from(["\r", "\n", "\r\n", "\n\r", "\r\r"])


@st.composite
def tqdm_bars(draw: st.DrawFn, description: st.SearchStrategy[str]) -> tuple[str, int, int]:
    """A tqdm status line with random bar width, counts, rate and postfix; (text, n, total)."""
    total = draw(st.integers(1, 10**7))
    n = draw(st.integers(0, total))
    width = draw(st.integers(0, 60))
    bar = draw(st.text(alphabet=BLOCKS, min_size=width, max_size=width))
    percent = draw(st.integers(0, 100))
    rate = draw(st.sampled_from(["?it/s", "12.34it/s", " 1.50it/s", "48.44s/it"]))
    postfix = draw(POSTFIX)
    name = draw(description)
    prefix = f"{name}:{draw(st.sampled_from(['', ' ', '  ']))}" if name else ""
    extra = f", {postfix}" if postfix else ""
    text = f"{prefix}{percent:3d}%|{bar}| {n}/{total} [08:04<16:08, {rate}{extra}]"
    return text, n, total


STEP_BARS = tqdm_bars(st.just("steps"))
OTHER_BARS = tqdm_bars(OTHER_BAR_NAMES)


@st.composite
def output_streams(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]]]:
    """Trainer output: step bars among other bars and log lines, each piece after a separator
    as tqdm writes it (a redraw starts with \\r); the stream and the step bars' (n, total)."""
    pieces: list[str] = []
    shown: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["step", "other", "noise"]))
        if kind == "step":
            text, n, total = draw(STEP_BARS)
            shown.append((n, total))
        elif kind == "other":
            text = draw(OTHER_BARS)[0]
        else:
            text = draw(NOISE_LINES)
        pieces.append(draw(SEPARATORS) + text)
    return "".join(pieces) + draw(st.sampled_from(["", "\n", "\r"])), shown


@settings(max_examples=300, deadline=None)
@given(output_streams())
def test_generated_progress_streams_give_the_last_step_bar(
    stream: tuple[str, list[tuple[int, int]]],
) -> None:
    """Whatever the bars' widths, rates and postfixes and the \\r/\\n noise between them, the
    parser reads the last steps bar's N/M, and nothing when no steps bar was printed."""
    text, shown = stream
    progress = parse_step(text)
    if shown:
        assert progress is not None and (progress.step, progress.total) == shown[-1]
    else:
        assert progress is None


@settings(max_examples=300, deadline=None)
@given(bar=OTHER_BARS, separator=SEPARATORS)
def test_bars_other_than_steps_never_parse(bar: tuple[str, int, int], separator: str) -> None:
    """Caching and validation bars (sd-scripts' "validation steps" among them) are no step
    counter."""
    assert parse_step(separator + bar[0]) is None
    assert parse_step(bar[0]) is None


@settings(max_examples=500, deadline=None)
@given(st.text() | st.binary().map(lambda data: data.decode("utf-8", errors="replace")))
def test_garbage_never_raises(garbage: str) -> None:
    """Any text gives a reading or None, never an exception; a reading is whole numbers."""
    progress = parse_step(garbage)
    if progress is not None:
        assert progress.step >= 0 and progress.total >= 0


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=output_streams(), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_a_stream_read_in_arbitrary_pieces_reports_only_bars_that_were_shown(
    tmp_path: Path, stream: tuple[str, list[tuple[int, int]]], cuts: list[int]
) -> None:
    """The log follower reading the stream as it grows, cut anywhere (mid-bar, mid-number),
    reports only N/M pairs a bar really showed, and the last steps bar at the end."""
    text, shown = stream
    data = text.encode()
    log = tmp_path / "train.log"
    log.unlink(missing_ok=True)
    follower = LogFollower(log)
    readings = []
    written = 0
    with log.open("wb") as handle:
        for cut in sorted({min(cut, len(data)) for cut in cuts} | {len(data)}):
            handle.write(data[written:cut])
            handle.flush()
            written = cut
            progress = follower.poll().progress
            if progress is not None:
                readings.append((progress.step, progress.total))
    assert set(readings) <= set(shown)
    if shown:
        assert readings[-1] == shown[-1]


@pytest.mark.slow
def test_a_newest_state_that_cannot_be_read_stops_the_recovery(
    fluxgym: FluxgymTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest state's optimizer.bin is refused (as another UID's 0600 file is; root reads
    everything, so the refusal is injected at os.open): the sidecar stops with the file, its
    owner and mode and what to change, and neither resumes from an older state nor from the
    beginning."""
    tree = build_fluxgym_tree(fluxgym.root.parent / "t", extra_trainer_args=FREQUENT_SAVES)
    real_open = os.open

    def refuse_the_newest(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        name = os.fspath(path)
        reading = not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if reading and "step00000018-state" in name and name.endswith("optimizer.bin"):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_the_newest)
    code, log = run_watchdog_in_process(
        tree,
        monkeypatch,
        wall=JumpingWallClock(),
        on_poll=lambda watchdog: None,
        simulation={"SIM_FAULTS": HANG_AT_STEP_20},
    )
    assert code == 3
    (gave_up,) = log.named("gave_up")
    assert "step00000018-state" in gave_up["reason"] and "cannot be read" in gave_up["reason"]
    assert "mode 0" in gave_up["reason"] and "uid" in gave_up["reason"]
    assert log.named("trainer_restarted") == []
    assert "--resume" not in tree.train_script.read_text()
