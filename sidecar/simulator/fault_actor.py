"""Faults in action: hangs that stall the process and crashes that end it like a CUDA error."""

from __future__ import annotations

from pathlib import Path

from sidecar.simulator.context import TrainerContext
from sidecar.simulator.faults import Fault
from sidecar.simulator.gpu_state import GpuActivity
from sidecar.simulator.hangs import (
    DATALOADER_WORKERS,
    UninterruptibleSleep,
    WorkerDataLoaderIter,
    all_reduce,
    denoise,
    mark_gpu_lost,
    sleep_for,
    stop_self,
    stuck_block_swap,
)


class SimulatedCrash(Exception):
    """Unwinds the simulated training to main(), which prints the crash and exits with its code."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.to_spec())
        self.fault = fault


def crash_report(fault: Fault, script: str) -> str:
    """A traceback shaped like a CUDA failure inside sd-scripts' training step."""
    return (
        "Traceback (most recent call last):\n"
        f'  File "{script}", line 519, in <module>\n'
        "    trainer.train(args)\n"
        '  File "train_network.py", line 1230, in train\n'
        "    accelerator.backward(loss)\n"
        "RuntimeError: CUDA error: an illegal memory access was encountered\n"
        f"(simulated by sidecar.simulator: {fault.to_spec()})\n"
    )


class FaultActor:
    """Carries out a hang or crash; hangs last forever unless the fault gives ``seconds``.

    :meth:`start` prepares what some hangs need before training begins (dataloader worker
    processes, the uninterruptible-sleep library) and fails early when that is impossible;
    :meth:`close` ends the workers when training finishes. ``dstate_library`` and
    ``gpu_state_file`` come from ``SIM_DSTATE_LIBRARY`` and ``SIM_GPU_STATE_FILE``.
    """

    def __init__(
        self,
        context: TrainerContext,
        *,
        dstate_library: str | None = None,
        gpu_state_file: Path | None = None,
        dataloader_workers: int = DATALOADER_WORKERS,
    ) -> None:
        """``dataloader_workers``: the DataLoader's worker processes (0: the main process
        loads the data, and a worker deadlock cannot happen)."""
        self._context = context
        self._workers = dataloader_workers
        self._dstate_library = dstate_library
        self._gpu_state_file = gpu_state_file
        self._dataloader: WorkerDataLoaderIter | None = None
        self._dstate: UninterruptibleSleep | None = None

    def start(self) -> None:
        """Set up the armed hangs' machinery; raises FaultSetupError when one cannot work."""
        faults = self._context.faults
        if faults.has("hang_dstate"):
            self._dstate = UninterruptibleSleep(self._dstate_library)
        if faults.has("hang_dataloader") and self._workers > 0:
            self._dataloader = WorkerDataLoaderIter(self._workers)

    def close(self) -> None:
        if self._dataloader is not None:
            self._dataloader.close()
            self._dataloader = None

    def suffer(self, fault: Fault) -> None:
        context, seconds = self._context, fault.seconds
        if fault.kind in ("crash", "crash_in_save"):
            raise SimulatedCrash(fault)
        if fault.kind == "hang_busy":
            context.gpu.show(GpuActivity.BUSY_HANG)
            all_reduce(seconds, context.clock)
        elif fault.kind == "hang_cuda_sync":
            context.gpu.show(GpuActivity.BUSY_HANG)
            stuck_block_swap(seconds, context.clock)
        elif fault.kind == "hang_dataloader":
            if self._workers == 0:
                # No worker to deadlock: the remedy for this hang (sd-scripts 1586).
                context.terminal.say(
                    "sidecar.simulator: hang_dataloader does not fire with "
                    "--max_data_loader_n_workers 0 (the main process loads the data)"
                )
                return
            context.gpu.show(GpuActivity.IDLE)
            if self._dataloader is None:  # armed after start() (a test calling suffer directly)
                self._dataloader = WorkerDataLoaderIter(self._workers)
            self._dataloader.stall_next_batch(seconds)
            next(self._dataloader)
        elif fault.kind == "hang_dstate":
            context.gpu.show(GpuActivity.IDLE)
            if self._dstate is None:
                self._dstate = UninterruptibleSleep(self._dstate_library)
            self._dstate.hang_in_vfork()
        elif fault.kind == "hang_stopped":
            context.gpu.show(GpuActivity.IDLE)
            stop_self()
        elif fault.kind == "hang_in_sample":
            context.gpu.show(GpuActivity.TRAINING)  # inference keeps the card as busy as steps
            denoise(seconds, context.sleep)
        elif fault.kind == "gpu_lost":
            context.gpu.show(GpuActivity.IDLE)
            mark_gpu_lost(self._gpu_state_file)
            sleep_for(None, context.sleep)
        else:  # hang_idle, hang_in_save
            context.gpu.show(GpuActivity.IDLE)
            sleep_for(seconds, context.sleep)
