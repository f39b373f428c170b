"""Requesting NCCL flight-recorder dumps from real rank processes through their FIFOs."""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import flight_rank  # tests/ is on pytest's path: the stand-in rank, also its dump shape
import pytest

from sidecar.observe.flight_recorder import (
    TRACE_BUFFER_ENTRIES,
    recorder_environment,
    request_dumps,
    summarise,
)

RANK_SCRIPT = Path(flight_rank.__file__)


class Ranks:
    """Starts stand-in rank processes with the recorder environment of ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, rank: int, *arguments: str, world: int = 3) -> subprocess.Popen[str]:
        environment = {
            **os.environ,
            **recorder_environment(self.folder),
            "TORCH_NCCL_COORD_CHECK_MILSEC": "100",  # torch polls every 1000 ms; keep tests fast
        }
        process = subprocess.Popen(
            [sys.executable, str(RANK_SCRIPT), f"--rank={rank}", f"--world={world}", *arguments],
            env=environment,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready and process.stdout.readline().strip() == "ready", "rank did not start"
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def ranks(tmp_path: Path) -> Iterator[Ranks]:
    folder = tmp_path / "flight"
    folder.mkdir()
    started = Ranks(folder)
    yield started
    started.stop()


def test_environment_names_fifo_and_dump_in_the_folder(tmp_path):
    """The launch environment turns the recorder on and puts FIFO and dump in the folder."""
    environment = recorder_environment(tmp_path)
    assert environment["TORCH_NCCL_TRACE_BUFFER_SIZE"] == str(TRACE_BUFFER_ENTRIES) == "2000"
    assert environment["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert environment["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"] == f"{tmp_path}/pipe_rank_"
    assert environment["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{tmp_path}/trace_rank_"
    assert environment["TORCH_FR_DUMP_TEMP_FILE"] == f"{tmp_path}/trace_rank_"
    assert environment["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


def test_environment_refuses_a_relative_folder():
    """Each rank resolves the paths from its own working directory: only absolute ones do."""
    with pytest.raises(ValueError, match="absolute"):
        recorder_environment(Path("flight"))


def test_lagging_rank_and_its_collective_are_named(ranks):
    """Three live ranks dump on request; the one that never finished #42 is named."""
    ranks.start(0, "--collectives", "all_reduce:completed*42")
    ranks.start(1, "--collectives", "all_reduce:completed*41,all_reduce:scheduled")
    ranks.start(2, "--collectives", "all_reduce:completed*42")
    assert sorted(path.name for path in ranks.folder.iterdir()) == [
        "pipe_rank_0.pipe",
        "pipe_rank_1.pipe",
        "pipe_rank_2.pipe",
    ]

    dumps = request_dumps(ranks.folder, wait=10)

    assert dumps is not None
    assert dumps.requested == [0, 1, 2]
    assert dumps.dumped == {r: ranks.folder / f"trace_rank_{r}" for r in (0, 1, 2)}
    assert dumps.missing == []
    assert dumps.summary == (
        "ranks 1 behind: last completed collective #41 (nccl:all_reduce) vs #42 on ranks 0,2; "
        "rank 1 is at #42 nccl:all_reduce scheduled"
    )
    assert dumps.seconds < 5


def test_dead_rank_is_missing_without_blocking(ranks):
    """A FIFO nobody reads (its rank died) is reported at once, never waited on."""
    ranks.start(0, "--collectives", "all_reduce:completed*7", world=2)
    os.mkfifo(ranks.folder / "pipe_rank_1.pipe")  # left behind by a dead rank

    began = time.monotonic()
    dumps = request_dumps(ranks.folder, wait=10)

    assert dumps is not None
    assert time.monotonic() - began < 5
    assert dumps.requested == [0]
    assert dumps.missing == [1]
    assert list(dumps.dumped) == [0]
    assert dumps.summary == (
        "all ranks at #7 nccl:all_reduce completed; "
        "ranks 1: no reader on its FIFO (the process is gone)"
    )


def test_files_that_are_not_fifos_are_left_alone(ranks, tmp_path):
    """A regular file or a symbolic link named like a FIFO is neither written nor counted."""
    ranks.start(0, "--collectives", "broadcast:completed", world=1)
    regular = ranks.folder / "pipe_rank_5.pipe"
    regular.write_bytes(b"keep")
    elsewhere = tmp_path / "other.pipe"
    os.mkfifo(elsewhere)
    (ranks.folder / "pipe_rank_6.pipe").symlink_to(elsewhere)

    dumps = request_dumps(ranks.folder, wait=10)

    assert dumps is not None
    assert dumps.requested == [0]
    assert dumps.missing == []
    assert regular.read_bytes() == b"keep"
    assert dumps.summary == "all ranks at #1 nccl:broadcast completed"


def test_folder_with_no_fifo_gives_none(tmp_path):
    """No FIFO (the trainer is not distributed, or the folder does not exist): nothing to ask."""
    assert request_dumps(tmp_path / "absent", wait=1) is None
    (tmp_path / "pipe_rank_0.pipe").write_bytes(b"")
    assert request_dumps(tmp_path, wait=1) is None
    assert (tmp_path / "pipe_rank_0.pipe").read_bytes() == b""


def test_hostile_dump_is_unreadable_and_never_run(ranks, tmp_path):
    """A dump whose unpickling would call os.system is refused, and nothing runs."""
    marker = tmp_path / "ran"
    ranks.start(0, "--collectives", "all_reduce:completed*3", world=2)
    ranks.start(1, "--hostile", str(marker), world=2)

    dumps = request_dumps(ranks.folder, wait=10)

    assert dumps is not None
    assert dumps.requested == [0, 1]
    assert sorted(dumps.dumped) == [0, 1]
    assert dumps.summary == "all ranks at #3 nccl:all_reduce completed; ranks 1 unreadable dump"
    assert dumps.seconds < 5  # refused at once, not waited on as if half-written
    assert not marker.exists()
    assert b"system" in (ranks.folder / "trace_rank_1").read_bytes()  # it was hostile


def test_wait_is_bounded_when_a_rank_never_dumps(tmp_path):
    """A reader that never answers costs at most ``wait``; a stale dump is not taken for new."""
    fifo = tmp_path / "pipe_rank_0.pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # alive, but never dumps
    (tmp_path / "trace_rank_0").write_bytes(flight_rank.dump(0, 1, [("all_reduce", "completed")]))
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    try:
        dumps = request_dumps(tmp_path, wait=3, clock=lambda: now[0], sleep=sleep)
        began = time.monotonic()
        real = request_dumps(tmp_path, wait=0.5)
        elapsed = time.monotonic() - began
        assert os.read(reader, 128) == b"11"  # both requests reached the reader
    finally:
        os.close(reader)

    assert dumps is not None and real is not None
    assert dumps.requested == [0] and dumps.missing == [0] and dumps.dumped == {}
    assert sum(slept) == pytest.approx(3)
    assert dumps.seconds == pytest.approx(3)
    assert dumps.summary == "ranks 0: no dump within 3 s"
    assert 0.5 <= elapsed < 2


_REAL_DUMP = """
import sys
import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

store = dist.FileStore(sys.argv[1] + ".store", 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
tensor = torch.ones(4)
for _ in range(3):
    dist.all_reduce(tensor)
with open(sys.argv[1], "wb") as out:
    out.write(c10d._dump_fr_trace())
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_real_torch_dump_is_read_and_shaped_like_the_stand_in(tmp_path):
    """torch's own FlightRecorder (gloo here, the same recorder as NCCL's) writes a dump that the
    restricted reader accepts and whose fields the stand-in rank reproduces."""
    pytest.importorskip("torch.distributed")
    target = tmp_path / "trace_rank_0"
    subprocess.run(
        [sys.executable, "-c", _REAL_DUMP, str(target)],
        check=True,
        timeout=120,
        env={**os.environ, "TORCH_FR_BUFFER_SIZE": "2000"},
    )
    real = target.read_bytes()
    assert summarise({0: real}) == "all ranks at #3 gloo:all_reduce scheduled"
    loaded = pickle.loads(real)
    stand_in = pickle.loads(_dump(("all_reduce", "completed")))
    assert set(stand_in) == set(loaded)
    assert set(stand_in["entries"][0]) == set(loaded["entries"][0])
    assert set(stand_in["pg_status"]["0"]) == set(loaded["pg_status"]["0"])


def _dump(*recorded: tuple[str, str], world: int = 2) -> bytes:
    return flight_rank.dump(0, world, list(recorded))


def test_summary_all_ranks_level():
    """Every rank at the same collective and state: one position for all."""
    same = _dump(("all_reduce", "completed"), ("all_reduce", "started"))
    assert summarise({0: same, 1: same}) == "all ranks at #2 nccl:all_reduce started"


def test_summary_rank_that_never_enqueued_the_next_collective():
    """Others started #42 and wait; the rank still at #41 is the one behind."""
    waiting = _dump(*[("all_reduce", "completed")] * 41, ("all_reduce", "started"), world=3)
    stuck = _dump(*[("all_reduce", "completed")] * 41, world=3)
    assert summarise({0: waiting, 1: stuck, 2: waiting}) == (
        "ranks 1 behind: last enqueued collective #41 (nccl:all_reduce) vs "
        "#42 (nccl:all_reduce) on ranks 0,2; rank 1 is at #41 nccl:all_reduce completed"
    )


def test_summary_empty_unreadable_and_missing_ranks():
    """No collectives, garbage, half a dump and a rank of the world with no dump are each said."""
    full = _dump(("broadcast", "completed"), world=5)
    empty = _dump(world=5)
    summary = summarise({0: full, 1: empty, 2: b"not a pickle", 3: full[: len(full) // 2]})
    assert summary == (
        "all ranks at #1 nccl:broadcast completed; ranks 1 recorded no collectives; "
        "ranks 2,3 unreadable dump; ranks 4: no dump"
    )


def test_summary_hostile_pickle_is_not_executed(tmp_path):
    """A reduce to os.system in the bytes is refused before anything is called."""
    marker = tmp_path / "ran"
    hostile = pickle.dumps({"entries": [], "x": flight_rank._RunsCode(str(marker))})
    assert summarise({0: hostile}) == "ranks 0 unreadable dump"
    assert not marker.exists()


def test_summary_of_nothing():
    """No dumps at all still gives a sentence."""
    assert summarise({}) == "no flight recorder dumps"
