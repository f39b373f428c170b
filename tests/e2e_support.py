"""End-to-end scenes on the real Docker engine: the two images, a shared outputs folder,
one compose project per test, and the sidecar's JSON events read back from `docker logs`.

Two images are built once per session (and cached by Docker's layer cache across sessions):

- the sidecar image from the repository's Dockerfile, under the same tag and build arguments
  as test_packaging, so both share one build;
- a trainer image (tests/e2e/trainer): the base image, the sidecar image's venv (which holds
  the simulator) and a FluxGym-like root at /app/fluxgym built inside the image, running as
  UID 1000 like FluxGym's own image.

A variant of the trainer image (tests/e2e/venv-ui) is built on top of it for the tests that
need a venv-based install, whose accelerate only the UI's own PATH reaches.

The test writes `outputs/my-lora/{train.sh,dataset.toml,sample_prompts.txt}` into a host
folder that the trainer sees at /app/fluxgym/outputs and the sidecar at /outputs, then brings
up a compose project written for the test. Everything carries the test labels and is removed
with `compose down -v --remove-orphans` when the scene closes, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from conftest import FAST_SETTINGS
from docker_support import (
    BASE_IMAGE,
    DOCKER_SOCKET,
    SESSION_ID,
    SESSION_LABEL,
    TEST_LABEL,
    build_image,
    docker_client,
    remove_session_containers,
    run_command,
    unique_name,
)

from sidecar import __version__
from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

ROOT = Path(__file__).resolve().parent.parent
# The tag test_packaging builds: same context and build arguments, so one build serves both.
SIDECAR_IMAGE = "training-sidecar:test"
TRAINER_IMAGE = "training-sidecar-e2e-trainer:test"
TRAINER_CONTEXT = Path(__file__).resolve().parent / "e2e" / "trainer"
# The trainer image as a venv-based install: accelerate only on the UI process's PATH.
VENV_UI_IMAGE = "training-sidecar-e2e-venv-ui:test"
VENV_UI_CONTEXT = Path(__file__).resolve().parent / "e2e" / "venv-ui"

FLUXGYM_ROOT = "/app/fluxgym"
RUN_NAME = "my-lora"
TRAINER_OUTPUTS = f"{FLUXGYM_ROOT}/outputs"
SIDECAR_OUTPUTS = "/outputs"
TRAINER_RUN_DIR = f"{TRAINER_OUTPUTS}/{RUN_NAME}"
SIDECAR_RUN_DIR = f"{SIDECAR_OUTPUTS}/{RUN_NAME}"
TRAINER_SCRIPT = f"{TRAINER_RUN_DIR}/train.sh"
SIDECAR_SCRIPT = f"{SIDECAR_RUN_DIR}/train.sh"
TRAINER_UID = 1000

# How FluxGym's UI (and compose.container.yaml) runs a training, with its output kept.
TRAIN_COMMAND = ["bash", "-c", f"exec bash {TRAINER_SCRIPT} >> {TRAINER_RUN_DIR}/train.log 2>&1"]

# The unit tests' fast settings, with a little more slack: a container start on a 2-core
# machine (interpreter start, imports) takes longer than a local process start.
FAST_SIDECAR = {
    **FAST_SETTINGS,
    "SIDECAR_STALL_TIMEOUT": "3s",
    "SIDECAR_STARTUP_GRACE": "6s",
    "SIDECAR_PATH_MAP": f"{SIDECAR_OUTPUTS}:{TRAINER_OUTPUTS}",
}
# 16 epochs x 4 steps = 64 steps of 0.05 s; a state every 6 steps (with --save_every_n_steps 6),
# so a hang at step 20 leaves step 6, 12 and 18 states behind and step 18 is the one to resume.
FAST_TRAINER = {
    "SIM_STEPS_PER_EPOCH": "4",
    "SIM_STEP_SECONDS": "0.05",
    "SIM_STARTUP_SECONDS": "0.2",
    "SIM_SAMPLE_SECONDS": "0.05",
}
HANG_STEP = 20
RESUMED_STATE = f"{RUN_NAME}-step00000018-state"


# -- images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    sidecar: str
    trainer: str
    sidecar_bytes: int
    trainer_bytes: int


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the end-to-end tests cannot run: {reason}")
    pytest.skip(reason)


@functools.cache
def build_images() -> Images:
    """Both images, built once per pytest process (each test module asks; one build runs)."""
    sidecar_bytes = build_image(
        SIDECAR_IMAGE, ROOT, {"BASE_IMAGE": BASE_IMAGE, "VERSION": __version__}
    )
    trainer_bytes = build_image(
        TRAINER_IMAGE, TRAINER_CONTEXT, {"BASE_IMAGE": BASE_IMAGE, "SIDECAR_IMAGE": SIDECAR_IMAGE}
    )
    return Images(SIDECAR_IMAGE, TRAINER_IMAGE, sidecar_bytes, trainer_bytes)


@functools.cache
def build_venv_ui_image() -> str:
    """The venv-UI variant of the trainer image (tests/e2e/venv-ui), on top of build_images."""
    images = build_images()
    build_image(VENV_UI_IMAGE, VENV_UI_CONTEXT, {"TRAINER_IMAGE": images.trainer})
    return VENV_UI_IMAGE


def compose_command() -> list[str]:
    """Compose v2: the venv's docker-compose binary, else the `docker compose` plugin."""
    beside_python = Path(sys.executable).parent / "docker-compose"
    if os.access(beside_python, os.X_OK):
        return [str(beside_python)]
    if shutil.which("docker") and run_command(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    _unavailable("Docker Compose v2 not installed (run .ci/provision-docker.sh)")
    raise AssertionError("unreachable")


# -- reporting -------------------------------------------------------------------------------


def announce(config: pytest.Config, text: str) -> None:
    """A line on the terminal even while output is captured (measured figures)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(text, flush=True)


def event_time(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


def seconds_between(first: dict[str, Any], second: dict[str, Any]) -> float:
    return (event_time(second) - event_time(first)).total_seconds()


def report_recovery(
    config: pytest.Config,
    record_property: Callable[[str, object], None],
    label: str,
    stall: dict[str, Any],
    restarted: dict[str, Any],
) -> float:
    """Print and record the time from `stall_detected` to `trainer_restarted`."""
    seconds = seconds_between(stall, restarted)
    record_property(f"recovery_seconds_{label}", round(seconds, 3))
    announce(config, f"\n[e2e] {label}: stall_detected -> trainer_restarted in {seconds:.2f} s")
    return seconds


# -- the shared outputs folder ---------------------------------------------------------------


def write_fluxgym_run(
    outputs: Path,
    *,
    extra_trainer_args: str,
    fixture: str = "fluxgym-20g-default.sh",
    scratch: Path,
) -> Path:
    """Write outputs/my-lora/ as FluxGym does, with paths in the trainer's view (/app/fluxgym).

    build_fluxgym_tree renders FluxGym's own script and helper files for a root on this host;
    mapping that root back to /app/fluxgym gives exactly the files FluxGym writes in its image.
    """
    tree = build_fluxgym_tree(
        scratch, name=RUN_NAME, fixture=fixture, extra_trainer_args=extra_trainer_args
    )
    run_dir = outputs / RUN_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train.sh", "dataset.toml", "sample_prompts.txt"):
        text = (tree.output_dir / name).read_text(encoding="utf-8")
        (run_dir / name).write_text(text.replace(str(tree.root), FLUXGYM_ROOT), encoding="utf-8")
    give_to_trainer_uid(outputs)
    return run_dir / "train.sh"


def give_to_trainer_uid(folder: Path) -> None:
    """Trainer and sidecar run as UID 1000 and write here (states, train.sh, the ledger)."""
    for path in [folder, *folder.rglob("*")]:
        _hand_over(path)


def _hand_over(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, TRAINER_UID, TRAINER_UID)
    else:  # not root (a developer in the docker group): open it to everyone instead
        path.chmod(0o777 if path.is_dir() else 0o666)


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    _hand_over(partial)
    os.replace(partial, path)


# -- a compose project -----------------------------------------------------------------------


class Scene:
    """One compose project: a sidecar, a trainer, the outputs folder they share."""

    def __init__(self, folder: Path, label: str) -> None:
        self.folder = folder
        self.project = unique_name(label)
        self.outputs = folder / "outputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        give_to_trainer_uid(self.outputs)
        self.run_dir = self.outputs / RUN_NAME
        self.compose_file = folder / "compose.yaml"
        self.client = docker_client()
        self._compose = compose_command()
        self._started = False

    # -- setting up ------------------------------------------------------------------------

    def write_run(self, extra_trainer_args: str, **options: Any) -> Path:
        return write_fluxgym_run(
            self.outputs,
            extra_trainer_args=extra_trainer_args,
            scratch=self.folder / "host-tree",
            **options,
        )

    def sidecar_service(
        self,
        environment: dict[str, str],
        *,
        docker_socket: bool = True,
        volumes: list[str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The sidecar image as the project's compose files run it: init, UID 1000, /outputs."""
        service: dict[str, Any] = {
            "image": SIDECAR_IMAGE,
            "command": ["run"],
            "init": True,
            "user": f"{TRAINER_UID}:{TRAINER_UID}",
            "environment": {**FAST_SIDECAR, **environment},
            "volumes": [f"{self.outputs}:{SIDECAR_OUTPUTS}", *(volumes or [])],
            "labels": self._labels(),
            # The image's check every second instead of every 30 s, so that `depends_on:
            # service_healthy` and the health assertions do not wait half a minute.
            "healthcheck": {
                "test": ["CMD", "training-sidecar", "healthcheck"],
                "interval": "1s",
                "timeout": "10s",
                "retries": 3,
                "start_period": "10s",
            },
            "stop_grace_period": "10s",
        }
        if docker_socket:
            # The raw socket, kept at UID 1000 (the trainer's UID, needed to signal it in the
            # other modes) with the socket's group added rather than running as root. The
            # shipped compose files put a filtering proxy in between; that proxy image cannot
            # be pulled here, and what these tests exercise is the sidecar, not the filter.
            service["volumes"].append(f"{DOCKER_SOCKET}:{DOCKER_SOCKET}")
            service["group_add"] = [str(os.stat(DOCKER_SOCKET).st_gid)]
        service.update(extra)
        return service

    def trainer_service(
        self,
        *,
        command: list[str] | None = None,
        simulation: dict[str, str] | None = None,
        environment: dict[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The FluxGym stand-in: its root in the image, the outputs folder bind-mounted."""
        service: dict[str, Any] = {
            "image": TRAINER_IMAGE,
            "command": command or TRAIN_COMMAND,
            "working_dir": FLUXGYM_ROOT,
            "environment": {**FAST_TRAINER, **(simulation or {}), **(environment or {})},
            "volumes": [f"{self.outputs}:{TRAINER_OUTPUTS}"],
            "labels": self._labels(),
            "restart": "no",
            "stop_grace_period": "1s",
        }
        service.update(extra)
        return service

    def exec_services(self, **trainer: Any) -> dict[str, dict[str, Any]]:
        """exec mode beside a long-lived UI container, as compose.yaml sets it up.

        The sidecar follows the outputs ROOT (it finds the run the UI starts); the UI's
        container joins the sidecar's PID namespace. ``trainer`` goes to trainer_service.
        """
        sidecar = {
            "SIDECAR_RESTART_MODE": "exec",
            "SIDECAR_TRAINER_CONTAINER": "trainer",
            "SIDECAR_OUTPUT_DIR": SIDECAR_OUTPUTS,
        }
        return {
            "sidecar": self.sidecar_service(sidecar),
            "trainer": self.trainer_service(
                pid="service:sidecar",
                depends_on={"sidecar": {"condition": "service_started"}},
                **trainer,
            ),
        }

    def up(self, services: dict[str, dict[str, Any]]) -> None:
        """Write the compose file and `docker compose up -d` it."""
        self.compose_file.write_text(json.dumps({"services": services}, indent=2) + "\n")
        self._started = True
        result = self._compose_run("up", "--detach", timeout=180)
        if result.returncode != 0:
            raise AssertionError(f"compose up failed:\n{result.stdout}\n{result.stderr}")

    def close(self) -> None:
        try:
            if self._started:
                self._compose_run("down", "--volumes", "--remove-orphans", "--timeout", "2")
        finally:
            # Catches anything labelled ours that compose did not remove.
            remove_session_containers(self.client)
            self.client.close()

    def _compose_run(
        self, *arguments: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("COMPOSE_", "DOCKER_HOST"))
        }
        return run_command(
            [
                *self._compose,
                "--project-name",
                self.project,
                "--file",
                str(self.compose_file),
                *arguments,
            ],
            timeout=timeout,
            env=env,
            cwd=self.folder,
        )

    def _labels(self) -> dict[str, str]:
        return {TEST_LABEL: "1", SESSION_LABEL: SESSION_ID}

    # -- looking ---------------------------------------------------------------------------

    def container(self, service: str) -> Any:
        """The service's container, freshly inspected."""
        found = self.client.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        assert len(found) == 1, f"expected one {service} container, found {len(found)}"
        return found[0]

    def state(self, service: str) -> dict[str, Any]:
        container = self.container(service)
        state: dict[str, Any] = container.attrs["State"]
        return {**state, "RestartCount": container.attrs["RestartCount"], "Id": container.id}

    def events(self, service: str = "sidecar") -> list[dict[str, Any]]:
        """The sidecar's JSON events from `docker logs` (stdout only), across its restarts."""
        try:
            raw = self.container(service).logs(stdout=True, stderr=False)
        except docker.errors.NotFound:
            return []
        events = []
        for line in raw.decode("utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
        return events

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events() if event["event"] == name]

    def wait_for(self, name: str, *, timeout: float = 60, count: int = 1) -> dict[str, Any]:
        """The ``count``-th event called ``name``; fails with the whole story after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            matching = self.named(name)
            if len(matching) >= count:
                return matching[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} #{count} within {timeout:g} s\n{self.story()}")
            time.sleep(0.1)

    def wait_until(self, what: str, predicate: Callable[[], Any], *, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g} s\n{self.story()}")
            time.sleep(0.1)

    def train_log(self) -> str:
        try:
            return (self.run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def ledger(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.run_dir / ".sidecar" / "state.json").read_text())
        return data

    def story(self) -> str:
        """What happened, for a failure message: events, the sidecar's stderr, the trainer."""
        lines = [f"compose project {self.project}"]
        with contextlib.suppress(Exception):
            lines.append("events: " + ", ".join(event["event"] for event in self.events()))
        for service in ("sidecar", "trainer"):
            with contextlib.suppress(Exception):
                container = self.container(service)
                state = container.attrs["State"]
                lines.append(
                    f"{service}: {state['Status']} exit={state['ExitCode']} "
                    f"restarts={container.attrs['RestartCount']}"
                )
                stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
                if stderr.strip():
                    lines.append(f"{service} stderr:\n{stderr[-2000:]}")
        lines.append(f"train.log tail:\n{self.train_log()[-1500:]}")
        return "\n".join(lines)

    # -- added for the interruption tests ----------------------------------------------------

    def compose(self, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`docker compose <arguments>` on this project (`exec -T sidecar ...`, say)."""
        return self._compose_run(*arguments, timeout=timeout)


@contextlib.contextmanager
def open_scene(folder: Path, test_name: str) -> Iterator[Scene]:
    """A scene for one test, named after it; torn down whatever happens."""
    label = test_name.removeprefix("test_")[:20].strip("_").replace("_", "-")
    scene = Scene(folder, label)
    try:
        yield scene
    finally:
        scene.close()


def step_seen(log: str, step: int, total: int) -> bool:
    """Whether the tqdm bar in ``log`` has shown ``step/total``."""
    return f"| {step}/{total} [" in log
