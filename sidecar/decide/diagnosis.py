"""What kind of hang a stall is, from the section, the threads' kernel states and the stacks.

Pure: the evidence is gathered elsewhere (``observe/hang_evidence``) and handed in. The
classes name a mechanism where the evidence shows one (a dataloader wait, a CUDA
synchronisation, a collective, uninterruptible I/O, a stopped process, a lost GPU) and
otherwise the place (sampling, a save), so that a repeat can be told with its known
mitigation. Stacks are the strongest evidence; without them (py-spy missing, or no ptrace
rights) the kernel's view and the section still classify most hangs, and the diagnosis says
that it was inferred.

The frame names are upstream's:

- torch ``utils/data/dataloader.py``: ``_MultiProcessingDataLoaderIter._next_data`` ->
  ``_get_data`` -> ``_try_get_data`` (the main thread waiting on the workers' queue);
- sd-scripts ``library/custom_offloading_utils.py`` (block swapping): ``_wait_blocks_move``
  waits on the single worker's ``future.result()`` while the worker runs
  ``swap_weight_devices_cuda`` and its stream ``synchronize`` calls;
- torch ``distributed/distributed_c10d.py``: ``all_reduce``, ``barrier``, ... and ``wait``;
- sd-scripts ``library/flux_train_utils.py``: ``sample_images`` -> ``sample_image_inference``;
- accelerate ``Accelerator.save_state`` and sd-scripts ``train_util.save_and_remove_state_*``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from sidecar.decide.sections import Section


class HangClass(StrEnum):
    DATALOADER_WAIT = "dataloader_wait"
    CUDA_SYNC = "cuda_sync"
    COLLECTIVE_WAIT = "collective_wait"
    UNINTERRUPTIBLE_IO = "uninterruptible_io"
    PROCESS_STOPPED = "process_stopped"
    SAMPLING = "hang_in_sampling"
    SAVING = "hang_in_save"
    GPU_LOST = "gpu_lost"
    UNKNOWN = "unknown"


# What each class means, for a person reading the stall_detected line or the page.
DESCRIPTIONS: dict[HangClass, str] = {
    HangClass.DATALOADER_WAIT: "the training loop waits for a dataloader worker that sends nothing",
    HangClass.CUDA_SYNC: "a CUDA synchronisation never returns (block swapping's weight moves)",
    HangClass.COLLECTIVE_WAIT: "a collective between ranks (NCCL) never completes",
    HangClass.UNINTERRUPTIBLE_IO: "a trainer thread is stuck in uninterruptible I/O (state D)",
    HangClass.PROCESS_STOPPED: "the trainer process is stopped (SIGSTOP, a debugger, a freezer)",
    HangClass.SAMPLING: "the hang is in sample image generation",
    HangClass.SAVING: "the hang is in a state or model save",
    HangClass.GPU_LOST: "the GPU is lost (NVML cannot reach it)",
    HangClass.UNKNOWN: "no known hang shape matches the evidence",
}

# Known mitigations, told when the same class comes back from the same checkpoint.
MITIGATIONS: dict[HangClass, str] = {
    HangClass.DATALOADER_WAIT: (
        "load data in the main process: --max_data_loader_n_workers 0 "
        "(and drop --persistent_data_loader_workers)"
    ),
    HangClass.CUDA_SYNC: "swap fewer blocks: lower --blocks_to_swap, or turn block swapping off",
    HangClass.COLLECTIVE_WAIT: (
        "read the NCCL flight recorder dumps in the incident bundle for the rank that is behind; "
        "check the interconnect (NCCL_P2P_DISABLE=1 rules out peer-to-peer transfers)"
    ),
    HangClass.UNINTERRUPTIBLE_IO: (
        "the storage the trainer reads or writes stops answering: check the volume (network "
        "file system, a full or failing disk)"
    ),
    HangClass.PROCESS_STOPPED: (
        "find what stops the trainer (a debugger, a cgroup freezer, SIGSTOP)"
    ),
    HangClass.SAMPLING: "sample less often (--sample_every_n_steps/epochs) or not at all",
    HangClass.SAVING: "save state less often, or to a faster local disk",
    HangClass.GPU_LOST: "the GPU needs a reset or the machine a reboot",
}

_DATALOADER_FRAMES = frozenset({"_next_data", "_get_data", "_try_get_data"})
_CUDA_SYNC_FRAMES = frozenset(
    {"swap_weight_devices_cuda", "swap_weight_devices", "_wait_blocks_move", "wait_for_block"}
)
_COLLECTIVE_FRAMES = frozenset(
    {
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_to_all",
        "barrier",
        "broadcast",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "monitored_barrier",
    }
)
_SAMPLING_FRAMES = frozenset({"sample_images", "sample_image_inference", "sample_images_common"})
_SAVING_FRAMES = frozenset(
    {
        "save_state",
        "save_and_remove_state_stepwise",
        "save_and_remove_state_on_epoch_end",
        "save_state_on_train_end",
        "save_model",
    }
)
# The classes stacks show, in the order they are looked for: mechanisms before places.
_FRAMES = {
    HangClass.CUDA_SYNC: _CUDA_SYNC_FRAMES,
    HangClass.COLLECTIVE_WAIT: _COLLECTIVE_FRAMES,
    HangClass.DATALOADER_WAIT: _DATALOADER_FRAMES,
    HangClass.SAMPLING: _SAMPLING_FRAMES,
    HangClass.SAVING: _SAVING_FRAMES,
}
# Kernel wait channels of a thread asleep on another process: a pipe, a futex, a poll.
_WAITING_CHANNELS = ("pipe", "futex", "poll", "select", "sk_wait", "unix_stream")
# (not do_wait: a launcher waiting for its child to exit, as accelerate launch does)
_SPINNING_SHARE = 0.5  # of one CPU over the sampling window: a thread busy-waiting


def is_python(cmdline: str, name: str) -> bool:
    """A Python process, by its executable's name (python, python3.11) or its own name."""
    first = cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]
    return "python" in first or "python" in name


@dataclass(frozen=True)
class ThreadView:
    tid: int
    name: str | None
    state: str | None  # /proc's one-letter state: R, S, D, T, t, Z, ...
    wchan: str | None
    cpu_share: float | None = None  # CPU used over the sampling window, in CPUs (1.0 = one)


@dataclass(frozen=True)
class ProcessView:
    pid: int
    ppid: int | None
    name: str
    cmdline: str
    state: str | None  # psutil's status word: running, sleeping, disk-sleep, stopped, ...
    threads: tuple[ThreadView, ...] = ()

    @property
    def is_python(self) -> bool:
        return is_python(self.cmdline, self.name)


@dataclass(frozen=True)
class ThreadStack:
    """One thread in one py-spy dump, its frames' function names innermost first."""

    pid: int
    thread: str  # py-spy's thread id as printed
    name: str | None
    active: bool
    frames: tuple[str, ...]  # "Queue.get", "_try_get_data", ...
    files: tuple[str, ...] = ()  # the frames' files, same order

    def functions(self) -> set[str]:
        """Bare function names: ``Queue.get`` counts as ``get``."""
        return {frame.rsplit(".", 1)[-1] for frame in self.frames}


@dataclass(frozen=True)
class Evidence:
    section: Section | None = None
    processes: tuple[ProcessView, ...] = ()
    # Each py-spy sample of the trainer's Python processes: a tuple of thread stacks.
    stack_samples: tuple[tuple[ThreadStack, ...], ...] = ()
    stacks_missing: str | None = None  # why there are no stacks, when there are none
    gpu_error: str | None = None
    gpu_busy: bool | None = None  # None: no GPU signal
    ranks: int = 1  # processes the launch starts (accelerate --num_processes)
    flight_recorder: str | None = None  # the NCCL flight recorder dumps' summary


@dataclass(frozen=True)
class Diagnosis:
    kind: HangClass
    evidence: tuple[str, ...]
    # How it was reached: "nvml" (the GPU's own answer), "stacks", "kernel" (thread
    # states), "flight recorder" (the ranks' NCCL dumps), "section" (only the trainer's
    # output), "none".
    basis: str
    # The same stacks in every sample: the process is stuck, not slow.
    stacks_unchanged: bool | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.kind]

    @property
    def mitigation(self) -> str | None:
        return MITIGATIONS.get(self.kind)

    def record(self) -> dict[str, object]:
        """The whole diagnosis, as the incident bundle keeps it (``diagnosis.json``)."""
        return {
            "class": self.kind.value,
            "description": self.description,
            "basis": self.basis,
            "evidence": list(self.evidence),
            "stacks_unchanged": self.stacks_unchanged,
            "notes": list(self.notes),
            "mitigation": self.mitigation,
        }

    def figures(self) -> dict[str, object]:
        """What the stall_detected line, the webhook and the bundle carry."""
        return {
            "diagnosis": self.kind.value,
            "diagnosis_basis": self.basis,
            "diagnosis_evidence": list(self.evidence),
            **(
                {"stacks_unchanged": self.stacks_unchanged}
                if self.stacks_unchanged is not None
                else {}
            ),
            **({"diagnosis_notes": list(self.notes)} if self.notes else {}),
        }


def diagnose(evidence: Evidence) -> Diagnosis:
    """The hang's class, with the lines of evidence that showed it."""
    notes: tuple[str, ...] = ()
    if evidence.stacks_missing:
        notes += (f"no Python stacks: {evidence.stacks_missing}",)
    if evidence.flight_recorder:
        notes += (f"NCCL flight recorder: {evidence.flight_recorder}",)
    if evidence.ranks > 1:
        notes += (f"{evidence.ranks} ranks launched",)
    unchanged = _stacks_unchanged(evidence.stack_samples)
    for rule, basis in ((_gpu_lost, "nvml"), (_kernel_states, "kernel")):
        found = rule(evidence)
        if found is not None:
            kind, lines = found
            return Diagnosis(kind, lines, basis, unchanged, notes)
    found = _from_stacks(evidence)
    if found is not None:
        kind, lines = found
        # Moving or not is judged on the threads that showed the class: a tqdm or
        # pin-memory thread that moves says nothing about a hung sampling.
        matched = {
            (s.pid, s.thread) for s in evidence.stack_samples[-1] if s.functions() & _FRAMES[kind]
        }
        unchanged = _stacks_unchanged(evidence.stack_samples, only=matched)
        return Diagnosis(kind, lines, "stacks", unchanged, notes)
    if evidence.flight_recorder and " behind" in evidence.flight_recorder:
        return Diagnosis(
            HangClass.COLLECTIVE_WAIT,
            (evidence.flight_recorder,),
            "flight recorder",
            unchanged,
            notes,
        )
    found = _from_section(evidence.section)
    if found is not None:
        kind, lines = found
        return Diagnosis(kind, lines, "section", unchanged, notes)
    if not evidence.stack_samples:
        found = _from_threads(evidence)
        if found is not None:
            kind, lines = found
            return Diagnosis(kind, lines, "kernel", unchanged, notes)
    return Diagnosis(HangClass.UNKNOWN, _summary(evidence), "none", unchanged, notes)


# -- rules -----------------------------------------------------------------------------------

_Found = tuple[HangClass, tuple[str, ...]] | None


def _gpu_lost(evidence: Evidence) -> _Found:
    error = evidence.gpu_error
    if error and "lost" in error.lower():
        return HangClass.GPU_LOST, (f"NVML: {error}",)
    return None


def _kernel_states(evidence: Evidence) -> _Found:
    stuck = [
        f"pid {p.pid} thread {t.tid} ({t.name or '?'}) in state D, waiting in {t.wchan or '?'}"
        for p in evidence.processes
        for t in p.threads
        if t.state == "D"
    ]
    stuck += [
        f"pid {p.pid} ({p.name}) in disk-sleep"
        for p in evidence.processes
        if p.state == "disk-sleep" and not p.threads
    ]
    if stuck:
        return HangClass.UNINTERRUPTIBLE_IO, tuple(stuck[:8])
    stopped = [
        f"pid {p.pid} ({p.name}) is stopped"
        for p in evidence.processes
        if p.state in ("stopped", "tracing-stop") and p.is_python
    ]
    if stopped:
        return HangClass.PROCESS_STOPPED, tuple(stopped[:8])
    return None


def _from_stacks(evidence: Evidence) -> _Found:
    if not evidence.stack_samples:
        return None
    last = evidence.stack_samples[-1]
    # Mechanisms before places: a CUDA sync inside sampling is still a CUDA sync.
    for kind, frames in _FRAMES.items():
        hits = [stack for stack in last if stack.functions() & frames]
        if hits:
            return kind, tuple(_stack_line(stack, frames) for stack in hits[:4])
    return None


def _from_section(section: Section | None) -> _Found:
    if section is Section.SAMPLING:
        return HangClass.SAMPLING, ("the trainer's last output began sample generation",)
    if section is Section.SAVING:
        return HangClass.SAVING, ("the trainer's last output began a save",)
    return None


def _from_threads(evidence: Evidence) -> _Found:
    """No stacks: what the kernel shows. A busy-waiting thread with the GPU busy is a sync
    or a collective; a main thread asleep on its worker processes is a dataloader wait."""
    spinning = [
        (p, t)
        for p in evidence.processes
        for t in p.threads
        if p.is_python and (t.cpu_share or 0.0) >= _SPINNING_SHARE
    ]
    if spinning and evidence.gpu_busy:
        process, thread = spinning[0]
        line = (
            f"pid {process.pid} thread {thread.tid} spins ({thread.cpu_share:.0%} of a CPU) "
            "with the GPU busy and no progress"
        )
        if evidence.ranks > 1:
            return HangClass.COLLECTIVE_WAIT, (line, f"{evidence.ranks} ranks launched")
        return HangClass.CUDA_SYNC, (line, "one process launched: no collective to wait for")
    if spinning:
        return None
    pythons = [p for p in evidence.processes if p.is_python]
    for process in pythons:
        workers = [p for p in pythons if p.ppid == process.pid]
        main = process.threads[0] if process.threads else None
        if not workers or main is None or not _asleep_waiting(main):
            continue
        if all(_all_asleep(worker) for worker in workers):
            return HangClass.DATALOADER_WAIT, (
                f"pid {process.pid}'s main thread asleep in {main.wchan or '?'}",
                f"{len(workers)} worker process(es) asleep: "
                + ", ".join(str(worker.pid) for worker in workers[:8]),
            )
    return None


def _asleep_waiting(thread: ThreadView) -> bool:
    return thread.state == "S" and any(
        channel in (thread.wchan or "") for channel in _WAITING_CHANNELS
    )


def _all_asleep(process: ProcessView) -> bool:
    return bool(process.threads) and all(t.state in ("S", "I") for t in process.threads)


def _stacks_unchanged(
    samples: Sequence[Sequence[ThreadStack]], *, only: set[tuple[int, str]] | None = None
) -> bool | None:
    """The same frames in every sample (of the threads in ``only``, when given)."""
    if len(samples) < 2:
        return None
    keyed = [
        {(s.pid, s.thread): s.frames for s in sample if only is None or (s.pid, s.thread) in only}
        for sample in samples
    ]
    return all(sample == keyed[0] for sample in keyed[1:])


def _stack_line(stack: ThreadStack, frames: Iterable[str]) -> str:
    wanted = set(frames)
    inner = [f for f in stack.frames if f.rsplit(".", 1)[-1] in wanted][:1]
    chain = " <- ".join(stack.frames[:4])
    at = inner[0] if inner else stack.frames[0]
    return f"pid {stack.pid} thread {stack.name or stack.thread} in {at}: {chain}"


def _summary(evidence: Evidence) -> tuple[str, ...]:
    states = sorted({t.state or "?" for p in evidence.processes for t in p.threads})
    lines = [f"{len(evidence.processes)} trainer processes, thread states {''.join(states)}"]
    if evidence.section is not None:
        lines.append(f"section {evidence.section.value}")
    return tuple(lines)
