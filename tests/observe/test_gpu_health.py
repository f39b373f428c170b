"""The NVML health probe against the fake ``libnvidia-ml.so.1``, through the real pynvml.

pynvml loads the library once per process, so each scenario runs in a fresh child whose
``LD_LIBRARY_PATH`` picks the fake. The child follows a plan (rewrite or append to the
fake's state file, read, close, ask NVML directly) and prints every reading as JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nvml_stub.build import CompilerMissing, build_fake_nvml, run_child

GIB = 1024**3

# Plan steps: {"state": text} rewrites the state file, {"append": text} adds lines (later
# lines win), {"read": true} reads once, {"close": true}, {"count": true} asks NVML for the
# device count directly (a number or the error class: is NVML still initialised?).
CHILD = r"""
import dataclasses, json, os, sys
import pynvml
import structlog
from sidecar.observe.gpu_health import NvmlHealthProbe

plan = json.load(sys.stdin)
state_file = os.environ["FAKE_NVML_STATE_FILE"]
out = {"readings": [], "counts": []}
with structlog.testing.capture_logs() as logs:
    probe = NvmlHealthProbe(plan.get("indices"))
    for step in plan["steps"]:
        if "state" in step:
            with open(state_file, "w") as handle:
                handle.write(step["state"])
        elif "append" in step:
            with open(state_file, "a") as handle:
                handle.write(step["append"])
        elif "read" in step:
            reading = probe.read()
            out["readings"].append(None if reading is None else dataclasses.asdict(reading))
        elif "close" in step:
            probe.close()
        elif "count" in step:
            try:
                out["counts"].append(pynvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as error:
                out["counts"].append(type(error).__name__)
out["logs"] = logs
print(json.dumps(out, default=str))
"""

READ = {"read": True}
CLOSE = {"close": True}
COUNT = {"count": True}


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml-health")).parent
    except CompilerMissing as error:
        pytest.skip(str(error))


def run_plan(library_dir: Path, state_file: Path, plan: dict[str, Any]) -> dict[str, Any]:
    return run_child(CHILD, library_dir, state_file, plan)


def readings(library_dir: Path, tmp_path: Path, *steps: dict[str, Any], **plan: Any) -> list[Any]:
    result = run_plan(library_dir, tmp_path / "state", {"steps": list(steps), **plan})
    found: list[Any] = result["readings"]
    return found


def test_reads_memory_processes_and_recovery_action(tmp_path: Path, fake_nvml: Path) -> None:
    """Each field comes from its NVML call; a process NVML cannot attribute has None bytes."""
    state = f"count=2\nmem_used={3 * GIB}\nmem_total={8 * GIB}\nprocs=4242:{GIB},77\n"
    [reading] = readings(fake_nvml, tmp_path, {"state": state + "recovery_action=1\n"}, READ)
    processes = [{"pid": 4242, "used_bytes": GIB}, {"pid": 77, "used_bytes": None}]
    expected = {
        "memory_used_bytes": 3 * GIB,
        "memory_total_bytes": 8 * GIB,
        "processes": processes,
        "xids": [],
        "recovery_action": "gpu_reset",
    }
    assert reading == {
        "devices": [{"index": 0, **expected}, {"index": 1, **expected}],
        "error": None,
    }


def test_no_processes_is_an_empty_list(tmp_path: Path, fake_nvml: Path) -> None:
    [reading] = readings(fake_nvml, tmp_path, {"state": "procs=\n"}, READ)
    assert reading["devices"][0]["processes"] == []


@pytest.mark.parametrize(
    ("value", "action"),
    [
        ("0", "none"),
        ("1", "gpu_reset"),
        ("2", "node_reboot"),
        ("3", "drain_p2p"),
        ("4", "drain_and_reset"),
        ("6", "bus_reset"),
        ("99", None),  # a number this release does not know
        ("unsupported", None),  # drivers before 570
    ],
)
def test_recovery_action_values(tmp_path: Path, fake_nvml: Path, value: str, action: str) -> None:
    [reading] = readings(fake_nvml, tmp_path, {"state": f"recovery_action={value}\n"}, READ)
    assert reading["error"] is None
    assert reading["devices"][0]["recovery_action"] == action


def test_xids_after_registration_are_seen_once_oldest_first(
    tmp_path: Path, fake_nvml: Path
) -> None:
    """XIDs before the first read are not seen; later ones arrive once each, in order."""
    seen = readings(
        fake_nvml,
        tmp_path,
        {"state": "count=2\nxid=31\n"},  # happened before the probe registered
        READ,
        {"append": "xid=31,13,79\n"},
        READ,
        READ,
        {"append": "xid=31,13,79,48\n"},
        READ,
    )
    per_read = [[device["xids"] for device in reading["devices"]] for reading in seen]
    assert per_read == [[[], []], [[13, 79], [13, 79]], [[], []], [[48], [48]]]


def test_unsupported_xid_events_degrade_only_the_xids(tmp_path: Path, fake_nvml: Path) -> None:
    state = f"xid=unsupported\nprocs=5:{GIB}\n"
    seen = readings(fake_nvml, tmp_path, {"state": state}, READ, {"append": "xid=79\n"}, READ)
    for reading in seen:
        assert reading["error"] is None
        [health] = reading["devices"]
        assert health["xids"] == []
        assert health["processes"] == [{"pid": 5, "used_bytes": GIB}]


def test_lost_gpu_is_a_reading_then_recovers_after_reinit(tmp_path: Path, fake_nvml: Path) -> None:
    """GPU lost: an error reading (no exception); once it answers again, readings resume."""
    seen = readings(
        fake_nvml,
        tmp_path,
        {"state": "procs=9:100\n"},
        READ,
        {"append": "error=gpu_lost\n"},
        READ,
        READ,
        {"append": "error=none\n"},
        READ,
    )
    assert seen[0]["error"] is None
    assert seen[1] == {"devices": [], "error": "GPU is lost"}
    assert seen[2] == {"devices": [], "error": "GPU is lost"}
    assert seen[3]["error"] is None
    assert seen[3]["devices"][0]["processes"] == [{"pid": 9, "used_bytes": 100}]


def test_lost_before_the_first_read_is_reported(tmp_path: Path, fake_nvml: Path) -> None:
    """NVML answers but the card does not: that is a GPU fault, not an absent GPU."""
    [reading] = readings(fake_nvml, tmp_path, {"state": "error=gpu_lost\n"}, READ)
    assert reading == {"devices": [], "error": "GPU is lost"}


def test_unknown_error_is_a_reading(tmp_path: Path, fake_nvml: Path) -> None:
    seen = readings(fake_nvml, tmp_path, READ, {"state": "error=unknown\n"}, READ)
    assert seen[1] == {"devices": [], "error": "Unknown Error"}


def test_driver_not_loaded_means_no_signal(tmp_path: Path, fake_nvml: Path) -> None:
    seen = readings(fake_nvml, tmp_path, {"state": "error=driver_not_loaded\n"}, READ, READ)
    assert seen == [None, None]


def test_no_library_means_no_signal(tmp_path: Path) -> None:
    """Without libnvidia-ml at all, reads are None and nothing raises."""
    empty = tmp_path / "no-nvml"
    empty.mkdir()
    probe = "import ctypes; ctypes.CDLL('libnvidia-ml.so.1')"
    env = {**os.environ, "LD_LIBRARY_PATH": str(empty)}
    if subprocess.run([sys.executable, "-c", probe], env=env, check=False).returncode == 0:
        pytest.skip("a real libnvidia-ml.so.1 is installed; its absence cannot be staged")
    assert readings(empty, tmp_path, READ, READ) == [None, None]


def test_watches_only_the_requested_indices(tmp_path: Path, fake_nvml: Path) -> None:
    seen = readings(fake_nvml, tmp_path, {"state": "count=3\n"}, READ, indices=[2, 2])
    assert [device["index"] for device in seen[0]["devices"]] == [2]


def test_requested_indices_that_do_not_exist_mean_no_signal(
    tmp_path: Path, fake_nvml: Path
) -> None:
    assert readings(fake_nvml, tmp_path, {"state": "count=1\n"}, READ, indices=[4]) == [None]


def test_close_balances_init_and_ends_reading(tmp_path: Path, fake_nvml: Path) -> None:
    """After close() NVML is shut down (pynvml counts inits) and reads return None."""
    result = run_plan(fake_nvml, tmp_path / "state", {"steps": [READ, COUNT, CLOSE, COUNT, READ]})
    assert result["counts"] == [1, "NVMLError_Uninitialized"]
    assert result["readings"][1] is None


def test_bad_indices_are_refused() -> None:
    from sidecar.observe.gpu_health import NvmlHealthProbe

    with pytest.raises(ValueError, match="GPU indices"):
        NvmlHealthProbe([0, -1])


@pytest.fixture(scope="session")
def old_driver_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake without _v3 processes, events and field values: drivers from before 510."""
    try:
        folder = tmp_path_factory.mktemp("fake-nvml-old")
        omit = ("COMPUTE_PROCESSES_V3", "EVENTS", "FIELD_VALUES")
        return build_fake_nvml(folder, omit=omit).parent
    except CompilerMissing as error:
        pytest.skip(str(error))


def test_an_older_driver_degrades_each_missing_call(tmp_path: Path, old_driver_nvml: Path) -> None:
    """FunctionNotFound: processes through _v2, no XIDs, no recovery action; no error."""
    seen = readings(
        old_driver_nvml, tmp_path, {"state": "procs=12:34\n"}, READ, {"append": "xid=79\n"}, READ
    )
    for reading in seen:
        assert reading["error"] is None
        [health] = reading["devices"]
        assert health["processes"] == [{"pid": 12, "used_bytes": 34}]
        assert health["xids"] == []
        assert health["recovery_action"] is None
