"""The three container restart modes end to end, on the real engine with the real images.

Each test brings up a compose project (sidecar image + trainer image), lets the simulated
trainer hang once at step 20, and follows the recovery through the sidecar's events, the
containers' state and the files on the shared outputs folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from docker_support import DOCKER_SOCKET, require_docker
from e2e_support import (
    FLUXGYM_ROOT,
    HANG_STEP,
    RESUMED_STATE,
    SIDECAR_OUTPUTS,
    SIDECAR_RUN_DIR,
    SIDECAR_SCRIPT,
    TRAINER_RUN_DIR,
    TRAINER_SCRIPT,
    Images,
    Scene,
    announce,
    build_images,
    build_venv_ui_image,
    open_scene,
    report_recovery,
)

from sidecar.trainers.shell.train_script import parse_train_script

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HANG_ONCE = {"SIM_FAULTS": f"hang_idle@step={HANG_STEP}:once"}
# A second hang after the relaunched trainer's second save: two relaunches, the second of a
# trainer that the sidecar itself had relaunched.
HANG_TWICE = {"SIM_FAULTS": f"hang_idle@step={HANG_STEP}:run=1;hang_idle@save=2:run=2"}
# The UI stand-in (tests/e2e/venv-ui/ui_launcher.py) starts train.sh once this file exists.
UI_START_FILE = "/tmp/start-training"


@pytest.fixture(scope="module")
def images(pytestconfig: pytest.Config) -> Images:
    require_docker()
    built = build_images()
    announce(
        pytestconfig,
        f"\n[e2e] {built.sidecar}: {built.sidecar_bytes / 1e6:.1f} MB, "
        f"{built.trainer}: {built.trainer_bytes / 1e6:.1f} MB",
    )
    return built


@pytest.fixture(scope="module")
def venv_ui_image(images: Images) -> str:
    return build_venv_ui_image()


@pytest.fixture
def scene(images: Images, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Scene]:
    with open_scene(tmp_path, request.node.name) as opened:
        yield opened


def _rewrites_before(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """train_script_rewritten events logged before the first ``name`` event."""
    names = [event["event"] for event in events]
    return [e for e in events[: names.index(name)] if e["event"] == "train_script_rewritten"]


def _assert_resumed_and_completed(scene: Scene) -> None:
    """On disk: the restarted trainer resumed from the step-18 state and wrote the final model."""
    log = scene.train_log()
    assert f"resuming from {TRAINER_RUN_DIR}/{RESUMED_STATE}" in log, log[-2000:]
    assert (scene.run_dir / "my-lora.safetensors").is_file()
    ledger = scene.ledger()
    assert [r["checkpoint"] for r in ledger["recoveries"]] == [f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}"]
    assert ledger["completed"] is True
    command = parse_train_script((scene.run_dir / "train.sh").read_text())
    assert command.save_state
    # Trainer-view path, whichever complete checkpoint it was last kept pointing at.
    assert command.resume is not None
    assert re.fullmatch(rf"{TRAINER_RUN_DIR}/my-lora-(step\d{{8}}|\d{{6}})-state", command.resume)


def test_container_mode_restarts_the_trainer_container_via_compose(
    scene: Scene, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """compose up; a hang is detected, train.sh points at the step-18 state in the trainer's
    view, the same container is restarted through the Engine API, resumes and completes, and
    the sidecar stays up afterwards."""
    # FluxGym's default script: no --save_state. The sidecar adds it before the trainer starts
    # (the trainer waits for the sidecar to be healthy, as in compose.container.yaml).
    scene.write_run("--save_every_n_steps 6")
    original = (scene.run_dir / "train.sh").read_text()
    assert not parse_train_script(original).save_state
    scene.up(
        {
            "sidecar": scene.sidecar_service(
                {
                    "SIDECAR_RESTART_MODE": "container",
                    "SIDECAR_TRAINER_CONTAINER": "trainer",  # a service of its own project
                    "SIDECAR_TRAIN_SCRIPT": SIDECAR_SCRIPT,
                }
            ),
            "trainer": scene.trainer_service(
                simulation=HANG_ONCE,
                init=True,
                depends_on={"sidecar": {"condition": "service_healthy"}},
            ),
        }
    )
    first = scene.state("trainer")
    stall = scene.wait_for("stall_detected")
    restarted = scene.wait_for("trainer_restarted")
    completed = scene.wait_for("training_completed", timeout=60)
    report_recovery(pytestconfig, record_property, "container", stall, restarted)

    events = scene.events()
    names = [event["event"] for event in events]
    started = scene.named("sidecar_started")[0]
    assert started["settings"]["restart_mode"] == "container"
    # --save_state was added before the trainer's first start.
    first_rewrite = scene.named("train_script_rewritten")[0]
    assert "--save_state" in first_rewrite["reason"]
    assert names.index("train_script_rewritten") < names.index("trainer_started")
    assert stall["last_step"] == HANG_STEP
    selected = scene.named("checkpoint_selected")[0]
    assert selected["checkpoint"] == f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}"
    # train.sh was pointed at it in the TRAINER's view before the restart (by the recovery,
    # or already by keeping the pointer current while the run was healthy).
    assert f"{TRAINER_RUN_DIR}/{RESUMED_STATE}" in [
        e["resume"] for e in _rewrites_before(events, "trainer_restarted")
    ]
    assert restarted["mode"] == "container"
    assert restarted["checkpoint"] == f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}"
    assert names.count("trainer_restarted") == 1
    assert completed["exit_code"] == 0

    after = scene.state("trainer")
    assert after["Id"] == first["Id"], "restarted, not recreated"
    assert after["StartedAt"] != first["StartedAt"]
    assert (after["Status"], after["ExitCode"]) == ("exited", 0)
    _assert_resumed_and_completed(scene)
    assert (scene.run_dir / "train.sh.orig").read_text() == original

    # Container modes stay up for the next run: still running a few polls later.
    scene.wait_until("heartbeat", lambda: scene.state("sidecar")["Health"]["Status"] == "healthy")
    sidecar = scene.state("sidecar")
    assert sidecar["Running"] and sidecar["RestartCount"] == 0
    assert "stall_detected" not in [e["event"] for e in scene.events()[len(events) :]]


def test_exec_mode_relaunches_inside_the_long_lived_container(
    scene: Scene, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """The UI's container keeps its main process; the sidecar finds the run under the outputs
    root, kills only the training processes and relaunches train.sh with docker exec."""
    scene.write_run("--save_every_n_steps 6 --save_state")
    # python's http.server stands in for FluxGym's web UI: the container's main process,
    # which must survive every recovery.
    scene.up(
        scene.exec_services(command=["python3", "-m", "http.server", "7860"], simulation=HANG_ONCE)
    )
    scene.wait_for("run_selected")
    ui = scene.state("trainer")
    # As the UI does: start train.sh in its container; what it prints goes nowhere we read.
    scene.container("trainer").exec_run(
        ["bash", "-c", f"exec bash {TRAINER_SCRIPT} > /dev/null 2>&1"],
        detach=True,
        workdir=FLUXGYM_ROOT,
    )
    begun = scene.wait_for("trainer_started")
    stall = scene.wait_for("stall_detected")
    restarted = scene.wait_for("trainer_restarted")
    completed = scene.wait_for("training_completed", timeout=60)
    report_recovery(pytestconfig, record_property, "exec", stall, restarted)

    selected = scene.named("run_selected")[0]
    assert selected["train_script"] == SIDECAR_SCRIPT
    assert scene.named("sidecar_started")[0]["following"] == SIDECAR_OUTPUTS
    assert begun["source"] == "external" and begun["mode"] == "exec"
    # No train.log before the relaunch: the trainer's writes into its pipe were the signal.
    assert stall["last_step"] is None and stall["seconds_since_progress"] >= 3
    assert scene.named("trainer_stopped"), "the hung training processes were stopped first"
    assert restarted["mode"] == "exec"
    assert restarted["checkpoint"] == f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}"
    assert completed["exit_code"] == 0

    after = scene.state("trainer")
    assert after["Pid"] == ui["Pid"] and after["StartedAt"] == ui["StartedAt"]
    assert after["Running"] and after["RestartCount"] == 0
    assert "http.server" in " ".join(psutil.Process(after["Pid"]).cmdline())
    left = [" ".join(row) for row in scene.container("trainer").top()["Processes"]]
    assert not [row for row in left if "train.sh" in row or "flux_train" in row], left
    _assert_resumed_and_completed(scene)


def test_exec_mode_relaunches_with_the_environment_the_ui_gave_train_sh(
    scene: Scene, venv_ui_image: str, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """A venv-based install: accelerate is only on the PATH the UI process gave train.sh, not
    on the container's. Each relaunch uses the environment and working directory read from
    the original train.sh process (kept across relaunches) and resumes; with the container's
    plain exec environment train.sh would end at once with `accelerate: command not found`."""
    scene.write_run("--save_every_n_steps 6 --save_state")
    scene.up(
        scene.exec_services(
            image=venv_ui_image,
            command=["python3", f"{FLUXGYM_ROOT}/ui_launcher.py"],
            simulation=HANG_TWICE,
            environment={"UI_TRAIN_SCRIPT": TRAINER_SCRIPT, "UI_START_FILE": UI_START_FILE},
        )
    )
    scene.wait_for("run_selected")
    ui = scene.container("trainer")
    # The premise: a plain exec in this container cannot find accelerate.
    assert ui.exec_run(["bash", "-c", "command -v accelerate"]).exit_code == 1
    ui.exec_run(["touch", UI_START_FILE])  # "Start training" in the UI
    first = scene.wait_for("trainer_restarted")
    second = scene.wait_for("trainer_restarted", count=2)
    completed = scene.wait_for("training_completed", timeout=60)
    report_recovery(
        pytestconfig, record_property, "exec-venv", scene.named("stall_detected")[1], second
    )

    relaunches = scene.named("relaunch_environment")
    assert len(relaunches) == 2, scene.story()
    for relaunch in relaunches:
        assert relaunch["environment"] == "original_process", relaunch
        assert (relaunch["workdir"], relaunch["workdir_from"]) == (FLUXGYM_ROOT, "original_process")
        assert {"PATH", "VIRTUAL_ENV", "HOME", "SIM_FAULTS"} <= set(relaunch["variables"])
        assert not {"_", "SHLVL", "PWD", "OLDPWD"} & set(relaunch["variables"])
    assert first["checkpoint"] == f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}"
    assert completed["exit_code"] == 0
    log = scene.train_log()
    assert "command not found" not in log, log[-2000:]
    assert log.count("resuming from") == 2, log[-2000:]
    assert (scene.run_dir / "my-lora.safetensors").is_file()
    assert len(scene.ledger()["recoveries"]) == 2
    assert scene.state("trainer")["Running"], "the UI stayed up"


def test_signal_mode_lets_the_restart_policy_bring_the_trainer_back(
    scene: Scene, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """Without a Docker socket: the sidecar points train.sh at the checkpoint and kills the
    trainer's processes; Docker's on-failure policy restarts the container, which resumes."""
    scene.write_run("--save_every_n_steps 6 --save_state")
    scene.up(
        {
            "sidecar": scene.sidecar_service(
                {"SIDECAR_RESTART_MODE": "signal", "SIDECAR_TRAIN_SCRIPT": SIDECAR_SCRIPT},
                docker_socket=False,
            ),
            "trainer": scene.trainer_service(
                simulation=HANG_ONCE,
                pid="service:sidecar",
                restart="on-failure",
                depends_on={"sidecar": {"condition": "service_healthy"}},
            ),
        }
    )
    stall = scene.wait_for("stall_detected")
    restarted = scene.wait_for("trainer_restarted")
    completed = scene.wait_for("training_completed", timeout=60)
    report_recovery(pytestconfig, record_property, "signal", stall, restarted)

    sidecar = scene.container("sidecar").attrs
    assert not any(DOCKER_SOCKET in mount["Destination"] for mount in sidecar["Mounts"])
    assert stall["last_step"] == HANG_STEP
    events = scene.events()
    assert f"{TRAINER_RUN_DIR}/{RESUMED_STATE}" in [
        e["resume"] for e in _rewrites_before(events, "trainer_restarted")
    ]
    assert restarted["mode"] == "signal"
    assert completed["reason"].startswith("trainer ended with the final model")

    trainer = scene.state("trainer")
    assert trainer["RestartCount"] == 1, "restarted once, by Docker's restart policy"
    assert (trainer["Status"], trainer["ExitCode"]) == ("exited", 0)
    assert scene.state("sidecar")["Running"]
    _assert_resumed_and_completed(scene)
