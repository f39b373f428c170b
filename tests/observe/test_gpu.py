"""The NVML adapter against a fake ``libnvidia-ml.so.1``.

pynvml loads the library once per process with ``CDLL("libnvidia-ml.so.1")``, so
each scenario runs in a fresh Python process whose ``LD_LIBRARY_PATH`` decides
which library it finds. The child follows a plan (write the state file, advance
the injected clock, poll) and prints every reading plus the captured log events
as JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nvml_stub.build import CompilerMissing, build_fake_nvml, run_child

GIB = 1024**3

# Runs in the child. Plan steps: {"state": text} rewrites the fake's state file,
# {"advance": seconds} moves the injected clock, {"poll": true} samples once,
# {"close": true} closes the monitor, {"probe": true} asks NVML directly for the
# device count (recorded as a number or the error class), to see whether NVML is
# still initialised.
CHILD = r"""
import dataclasses, json, os, sys
import pynvml
import structlog
from sidecar.observe.gpu import NvmlGpuMonitor

plan = json.load(sys.stdin)
state_file = os.environ["FAKE_NVML_STATE_FILE"]
now = [0.0]
readings = []
probes = []
with structlog.testing.capture_logs() as logs:
    monitor = NvmlGpuMonitor(
        plan.get("indices"), retry_interval=plan.get("retry_interval", 60.0), clock=lambda: now[0]
    )
    for step in plan["steps"]:
        if "state" in step:
            with open(state_file, "w") as handle:
                handle.write(step["state"])
        elif "advance" in step:
            now[0] += step["advance"]
        elif "poll" in step:
            reading = monitor.sample()
            readings.append(None if reading is None else dataclasses.asdict(reading))
        elif "close" in step:
            monitor.close()
        elif "probe" in step:
            try:
                probes.append(pynvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as error:
                probes.append(type(error).__name__)
print(json.dumps({"readings": readings, "probes": probes, "logs": logs}, default=str))
"""


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml")).parent
    except CompilerMissing as error:
        pytest.skip(str(error))


@pytest.fixture
def empty_library_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "no-nvml"
    folder.mkdir()
    yield folder


def run_plan(library_dir: Path, state_file: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Run the plan in a child whose only NVML candidate is in ``library_dir``."""
    return run_child(CHILD, library_dir, state_file, plan)


def events(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [entry for entry in result["logs"] if entry["event"] == name]


POLL = {"poll": True}
CLOSE = {"close": True}
PROBE = {"probe": True}


def real_nvml_is_installed(empty_dir: Path) -> bool:
    """True when the system's loader finds a libnvidia-ml.so.1 without our help."""
    probe = "import ctypes; ctypes.CDLL('libnvidia-ml.so.1')"
    env = {**os.environ, "LD_LIBRARY_PATH": str(empty_dir)}
    completed = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, check=False
    )
    return completed.returncode == 0


def test_no_library_means_no_signal_logged_once(tmp_path: Path, empty_library_dir: Path) -> None:
    """Without libnvidia-ml every poll returns None and gpu_unavailable is logged once."""
    if real_nvml_is_installed(empty_library_dir):
        pytest.skip("a real libnvidia-ml.so.1 is installed; its absence cannot be staged")
    plan = {"steps": [POLL, POLL, {"advance": 120}, POLL, POLL]}
    result = run_plan(empty_library_dir, tmp_path / "state", plan)

    assert result["readings"] == [None, None, None, None]
    [unavailable] = events(result, "gpu_unavailable")
    assert unavailable["log_level"] == "info"
    assert unavailable["error_type"] == "NVMLError_LibraryNotFound"
    assert "Not Found" in unavailable["reason"]


def test_reads_devices_and_follows_state_changes(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """Utilisation, memory and power come from NVML and change when the device state does."""
    first = f"util=37\nmem_used={3 * GIB}\nmem_total={8 * GIB}\npower_mw=123456\n"
    second = f"util=100\nmem_used={7 * GIB}\nmem_total={8 * GIB}\npower_mw=251000\n"
    plan = {"steps": [{"state": first}, POLL, {"state": second}, POLL]}
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    assert result["readings"] == [
        {
            "samples": [
                {
                    "index": 0,
                    "utilization_percent": 37,
                    "memory_used_bytes": 3 * GIB,
                    "memory_total_bytes": 8 * GIB,
                    "power_watts": 123.456,
                }
            ],
            "error": None,
        },
        {
            "samples": [
                {
                    "index": 0,
                    "utilization_percent": 100,
                    "memory_used_bytes": 7 * GIB,
                    "memory_total_bytes": 8 * GIB,
                    "power_watts": 251.0,
                }
            ],
            "error": None,
        },
    ]
    [detected] = events(result, "gpu_detected")
    assert detected["count"] == 1
    assert detected["names"] == ["Fake NVML GPU 0"]
    assert detected["driver_version"] == "999.99.99-fake"


def test_missing_state_file_gives_fake_defaults(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """The fake's documented defaults hold, so other tests may rely on them."""
    result = run_plan(fake_nvml_dir, tmp_path / "absent", {"steps": [POLL]})

    [reading] = result["readings"]
    assert reading["samples"] == [
        {
            "index": 0,
            "utilization_percent": 0,
            "memory_used_bytes": 0,
            "memory_total_bytes": 24 * GIB,
            "power_watts": 30.0,
        }
    ]


def test_gpu_lost_mid_run_is_reported_once_and_recovers(
    tmp_path: Path, fake_nvml_dir: Path
) -> None:
    """A lost GPU yields error readings (one warning), and samples return once it is back."""
    plan = {
        "steps": [
            {"state": "util=80\n"},
            POLL,
            {"state": "util=80\nerror=gpu_lost\n"},
            POLL,
            POLL,
            POLL,
            {"state": "util=55\nerror=none\n"},
            POLL,
            POLL,
            CLOSE,
            PROBE,
        ]
    }
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    utilisation = [
        [sample["utilization_percent"] for sample in reading["samples"]]
        for reading in result["readings"]
    ]
    assert utilisation == [[80], [], [], [], [55], [55]]
    assert [reading["error"] for reading in result["readings"]] == [
        None,
        "GPU is lost",
        "GPU is lost",
        "GPU is lost",
        None,
        None,
    ]
    [failed] = events(result, "gpu_poll_failed")
    assert failed["log_level"] == "warning"
    assert failed["error_type"] == "NVMLError_GpuIsLost"
    assert failed["reinitialise_next_poll"] is True
    [recovered] = events(result, "gpu_poll_recovered")
    assert recovered["previous_error"] == "GPU is lost"
    assert len(events(result, "gpu_detected")) == 1
    # Every re-initialisation was balanced by a shutdown: after close() NVML is down.
    assert result["probes"] == ["NVMLError_Uninitialized"]


def test_poll_failure_logged_again_when_the_error_changes(
    tmp_path: Path, fake_nvml_dir: Path
) -> None:
    """Repeated identical failures log once; a different failure logs again."""
    plan = {
        "steps": [
            POLL,
            {"state": "error=unknown\n"},
            POLL,
            POLL,
            {"state": "error=gpu_lost\n"},
            POLL,
            POLL,
        ]
    }
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    failures = events(result, "gpu_poll_failed")
    assert [entry["error"] for entry in failures] == ["Unknown Error", "GPU is lost"]
    assert failures[0]["reinitialise_next_poll"] is False
    assert [reading["error"] for reading in result["readings"]] == [
        None,
        "Unknown Error",
        "Unknown Error",
        "GPU is lost",
        "GPU is lost",
    ]


def test_driver_lost_after_gpu_seen_is_a_failure_not_absence(
    tmp_path: Path, fake_nvml_dir: Path
) -> None:
    """Once a GPU was seen, a failing re-initialisation is a failed reading, never None."""
    plan = {
        "steps": [
            POLL,
            {"state": "error=gpu_lost\n"},
            POLL,
            {"state": "error=driver_not_loaded\n"},
            POLL,
            POLL,
            {"state": "error=none\n"},
            POLL,
        ]
    }
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    assert [reading["error"] for reading in result["readings"]] == [
        None,
        "GPU is lost",
        "Driver Not Loaded",
        "Driver Not Loaded",
        None,
    ]
    assert events(result, "gpu_unavailable") == []
    assert len(events(result, "gpu_poll_failed")) == 2
    assert len(events(result, "gpu_poll_recovered")) == 1


def test_driver_not_loaded_at_start_means_no_signal(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """A driver that is not loaded when the sidecar starts is the normal no-GPU case."""
    plan = {"steps": [{"state": "error=driver_not_loaded\n"}, POLL, POLL]}
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    assert result["readings"] == [None, None]
    [unavailable] = events(result, "gpu_unavailable")
    assert unavailable["reason"] == "Driver Not Loaded"
    assert unavailable["error_type"] == "NVMLError_DriverNotLoaded"


def test_init_is_retried_only_after_the_interval(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """A driver that appears later is picked up at the next retry, not before, and silently."""
    plan = {
        "retry_interval": 60.0,
        "steps": [
            {"state": "error=driver_not_loaded\n"},
            POLL,
            {"state": "util=12\n"},
            {"advance": 59},
            POLL,
            {"advance": 1},
            POLL,
        ],
    }
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    first, too_early, retried = result["readings"]
    assert first is None
    assert too_early is None
    assert [sample["utilization_percent"] for sample in retried["samples"]] == [12]
    assert len(events(result, "gpu_unavailable")) == 1
    assert len(events(result, "gpu_detected")) == 1


def test_no_retry_when_interval_is_none(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """retry_interval=None keeps an unavailable GPU unavailable for the monitor's life."""
    plan = {
        "retry_interval": None,
        "steps": [
            {"state": "error=driver_not_loaded\n"},
            POLL,
            {"state": ""},
            {"advance": 1e6},
            POLL,
        ],
    }
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    assert result["readings"] == [None, None]


def test_zero_devices_means_no_signal(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """NVML present but no device visible (no GPU requested) is the normal no-GPU case."""
    result = run_plan(fake_nvml_dir, tmp_path / "state", {"steps": [{"state": "count=0\n"}, POLL]})

    assert result["readings"] == [None]
    [unavailable] = events(result, "gpu_unavailable")
    assert unavailable["reason"] == "NVML reports no GPU"


def test_power_not_supported_gives_none(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """A board that cannot report power still yields a sample, with power_watts None."""
    plan = {"steps": [{"state": "util=42\npower_mw=-1\n"}, POLL]}
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    [reading] = result["readings"]
    [sample] = reading["samples"]
    assert sample["power_watts"] is None
    assert sample["utilization_percent"] == 42
    assert reading["error"] is None
    assert events(result, "gpu_poll_failed") == []


def test_indices_select_devices_and_missing_ones_are_skipped(
    tmp_path: Path, fake_nvml_dir: Path
) -> None:
    """Only the requested GPUs are sampled; an index that does not exist is reported once."""
    plan = {"indices": [1, 5], "steps": [{"state": "count=2\nutil=9\n"}, POLL, POLL]}
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    for reading in result["readings"]:
        assert [sample["index"] for sample in reading["samples"]] == [1]
    [missing] = events(result, "gpu_index_missing")
    assert missing["index"] == 5
    assert missing["device_count"] == 2
    [detected] = events(result, "gpu_detected")
    assert detected["indices"] == [1]
    assert detected["names"] == ["Fake NVML GPU 1"]


def test_all_devices_when_indices_is_none(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """Without indices every visible GPU is sampled, in NVML order."""
    result = run_plan(fake_nvml_dir, tmp_path / "state", {"steps": [{"state": "count=3\n"}, POLL]})

    [reading] = result["readings"]
    assert [sample["index"] for sample in reading["samples"]] == [0, 1, 2]


def test_no_requested_index_exists_means_no_signal(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """Watching only GPUs that are absent leaves no signal, which is reported once."""
    plan = {"indices": [3], "steps": [{"state": "count=2\n"}, POLL, POLL]}
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    assert result["readings"] == [None, None]
    [unavailable] = events(result, "gpu_unavailable")
    assert "[3]" in unavailable["reason"]


def test_close_stops_sampling(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """After close() the monitor gives no signal and NVML was shut down cleanly."""
    plan = {"steps": [POLL, PROBE, CLOSE, PROBE, POLL]}
    result = run_plan(fake_nvml_dir, tmp_path / "state", plan)

    first, after_close = result["readings"]
    assert first["samples"]
    assert after_close is None
    assert result["probes"] == [1, "NVMLError_Uninitialized"]
    assert events(result, "gpu_shutdown_failed") == []
