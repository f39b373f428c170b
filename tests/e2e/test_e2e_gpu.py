"""The GPU signal inside the real sidecar image: pynvml loading a stand-in libnvidia-ml.so.1.

The fake library (tests/nvml_stub) is compiled on the host (the same Debian release as the
base image) and mounted into the sidecar container, found through LD_LIBRARY_PATH. It reads
its answers from a state file on the shared outputs folder, which the simulated trainer
rewrites as its GPU activity changes (`SIM_GPU_STATE_FILE`), or which the test writes itself.
Container restart mode, so the whole chain runs as deployed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_support import require_docker
from e2e_support import (
    HANG_STEP,
    SIDECAR_OUTPUTS,
    SIDECAR_SCRIPT,
    TRAINER_OUTPUTS,
    Images,
    Scene,
    build_images,
    open_scene,
    report_recovery,
    seconds_between,
    step_seen,
    write_atomically,
)
from nvml_stub.build import STATE_FILE_VARIABLE, CompilerMissing, build_fake_nvml

pytestmark = [pytest.mark.docker, pytest.mark.slow]

NVML_IN_SIDECAR = "/opt/fake-nvml"
STATE_FILE = "gpu.state"


@pytest.fixture(scope="module")
def images() -> Images:
    require_docker()
    return build_images()


@pytest.fixture(scope="module")
def fake_nvml_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fake-nvml")
    try:
        library = build_fake_nvml(folder)
    except CompilerMissing as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the fake NVML library cannot be built: {error}")
        pytest.skip(str(error))
    # The sidecar runs as UID 1000; pytest's temporary folders are private to root.
    os.chmod(folder, 0o755)
    os.chmod(library, 0o755)
    return folder


@pytest.fixture
def scene(images: Images, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Scene]:
    with open_scene(tmp_path, request.node.name) as opened:
        yield opened


def _up_with_gpu(
    scene: Scene,
    nvml: Path,
    *,
    sidecar: dict[str, str],
    simulation: dict[str, str],
    trainer_writes_gpu_state: bool = True,
) -> None:
    scene.write_run("--save_every_n_steps 6 --save_state")
    gpu_state = {"SIM_GPU_STATE_FILE": f"{TRAINER_OUTPUTS}/{STATE_FILE}"}
    scene.up(
        {
            "sidecar": scene.sidecar_service(
                {
                    "SIDECAR_RESTART_MODE": "container",
                    "SIDECAR_TRAINER_CONTAINER": "trainer",
                    "SIDECAR_TRAIN_SCRIPT": SIDECAR_SCRIPT,
                    "LD_LIBRARY_PATH": NVML_IN_SIDECAR,
                    STATE_FILE_VARIABLE: f"{SIDECAR_OUTPUTS}/{STATE_FILE}",
                    **sidecar,
                },
                volumes=[f"{nvml}:{NVML_IN_SIDECAR}:ro"],
            ),
            "trainer": scene.trainer_service(
                simulation={**(gpu_state if trainer_writes_gpu_state else {}), **simulation},
                init=True,
                depends_on={"sidecar": {"condition": "service_healthy"}},
            ),
        }
    )


def test_idle_gpu_gives_a_fast_verdict(
    scene: Scene, fake_nvml_folder: Path, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """Stall timeout 60 s, GPU idle timeout 2 s: an idle hang is caught by the GPU rule, in
    seconds, and the run is recovered."""
    _up_with_gpu(
        scene,
        fake_nvml_folder,
        sidecar={"SIDECAR_STALL_TIMEOUT": "60s", "SIDECAR_GPU_IDLE_TIMEOUT": "2s"},
        simulation={"SIM_FAULTS": f"hang_idle@step={HANG_STEP}:once"},
    )
    detected = scene.wait_for("gpu_detected")
    stall = scene.wait_for("stall_detected", timeout=40)
    restarted = scene.wait_for("trainer_restarted")
    scene.wait_for("training_completed", timeout=60)
    report_recovery(pytestconfig, record_property, "container, GPU idle", stall, restarted)

    assert detected["count"] == 1
    assert stall["reason"].startswith("GPU idle")
    assert stall["gpu_utilization"] == [0]
    assert stall["last_step"] == HANG_STEP
    assert 2 <= stall["seconds_since_progress"] < 15, "well before the 60 s stall timeout"
    started = scene.named("trainer_started")[0]
    assert seconds_between(started, stall) < 30
    assert (scene.run_dir / "my-lora.safetensors").is_file()


def test_busy_gpu_without_progress_is_still_a_stall(
    scene: Scene, fake_nvml_folder: Path, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """100% utilisation at idle power and no step (a hung collective) is no progress: the
    stall timeout catches it, and the verdict carries the GPU figures."""
    _up_with_gpu(
        scene,
        fake_nvml_folder,
        # Only the stall timeout may catch it: the GPU rule is kept out of reach, so the
        # verdict shows that a busy GPU did not count as progress.
        sidecar={"SIDECAR_STALL_TIMEOUT": "3s", "SIDECAR_GPU_IDLE_TIMEOUT": "1h"},
        simulation={"SIM_FAULTS": f"hang_busy@step={HANG_STEP}:once"},
    )
    scene.wait_for("gpu_detected")
    stall = scene.wait_for("stall_detected", timeout=40)
    restarted = scene.wait_for("trainer_restarted")
    scene.wait_for("training_completed", timeout=60)
    report_recovery(pytestconfig, record_property, "container, GPU busy", stall, restarted)

    assert stall["reason"].startswith("no progress for")
    assert stall["gpu_utilization"] == [100]
    assert stall["last_step"] == HANG_STEP
    assert (scene.run_dir / "my-lora.safetensors").is_file()


def test_nvml_error_mid_run_is_reported_once_and_the_run_goes_on(
    scene: Scene, fake_nvml_folder: Path
) -> None:
    """The card is lost in the middle of a healthy run: one gpu_poll_failed, no verdict from
    it, the loop keeps polling and sees the run complete."""
    # The test drives the state file alone: the simulator would overwrite the error line.
    state = scene.outputs / STATE_FILE
    write_atomically(state, "util=97\npower_mw=250000\n")
    _up_with_gpu(
        scene,
        fake_nvml_folder,
        sidecar={"SIDECAR_GPU_IDLE_TIMEOUT": "2s"},
        simulation={"SIM_STEP_SECONDS": "0.1"},
        trainer_writes_gpu_state=False,
    )
    scene.wait_for("gpu_detected")
    scene.wait_until("step 10 in train.log", lambda: step_seen(scene.train_log(), 10, 64))
    write_atomically(state, "util=97\npower_mw=250000\nerror=gpu_lost\n")
    failed = scene.wait_for("gpu_poll_failed")
    completed = scene.wait_for("training_completed", timeout=60)

    assert failed["error_type"] == "NVMLError_GpuIsLost"
    assert seconds_between(failed, completed) > 0
    names = [event["event"] for event in scene.events()]
    assert names.count("gpu_poll_failed") == 1, names
    assert "stall_detected" not in names and "trainer_restarted" not in names
    assert completed["exit_code"] == 0
    assert (scene.run_dir / "my-lora.safetensors").is_file()
    assert scene.state("sidecar")["Running"]
