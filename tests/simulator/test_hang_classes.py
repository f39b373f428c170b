"""The simulator's hang classes look, from outside, like the real hangs they stand for.

Each test starts the real ``bash train.sh`` of a FluxGym-shaped tree with one fault, waits
until the trainer hangs, and checks what a sidecar can see: the process states in
``/proc``, the trainer's children, the GPU state file and ``py-spy dump``'s frames. Then it
ends the tree the way the sidecar does (``terminate_tree``) and checks nothing is left.

py-spy's default (blocking) dump pauses the target with ptrace: on a process in state D it
never returns, and on one in state T it fails ("Failed to suspend process"). Those two
hangs are therefore read with ``--nonblocking``; the others as the sidecar reads them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from dstate.build import DSTATE_LIBRARY_VARIABLE, CompilerMissing, build_dstate_library
from nvml_stub.build import STATE_FILE_VARIABLE, build_fake_nvml
from nvml_stub.build import CompilerMissing as NvmlCompilerMissing

from sidecar.observe.process_tree import terminate_tree, tree_of
from sidecar.simulator import Fault, FluxgymTree, build_fluxgym_tree, format_faults
from sidecar.simulator.faults import FaultPlan, parse_fault
from sidecar.simulator.gpu_state import HELD_BYTES

PY_SPY = Path(sys.executable).parent / "py-spy"
FAST = {
    "SIM_STEPS_PER_EPOCH": "2",
    "SIM_STEP_SECONDS": "0.01",
    "SIM_STARTUP_SECONDS": "0",
    "SIM_SAVE_SECONDS": "0",
    "SIM_SAMPLE_SECONDS": "0.01",
}
TOTAL_STEPS = 32  # FluxGym's default script: 16 epochs of SIM_STEPS_PER_EPOCH steps

needs_py_spy = pytest.mark.skipif(
    not os.access(PY_SPY, os.X_OK), reason=f"py-spy is not installed beside {sys.executable}"
)


# --------------------------------------------------------------------------- helpers


@dataclass
class Thread:
    name: str
    frames: list[str]  # function names, outermost first, class prefix dropped


def py_spy_threads(pid: int, *, nonblocking: bool = False) -> list[Thread]:
    """The threads of one ``py-spy dump``; [] when py-spy could not read the process."""
    command = [str(PY_SPY), "dump", "--pid", str(pid), *(["--nonblocking"] if nonblocking else [])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return []
    threads: list[Thread] = []
    for line in result.stdout.splitlines():
        header = re.match(r'^Thread \S+ \([^)]*\): "(.*)"', line)
        frame = re.match(r"^\s+(\S+) \(", line)
        if header:
            threads.append(Thread(header[1], []))
        elif frame and threads:
            threads[-1].frames.insert(0, frame[1].rsplit(".", 1)[-1])
    return threads


def calls_in_order(frames: Sequence[str], names: Sequence[str]) -> bool:
    """Whether ``names`` appear among ``frames`` (outermost first) in this order."""
    remaining = iter(frames)
    return all(name in remaining for name in names)


def proc_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (R, S, D, T, Z...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def in_vfork_wait(process: psutil.Process) -> bool:
    """In state D with its vfork child alive: the hang, not a brief block on disk I/O."""
    return proc_state(process.pid) == "D" and bool(process.children())


class Trainer:
    """A running ``bash train.sh`` with its output in a file, ended by ``terminate_tree``."""

    def __init__(self, tree: FluxgymTree, log: Path, environment: dict[str, str]) -> None:
        self.tree = tree
        self.log = log
        with log.open("wb") as sink:
            self.shell = subprocess.Popen(
                tree.command,
                cwd=tree.root,
                env=environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def python(self) -> psutil.Process:
        """The trainer's python (the accelerate stand-in execs it under bash)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(self.shell.pid).children()
                if children:
                    return children[0]
            if self.shell.poll() is not None:
                raise AssertionError(f"train.sh exited {self.shell.returncode}: {self.output}")
            time.sleep(0.02)
        raise AssertionError(f"no trainer process under train.sh: {self.output}")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; output tail:\n{self.output}")
            time.sleep(0.05)

    def wait_for_thread(
        self, pid: int, *chains: Sequence[str], nonblocking: bool = False
    ) -> list[Thread]:
        """py-spy the process until each chain of names is shown, in order, by one of its
        threads in the same dump; returns that dump's threads."""
        found: list[Thread] = []

        def shows() -> bool:
            nonlocal found
            found = py_spy_threads(pid, nonblocking=nonblocking)
            return all(
                any(calls_in_order(thread.frames, chain) for thread in found) for chain in chains
            )

        described = "; ".join(" -> ".join(chain) for chain in chains)
        self.wait_for(shows, f"threads of {pid} in {described}")
        return found

    def leftovers(self) -> list[psutil.Process]:
        """Live processes still running this tree's trainer (workers, vfork children...)."""
        left = []
        for process in psutil.process_iter(["cmdline", "status"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if str(self.tree.root) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(process)
        return left

    def end(self) -> None:
        """Stop the whole tree as the sidecar does and check that nothing survives."""
        survivors = terminate_tree(tree_of(self.shell.pid), grace=1.0)
        assert survivors == []
        self.shell.wait(10)
        self.wait_for(lambda: not self.leftovers(), "the tree's processes to be gone", 5)

    def kill(self) -> None:
        for process in [*tree_of(self.shell.pid), *self.leftovers()]:
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.shell.wait(5)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Trainer]]:
    """Start train.sh with faults; anything still running at the end of the test is killed."""
    started: list[Trainer] = []

    def launch(faults: str, *, extra_args: str = "", **environment: str) -> Trainer:
        tree = build_fluxgym_tree(
            tmp_path / f"fluxgym{len(started)}", extra_trainer_args=extra_args
        )
        variables = {**FAST, "SIM_FAULTS": faults, **environment}
        trainer = Trainer(tree, tmp_path / f"train{len(started)}.log", tree.env(variables))
        started.append(trainer)
        return trainer

    yield launch
    for trainer in started:
        trainer.kill()


@pytest.fixture(scope="module")
def dstate_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_dstate_library(tmp_path_factory.mktemp("dstate"))
    except CompilerMissing as error:
        pytest.skip(str(error))


def gpu_state(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return dict(line.split("=", 1) for line in lines if "=" in line)


# --------------------------------------------------------------------------- the grammar


def test_new_kinds_round_trip_and_reject_what_cannot_happen() -> None:
    """New kinds parse and render back; endless hangs refuse seconds=, samples refuse save=."""
    faults = [
        Fault("hang_dataloader", step=5, seconds=1.5),
        Fault("hang_cuda_sync", save=2, once=True),
        Fault("hang_dstate", step=3),
        Fault("hang_stopped", run=2),
        Fault("hang_in_sample", step=10, seconds=0.5),
        Fault("gpu_lost", save=1),
    ]
    assert [parse_fault(fault.to_spec()) for fault in faults] == faults
    assert format_faults(faults).startswith("hang_dataloader@step=5:seconds=1.5;")
    for kind in ("hang_dstate", "hang_stopped", "gpu_lost"):
        with pytest.raises(ValueError, match=f"seconds= does not apply to {kind}: it lasts"):
            parse_fault(f"{kind}@step=1:seconds=3")
    with pytest.raises(ValueError, match="hang_in_sample is triggered by step=N"):
        parse_fault("hang_in_sample@save=1")
    with pytest.raises(ValueError, match="unknown kind 'hang_nccl'"):
        parse_fault("hang_nccl")


def test_plan_places_the_new_hangs() -> None:
    """Step/save hangs fire like hang_idle; a sampling hang is armed from its step on."""
    plan = FaultPlan((Fault("hang_cuda_sync", step=4), Fault("hang_in_sample", step=6)))
    assert plan.after_step(4) == Fault("hang_cuda_sync", step=4)
    assert plan.after_step(6) is None  # hang_in_sample never fires between steps
    assert plan.in_sampling(4) is None
    assert plan.in_sampling(6) == plan.in_sampling(8) == Fault("hang_in_sample", step=6)
    assert FaultPlan((Fault("gpu_lost", save=2),)).after_save(2) == Fault("gpu_lost", save=2)
    assert FaultPlan((Fault("hang_in_sample"),)).in_sampling(0) == Fault("hang_in_sample")
    assert plan.has("hang_cuda_sync") and not plan.has("hang_dataloader")


# --------------------------------------------------------------------------- hangs


@needs_py_spy
def test_dataloader_hang_has_sleeping_workers_and_torch_frames(
    start: Callable[..., Trainer], tmp_path: Path
) -> None:
    """The main thread waits in torch's DataLoader chain; two worker children sleep."""
    state_file = tmp_path / "gpu-state"
    trainer = start("hang_dataloader@step=1", SIM_GPU_STATE_FILE=str(state_file))
    python = trainer.python()
    threads = trainer.wait_for_thread(
        python.pid, ["__next__", "_next_data", "_get_data", "_try_get_data", "get"]
    )
    main = next(thread for thread in threads if thread.name == "MainThread")
    assert calls_in_order(main.frames, ["_try_get_data", "get", "poll", "wait", "select"])
    workers = python.children()
    assert len(workers) == 2
    assert {proc_state(worker.pid) for worker in workers} == {"S"}

    def stalled_workers() -> list[psutil.Process]:
        return [
            worker
            for worker in workers
            if any(
                calls_in_order(thread.frames, ["_worker_loop", "fetch", "__getitem__"])
                for thread in py_spy_threads(worker.pid)
            )
        ]

    # One worker fetches the batch and never returns; the other waits for an index.
    trainer.wait_for(lambda: len(stalled_workers()) == 1, "one worker stuck in __getitem__")
    assert proc_state(python.pid) == "S"
    assert gpu_state(state_file)["util"] == "0"
    assert "2/32" not in trainer.output  # stuck before step 2
    trainer.end()


@pytest.mark.slow
@needs_py_spy
def test_dataloader_hang_ends_like_torch_when_the_worker_dies(
    start: Callable[..., Trainer],
) -> None:
    """Killing the stalled worker makes the trainer fail with torch's worker-exit error."""
    trainer = start("hang_dataloader@step=1")
    python = trainer.python()
    trainer.wait_for_thread(python.pid, ["__next__", "_get_data"])
    stalled = next(
        worker
        for worker in python.children()
        if any("__getitem__" in thread.frames for thread in py_spy_threads(worker.pid))
    )
    stalled.kill()
    # torch notices at its next five-second queue timeout (MP_STATUS_CHECK_INTERVAL).
    assert trainer.shell.wait(15) == 1
    expected = f"RuntimeError: DataLoader worker (pid(s) {stalled.pid}) exited unexpectedly"
    assert expected in trainer.output
    trainer.wait_for(lambda: not trainer.leftovers(), "the other worker to end", 10)


@needs_py_spy
def test_cuda_sync_hang_waits_on_the_offloader_thread(
    start: Callable[..., Trainer], tmp_path: Path
) -> None:
    """Main thread in wait_for_block -> result; the offloader thread spins in synchronize."""
    state_file = tmp_path / "gpu-state"
    trainer = start("hang_cuda_sync@step=1", SIM_GPU_STATE_FILE=str(state_file))
    python = trainer.python()
    threads = trainer.wait_for_thread(
        python.pid,
        ["forward", "wait_for_block", "_wait_blocks_move", "result"],
        ["move_blocks", "swap_weight_devices", "swap_weight_devices_cuda", "synchronize"],
    )
    main = next(thread for thread in threads if thread.name == "MainThread")
    assert calls_in_order(main.frames, ["wait_for_block", "_wait_blocks_move", "result"])
    offloader = next(thread for thread in threads if thread.name.startswith("ThreadPoolExecutor"))
    assert offloader.frames[-1] == "synchronize"
    assert gpu_state(state_file)["util"] == "100"
    trainer.end()


@needs_py_spy
def test_busy_hang_spins_in_all_reduce_wait(start: Callable[..., Trainer], tmp_path: Path) -> None:
    """hang_busy spins in all_reduce -> wait, the GPU 100% busy at low power."""
    state_file = tmp_path / "gpu-state"
    trainer = start("hang_busy@step=1", SIM_GPU_STATE_FILE=str(state_file))
    python = trainer.python()
    threads = trainer.wait_for_thread(python.pid, ["all_reduce", "wait"])
    assert threads[0].frames[-2:] == ["all_reduce", "wait"]
    assert gpu_state(state_file) == {
        "util": "100",
        "power_mw": "60000",
        "procs": f"{python.pid}:{HELD_BYTES}",
        "free_on_exit": "1",
    }
    trainer.end()


@needs_py_spy
def test_dstate_hang_sits_in_d_with_a_vfork_child(
    start: Callable[..., Trainer], dstate_library: Path
) -> None:
    """The trainer is in state D inside hang_in_vfork; its vfork child sleeps; both end."""
    trainer = start("hang_dstate@step=1", **{DSTATE_LIBRARY_VARIABLE: str(dstate_library)})
    python = trainer.python()
    trainer.wait_for(lambda: in_vfork_wait(python), "state D in vfork")
    # The vfork wait (older kernels name the function _do_fork or do_fork).
    assert Path(f"/proc/{python.pid}/wchan").read_text() in {"kernel_clone", "_do_fork", "do_fork"}
    (child,) = python.children()
    assert proc_state(child.pid) == "S"
    threads = trainer.wait_for_thread(python.pid, ["suffer", "hang_in_vfork"], nonblocking=True)
    assert threads[0].frames[-1] == "hang_in_vfork"
    trainer.end()


def test_dstate_child_dies_with_the_trainer(
    start: Callable[..., Trainer], dstate_library: Path
) -> None:
    """SIGKILL to the trainer alone also ends its vfork child (it asked for PDEATHSIG)."""
    trainer = start("hang_dstate@step=1", **{DSTATE_LIBRARY_VARIABLE: str(dstate_library)})
    python = trainer.python()
    trainer.wait_for(lambda: in_vfork_wait(python), "state D in vfork")
    (child,) = python.children()
    python.kill()
    assert trainer.shell.wait(10) == 128 + signal.SIGKILL
    trainer.wait_for(lambda: not psutil.pid_exists(child.pid) or _zombie(child), "child gone", 5)
    assert trainer.leftovers() == []


def _zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_dstate_without_its_library_fails_before_the_first_step(
    start: Callable[..., Trainer],
) -> None:
    """Without SIM_DSTATE_LIBRARY the trainer exits 1 at start, naming the variable."""
    trainer = start("hang_dstate@step=3", **{DSTATE_LIBRARY_VARIABLE: ""})  # empty = unset
    assert trainer.shell.wait(15) == 1
    assert "FaultSetupError: hang_dstate needs SIM_DSTATE_LIBRARY" in trainer.output
    assert "1/32" not in trainer.output


@needs_py_spy
def test_stopped_hang_is_in_state_t_and_resumes_on_sigcont(
    start: Callable[..., Trainer],
) -> None:
    """The trainer stops itself (state T, bash keeps waiting); SIGCONT lets it finish."""
    trainer = start("hang_stopped@step=1")
    python = trainer.python()
    trainer.wait_for(lambda: proc_state(python.pid) == "T", "state T")
    assert trainer.shell.poll() is None and proc_state(trainer.shell.pid) == "S"
    threads = trainer.wait_for_thread(python.pid, ["suffer", "stop_self"], nonblocking=True)
    assert threads[0].frames[-1] == "stop_self"
    python.send_signal(signal.SIGCONT)
    assert trainer.shell.wait(20) == 0
    assert f"{TOTAL_STEPS}/{TOTAL_STEPS}" in trainer.output


@needs_py_spy
def test_stopped_hang_ends_with_the_tree(start: Callable[..., Trainer]) -> None:
    """A stopped trainer still ends when the sidecar stops the tree (SIGKILL after grace)."""
    trainer = start("hang_stopped@step=1")
    python = trainer.python()
    trainer.wait_for(lambda: proc_state(python.pid) == "T", "state T")
    trainer.end()


@needs_py_spy
def test_sample_hang_is_in_sample_image_inference(
    start: Callable[..., Trainer], tmp_path: Path
) -> None:
    """After sampling's log line the trainer hangs in flux_train_utils' frames, GPU busy."""
    state_file = tmp_path / "gpu-state"
    trainer = start(
        "hang_in_sample@step=3",
        extra_args="--sample_every_n_steps 2",
        SIM_GPU_STATE_FILE=str(state_file),
    )
    python = trainer.python()
    trainer.wait_for_thread(python.pid, ["sample_images", "sample_image_inference", "denoise"])
    assert "サンプル画像生成 ステップ: 4" in trainer.output  # the first sampling at step >= 3
    assert "サンプル画像生成 ステップ: 2" in trainer.output
    assert gpu_state(state_file)["util"] == "97"
    assert len(list((trainer.tree.output_dir / "sample").glob("*.png"))) == 1  # step 2's only
    trainer.end()


@needs_py_spy
def test_hang_in_save_shows_save_state_and_hang_after_save_does_not(
    start: Callable[..., Trainer],
) -> None:
    """A hang inside a step save is in save_and_remove_state_stepwise -> save_state."""
    extra = "--save_state --save_every_n_steps 2"
    inside = start("hang_in_save@save=1", extra_args=extra)
    python = inside.python()
    inside.wait_for_thread(python.pid, ["save_and_remove_state_stepwise", "save_state", "suffer"])
    inside.end()
    after = start("hang_idle@save=1", extra_args=extra)
    python = after.python()
    threads = after.wait_for_thread(python.pid, ["save_and_remove_state_stepwise", "suffer"])
    assert "save_state" not in threads[0].frames


def test_gpu_lost_tells_the_stand_in_nvml(start: Callable[..., Trainer], tmp_path: Path) -> None:
    """gpu_lost adds error=gpu_lost to the state file; real pynvml on the stub sees a lost GPU."""
    state_file = tmp_path / "gpu-state"
    trainer = start("gpu_lost@step=2", SIM_GPU_STATE_FILE=str(state_file))
    trainer.wait_for(lambda: gpu_state(state_file).get("error") == "gpu_lost", "error=gpu_lost")
    python = trainer.python()
    assert gpu_state(state_file) == {
        "util": "0",
        "power_mw": "30000",
        "procs": f"{python.pid}:{HELD_BYTES}",
        "free_on_exit": "1",
        "error": "gpu_lost",
    }
    assert proc_state(python.pid) == "S"
    try:
        library = build_fake_nvml(tmp_path / "nvml")
    except NvmlCompilerMissing as error:
        pytest.skip(str(error))
    probe = (
        "import pynvml\n"
        "pynvml.nvmlInit()\n"
        "try:\n"
        "    handle = pynvml.nvmlDeviceGetHandleByIndex(0)\n"
        "    pynvml.nvmlDeviceGetUtilizationRates(handle)\n"
        "except pynvml.NVMLError_GpuIsLost:\n"
        "    print('lost')\n"
    )
    environment = {
        **os.environ,
        "LD_LIBRARY_PATH": str(library.parent),
        STATE_FILE_VARIABLE: str(state_file),
    }
    answer = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=30
    )
    assert answer.stdout.strip() == "lost", answer.stderr
    trainer.end()


@pytest.mark.parametrize(
    ("faults", "extra_args"),
    [
        ("hang_dataloader@step=3:seconds=0.5", ""),
        ("hang_cuda_sync@step=3:seconds=0.3", ""),
        ("hang_in_sample@step=3:seconds=0.3", "--sample_every_n_steps 4"),
    ],
)
def test_transient_hangs_end_and_training_finishes(
    start: Callable[..., Trainer], faults: str, extra_args: str
) -> None:
    """With seconds= the stall passes, training completes and no worker is left behind."""
    trainer = start(faults, extra_args=extra_args)
    assert trainer.shell.wait(30) == 0, trainer.output
    assert f"{TOTAL_STEPS}/{TOTAL_STEPS}" in trainer.output
    assert (trainer.tree.output_dir / "my-lora.safetensors").exists()
    trainer.wait_for(lambda: not trainer.leftovers(), "no process left", 5)
