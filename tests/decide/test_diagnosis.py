"""The hang classes from their evidence: stacks first, then the kernel's view, then the section."""

from __future__ import annotations

import pytest

from sidecar.decide.diagnosis import (
    MITIGATIONS,
    Evidence,
    HangClass,
    ProcessView,
    ThreadStack,
    ThreadView,
    diagnose,
)
from sidecar.decide.sections import Section

TRAINER = "python sd-scripts/flux_train_network.py --config x"


def stack(*frames: str, pid: int = 10, name: str = "MainThread", files=()) -> ThreadStack:
    return ThreadStack(
        pid=pid, thread=str(pid), name=name, active=False, frames=frames, files=files
    )


def process(pid: int, *threads: ThreadView, ppid: int = 1, state="sleeping", cmd=TRAINER):
    return ProcessView(pid=pid, ppid=ppid, name="python", cmdline=cmd, state=state, threads=threads)


def asleep(tid: int, wchan: str = "futex_wait_queue", cpu: float = 0.0) -> ThreadView:
    return ThreadView(tid=tid, name="python", state="S", wchan=wchan, cpu_share=cpu)


DATALOADER = (
    "Condition.wait",
    "Queue.get",
    "_MultiProcessingDataLoaderIter._try_get_data",
    "_MultiProcessingDataLoaderIter._get_data",
    "_MultiProcessingDataLoaderIter._next_data",
    "_BaseDataLoaderIter.__next__",
    "NetworkTrainer.train",
)
BLOCK_SWAP = ("Future.result", "ModelOffloader._wait_blocks_move", "ModelOffloader.wait_for_block")
COLLECTIVE = ("Work.wait", "all_reduce", "wrapper", "Accelerator.backward")
SAMPLING = ("Tensor.to", "sample_image_inference", "sample_images", "NetworkTrainer.train")
SAVING = ("save_file", "Accelerator.save_state", "save_and_remove_state_stepwise")


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (DATALOADER, HangClass.DATALOADER_WAIT),
        (BLOCK_SWAP, HangClass.CUDA_SYNC),
        (("synchronize", "swap_weight_devices_cuda", "move_blocks"), HangClass.CUDA_SYNC),
        (COLLECTIVE, HangClass.COLLECTIVE_WAIT),
        (SAMPLING, HangClass.SAMPLING),
        (SAVING, HangClass.SAVING),
    ],
)
def test_a_stack_names_the_mechanism(frames, expected):
    seen = Evidence(
        section=Section.TRAINING,
        processes=(process(10, asleep(10)),),
        stack_samples=((stack(*frames),), (stack(*frames),)),
    )
    diagnosis = diagnose(seen)
    assert diagnosis.kind is expected
    assert diagnosis.basis == "stacks"
    assert diagnosis.stacks_unchanged is True
    assert any(frame.rsplit(".", 1)[-1] in diagnosis.evidence[0] for frame in frames)


def test_a_mechanism_beats_the_place_it_happens_in():
    """Block swapping during sampling is a CUDA synchronisation: its remedy is fewer blocks."""
    frames = (*BLOCK_SWAP, "sample_image_inference", "sample_images")
    seen = Evidence(section=Section.SAMPLING, stack_samples=((stack(*frames),),))
    assert diagnose(seen).kind is HangClass.CUDA_SYNC


def test_stacks_that_moved_between_samples_say_so():
    seen = Evidence(stack_samples=((stack(*DATALOADER),), (stack("step", "train"),)))
    diagnosis = diagnose(seen)
    assert diagnosis.stacks_unchanged is False
    assert diagnosis.kind is HangClass.UNKNOWN


def test_a_lost_gpu_comes_first():
    seen = Evidence(gpu_error="GPU is lost", stack_samples=((stack(*DATALOADER),),))
    diagnosis = diagnose(seen)
    assert diagnosis.kind is HangClass.GPU_LOST
    assert "GPU is lost" in diagnosis.evidence[0]


def test_a_thread_in_uninterruptible_sleep():
    stuck = ThreadView(tid=11, name="python", state="D", wchan="nfs_wait_bit_killable")
    seen = Evidence(processes=(process(10, asleep(10), stuck),))
    diagnosis = diagnose(seen)
    assert diagnosis.kind is HangClass.UNINTERRUPTIBLE_IO
    assert "nfs_wait_bit_killable" in diagnosis.evidence[0] and "11" in diagnosis.evidence[0]


def test_a_stopped_trainer():
    stopped = process(10, ThreadView(tid=10, name="python", state="T", wchan="do_signal_stop"))
    seen = Evidence(processes=(stopped.__class__(**{**stopped.__dict__, "state": "stopped"}),))
    assert diagnose(seen).kind is HangClass.PROCESS_STOPPED


def test_without_stacks_the_section_places_the_hang():
    for section, expected in (
        (Section.SAMPLING, HangClass.SAMPLING),
        (Section.SAVING, HangClass.SAVING),
    ):
        seen = Evidence(section=section, stacks_missing="py-spy is not installed")
        diagnosis = diagnose(seen)
        assert diagnosis.kind is expected and diagnosis.basis == "section"
        assert "py-spy is not installed" in diagnosis.notes[0]


def test_without_stacks_a_main_thread_asleep_on_sleeping_workers_is_a_dataloader_wait():
    main = process(10, asleep(10, "pipe_read"), asleep(12))
    workers = [process(20 + i, asleep(20 + i, "futex_wait_queue"), ppid=10) for i in range(2)]
    seen = Evidence(section=Section.TRAINING, processes=(main, *workers), stacks_missing="x")
    diagnosis = diagnose(seen)
    assert diagnosis.kind is HangClass.DATALOADER_WAIT and diagnosis.basis == "kernel"
    assert "20, 21" in diagnosis.evidence[1]


def test_a_launcher_waiting_for_its_trainer_is_not_a_dataloader():
    """accelerate launch's python waits for its child in do_wait: that is no worker queue."""
    launcher = process(10, asleep(10, "do_wait"), cmd="python -m accelerate.commands.launch")
    trainer = process(20, asleep(20, "hrtimer_nanosleep"), ppid=10)
    seen = Evidence(processes=(launcher, trainer), stacks_missing="x")
    assert diagnose(seen).kind is HangClass.UNKNOWN


@pytest.mark.parametrize(
    ("ranks", "expected"), [(1, HangClass.CUDA_SYNC), (4, HangClass.COLLECTIVE_WAIT)]
)
def test_without_stacks_a_spinning_thread_with_the_gpu_busy(ranks, expected):
    spinning = ThreadView(tid=10, name="python", state="R", wchan="0", cpu_share=0.98)
    seen = Evidence(
        processes=(process(10, spinning),), gpu_busy=True, ranks=ranks, stacks_missing="x"
    )
    diagnosis = diagnose(seen)
    assert diagnosis.kind is expected
    assert "98%" in diagnosis.evidence[0]


def test_a_spinning_thread_with_an_idle_gpu_is_not_guessed():
    spinning = ThreadView(tid=10, name="python", state="R", wchan="0", cpu_share=0.98)
    seen = Evidence(processes=(process(10, spinning),), gpu_busy=False, stacks_missing="x")
    assert diagnose(seen).kind is HangClass.UNKNOWN


def test_the_flight_recorder_names_a_collective_wait():
    summary = "ranks 1 behind: last completed collective #41 (nccl:all_reduce) vs #42 on ranks 0"
    diagnosis = diagnose(Evidence(flight_recorder=summary, stacks_missing="x"))
    assert diagnosis.kind is HangClass.COLLECTIVE_WAIT and diagnosis.basis == "flight recorder"
    assert any("flight recorder" in note for note in diagnosis.notes)


def test_nothing_known_is_unknown_with_a_summary():
    diagnosis = diagnose(Evidence(section=Section.TRAINING, processes=(process(10, asleep(10)),)))
    assert diagnosis.kind is HangClass.UNKNOWN and diagnosis.basis == "none"
    assert "1 trainer processes" in diagnosis.evidence[0]
    assert diagnosis.mitigation is None


def test_figures_carry_the_class_and_its_evidence():
    figures = diagnose(Evidence(stack_samples=((stack(*DATALOADER),),))).figures()
    assert figures["diagnosis"] == "dataloader_wait"
    assert figures["diagnosis_basis"] == "stacks"
    assert figures["diagnosis_evidence"]


def test_every_class_but_unknown_has_a_mitigation():
    assert set(MITIGATIONS) == set(HangClass) - {HangClass.UNKNOWN}


def test_only_the_threads_that_showed_the_class_decide_whether_it_moves():
    """A hung sampling stays hung when a tqdm thread's stack moves beside it."""
    sampling = stack(*SAMPLING, pid=10, name="MainThread")
    monitor_a = ThreadStack(10, "11", "tqdm", True, ("wait", "run"))
    monitor_b = ThreadStack(10, "11", "tqdm", True, ("sleep", "run"))
    seen = Evidence(stack_samples=((sampling, monitor_a), (sampling, monitor_b)))
    diagnosis = diagnose(seen)
    assert diagnosis.kind is HangClass.SAMPLING
    assert diagnosis.stacks_unchanged is True
    moved = Evidence(stack_samples=((sampling,), (stack("denoise", *SAMPLING, pid=10),)))
    assert diagnose(moved).stacks_unchanged is False


def test_several_ranks_are_noted():
    diagnosis = diagnose(Evidence(ranks=4, stacks_missing="x"))
    assert "4 ranks launched" in diagnosis.notes
