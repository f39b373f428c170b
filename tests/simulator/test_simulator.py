"""The simulated FluxGym trainer behaves like sd-scripts from the outside.

Most tests run the real thing the sidecar will meet: ``bash outputs/<name>/train.sh`` from a
FluxGym-shaped tree, through the accelerate stand-in, with fast ``SIM_*`` timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from repo_paths import SHARED

from sidecar.simulator import Fault, FluxgymTree, build_fluxgym_tree, format_faults, parse_faults
from sidecar.simulator.accelerate_shim import main as accelerate_main
from sidecar.simulator.accelerate_shim import split_launch_arguments
from sidecar.simulator.faults import FaultPlan, parse_fault
from sidecar.simulator.file_formats import (
    SafetensorError,
    check_safetensors_loadable,
    check_torch_archive,
    safetensors_bytes,
    torch_archive_bytes,
)
from sidecar.simulator.fluxgym_tree import FIXTURE_SCRIPTS, fixture_script, render_train_script
from sidecar.simulator.gpu_state import HELD_BYTES
from sidecar.simulator.resume_position import ResumePosition, resume_position
from sidecar.simulator.schedule import TrainingPlan, stale_step_state
from sidecar.simulator.terminal_output import format_progress
from sidecar.simulator.trainer import main as trainer_main
from sidecar.trainers.sd_scripts.rich_log import unwrap

# FluxGym's own generator output, as handed to the project (beside the checkout, in CI too).
SHARED_FIXTURES = SHARED / "fixtures" / "fluxgym-train-scripts"
STATE_FILES_IN_WRITE_ORDER = (
    "train_state.json",
    "model.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
)
# Two steps per epoch keeps the default 16-epoch script at 32 steps: a fraction of a second.
FAST = {
    "SIM_STEPS_PER_EPOCH": "2",
    "SIM_STEP_SECONDS": "0.005",
    "SIM_STARTUP_SECONDS": "0",
    "SIM_SAVE_SECONDS": "0",
    "SIM_SAMPLE_SECONDS": "0.005",
    "SIM_FAULTS": "",
}
PROGRESS = re.compile(r"steps:\s+\d+%\|[^|]*\| (\d+)/(\d+) \[")


class TrainerRun:
    """A running train.sh whose output is drained continuously (an unread pipe blocks it)."""

    def __init__(self, tree: FluxgymTree, environment: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            tree.command,
            cwd=tree.root,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so the whole tree can be killed
        )
        self._stdout = bytearray()
        self._stderr = bytearray()
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=_drain, args=(self.process.stdout, self._stdout), daemon=True),
            threading.Thread(target=_drain, args=(self.process.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def stdout(self) -> str:
        return self._stdout.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    def progress(self) -> list[tuple[int, int]]:
        """Every (n, total) the ``steps`` bar has shown so far."""
        return [(int(n), int(total)) for n, total in PROGRESS.findall(self.stderr)]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; stderr tail: {self.stderr[-1500:]!r}")
            if self.process.poll() is not None and not condition():
                time.sleep(0.05)  # let the readers catch up before giving up
                if not condition():
                    raise AssertionError(
                        f"trainer exited {self.process.returncode}: {self.stderr[-1500:]!r}"
                    )
            time.sleep(0.01)

    def wait_for_step(self, step: int) -> None:
        self.wait_for(lambda: any(n >= step for n, _ in self.progress()))

    def finish(self, timeout: float = 20.0) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def cpu_seconds(self) -> float:
        """CPU time used so far by the shell and everything below it."""
        root = psutil.Process(self.process.pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def _drain(stream: object, sink: bytearray) -> None:
    read = stream.read1  # type: ignore[attr-defined]
    while chunk := read(65536):
        sink.extend(chunk)


@pytest.fixture
def launch() -> Iterator[Callable[..., TrainerRun]]:
    """Start train.sh runs; whatever is still alive at the end of the test is killed."""
    runs: list[TrainerRun] = []

    def start(tree: FluxgymTree, **overrides: str) -> TrainerRun:
        run = TrainerRun(tree, tree.env({**FAST, **overrides}))
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


def run_to_end(
    launch: Callable[..., TrainerRun], tree: FluxgymTree, **overrides: str
) -> TrainerRun:
    run = launch(tree, **overrides)
    run.finish()
    return run


def state_folders(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir() if p.is_dir() and p.name.endswith("-state"))


# --------------------------------------------------------------------------- the tree


def test_packaged_scripts_are_byte_identical_to_the_fixtures() -> None:
    """The train.sh templates shipped in the package are exactly FluxGym's generated files."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"the shared FluxGym fixtures are not beside this checkout ({SHARED_FIXTURES})")
    assert sorted(FIXTURE_SCRIPTS) == sorted(p.name for p in SHARED_FIXTURES.glob("*.sh"))
    for name in FIXTURE_SCRIPTS:
        assert fixture_script(name).encode() == (SHARED_FIXTURES / name).read_bytes()


def test_tree_has_fluxgym_layout_and_rewritten_paths(tmp_path: Path) -> None:
    """The tree has FluxGym's files; train.sh points at the new root, final backslash kept."""
    tree = build_fluxgym_tree(tmp_path / "fluxgym", name="cat-lora")
    assert (tree.root / "app.py").exists()
    assert (tree.root / "sd-scripts" / "flux_train_network.py").exists()
    assert os.access(tree.bin_dir / "accelerate", os.X_OK)
    assert tree.train_script == tree.root / "outputs" / "cat-lora" / "train.sh"
    text = tree.train_script.read_text()
    assert "/app/fluxgym" not in text and "my-lora" not in text
    assert f'--output_dir "{tree.root}/outputs/cat-lora"' in text
    assert text.endswith("--loss_type l2 \\")
    assert (tree.output_dir / "dataset.toml").exists()
    assert (tree.output_dir / "sample_prompts.txt").exists()
    assert tree.env({"X": "1"})["PATH"].split(os.pathsep)[0] == str(tree.bin_dir)


def test_advanced_options_are_appended_in_fluxgym_shape() -> None:
    """Extra flags become FluxGym's advanced-option lines, matching a script FluxGym generated."""
    low_vram = fixture_script("fluxgym-12g-save-state-steps.sh")
    base_end = low_vram.index("\n  --save_state")
    rendered = render_train_script(
        Path("/app/fluxgym"),
        "my-lora",
        low_vram[:base_end],
        "--save_state --save_every_n_steps 100",
    )
    assert rendered == low_vram
    again = render_train_script(Path("/r"), "my-lora", low_vram, "--resume '/r/a b-state'")
    assert again.endswith("--save_every_n_steps 100 \\\n  --resume '/r/a b-state'")


# --------------------------------------------------------------------------- normal runs


def test_default_fluxgym_script_runs_to_completion(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """FluxGym's unchanged default script trains to the end, saving models but no state."""
    tree = build_fluxgym_tree(tmp_path)
    run = launch(tree)
    assert run.finish() == 0
    final = tree.output_dir / "my-lora.safetensors"
    check_safetensors_loadable(final)
    epoch_models = sorted(p.name for p in tree.output_dir.glob("my-lora-0*.safetensors"))
    assert epoch_models == [
        "my-lora-000004.safetensors",
        "my-lora-000008.safetensors",
        "my-lora-000012.safetensors",
    ]
    assert state_folders(tree.output_dir) == []
    progress = run.progress()
    steps = [n for n, _ in progress]
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(33))
    assert {total for _, total in progress} == {32}
    assert "epoch 1/16" in run.stdout and "epoch 16/16" in run.stdout
    assert "model saved." in run.stderr
    assert "\n" not in run.stderr.split("steps:   0%")[1].split("32/32")[0]  # redrawn with \r only


def test_state_folders_are_written_in_accelerate_order(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """With --save_state, step, epoch and final states hold every file, train_state.json first."""
    tree = build_fluxgym_tree(
        tmp_path, extra_trainer_args="--save_state --save_every_n_steps 2 --max_train_epochs 5"
    )
    # FluxGym's --save_every_n_epochs 4 adds an epoch state after epoch 4 (never the last).
    run = launch(tree, SIM_SAVE_SECONDS="0.05")
    assert run.finish() == 0
    assert state_folders(tree.output_dir) == [
        "my-lora-000004-state",
        "my-lora-state",
        *(f"my-lora-step{step:08d}-state" for step in (2, 4, 6, 8, 10)),
    ]
    for folder in state_folders(tree.output_dir):
        mtimes = [
            (tree.output_dir / folder / name).stat().st_mtime_ns
            for name in STATE_FILES_IN_WRITE_ORDER
        ]
        assert mtimes == sorted(mtimes), folder
        assert mtimes[0] < mtimes[-1], folder
        check_safetensors_loadable(tree.output_dir / folder / "model.safetensors")
        check_torch_archive(tree.output_dir / folder / "optimizer.bin")

    def train_state(folder: str) -> str:
        return (tree.output_dir / folder / "train_state.json").read_text()

    assert train_state("my-lora-step00000004-state") == '{"current_epoch": 2, "current_step": 4}'
    assert train_state("my-lora-000004-state") == '{"current_epoch": 4, "current_step": 8}'


def test_save_last_n_steps_state_removes_older_step_states(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """--save_last_n_steps_state keeps only the step states of the last N steps, like sd-scripts."""
    extra = "--save_state --save_every_n_steps 1 --save_last_n_steps_state 2 --max_train_epochs 3"
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args=extra)
    assert run_to_end(launch, tree).process.returncode == 0
    step_states = [name for name in state_folders(tree.output_dir) if "-step" in name]
    assert step_states == [f"my-lora-step{step:08d}-state" for step in (4, 5, 6)]


def test_samples_are_written_every_n_steps(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """Sample images land in <output_dir>/sample named by step and prompt index."""
    tree = build_fluxgym_tree(
        tmp_path, extra_trainer_args="--sample_every_n_steps 2 --max_train_epochs 2"
    )
    assert run_to_end(launch, tree).process.returncode == 0
    samples = sorted(p.name for p in (tree.output_dir / "sample").iterdir())
    assert [name[: len("my-lora_000002_00")] for name in samples] == [
        "my-lora_000002_00",
        "my-lora_000004_00",
    ]
    assert all(re.fullmatch(r"my-lora_\d{6}_00_\d{14}\.png", name) for name in samples)


# --------------------------------------------------------------------------- resume


def test_resume_skips_finished_epochs_and_restarts_the_step_count(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """Resuming skips whole epochs, completes, and numbers steps from 0 again as sd-scripts does."""
    extra = "--save_state --save_every_n_steps 2 --max_train_epochs 4"
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args=extra)
    first = run_to_end(launch, tree, SIM_FAULTS=format_faults([Fault("crash", step=5, code=3)]))
    assert first.process.returncode == 3
    state = tree.output_dir / "my-lora-step00000004-state"
    build_fluxgym_tree(tmp_path, extra_trainer_args=f"{extra} --resume {state}")
    second = run_to_end(launch, tree)
    assert second.process.returncode == 0, second.stderr[-2000:]
    assert f"resuming from {state} (epoch 2, step 4)" in second.stdout
    assert "epoch 2/4" not in second.stdout and "epoch 3/4" in second.stdout
    assert second.progress()[-1] == (4, 8)  # the bar restarts at 0 and never reaches its total
    assert (state / "train_state.json").read_text() == '{"current_epoch": 4, "current_step": 4}'
    assert (tree.output_dir / "my-lora.safetensors").exists()


def test_resume_from_missing_folder_fails_like_accelerate(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """A wrong --resume path exits 1 with accelerate's 'Tried to find' error."""
    missing = tmp_path / "outputs" / "my-lora" / "my-lora-step00000100-state"
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args=f"--resume {missing}")
    run = run_to_end(launch, tree)
    assert run.process.returncode == 1
    assert f"ValueError: Tried to find {missing} but folder does not exist" in run.stderr
    assert "Traceback (most recent call last)" in run.stderr


@pytest.mark.parametrize(
    ("damaged_file", "damage", "error"),
    [
        ("optimizer.bin", "truncate", "failed finding central directory"),
        ("model.safetensors", "truncate", "MetadataIncompleteBuffer"),
        ("scheduler.bin", "delete", "FileNotFoundError"),
    ],
)
def test_resume_from_damaged_state_fails(
    tmp_path: Path, launch: Callable[..., TrainerRun], damaged_file: str, damage: str, error: str
) -> None:
    """A state folder with a missing or truncated required file makes the resume exit 1."""
    extra = "--save_state --save_every_n_steps 2 --max_train_epochs 2"
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args=extra)
    assert run_to_end(launch, tree).process.returncode == 0
    state = tree.output_dir / "my-lora-step00000002-state"
    target = state / damaged_file
    if damage == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:-10])
    build_fluxgym_tree(tmp_path, extra_trainer_args=f"{extra} --resume {state}")
    run = run_to_end(launch, tree)
    assert run.process.returncode == 1
    assert error in run.stderr


def test_resume_from_final_state_fails_the_step_assertion(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """Restarting a finished run from <name>-state fails sd-scripts' max_train_steps assertion."""
    extra = "--save_state --max_train_epochs 2"
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args=extra)
    assert run_to_end(launch, tree).process.returncode == 0
    build_fluxgym_tree(
        tmp_path, extra_trainer_args=f"{extra} --resume {tree.output_dir / 'my-lora-state'}"
    )
    run = run_to_end(launch, tree)
    assert run.process.returncode == 1
    assert "AssertionError: max_train_steps should be greater than initial step" in run.stderr


def test_epochs_to_skip_come_from_current_step() -> None:
    """Skipped epochs are current_step // steps_per_epoch, so a mid-epoch state redoes its epoch."""
    plan = TrainingPlan(steps_per_epoch=4, max_train_steps=64, num_train_epochs=16)
    args = argparse.Namespace(
        initial_epoch=None, initial_step=None, skip_until_initial_step=False, resume="x"
    )

    def position(steps_from_state: int | None) -> ResumePosition:
        return resume_position(args, steps_from_state, plan, lambda *_: None)

    assert position(None) == ResumePosition(0, 0, 4)
    assert position(8).epoch_to_start == 2
    assert position(10) == ResumePosition(2, 0, 4)  # initial_step 0: the partial epoch again
    with pytest.raises(AssertionError, match="max_train_steps should be greater than initial step"):
        position(64)


def test_stale_step_state_follows_sd_scripts_arithmetic() -> None:
    """The removed step state is the one just over N steps old, on the save cadence."""
    assert stale_step_state(6, keep_steps=2, every_n_steps=1) == 3
    assert stale_step_state(600, keep_steps=200, every_n_steps=100) == 300
    assert stale_step_state(2, keep_steps=2, every_n_steps=1) is None


# --------------------------------------------------------------------------- faults


def test_hang_idle_stops_progress_with_an_idle_cpu(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """hang_idle leaves a live trainer whose bar is frozen and whose CPU time does not grow."""
    tree = build_fluxgym_tree(tmp_path)
    gpu_file = tmp_path / "gpu-state"
    run = launch(tree, SIM_FAULTS="hang_idle@step=3", SIM_GPU_STATE_FILE=str(gpu_file))
    run.wait_for_step(3)
    children = psutil.Process(run.process.pid).children()
    assert len(children) == 1 and "flux_train_network.py" in " ".join(children[0].cmdline())
    before = run.cpu_seconds()
    time.sleep(0.6)
    assert run.process.poll() is None
    assert run.cpu_seconds() - before < 0.1
    assert run.progress()[-1] == (3, 32)
    # The trainer holds GPU memory as itself, and the stand-in frees it when it exits.
    assert gpu_file.read_text() == (
        f"util=0\npower_mw=30000\nprocs={children[0].pid}:{HELD_BYTES}\nfree_on_exit=1\n"
    )


def test_hang_busy_burns_cpu_and_reports_a_busy_gpu(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """hang_busy freezes progress while a CPU spins and the GPU reads 100% at low power."""
    tree = build_fluxgym_tree(tmp_path)
    gpu_file = tmp_path / "gpu-state"
    run = launch(tree, SIM_FAULTS="hang_busy@step=2", SIM_GPU_STATE_FILE=str(gpu_file))
    run.wait_for_step(2)
    run.wait_for(
        lambda: gpu_file.exists() and gpu_file.read_text().startswith("util=100\npower_mw=60000\n")
    )
    before = run.cpu_seconds()
    time.sleep(0.6)
    assert run.cpu_seconds() - before > 0.2
    assert run.progress()[-1] == (2, 32)


def test_gpu_state_file_follows_training_activity(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """SIM_GPU_STATE_FILE reads busy while steps run and idle after the trainer exits."""
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args="--max_train_epochs 4")
    gpu_file = tmp_path / "gpu-state"
    run = launch(tree, SIM_STEP_SECONDS="0.05", SIM_GPU_STATE_FILE=str(gpu_file))
    run.wait_for(
        lambda: gpu_file.exists() and gpu_file.read_text().startswith("util=97\npower_mw=250000\n")
    )
    assert run.finish() == 0
    assert gpu_file.read_text().startswith("util=0\npower_mw=30000\n")


def test_crash_exits_with_the_given_code(tmp_path: Path, launch: Callable[..., TrainerRun]) -> None:
    """A crash fault prints a traceback and train.sh exits with the fault's code."""
    tree = build_fluxgym_tree(tmp_path)
    run = run_to_end(launch, tree, SIM_FAULTS="crash@step=3:code=7")
    assert run.process.returncode == 7
    assert (
        "Traceback (most recent call last)" in run.stderr
        and "RuntimeError: CUDA error" in run.stderr
    )
    assert run.progress()[-1] == (3, 32)
    assert not (tree.output_dir / "my-lora.safetensors").exists()


def test_hang_in_save_leaves_a_half_written_state(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """hang_in_save stops after train_state.json and the weights, before optimizer.bin."""
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args="--save_state --save_every_n_steps 2")
    run = launch(tree, SIM_FAULTS="hang_in_save@save=2")
    folder = tree.output_dir / "my-lora-step00000004-state"
    run.wait_for(
        lambda: f"Model weights saved in {folder / 'model.safetensors'}" in unwrap(run.stderr)
    )
    time.sleep(0.2)
    assert run.process.poll() is None
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "train_state.json"]
    assert (tree.output_dir / "my-lora-step00000002-state" / "random_states_0.pkl").exists()


def test_once_fault_fires_only_in_the_first_run(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """A ':once' crash stops the first run; the rerun of the same script completes."""
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args="--max_train_epochs 2")
    faults = "crash@step=1:once"
    assert run_to_end(launch, tree, SIM_FAULTS=faults).process.returncode == 1
    assert run_to_end(launch, tree, SIM_FAULTS=faults).process.returncode == 0
    assert (tree.output_dir / ".simulator" / "runs").read_text() == "2\n"


def test_slow_start_delays_the_first_step(
    tmp_path: Path, launch: Callable[..., TrainerRun]
) -> None:
    """slow_start adds silent seconds before the progress bar appears."""
    tree = build_fluxgym_tree(tmp_path, extra_trainer_args="--max_train_epochs 1")
    started = time.monotonic()
    run = run_to_end(launch, tree, SIM_FAULTS="slow_start:seconds=0.5")
    assert run.process.returncode == 0
    assert time.monotonic() - started >= 0.5


# --------------------------------------------------------------------------- fault grammar


def test_faults_round_trip_through_the_spec_grammar() -> None:
    """Faults built in Python render to SIM_FAULTS text that parses back to the same faults."""
    faults = [
        Fault("hang_idle", step=3),
        Fault("crash", step=5, code=137, once=True),
        Fault("hang_in_save", save=2),
        Fault("slow_save", seconds=1.5),
        Fault("hang_busy", run=2),
        Fault("crash", save=1, run=3),
    ]
    text = format_faults(faults)
    assert text.split(";")[1] == "crash@step=5:code=137:once"
    assert parse_faults(text) == faults
    assert parse_faults(" hang_idle@step=3 ; ;") == [Fault("hang_idle", step=3)]


def test_fault_plan_picks_faults_for_this_run() -> None:
    """':once' and run=N decide which faults are armed; untriggered stops fire before step 1."""
    faults = parse_faults("crash:once;hang_idle@step=4:run=2;slow_start:seconds=2")
    first = FaultPlan.for_run(faults, 1)
    second = FaultPlan.for_run(faults, 2)
    assert first.after_step(0) == Fault("crash", once=True)
    assert second.after_step(0) is None and second.after_step(4) == Fault(
        "hang_idle", step=4, run=2
    )
    assert first.startup_delay() == second.startup_delay() == 2


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("crsh@step=1", "crsh"),
        ("crash@stp=1", "stp=1"),
        ("crash:code=x", "code='x'"),
        ("crash:code=300", "code=300"),
        ("hang_idle@step=-1", "step=-1"),
        ("hang_idle:bogus", "bogus"),
        ("slow_save", "needs seconds"),
        ("crash@step=1:save=2", "save=2"),
        ("slow_start@step=2:seconds=1", "slow_start"),
        ("hang_busy:code=3", "code="),
    ],
)
def test_bad_fault_specs_raise_value_error_naming_the_part(spec: str, named: str) -> None:
    """A malformed SIM_FAULTS entry raises ValueError that names what is wrong."""
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_fault(spec)


def test_trainer_refuses_bad_sim_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad SIM_FAULTS or SIM_* number makes the trainer exit 2 before training."""
    monkeypatch.setenv("SIM_FAULTS", "explode@step=1")
    assert trainer_main(["--output_dir", str(tmp_path)]) == 2
    assert "explode" in capsys.readouterr().err
    monkeypatch.setenv("SIM_FAULTS", "")
    monkeypatch.setenv("SIM_STEP_SECONDS", "fast")
    assert trainer_main(["--output_dir", str(tmp_path)]) == 2
    assert "SIM_STEP_SECONDS" in capsys.readouterr().err


# --------------------------------------------------------------------------- formats and shim


def test_progress_line_matches_tqdm() -> None:
    """The bar is drawn exactly as tqdm draws it into a pipe."""
    assert (
        format_progress(10, 30, 4.1, postfix="avr_loss=0.407")
        == "steps:  33%|███▎      | 10/30 [00:04<00:08,  2.44it/s, avr_loss=0.407]"
    )
    assert format_progress(0, 30, 0.0) == "steps:   0%|          | 0/30 [00:00<?, ?it/s]"
    assert format_progress(10, 30, 484.4).endswith("[08:04<16:08, 48.44s/it]")


def test_checkpoint_files_pass_and_fail_structural_checks(tmp_path: Path) -> None:
    """The simulator's files are real safetensors/zip layouts; truncation is detectable."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(safetensors_bytes({"ss_steps": "1"}))
    check_safetensors_loadable(model)
    model.write_bytes(model.read_bytes()[:-1])
    with pytest.raises(SafetensorError):
        check_safetensors_loadable(model)
    archive = tmp_path / "optimizer.bin"
    archive.write_bytes(torch_archive_bytes("optimizer", {"state": {}}))
    check_torch_archive(archive)
    archive.write_bytes(archive.read_bytes()[:-22])  # cut the end-of-central-directory record
    with pytest.raises(RuntimeError, match="central directory"):
        check_torch_archive(archive)


def test_accelerate_shim_skips_launcher_flags_and_execs_the_script() -> None:
    """The shim drops accelerate's own flags and execs python with the script and its flags."""
    calls: list[tuple[str, list[str]]] = []
    launcher_flags = ["--mixed_precision", "bf16", "--num_cpu_threads_per_process", "1"]
    launcher_flags += ["--multi_gpu", "--num_processes=1"]
    argv = ["launch", *launcher_flags, "sd-scripts/flux_train_network.py", "--save_state"]
    argv += ["--optimizer_args", "a=1", "b=2"]
    assert accelerate_main(argv, execute=lambda path, args: calls.append((path, args))) == 0
    ((path, args),) = calls
    assert args[0] == path
    assert args[1:] == [
        "sd-scripts/flux_train_network.py",
        "--save_state",
        "--optimizer_args",
        "a=1",
        "b=2",
    ]
    assert split_launch_arguments(["x.py"]) == ([], "x.py", [])


def test_accelerate_shim_rejects_other_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """Anything but 'accelerate launch ... script.py' is a usage error (exit 2)."""
    assert accelerate_main(["config"], execute=lambda *_: pytest.fail("must not exec")) == 2
    assert (
        accelerate_main(["launch", "--cpu"], execute=lambda *_: pytest.fail("must not exec")) == 2
    )
    assert "usage: accelerate launch" in capsys.readouterr().err
