"""The call chains hung trainers are caught in, under the names py-spy shows for the real ones.

A sidecar that reads a hung trainer's Python stacks (``py-spy dump``) and its processes'
states in ``/proc`` tells hang classes apart by those names and states, so each hang here
reproduces the upstream function names and the process shape, not only the silence:

- :func:`all_reduce`: a collective a peer never joins (torch.distributed's
  ``all_reduce`` -> ``Work.wait``), spinning one CPU;
- :class:`ModelOffloader`: sd-scripts' block swapping with a CUDA stream that never
  finishes (``wait_for_block`` -> ``_wait_blocks_move`` -> ``Future.result`` on the main
  thread, ``move_blocks`` -> ``swap_weight_devices`` -> ``swap_weight_devices_cuda`` ->
  ``synchronize`` on the offloader's thread);
- :class:`WorkerDataLoaderIter`: torch's multiprocess DataLoader iterator whose worker
  process never delivers a batch (torch's class names, ``_MultiProcessingDataLoaderIter``);
- :class:`UninterruptibleSleep`: the main thread in state D inside a C call;
- :func:`stop_self`: the process in state T;
- :func:`denoise`: an inference step of sample generation that never returns;
- :func:`mark_gpu_lost`: the stand-in NVML library told that the card fell off the bus.

None of them imports torch: the simulator stays a plain Python process that starts in a
fraction of a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sidecar.atomic_files import replace_atomically

Clock = Callable[[], float]
Sleep = Callable[[float], None]

# The environment variable naming the library that hang_dstate calls (tests/dstate/build.py).
DSTATE_LIBRARY_VARIABLE = "SIM_DSTATE_LIBRARY"
# torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL: how often the DataLoader's main thread
# and its workers wake from a queue wait to check that the other side is still alive.
MP_STATUS_CHECK_INTERVAL = 5.0
# FluxGym's train.sh passes --max_data_loader_n_workers 2 --persistent_data_loader_workers.
DATALOADER_WORKERS = 2


class FaultSetupError(RuntimeError):
    """An armed fault cannot be carried out here; raised at start-up, before step 1."""


def sleep_for(seconds: float | None, sleep: Sleep) -> None:
    """Sleep ``seconds``, or forever when None (in hour-long naps, so the stack stays put)."""
    if seconds is not None:
        sleep(seconds)
        return
    while True:
        sleep(3600)


# --------------------------------------------------------------------------- a hung collective


class Work:
    """torch.distributed's ``Work`` handle of a collective that one rank never joins.

    With ``TORCH_NCCL_BLOCKING_WAIT=1`` (or a CPU-side wait on the result) ``wait()`` polls
    the collective on the host and never returns, holding a CPU busy while NVML reports the
    GPU 100% busy with the NCCL kernel that waits for its peer. The spin is inlined so
    ``wait`` is the innermost Python frame, as the real wait (C++) leaves it.
    """

    def __init__(self, seconds: float | None, clock: Clock) -> None:
        self._seconds = seconds
        self._clock = clock

    def wait(self) -> bool:
        deadline = math.inf if self._seconds is None else self._clock() + self._seconds
        while self._clock() < deadline:
            pass
        return True


def all_reduce(seconds: float | None, clock: Clock) -> None:
    """``torch.distributed.all_reduce`` (distributed_c10d.py): run the collective, then
    ``work.wait()`` unless ``async_op``; here the wait spins for ``seconds`` (None: forever)."""
    work = Work(seconds, clock)
    work.wait()


# --------------------------------------------------------------------------- block swapping


def synchronize(seconds: float | None, clock: Clock) -> None:
    """A stand-in for ``torch.cuda.Stream.synchronize`` on a stream whose work never finishes.

    The CUDA runtime's default scheduling (``cudaDeviceScheduleAuto``: spin while there are
    fewer active contexts than CPUs) waits for the device by spinning, so the thread burns a
    CPU; it returns after ``seconds`` (None: never). The spin is inlined so ``synchronize``
    is the innermost Python frame, as the real one (C++) leaves it.
    """
    deadline = math.inf if seconds is None else clock() + seconds
    while clock() < deadline:
        pass


def swap_weight_devices_cuda(seconds: float | None, clock: Clock) -> None:
    """sd-scripts' ``swap_weight_devices_cuda``: queues the weight copies on a side stream,
    then ``stream.synchronize()``, which is where a stuck copy or kernel holds it."""
    synchronize(seconds, clock)


class Offloader:
    """The part of sd-scripts' ``Offloader`` (library/custom_offloading_utils.py,
    kohya-ss/sd-scripts) that a stuck block swap shows: class, method and function names
    are upstream's, and so is the single-worker ``ThreadPoolExecutor`` whose future the
    forward pass waits on before it uses a block.

    ``_submit_move_blocks`` queues ``move_blocks`` on the pool; ``_wait_blocks_move`` waits
    on that future's ``result()``. The swap's synchronize spins for ``seconds`` (None:
    forever).
    """

    def __init__(
        self, num_blocks: int, blocks_to_swap: int, *, seconds: float | None, clock: Clock
    ) -> None:
        self.num_blocks = num_blocks
        self.blocks_to_swap = blocks_to_swap
        self.thread_pool = ThreadPoolExecutor(max_workers=1)
        self.futures: dict[int, Future[tuple[int, int]]] = {}
        self._seconds = seconds
        self._clock = clock

    def swap_weight_devices(self, block_to_cpu: int, block_to_cuda: int) -> None:
        # Offloader.swap_weight_devices: swap_weight_devices_cuda when the device is CUDA.
        del block_to_cpu, block_to_cuda  # the simulated blocks carry no weights
        swap_weight_devices_cuda(self._seconds, self._clock)

    def _submit_move_blocks(self, block_idx_to_cpu: int, block_idx_to_cuda: int) -> None:
        def move_blocks(bidx_to_cpu: int, bidx_to_cuda: int) -> tuple[int, int]:
            self.swap_weight_devices(bidx_to_cpu, bidx_to_cuda)
            return bidx_to_cpu, bidx_to_cuda

        self.futures[block_idx_to_cuda] = self.thread_pool.submit(
            move_blocks, block_idx_to_cpu, block_idx_to_cuda
        )

    def _wait_blocks_move(self, block_idx: int) -> None:
        if block_idx not in self.futures:
            return
        future = self.futures.pop(block_idx)
        _, bidx_to_cuda = future.result()
        assert block_idx == bidx_to_cuda, f"Block index mismatch: {block_idx} != {bidx_to_cuda}"

    def close(self) -> None:
        self.thread_pool.shutdown(wait=True)


class ModelOffloader(Offloader):
    """sd-scripts' forward offloader: the two calls FLUX's forward makes around each block."""

    def submit_move_blocks(self, block_idx: int) -> None:
        if block_idx >= self.blocks_to_swap:
            return
        block_idx_to_cpu = block_idx
        block_idx_to_cuda = self.num_blocks - self.blocks_to_swap + block_idx
        self._submit_move_blocks(block_idx_to_cpu, block_idx_to_cuda)

    def wait_for_block(self, block_idx: int) -> None:
        self._wait_blocks_move(block_idx)


class Flux:
    """FLUX's transformer with ``--blocks_to_swap`` (library/flux_models.py): ``forward``
    waits for each swapped block before running it and queues the next swap after it."""

    # An illustrative size (FLUX has 19 double blocks); only the call chain matters here.
    num_blocks, blocks_to_swap = 19, 18

    def __init__(self, seconds: float | None, clock: Clock) -> None:
        self.offloader = ModelOffloader(
            self.num_blocks, self.blocks_to_swap, seconds=seconds, clock=clock
        )

    def forward(self) -> None:
        # Block 0 has run: it goes out to the CPU while block num - swap + 0 comes in, and
        # that block is waited for before it runs.
        self.offloader.submit_move_blocks(0)
        self.offloader.wait_for_block(self.num_blocks - self.blocks_to_swap)
        self.offloader.close()


def stuck_block_swap(seconds: float | None, clock: Clock) -> None:
    """One forward pass whose block swap hangs for ``seconds`` (None: forever)."""
    Flux(seconds, clock).forward()


# --------------------------------------------------------------------------- dataloader workers


class _StalledDataset:
    """A map-style dataset whose items can only be read once ``lock`` is free, and it never is.

    The lock was held when the worker was forked, so the worker's copy stays locked: the
    classic deadlock of forking while another thread holds a lock. ``seconds`` bounds it.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __getitem__(self, request: tuple[int, float | None]) -> str:
        index, seconds = request
        self._lock.acquire(timeout=-1 if seconds is None else seconds)
        return f"batch {index}"


class _MapDatasetFetcher:
    """torch's fetcher of a map-style dataset (torch/utils/data/_utils/fetch.py), one item."""

    def __init__(self, dataset: _StalledDataset) -> None:
        self.dataset = dataset

    def fetch(self, request: tuple[int, float | None]) -> str:
        return self.dataset[request]


def _worker_loop(index_queue: Any, data_queue: Any, lock: threading.Lock, parent_pid: int) -> None:
    """torch.utils.data._utils.worker._worker_loop, reduced: wait for an index (waking every
    MP_STATUS_CHECK_INTERVAL to see whether the parent is still there, as its
    ``ManagerWatchdog`` does), fetch, put the result; ``None`` ends the worker."""
    fetcher = _MapDatasetFetcher(_StalledDataset(lock))
    while os.getppid() == parent_pid:
        try:
            request = index_queue.get(timeout=MP_STATUS_CHECK_INTERVAL)
        except queue.Empty:
            continue
        if request is None:
            break
        index, _seconds = request
        data_queue.put((index, fetcher.fetch(request)))


class _BaseDataLoaderIter:
    """torch's base of DataLoader iterators: ``__next__`` is defined here, ``_next_data`` in
    the subclass (torch/utils/data/dataloader.py), so py-spy names the frames the same."""

    def __iter__(self) -> _BaseDataLoaderIter:
        return self

    def __next__(self) -> Any:
        return self._next_data()

    def _next_data(self) -> Any:
        raise NotImplementedError


class _MultiProcessingDataLoaderIter(_BaseDataLoaderIter):
    """torch's ``_MultiProcessingDataLoaderIter`` (torch/utils/data/dataloader.py) reduced
    to what a worker deadlock shows: real worker processes and torch's method names.

    The workers are forked at construction, as the iterator of a DataLoader with
    ``persistent_workers`` forks them once (multiprocessing's default start method on
    Linux). ``__next__`` -> ``_next_data`` sends the batch's index to a worker and waits in
    ``_get_data``, which calls ``_try_get_data`` -> ``multiprocessing.Queue.get`` with torch's
    five-second timeout in a loop; a worker that died ends the wait with torch's
    "DataLoader worker (pid(s) ...) exited unexpectedly" error.
    """

    def __init__(self, num_workers: int = DATALOADER_WORKERS) -> None:
        context = multiprocessing.get_context("fork")
        self._data_queue: Any = context.Queue()
        self._index_queues: list[Any] = []
        self._workers: list[Any] = []
        self._send_idx = 0
        self._stall: float | None = None
        held = threading.Lock()
        held.acquire()  # every worker inherits it locked
        # A forked child flushes inherited stdio buffers when it ends: empty them first so
        # no line is printed twice.
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            for worker_id in range(num_workers):
                index_queue = context.Queue()
                worker = context.Process(
                    target=_worker_loop,
                    args=(index_queue, self._data_queue, held, os.getpid()),
                    name=f"dataloader-worker-{worker_id}",
                    daemon=True,  # as torch's: ended by multiprocessing when the trainer exits
                )
                worker.start()
                self._index_queues.append(index_queue)
                self._workers.append(worker)
        finally:
            held.release()

    @property
    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]

    def stall_next_batch(self, seconds: float | None) -> None:
        """The next batch's worker blocks for ``seconds`` (None: forever) fetching it."""
        self._stall = seconds

    def _next_data(self) -> Any:
        worker_id = self._send_idx % len(self._workers)
        self._index_queues[worker_id].put((self._send_idx, self._stall))
        self._send_idx += 1
        return self._get_data()

    def _get_data(self) -> Any:
        while True:
            success, data = self._try_get_data()
            if success:
                return data

    def _try_get_data(self, timeout: float = MP_STATUS_CHECK_INTERVAL) -> tuple[bool, Any]:
        try:
            return True, self._data_queue.get(timeout=timeout)
        except queue.Empty as empty:
            failed = [worker for worker in self._workers if not worker.is_alive()]
            if failed:
                pids = ", ".join(str(worker.pid) for worker in failed)
                raise RuntimeError(
                    f"DataLoader worker (pid(s) {pids}) exited unexpectedly"
                ) from empty
            return False, None

    def close(self) -> None:
        """End the workers (at the end of training)."""
        self._shutdown_workers()

    def _shutdown_workers(self) -> None:
        """torch's ``_shutdown_workers``: ``None`` to every worker, join, terminate stragglers."""
        for index_queue in self._index_queues:
            with contextlib.suppress(OSError, ValueError):
                index_queue.put(None)
        for worker in self._workers:
            worker.join(timeout=MP_STATUS_CHECK_INTERVAL)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=MP_STATUS_CHECK_INTERVAL)
        for index_queue in [*self._index_queues, self._data_queue]:
            index_queue.cancel_join_thread()
            index_queue.close()


WorkerDataLoaderIter = _MultiProcessingDataLoaderIter


# --------------------------------------------------------------------------- process states


class UninterruptibleSleep:
    """The library behind ``hang_dstate``: ``hang_in_vfork()`` leaves its caller in state D.

    Loaded at start-up, so a missing or broken library fails the trainer before step 1
    rather than at the hang. See tests/dstate/dstate.c for how the sleep is made.
    """

    def __init__(self, library_path: str | None) -> None:
        if not library_path:
            raise FaultSetupError(
                f"hang_dstate needs {DSTATE_LIBRARY_VARIABLE}: the path of the library built"
                " by tests/dstate/build.py (it exports hang_in_vfork)"
            )
        try:
            library = ctypes.CDLL(library_path)
            self._hang = library.hang_in_vfork
        except (OSError, AttributeError) as error:
            raise FaultSetupError(
                f"hang_dstate: {DSTATE_LIBRARY_VARIABLE}={library_path!r} cannot be used: {error}"
            ) from None
        self._hang.argtypes = []
        self._hang.restype = None

    def hang_in_vfork(self) -> None:
        """Sit in state D until killed; returns (by raising) only if the vfork child ended."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._hang()
        raise RuntimeError("hang_in_vfork returned: vfork failed or its child was killed")


def stop_self() -> None:
    """Stop this process with SIGSTOP (state T) until someone sends SIGCONT."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP)


# --------------------------------------------------------------------------- sampling, the card


def denoise(seconds: float | None, sleep: Sleep) -> None:
    """flux_train_utils.denoise: the sampler's loop of transformer forwards; one that never
    returns (a kernel that does not finish) holds the sampling for ``seconds`` (None: ever).

    The wait is inlined so ``denoise`` is the innermost Python frame."""
    if seconds is not None:
        sleep(seconds)
        return
    while True:
        sleep(3600)


def mark_gpu_lost(state_file: Path | None) -> None:
    """Add ``error=gpu_lost`` to the GPU state file the stand-in NVML library reads.

    The other lines (utilisation, power, anything a test staged) are kept; a previous
    ``error=`` line is replaced. Without a state file there is no NVML to tell.
    """
    if state_file is None:
        return
    try:
        lines = state_file.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines if not line.startswith("error=")]
    state_file.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(state_file, "\n".join([*kept, "error=gpu_lost"]) + "\n")
