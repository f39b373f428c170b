"""What goes wrong around a long run, staged on the real engine (container restart mode).

The Docker daemon drops out in the middle of a recovery, the trainer container is removed
under the sidecar, and the sidecar container itself is restarted between two recoveries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_support import ContainerReachableProxy, require_docker
from e2e_support import (
    HANG_STEP,
    RESUMED_STATE,
    SIDECAR_RUN_DIR,
    SIDECAR_SCRIPT,
    TRAINER_RUN_DIR,
    Images,
    Scene,
    build_images,
    open_scene,
    report_recovery,
    seconds_between,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CONTAINER_MODE = {
    "SIDECAR_RESTART_MODE": "container",
    "SIDECAR_TRAINER_CONTAINER": "trainer",
    "SIDECAR_TRAIN_SCRIPT": SIDECAR_SCRIPT,
}
PROXY_IN_SIDECAR = "/docker-api"
OUTAGE_SECONDS = 3.0


@pytest.fixture(scope="module")
def images() -> Images:
    require_docker()
    return build_images()


@pytest.fixture
def scene(images: Images, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Scene]:
    with open_scene(tmp_path, request.node.name) as opened:
        yield opened


@pytest.fixture
def proxy() -> Iterator[ContainerReachableProxy]:
    flaky = ContainerReachableProxy()
    try:
        yield flaky
    finally:
        flaky.close()


def test_docker_daemon_unreachable_during_a_recovery(
    scene: Scene,
    proxy: ContainerReachableProxy,
    pytestconfig: pytest.Config,
    record_property: Any,
) -> None:
    """The API drops just as the stall is detected, in the middle of the recovery's calls: the
    sidecar retries them (docker_retry) until the daemon answers again, restarts the trainer,
    and the run completes."""
    scene.write_run("--save_every_n_steps 6 --save_state")
    scene.up(
        {
            "sidecar": scene.sidecar_service(
                {
                    **CONTAINER_MODE,
                    "DOCKER_HOST": f"unix://{PROXY_IN_SIDECAR}/docker.sock",
                    "SIDECAR_DOCKER_RETRY_WINDOW": "30s",
                    "SIDECAR_KILL_GRACE": "3s",
                },
                docker_socket=False,
                volumes=[f"{proxy.folder}:{PROXY_IN_SIDECAR}"],
            ),
            # No init: bash is PID 1 and ignores SIGTERM, so each restart lasts the whole stop
            # timeout (the kill grace) and the cut below lands while the restart is in flight.
            "trainer": scene.trainer_service(
                simulation={"SIM_FAULTS": f"hang_idle@step={HANG_STEP}:once"},
                depends_on={"sidecar": {"condition": "service_healthy"}},
            ),
        }
    )
    stall = scene.wait_for("stall_detected")
    proxy.cut()
    time.sleep(OUTAGE_SECONDS)  # the outage being staged, not a wait for something to happen
    proxy.restore()
    restarted = scene.wait_for("trainer_restarted", timeout=40)
    completed = scene.wait_for("training_completed", timeout=60)
    report_recovery(pytestconfig, record_property, "container, daemon cut 3 s", stall, restarted)

    events = scene.events()
    names = [event["event"] for event in events]
    between = events[names.index("stall_detected") : names.index("trainer_restarted")]
    retries = [event for event in between if event["event"] == "docker_retry"]
    assert retries, f"no docker_retry during the recovery: {names}"
    # Usually the restart call in flight (it lasts the 3 s stop timeout); when the cut comes
    # a few milliseconds sooner, the lookup of the trainer's container just before it.
    assert {r["operation"] for r in retries} <= {"restart", "inspect", "list"}, retries
    assert all(r["docker_host"] == f"unix://{PROXY_IN_SIDECAR}/docker.sock" for r in retries)
    assert "restart_failed" not in names and "gave_up" not in names
    assert seconds_between(stall, restarted) >= OUTAGE_SECONDS - 0.5
    assert restarted["checkpoint"] == f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}"
    assert completed["exit_code"] == 0
    assert f"resuming from {TRAINER_RUN_DIR}/{RESUMED_STATE}" in scene.train_log()
    assert (scene.run_dir / "my-lora.safetensors").is_file()
    assert scene.state("sidecar")["Running"]


def test_trainer_container_removed_mid_run(scene: Scene) -> None:
    """One clear trainer_unreachable error, not one per poll; the sidecar keeps running (no
    exit, no crash loop under its restart policy) and its health check keeps passing."""
    scene.write_run("--save_every_n_steps 6 --save_state")
    scene.up(
        {
            "sidecar": scene.sidecar_service(CONTAINER_MODE, restart="on-failure"),
            # Slow steps: the run is still going when the container is removed.
            "trainer": scene.trainer_service(
                simulation={"SIM_STEP_SECONDS": "0.3"},
                init=True,
                depends_on={"sidecar": {"condition": "service_healthy"}},
            ),
        }
    )
    scene.wait_for("trainer_started")
    sidecar_before = scene.state("sidecar")
    scene.container("trainer").remove(force=True)
    unreachable = scene.wait_for("trainer_unreachable")
    assert "no container named 'trainer'" in unreachable["reason"]
    # Fifty polls later (poll 0.2 s; well past the 3 s stall timeout), still that one error.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = scene.state("sidecar")
        assert state["Running"], scene.story()
        time.sleep(0.5)

    events = scene.events()
    names = [event["event"] for event in events]
    assert names.count("trainer_unreachable") == 1, names
    # Not a flood: besides that error, at most the failed recovery it leads to once the stall
    # timeout passes (today the unseen trainer counts as stalled: restart_failed, gave_up).
    after = events[names.index("trainer_unreachable") :]
    errors = [event["event"] for event in after if event["level"] == "error"]
    assert len(errors) <= 3 and set(errors) <= {"trainer_unreachable", "restart_failed", "gave_up"}
    assert names.count("sidecar_started") == 1, "the sidecar never restarted"
    sidecar = scene.state("sidecar")
    assert sidecar["Running"] and sidecar["RestartCount"] == 0
    assert sidecar["StartedAt"] == sidecar_before["StartedAt"]
    assert sidecar["Health"]["Status"] == "healthy"
    assert sidecar["Health"]["Log"][-1]["ExitCode"] == 0
    check = scene.container("sidecar").exec_run(["training-sidecar", "healthcheck"])
    assert check.exit_code == 0, check.output


def test_budget_survives_a_sidecar_restart(scene: Scene) -> None:
    """With a budget of one recovery, spent before `docker restart` of the sidecar, the next
    stall makes the restarted sidecar give up instead of restarting the trainer again."""
    scene.write_run("--save_every_n_steps 6 --save_state")
    scene.up(
        {
            "sidecar": scene.sidecar_service({**CONTAINER_MODE, "SIDECAR_MAX_RESTARTS": "1"}),
            # Hangs at step 20 of every run: the resumed run hangs again.
            "trainer": scene.trainer_service(
                simulation={"SIM_FAULTS": f"hang_idle@step={HANG_STEP}"},
                init=True,
                depends_on={"sidecar": {"condition": "service_healthy"}},
            ),
        }
    )
    scene.wait_for("trainer_restarted")
    assert len(scene.ledger()["recoveries"]) == 1
    scene.container("sidecar").restart(timeout=10)
    scene.wait_for("sidecar_started", count=2)
    gave_up = scene.wait_for("gave_up", timeout=40)

    names = [event["event"] for event in scene.events()]
    second_life = names[names.index("sidecar_started", 1) :]
    assert "stall_detected" in second_life
    assert names.count("trainer_restarted") == 1, "no second restart after the sidecar's own"
    assert gave_up["restarts"] == 1 and gave_up["max_restarts"] == 1
    assert "budget" in gave_up["reason"]
    ledger = scene.ledger()
    assert len(ledger["recoveries"]) == 1
    assert ledger["recoveries"][0]["checkpoint"] == f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}"
    assert ledger["gave_up"] is True
    # Given up: train.sh keeps the pointer of the one recovery, nothing was relaunched.
    assert f'--resume "{TRAINER_RUN_DIR}/' in (scene.run_dir / "train.sh").read_text()
    assert scene.state("sidecar")["Running"]
