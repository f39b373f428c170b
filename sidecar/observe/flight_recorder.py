"""Asking a hung multi-process trainer's ranks for their NCCL flight-recorder dumps.

No code change in the trainer: PyTorch's ProcessGroupNCCL does all of it when the launch
environment names a FIFO and a dump file (``recorder_environment``). What it does, read in
pytorch/pytorch (torch/csrc/distributed/c10d/):

- ProcessGroupNCCL.hpp, ``struct DumpPipe``: when ``TORCH_NCCL_DEBUG_INFO_PIPE_FILE`` is set and
  ``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0, the rank unlinks ``<stem><rank>.pipe``, creates it with
  ``mkfifo(0666)`` and keeps it open ``O_RDONLY|O_NONBLOCK``; ``shouldDump()`` is a ``read`` of
  up to 128 bytes that returned something. The rank is the global rank (PG uid 0 only).
- ProcessGroupNCCL.cpp, ``HeartbeatMonitor::runLoop`` (thread ``pt_nccl_heartbt``): polls the
  FIFO once per wake-up, every ``TORCH_NCCL_COORD_CHECK_MILSEC`` (1000 ms) when
  ``TORCH_NCCL_DUMP_ON_TIMEOUT`` is on (the default), else every
  ``TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC`` (480 s). A read byte starts ``dumpDebuggingInfo``
  asynchronously; training goes on. The main thread hung in a collective does not stop it.
- FlightRecorder.cpp, ``DebugInfoWriter``: writes the dump to ``<prefix><rank>``, the prefix from
  ``TORCH_FR_DUMP_TEMP_FILE`` or else ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE`` (older releases:
  ``/tmp/nccl_trace_rank_``; newer: ``~/.cache/torch/comm_lib_trace_rank_``), through an
  ``std::ofstream`` that truncates and writes in place: a reader can see half a dump.
- FlightRecorderDetail.hpp, ``dump_dict``/``getCollectiveTrace``: the dump is a pickle
  (``pickle_str``) of a dict: ``version`` ("2.10" in torch 2.13), ``comm_lib_version``,
  ``pg_config`` ({pg name: {name, desc, ranks: "[0, 1]"}}), ``pg_status`` ({str(pg id):
  {last_enqueued_collective, last_started_collective, last_completed_collective}}), ``entries``
  (oldest first, at most the buffer size: record_id, pg_id, process_group (name, desc),
  collective_seq_id, p2p_seq_id, op_id, profiling_name such as "nccl:all_reduce",
  time_created_ns, input/output sizes and dtypes, state "scheduled"/"started"/"completed",
  time_discovered_started_ns, time_discovered_completed_ns, retired, timeout_ms, is_p2p,
  frames, thread_name, thread_id) and ``nccl_comm_state``. The pickle holds only builtin
  containers and scalars. ``dump_json`` exists too, but only through the Python API
  (``torch._C._distributed_c10d._dump_nccl_trace_json``): the FIFO always gets the pickle.
- Utils.hpp, ``getCvarString``/``getCvarInt``: the first name of a list wins, later names are
  deprecated aliases. Newer releases read the buffer size for the recorder itself from
  ``TORCH_FR_BUFFER_SIZE`` before ``TORCH_NCCL_TRACE_BUFFER_SIZE`` (FlightRecorder.hpp) while
  ProcessGroupNCCL gates the FIFO on ``TORCH_NCCL_TRACE_BUFFER_SIZE`` alone, so both are set.

The dump format was checked against a real dump of the installed torch (gloo backend, same
FlightRecorder); the stand-in rank of the tests (tests/flight_rank.py) writes that shape.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DUMP_PREFIX",
    "PIPE_PREFIX",
    "TRACE_BUFFER_ENTRIES",
    "FlightDumps",
    "recorder_environment",
    "request_dumps",
    "summarise",
]

# Collectives kept per rank: torch's own default in recent releases (FlightRecorder.hpp),
# and enough to cover many steps of a LoRA run's all-reduces; older releases default to 0 (off).
TRACE_BUFFER_ENTRIES = 2000
PIPE_PREFIX = "pipe_rank_"  # torch appends "<rank>.pipe"
DUMP_PREFIX = "trace_rank_"  # torch appends "<rank>"
# A dump of 2000 entries with Python frames is a few MB; anything far larger is not a dump.
_MAX_DUMP_BYTES = 64 * 1024 * 1024
_POLL_SECONDS = 0.1
_PIPE_NAME = re.compile(re.escape(PIPE_PREFIX) + r"([0-9]+)\.pipe")
_STATE_ORDER = {"scheduled": 0, "started": 1, "completed": 2}


def recorder_environment(folder: Path) -> dict[str, str]:
    """Environment for a trainer launch so that each rank keeps a flight record and dumps it
    on request: FIFO ``<folder>/pipe_rank_<r>.pipe``, dump ``<folder>/trace_rank_<r>``.

    ``TORCH_NCCL_DUMP_ON_TIMEOUT=1`` is its default in recent torch; it is set because only
    with it does the heartbeat thread poll the FIFO every second (else every 8 minutes), and
    it also writes the same dump by itself when a collective times out.
    """
    folder = Path(folder)
    if not folder.is_absolute():
        raise ValueError(f"flight recorder folder must be an absolute path, got {str(folder)!r}")
    size = str(TRACE_BUFFER_ENTRIES)
    dump = str(folder / DUMP_PREFIX)
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": size,
        "TORCH_FR_BUFFER_SIZE": size,
        "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": str(folder / PIPE_PREFIX),
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": dump,
        "TORCH_FR_DUMP_TEMP_FILE": dump,
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }


def launch_environment(folder: Path, ranks: int) -> dict[str, str]:
    """The recorder's variables for a launch of ``ranks`` processes: none for one (no
    collectives), none when ``folder`` cannot be made or hold FIFOs (SMB, some FUSE mounts:
    the ranks could not make theirs, and the launch must not be put at risk)."""
    if ranks <= 1:
        return {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fifo-check-{os.getpid()}"
        probe.unlink(missing_ok=True)
        os.mkfifo(probe, 0o600)
        probe.unlink()
    except OSError:
        return {}
    return recorder_environment(folder)


@dataclass(frozen=True)
class FlightDumps:
    """What one round of dump requests got.

    ``requested``: ranks whose FIFO had a reader (the byte was written); ``dumped``: ranks
    whose dump file was rewritten after the request and parses; ``missing``: every other rank
    found in the folder (no reader on its FIFO: the process is gone; or no dump in time).
    """

    requested: list[int]
    dumped: dict[int, Path]
    missing: list[int]
    summary: str
    seconds: float


def request_dumps(
    folder: Path,
    *,
    wait: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> FlightDumps | None:
    """Ask every rank with a FIFO in ``folder`` for a dump and wait up to ``wait`` seconds
    for the dumps; None when the folder holds no FIFO (no rank set one up).

    Never blocks on a FIFO (non-blocking open, ENXIO = no reader), never writes to anything
    that is not a FIFO, never follows a symbolic link.
    """
    if wait < 0:
        raise ValueError(f"wait must be >= 0 seconds, got {wait}")
    started = clock()
    pipes = _fifos(Path(folder))
    if not pipes:
        return None
    absent: dict[int, str] = {}
    requested: list[int] = []
    before: dict[int, tuple[int, ...] | None] = {}
    for rank, pipe in sorted(pipes.items()):
        dump = Path(folder) / f"{DUMP_PREFIX}{rank}"
        # Taken before the request: any change after it is the answer to this request.
        before[rank] = _signature(dump)
        reason = _poke(pipe)
        if reason is None:
            requested.append(rank)
        else:
            absent[rank] = reason
    fresh: dict[int, bytes] = {}
    partial: dict[int, bytes] = {}  # rewritten since the request, not parseable (yet)
    pending = list(requested)
    while True:
        for rank in list(pending):
            content = _changed(Path(folder) / f"{DUMP_PREFIX}{rank}", before[rank])
            if content is None:
                continue
            try:
                _load(content)
            except _Refused:
                pass  # final: a dump naming classes or functions never becomes readable
            except _Unreadable:
                # torch truncates and writes in place: half a pickle fails, wait for more.
                partial[rank] = content
                continue
            fresh[rank] = content
            partial.pop(rank, None)
            pending.remove(rank)
        remaining = wait - (clock() - started)
        if not pending or remaining <= 0:
            break
        sleep(min(_POLL_SECONDS, remaining))
    fresh.update(partial)  # still unparseable at the deadline: reported as unreadable
    for rank in pending:
        if rank not in partial:
            absent[rank] = f"no dump within {wait:g} s"
    return FlightDumps(
        requested=requested,
        dumped={rank: Path(folder) / f"{DUMP_PREFIX}{rank}" for rank in sorted(fresh)},
        missing=sorted(absent),
        summary=summarise(fresh, absent=absent),
        seconds=round(clock() - started, 3),
    )


def _fifos(folder: Path) -> dict[int, Path]:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for entry in entries:
        match = _PIPE_NAME.fullmatch(entry.name)
        if not match:
            continue
        try:
            mode = os.lstat(entry.path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISFIFO(mode):  # a regular file or a link of that name is not torch's
            found[int(match.group(1))] = Path(entry.path)
    return found


def _poke(pipe: Path) -> str | None:
    """Write one byte to ``pipe``; None when written (or a request is already queued), else
    why not."""
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(pipe, flags)
    except OSError as error:
        if error.errno == errno.ENXIO:
            return "no reader on its FIFO (the process is gone)"
        if error.errno == errno.ELOOP:
            return "its FIFO was replaced by a symbolic link"
        return f"its FIFO cannot be opened ({error.strerror})"
    try:
        # Replaced between the lstat and the open? Then it is not a FIFO: write nothing.
        if not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
            return "its FIFO was replaced by another kind of file"
        try:
            os.write(descriptor, b"1")
        except BlockingIOError:
            pass  # the pipe is full of earlier requests: one is pending already
        except BrokenPipeError:
            return "no reader on its FIFO (the process is gone)"
    finally:
        os.close(descriptor)
    return None


def _signature(path: Path) -> tuple[int, ...] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _changed(path: Path, before: tuple[int, ...] | None) -> bytes | None:
    """The dump file's bytes when it was written after ``before`` was taken, else None."""
    signature = _signature(path)
    if signature is None or signature == before:
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read(_MAX_DUMP_BYTES + 1)


class _Unreadable(Exception):
    """Not a loadable dump (truncated, garbage, too large, not a dict)."""


class _Refused(_Unreadable):
    """A dump that names a global: refused, whatever follows."""


class _BuiltinsOnly(pickle.Unpickler):
    """Loads builtin containers and scalars only: every global (classes, functions such as
    ``os.system``) is refused, so nothing in the file can run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"the dump names {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("the dump uses persistent ids")


def _load(content: bytes) -> dict[str, Any]:
    if len(content) > _MAX_DUMP_BYTES:
        raise _Unreadable("too large")
    try:
        value = _BuiltinsOnly(io.BytesIO(content)).load()
    except _Unreadable:
        raise
    except Exception as error:  # any malformed pickle: truncated, garbage, wrong opcodes
        raise _Unreadable(str(error)) from error
    if not isinstance(value, dict) or not isinstance(value.get("entries", []), list):
        raise _Unreadable("not a flight recorder dump")
    return value


@dataclass(frozen=True)
class _Collective:
    seq: int
    name: str
    state: str


@dataclass(frozen=True)
class _Position:
    """Where one rank is in one process group's collectives."""

    completed: _Collective | None  # the newest completed
    frontier: _Collective  # the newest recorded (enqueued)

    @property
    def key(self) -> tuple[int, int, int]:
        done = self.completed.seq if self.completed else -1
        return (done, self.frontier.seq, _STATE_ORDER.get(self.frontier.state, 0))


def summarise(dumps: Mapping[int, bytes], *, absent: Mapping[int, str] | None = None) -> str:
    """One line saying which ranks are behind and at which collective.

    ``dumps``: each rank's dump file content. ``absent``: ranks known to have no dump, with
    why. Ranks named in a dump's ``pg_config`` but in neither are reported as missing.
    """
    absent = dict(absent or {})
    unreadable: list[int] = []
    parsed: dict[int, dict[str, Any]] = {}
    for rank, content in dumps.items():
        try:
            parsed[rank] = _load(content)
        except _Unreadable:
            unreadable.append(rank)
    world: set[int] = set()
    for dump in parsed.values():
        world |= _config_ranks(dump)
    for rank in sorted(world - set(dumps) - set(absent)):
        absent[rank] = "no dump"
    positions: dict[int, dict[Any, _Position]] = {rank: _positions(d) for rank, d in parsed.items()}
    empty = sorted(rank for rank, by_group in positions.items() if not by_group)
    parts = [_comparison({r: p for r, p in positions.items() if p})]
    if empty:
        parts.append(f"{_ranks(empty)} recorded no collectives")
    if unreadable:
        parts.append(f"{_ranks(sorted(unreadable))} unreadable dump")
    for reason in sorted(set(absent.values())):
        parts.append(f"{_ranks(sorted(r for r, why in absent.items() if why == reason))}: {reason}")
    text = "; ".join(part for part in parts if part)
    return text or "no flight recorder dumps"


def _config_ranks(dump: Mapping[str, Any]) -> set[int]:
    config = dump.get("pg_config")
    ranks: set[int] = set()
    if isinstance(config, dict):
        for group in config.values():
            if isinstance(group, dict) and isinstance(group.get("ranks"), str):
                ranks.update(int(number) for number in re.findall(r"[0-9]+", group["ranks"]))
    return ranks


def _positions(dump: Mapping[str, Any]) -> dict[Any, _Position]:
    """Per process group, the newest completed and the newest recorded collective (p2p
    sends and receives have their own sequence and are left out)."""
    completed: dict[Any, _Collective] = {}
    frontier: dict[Any, _Collective] = {}
    for entry in dump.get("entries", []):
        if not isinstance(entry, dict) or entry.get("is_p2p"):
            continue
        seq = entry.get("collective_seq_id")
        if not isinstance(seq, int) or isinstance(seq, bool):
            continue
        group = entry.get("pg_id", entry.get("process_group"))
        group = tuple(group) if isinstance(group, list) else group
        collective = _Collective(
            seq, str(entry.get("profiling_name") or "?"), str(entry.get("state") or "?")
        )
        newest = frontier.get(group)
        if newest is None or seq >= newest.seq:
            frontier[group] = collective
        done = completed.get(group)
        if collective.state == "completed" and (done is None or seq >= done.seq):
            completed[group] = collective
    return {group: _Position(completed.get(group), last) for group, last in frontier.items()}


def _comparison(positions: Mapping[int, Mapping[Any, _Position]]) -> str:
    if not positions:
        return ""
    groups = sorted({g for by_group in positions.values() for g in by_group}, key=repr)
    lines = []
    for group in groups:
        at = {rank: by_group[group] for rank, by_group in positions.items() if group in by_group}
        line = _compare_group(at)
        if line:
            lines.append(line if len(groups) == 1 else f"process group {group}: {line}")
    if lines:
        return "; ".join(lines)
    # Everyone level everywhere: name the default group's (or the first group's) position.
    group = 0 if any(0 in by_group for by_group in positions.values()) else groups[0]
    position = next(by_group[group] for by_group in positions.values() if group in by_group)
    frontier = position.frontier
    return f"all ranks at #{frontier.seq} {frontier.name} {frontier.state}"


def _compare_group(at: Mapping[int, _Position]) -> str:
    """Who is behind in one group; the empty string when every rank is at the same place."""
    best = max(position.key for position in at.values())
    leaders = sorted(rank for rank, position in at.items() if position.key == best)
    behind = sorted(rank for rank in at if rank not in leaders)
    if not behind:
        return ""
    lead = at[leaders[0]]
    lead_done = lead.completed.seq if lead.completed else -1
    if any(_done(at[rank]) < lead_done for rank in behind):
        what = "last completed collective"
        theirs = _grouped(behind, lambda rank: _describe(at[rank].completed))
        ours = f"#{lead_done}" if lead.completed else "none"
    else:
        what = "last enqueued collective"
        theirs = _grouped(behind, lambda rank: _describe(at[rank].frontier))
        ours = _describe(lead.frontier)
    where = "; ".join(
        f"rank {rank} is at #{at[rank].frontier.seq} {at[rank].frontier.name} "
        f"{at[rank].frontier.state}"
        for rank in behind
    )
    return f"{_ranks(behind)} behind: {what} {theirs} vs {ours} on {_ranks(leaders)}; {where}"


def _done(position: _Position) -> int:
    return position.completed.seq if position.completed else -1


def _describe(collective: _Collective | None) -> str:
    return "none" if collective is None else f"#{collective.seq} ({collective.name})"


def _grouped(ranks: Iterable[int], describe: Callable[[int], str]) -> str:
    by_text: dict[str, list[int]] = {}
    for rank in ranks:
        by_text.setdefault(describe(rank), []).append(rank)
    if len(by_text) == 1:
        return next(iter(by_text))
    return ", ".join(f"{text} on {_ranks(members)}" for text, members in by_text.items())


def _ranks(ranks: Iterable[int]) -> str:
    return "ranks " + ",".join(str(rank) for rank in ranks)
