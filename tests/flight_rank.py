"""A stand-in for one rank of a torch.distributed NCCL job, as far as its flight recorder goes.

Plain Python, no torch. It does what ProcessGroupNCCL does (see sidecar/observe/flight_recorder.py
for the upstream sources): with ``TORCH_NCCL_DEBUG_INFO_PIPE_FILE`` set and
``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0 it unlinks and ``mkfifo``s ``<stem><rank>.pipe`` (0666),
opens it ``O_RDONLY|O_NONBLOCK``, and like the heartbeat monitor thread reads up to 128 bytes
from it every ``TORCH_NCCL_COORD_CHECK_MILSEC``; when a read returns bytes it writes its dump to
``<TORCH_NCCL_DEBUG_INFO_TEMP_FILE><rank>`` by truncating and writing in place (as
``DebugInfoWriter`` does through ``std::ofstream``), in two halves with a pause between them so
that a reader can catch half a dump. The dump is a pickle shaped like torch 2.13's.

    python flight_rank.py \\
    --rank 1 --world 3 --collectives all_reduce:completed*41,all_reduce:scheduled

``--collectives``: the recorded collectives in order, ``op:state`` (``*N`` repeats), sequence ids
1, 2, ... ``--hostile``: dump a pickle whose loading would run ``os.system`` (touching
``--hostile`` 's argument) instead. Prints "ready" once the FIFO exists, then runs until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import time

_STARTED_NS = 1_796_135_125_740_245_564


def collectives(spec: str) -> list[tuple[str, str]]:
    recorded = []
    for item in filter(None, spec.split(",")):
        operation, _, rest = item.partition(":")
        state, _, times = rest.partition("*")
        recorded += [(operation, state)] * int(times or 1)
    return recorded


def entry(record_id: int, seq: int, operation: str, state: str) -> dict[str, object]:
    """One collective as FlightRecorderDetail.hpp getCollectiveTrace writes it."""
    created = _STARTED_NS + seq * 1_000_000
    started = created + 1000 if state in ("started", "completed") else None
    completed = created + 2000 if state == "completed" else None
    return {
        "frames": [{"name": "all_reduce", "filename": "distributed_c10d.py", "line": 2950}],
        "record_id": record_id,
        "pg_id": 0,
        "process_group": ("0", "default_pg"),
        "thread_name": "python",
        "thread_id": "140375476624256",
        "collective_seq_id": seq,
        "p2p_seq_id": 0,
        "op_id": seq,
        "profiling_name": f"nccl:{operation}",
        "time_created_ns": created,
        "input_sizes": [[1024]],
        "input_dtypes": ["Float"],
        "output_sizes": [[1024]],
        "output_dtypes": ["Float"],
        "state": state,
        "time_discovered_started_ns": started,
        "time_discovered_completed_ns": completed,
        "retired": state == "completed",
        "timeout_ms": 600000,
        "is_p2p": False,
    }


def dump(rank: int, world: int, recorded: list[tuple[str, str]]) -> bytes:
    entries = [entry(index, index + 1, op, state) for index, (op, state) in enumerate(recorded)]
    done = [e["collective_seq_id"] for e in entries if e["state"] == "completed"]
    begun = [e["collective_seq_id"] for e in entries if e["state"] != "scheduled"]
    return pickle.dumps(
        {
            "version": "2.10",
            "pg_config": {
                "0": {"name": "0", "desc": "default_pg", "ranks": str(list(range(world)))}
            },
            "comm_lib_version": "2.21.5",
            "pg_status": {
                "0": {
                    "last_enqueued_collective": len(entries),
                    "last_started_collective": max(begun, default=-1),
                    "last_completed_collective": max(done, default=-1),
                }
            },
            "entries": entries,  # nccl_comm_state is left out when empty, as torch does
        }
    )


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", "0")))
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--collectives", default="")
    parser.add_argument("--hostile", default=None)
    args = parser.parse_args()

    stem = os.environ.get("TORCH_NCCL_DEBUG_INFO_PIPE_FILE", "")
    prefix = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "/tmp/nccl_trace_rank_")
    interval = int(os.environ.get("TORCH_NCCL_COORD_CHECK_MILSEC", "1000")) / 1000
    if not stem or int(os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "0")) <= 0:
        raise SystemExit("flight_rank: no FIFO configured (as torch, which then creates none)")
    fifo = f"{stem}{args.rank}.pipe"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fifo)
    os.mkfifo(fifo, 0o666)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    if args.hostile:
        content = pickle.dumps({"entries": [], "evil": _RunsCode(args.hostile)})
    else:
        content = dump(args.rank, args.world, collectives(args.collectives))
    print("ready", flush=True)
    while True:
        time.sleep(interval)
        try:
            request = os.read(reader, 128)
        except BlockingIOError:  # a writer holds it open but wrote nothing yet
            continue
        if not request:
            continue
        with open(f"{prefix}{args.rank}", "wb") as out:
            half = len(content) // 2
            out.write(content[:half])
            out.flush()
            time.sleep(0.2)
            out.write(content[half:])


if __name__ == "__main__":
    main()
