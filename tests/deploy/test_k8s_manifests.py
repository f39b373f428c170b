"""The Kubernetes manifests: every overlay renders, validates offline, and keeps its safety.

Each overlay under k8s/overlays is rendered with `kubectl kustomize`, validated with
`kubernetes-validate --strict` against Kubernetes 1.29 and 1.33, and its pod is checked
for the properties the sidecar depends on (shared PID namespace, GPU on the trainer
only, a non-root sidecar that cannot escalate, the intended restart mode) and for the
Pod Security profile it claims. A later edit that drops one of them fails here.
Without kubectl the tests skip on a laptop and fail under CI (env CI set).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from repo_paths import REPO_ROOT

from sidecar.config import Settings, parse_duration
from sidecar.observe.trainer_processes import DEFAULT_TRAINER_PATTERN

ROOT = REPO_ROOT
K8S = ROOT / "k8s"
OVERLAYS = K8S / "overlays"
# The versions CI validates every overlay against: the first with native sidecars on by
# default, and the one where they became stable.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")


@dataclass(frozen=True)
class Profile:
    """What an overlay promises."""

    restart_mode: str  # SIDECAR_RESTART_MODE
    native_sidecar: bool  # an init container with restartPolicy Always
    pod_security: str  # the strictest Pod Security level it passes
    extra_versions: tuple[str, ...] = ()


# Every overlay must be listed here: a new one cannot ship without stating its promises.
PROFILES = {
    "job": Profile("signal", native_sidecar=True, pod_security="restricted"),
    "job-pre-1.29": Profile(
        "signal",
        native_sidecar=False,
        pod_security="restricted",
        # Meant for older clusters: it must not use a field they lack.
        extra_versions=("1.27.0", "1.28.0"),
    ),
    "job-baseline": Profile("signal", native_sidecar=True, pod_security="baseline"),
    "job-pod-mode": Profile("pod", native_sidecar=True, pod_security="restricted"),
    "indexed-job-multi-node": Profile("pod", native_sidecar=True, pod_security="restricted"),
}


# --- rendering ------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the manifest checks cannot run: {reason}")
    pytest.skip(reason)


def _tool(name: str) -> str:
    """A tool from this interpreter's venv (the test extras), else from PATH."""
    beside_python = Path(sys.executable).parent / name
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        _unavailable(f"{name} is not installed (pip install -e '.[test]')")
    assert found is not None
    return found


@dataclass
class Rendered:
    overlay: str
    text: str
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"{self.overlay}: expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def job(self) -> dict[str, Any]:
        return self.one("Job")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.job["spec"]["template"]["spec"]
        return spec

    def containers(self) -> list[dict[str, Any]]:
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]

    def container(self, name: str) -> dict[str, Any]:
        matching = [c for c in self.containers() if c["name"] == name]
        assert len(matching) == 1, f"{self.overlay}: no single container named {name}"
        return matching[0]

    @property
    def sidecar(self) -> dict[str, Any]:
        return self.container("sidecar")

    @property
    def trainer(self) -> dict[str, Any]:
        return self.container("trainer")

    def config_map(self, name: str) -> dict[str, str]:
        for obj in self.of_kind("ConfigMap"):
            if obj["metadata"]["name"] == name:
                return dict(obj.get("data") or {})
        raise AssertionError(f"{self.overlay}: no ConfigMap {name}")

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's variables as the kubelet would set them (fieldRefs as markers)."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self.config_map(source["configMapRef"]["name"]))
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = _expand(entry["value"], env)
                continue
            source = entry["valueFrom"]
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[entry["name"]] = self.config_map(ref["name"])[ref["key"]]
            else:
                env[entry["name"]] = f"<{source['fieldRef']['fieldPath']}>"
        return env


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of variables defined before."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        _unavailable("kubectl is not installed (`kubectl kustomize` renders the overlays)")
    assert found is not None
    return found


_rendered: dict[str, Rendered] = {}


def render(overlay: str) -> Rendered:
    if overlay not in _rendered:
        result = subprocess.run(
            [_kubectl(), "kustomize", str(OVERLAYS / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
        objects = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
        _rendered[overlay] = Rendered(overlay, result.stdout, objects)
    return _rendered[overlay]


def test_every_overlay_states_its_promises():
    """Each folder under k8s/overlays has a profile here, and each profile a folder."""
    present = {path.name for path in OVERLAYS.iterdir() if path.is_dir()}
    assert present == set(PROFILES)


# --- offline validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "version"),
    [
        (overlay, version)
        for overlay, profile in PROFILES.items()
        for version in (*KUBERNETES_VERSIONS, *profile.extra_versions)
    ],
)
def test_overlay_validates_strictly(overlay: str, version: str, tmp_path: Path):
    """kubernetes-validate --strict accepts every object: no unknown field, no wrong type."""
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(render(overlay).text)
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_catches_an_unknown_field(tmp_path: Path):
    """The validation above can fail: a misspelt pod field is rejected."""
    text = render("job").text.replace(
        "shareProcessNamespace: true",
        "shareProcessNamespace: true\n      shareProcesNamespace: true",
    )
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(text)
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", "1.33.0", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "shareProcesNamespace" in result.stdout + result.stderr


def test_native_sidecars_need_the_newer_schema():
    """The native-sidecar overlays are not meant for 1.27: its schema lacks the field."""
    import kubernetes_validate

    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(render("job").job, "1.27.0", strict=True)


def test_sources_pass_yamllint():
    """yamllint in strict mode (warnings fail) with the repository's .yamllint."""
    result = subprocess.run(
        [_tool("yamllint"), "--strict", "k8s"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the properties the sidecar relies on ---------------------------------------------------

overlays = pytest.mark.parametrize("overlay", sorted(PROFILES))


@overlays
def test_trainer_and_sidecar_share_the_process_namespace(overlay: str):
    """shareProcessNamespace is on: without it the sidecar can neither see nor stop the trainer."""
    assert render(overlay).pod.get("shareProcessNamespace") is True


@overlays
def test_gpu_is_requested_by_the_trainer_only(overlay: str):
    """nvidia.com/gpu appears in the trainer's limits and in no other container's resources."""
    rendered = render(overlay)
    assert int(rendered.trainer["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for container in rendered.containers():
        if container["name"] == "trainer":
            continue
        resources = container.get("resources", {})
        asked = {**resources.get("requests", {}), **resources.get("limits", {})}
        assert not any("gpu" in name for name in asked), container["name"]


@overlays
def test_restart_mode_is_the_overlays(overlay: str):
    """The sidecar's effective SIDECAR_RESTART_MODE is signal, or pod in the pod-mode overlays."""
    rendered = render(overlay)
    environment = rendered.environment(rendered.sidecar)
    assert environment["SIDECAR_RESTART_MODE"] == PROFILES[overlay].restart_mode


@overlays
def test_sidecar_settings_load(overlay: str):
    """The sidecar's variables pass the real settings model, as at its start in the pod."""
    rendered = render(overlay)
    environment = {
        name: value
        for name, value in rendered.environment(rendered.sidecar).items()
        if name.startswith("SIDECAR_")
    }
    known = {f"SIDECAR_{name.upper()}" for name in Settings.model_fields}
    assert set(environment) <= known, f"not settings: {sorted(set(environment) - known)}"
    # "<metadata.name>" stands for what the downward API fills in; any name will do.
    settings = Settings(
        **{name.removeprefix("SIDECAR_").lower(): value for name, value in environment.items()}
    )
    assert settings.restart_mode == PROFILES[overlay].restart_mode
    assert settings.kill_grace < rendered.pod["terminationGracePeriodSeconds"]


@overlays
def test_sidecar_runs_as_a_native_or_plain_sidecar(overlay: str):
    """Native overlays put it in initContainers with restartPolicy Always, the others in
    containers; either way it starts before the trainer or beside it, never after."""
    rendered = render(overlay)
    init_names = [c["name"] for c in rendered.pod.get("initContainers", [])]
    if PROFILES[overlay].native_sidecar:
        assert init_names == ["sidecar"]
        assert rendered.sidecar["restartPolicy"] == "Always"
    else:
        assert init_names == []
        assert "restartPolicy" not in rendered.sidecar
        assert {c["name"] for c in rendered.pod["containers"]} == {"trainer", "sidecar"}


@overlays
def test_no_container_can_escalate_privileges(overlay: str):
    """Every container: allowPrivilegeEscalation false, not privileged, capabilities dropped."""
    for container in render(overlay).containers():
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert not context.get("privileged"), container["name"]
        assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]


@overlays
def test_sidecar_is_locked_down(overlay: str):
    """Non-root (restricted overlays) or root with exactly KILL and DAC_OVERRIDE (baseline),
    a read-only root filesystem, and its heartbeat on a writable emptyDir."""
    rendered = render(overlay)
    sidecar = rendered.sidecar
    context = {**rendered.pod.get("securityContext", {}), **sidecar["securityContext"]}
    added = set(sidecar["securityContext"].get("capabilities", {}).get("add", []))
    if PROFILES[overlay].pod_security == "restricted":
        assert context.get("runAsNonRoot") is True
        assert context.get("runAsUser", 0) != 0
        assert not added
    else:
        assert context.get("runAsUser") == 0
        assert added == {"KILL", "DAC_OVERRIDE"}
    assert sidecar["securityContext"].get("readOnlyRootFilesystem") is True
    heartbeat = Path(rendered.environment(sidecar)["SIDECAR_HEARTBEAT_FILE"])
    mount = _mount_of(rendered, sidecar, heartbeat)
    assert "emptyDir" in _volume(rendered, mount["name"]) and not mount.get("readOnly")


@pytest.mark.parametrize(
    "overlay", sorted(name for name, p in PROFILES.items() if p.pod_security == "restricted")
)
def test_sidecar_runs_as_the_trainers_uid_where_restricted(overlay: str):
    """In the restricted overlays both run as one UID: kill(2) needs it without CAP_KILL
    (the baseline overlay gives the sidecar CAP_KILL instead)."""
    rendered = render(overlay)
    pod_context = rendered.pod.get("securityContext", {})

    def uid(container: dict[str, Any]) -> Any:
        return container.get("securityContext", {}).get("runAsUser", pod_context.get("runAsUser"))

    assert uid(rendered.sidecar) is not None
    assert uid(rendered.sidecar) == uid(rendered.trainer)


@overlays
def test_api_access_only_where_pod_mode_needs_it(overlay: str):
    """Signal mode mounts no token anywhere and ships no RBAC; pod mode mounts one into the
    sidecar alone, bound to a Role that may only delete pods."""
    rendered = render(overlay)
    pod = rendered.pod
    assert pod.get("automountServiceAccountToken") is False
    token_volumes = {
        volume["name"]
        for volume in pod.get("volumes", [])
        if any(
            "serviceAccountToken" in source
            for source in volume.get("projected", {}).get("sources", [])
        )
    }
    mounted_by = {
        container["name"]
        for container in rendered.containers()
        for mount in container.get("volumeMounts", [])
        if mount["name"] in token_volumes
    }
    rbac = [obj for obj in rendered.objects if obj["kind"] in ("Role", "ClusterRole")]
    if PROFILES[overlay].restart_mode == "signal":
        assert not token_volumes and "serviceAccountName" not in pod
        assert not rbac and not rendered.of_kind("RoleBinding")
        return
    assert mounted_by == {"sidecar"}
    account = rendered.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    (role,) = rbac
    assert role["kind"] == "Role", "namespaced, never cluster-wide"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}]
    binding = rendered.one("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    environment = rendered.environment(rendered.sidecar)
    assert environment["SIDECAR_POD_NAME"] == "<metadata.name>"
    assert environment["SIDECAR_POD_NAMESPACE"] == "<metadata.namespace>"


@overlays
def test_restarts_fit_the_jobs_retry_budget(overlay: str):
    """OnFailure restarts the trainer in place, and backoffLimit leaves room for every
    recovery the sidecar may make on every node, so the Job does not fail first."""
    rendered = render(overlay)
    assert rendered.pod["restartPolicy"] == "OnFailure"
    max_restarts = int(rendered.environment(rendered.sidecar)["SIDECAR_MAX_RESTARTS"])
    nodes = int(rendered.job["spec"].get("parallelism", 1))
    assert rendered.job["spec"]["backoffLimit"] > nodes * max_restarts


@overlays
def test_stall_timeout_outlasts_the_crashloop_backoff(overlay: str):
    """The stall timeout exceeds the kubelet's 10-minute backoff reset and the startup grace
    its longest restart delay (5 min), so a restart delay is never taken for a stall."""
    rendered = render(overlay)
    environment = rendered.environment(rendered.sidecar)
    assert parse_duration(environment["SIDECAR_STALL_TIMEOUT"]) > 600
    assert parse_duration(environment["SIDECAR_STARTUP_GRACE"]) > 300


@overlays
def test_sidecar_has_probes_and_small_resources(overlay: str):
    """Startup and liveness probes ask /healthz, readiness /readyz, on the port the sidecar
    serves (SIDECAR_HTTP_PORT); requests and limits are set and small."""
    rendered = render(overlay)
    sidecar = rendered.sidecar
    (port,) = [p for p in sidecar["ports"] if p["name"] == "http"]
    served = int(rendered.environment(sidecar)["SIDECAR_HTTP_PORT"])
    assert port["containerPort"] == served != 0
    paths = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in paths.items():
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        assert sidecar[probe]["timeoutSeconds"] >= 5, probe
    assert not any("Probe" in key and key in rendered.trainer for key in paths), (
        "the trainer is judged by the sidecar, not by probes that could restart it mid-save"
    )
    resources = sidecar["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}
    assert _mebibytes(resources["limits"]["memory"]) <= 512


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert match, quantity
    return int(match[1]) * units[match[2]]


@overlays
def test_both_see_the_outputs_volume_where_the_path_map_says(overlay: str):
    """The PVC is mounted in both containers, at the two prefixes of SIDECAR_PATH_MAP."""
    rendered = render(overlay)
    claim = rendered.one("PersistentVolumeClaim")["metadata"]["name"]
    volume = next(
        v["name"]
        for v in rendered.pod["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    )

    def mount_path(container: dict[str, Any]) -> str:
        (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
        return str(path)

    path_map = rendered.environment(rendered.sidecar)["SIDECAR_PATH_MAP"]
    assert path_map == f"{mount_path(rendered.sidecar)}:{mount_path(rendered.trainer)}"


@overlays
def test_trainers_command_waits_for_the_run_then_runs_train_sh(overlay: str):
    """From FluxGym's root, the trainer runs outputs/$RUN_NAME/train.sh as `bash <script>` (what
    the sidecar's default pattern recognises); its waiting shell is never taken for it."""
    rendered = render(overlay)
    trainer = rendered.trainer
    assert trainer["workingDir"] == "/app/fluxgym"
    assert trainer["command"] == ["bash", "-c"]
    (wrapper,) = trainer["args"]
    assert 'script="/app/fluxgym/outputs/${RUN_NAME}/train.sh"' in wrapper
    assert re.search(r'^\s*(exec )?bash "\$script"$', wrapper, re.M)
    assert "RUN_NAME" in rendered.environment(trainer)
    pattern = re.compile(DEFAULT_TRAINER_PATTERN)
    assert pattern.search("bash /app/fluxgym/outputs/my-lora/train.sh")
    assert not pattern.search(" ".join(["bash", "-c", wrapper])), "the wrapper looks like a trainer"


def test_trainer_waits_then_becomes_bash_running_train_sh(tmp_path: Path):
    """Run for real: while train.sh is missing it waits and says so, unmatched by the trainer
    pattern; once it appears, the same process runs it, matched, and exits with its status."""
    outputs = tmp_path / "outputs"
    (outputs / "my-lora").mkdir(parents=True)
    wrapper = local_script(render("job").trainer["args"][0], tmp_path)
    trainer = subprocess.Popen(
        ["bash", "-c", wrapper],
        env={**os.environ, "RUN_NAME": "my-lora"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert trainer.stdout is not None
        assert "waiting for" in trainer.stdout.readline()
        pattern = re.compile(DEFAULT_TRAINER_PATTERN)
        assert not pattern.search(" ".join(psutil.Process(trainer.pid).cmdline()))
        script = outputs / "my-lora" / "train.sh"
        script.write_text("sleep 1\nexit 7\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cmdline = " ".join(psutil.Process(trainer.pid).cmdline())
            if pattern.search(cmdline):
                break
            time.sleep(0.05)
        assert cmdline == f"bash {script}"
        assert trainer.wait(timeout=10) == 7
    finally:
        if trainer.poll() is None:
            trainer.kill()


def local_script(script: str, root: Path) -> str:
    """A manifest's shell script with its pod paths moved under ``root`` and short sleeps."""
    return (
        script.replace("/run/pod-lifecycle", str(root / "lifecycle"))
        .replace("/app/fluxgym/outputs", str(root / "outputs"))
        .replace("sleep 30", "sleep 0.1")
        .replace("sleep 10", "sleep 0.1")
    )


# --- Pod Security Standards ------------------------------------------------------------------

# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.29 and later)
_BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pod_security_violations(pod: dict[str, Any], level: str) -> list[str]:
    """What the named Pod Security level forbids in this pod spec (empty: it passes)."""
    problems = []
    pod_context = pod.get("securityContext", {})
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            problems.append(f"hostPath volume {volume['name']}")
        if level == "restricted" and not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"volume type {kinds} of {volume['name']}")
    if pod_context.get("seccompProfile", {}).get("type") == "Unconfined":
        problems.append("pod seccomp Unconfined")
    for container in containers:
        name = container["name"]
        context = container.get("securityContext", {})
        capabilities = context.get("capabilities", {})
        added = set(capabilities.get("add", []))
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if not added <= _BASELINE_CAPABILITIES:
            problems.append(f"{name}: adds {sorted(added - _BASELINE_CAPABILITIES)}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if context.get("seccompProfile", {}).get("type") == "Unconfined":
            problems.append(f"{name}: seccomp Unconfined")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        if level != "restricted":
            continue
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        if not (
            context.get("runAsNonRoot") is True
            or (
                pod_context.get("runAsNonRoot") is True and context.get("runAsNonRoot") is not False
            )
        ):
            problems.append(f"{name}: runAsNonRoot not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp profile not RuntimeDefault or Localhost")
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities not dropped")
        if not added <= {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds {sorted(added)}")
    return problems


@overlays
def test_pod_passes_its_pod_security_level(overlay: str):
    """Restricted overlays pass "restricted"; the baseline one passes "baseline" only."""
    pod = render(overlay).pod
    level = PROFILES[overlay].pod_security
    assert pod_security_violations(pod, level) == []
    if level == "baseline":
        assert pod_security_violations(pod, "restricted"), "documented as not restricted"


def test_pod_security_check_can_fail():
    """The checker above flags an added capability and a root user under restricted."""
    pod = yaml.safe_load(yaml.safe_dump(render("job").pod))
    pod["initContainers"][0]["securityContext"]["capabilities"]["add"] = ["KILL"]
    pod["initContainers"][0]["securityContext"]["runAsUser"] = 0
    problems = pod_security_violations(pod, "restricted")
    assert any("adds ['KILL']" in problem for problem in problems)
    assert any("runAsUser 0" in problem for problem in problems)
    assert pod_security_violations(pod, "baseline") == []


# --- the pre-1.29 completion handshake, run for real -----------------------------------------


class Handshake:
    """The pre-1.29 overlay's two wrapper scripts, run by sh/bash on local paths."""

    def __init__(self, root: Path):
        rendered = render("job-pre-1.29")
        self.root = root
        self.lifecycle = root / "lifecycle"
        self.outputs = root / "outputs"
        self.bin = root / "bin"
        for folder in (self.lifecycle, self.outputs / "my-lora", self.bin):
            folder.mkdir(parents=True)
        self.trainer_script = local_script(rendered.trainer["args"][0], root)
        self.sidecar_script = local_script(rendered.sidecar["args"][0], root)
        self.started: list[subprocess.Popen[bytes]] = []
        assert rendered.sidecar["command"] == ["tini", "--", "sh", "-c"]
        # A stand-in sidecar: runs until SIGTERM (exit 143, as the real one does), or exits
        # with $FAKE_SIDECAR_EXIT after a moment.
        fake = self.bin / "training-sidecar"
        fake.write_text(
            "#!/bin/sh\n"
            f"trap 'echo stopped > {root}/sidecar-stopped; exit 143' TERM\n"
            'if [ -n "${FAKE_SIDECAR_EXIT:-}" ]; then sleep 0.3; exit "$FAKE_SIDECAR_EXIT"; fi\n'
            "while :; do sleep 0.1; done\n"
        )
        fake.chmod(0o755)

    def environment(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "RUN_NAME": "my-lora",
            **extra,
        }

    def run_trainer(self, train_sh: str) -> int:
        (self.outputs / "my-lora" / "train.sh").write_text(train_sh)
        return subprocess.run(
            ["bash", "-c", self.trainer_script], env=self.environment(), timeout=30, check=False
        ).returncode

    def start_sidecar(self, **extra: str) -> subprocess.Popen[bytes]:
        sidecar = subprocess.Popen(
            ["sh", "-c", self.sidecar_script],
            env=self.environment(**extra),
            start_new_session=True,  # so the fixture can stop its background loops too
        )
        self.started.append(sidecar)
        return sidecar

    def stop_all(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    @property
    def marked(self) -> bool:
        return (self.lifecycle / "trainer-succeeded").exists()


@pytest.fixture
def handshake(tmp_path: Path) -> Iterator[Handshake]:
    scene = Handshake(tmp_path)
    yield scene
    scene.stop_all()


def test_pre_129_success_ends_both_containers_with_0(handshake: Handshake):
    """train.sh exits 0: the trainer marks it, the sidecar is stopped and its container exits 0."""
    sidecar = handshake.start_sidecar()
    assert handshake.run_trainer("exit 0\n") == 0
    assert handshake.marked
    assert sidecar.wait(timeout=15) == 0
    assert (handshake.root / "sidecar-stopped").exists()


def test_pre_129_killed_trainer_is_restarted_not_marked(handshake: Handshake):
    """train.sh killed (what the sidecar does) or failing: its status is passed on, no mark."""
    assert handshake.run_trainer("kill -TERM $$\n") == 143
    assert handshake.run_trainer("exit 3\n") == 3
    assert not handshake.marked


def test_pre_129_sidecar_failure_is_passed_on(handshake: Handshake):
    """The sidecar ending on its own, without the mark, ends the container with its status."""
    assert handshake.start_sidecar(FAKE_SIDECAR_EXIT="3").wait(timeout=15) == 3


def test_pre_129_sidecar_stops_on_sigterm(handshake: Handshake):
    """SIGTERM to the wrapper (the kubelet stopping the pod) reaches the sidecar; 143 results."""
    sidecar = handshake.start_sidecar()
    time.sleep(0.5)
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(timeout=15) == 143
    assert (handshake.root / "sidecar-stopped").exists()


def _mount_of(rendered: Rendered, container: dict[str, Any], path: Path) -> dict[str, Any]:
    for mount in container.get("volumeMounts", []):
        if path.is_relative_to(mount["mountPath"]):
            return dict(mount)
    raise AssertionError(f"{rendered.overlay}: nothing mounted above {path}")


def _volume(rendered: Rendered, name: str) -> dict[str, Any]:
    (volume,) = [v for v in rendered.pod["volumes"] if v["name"] == name]
    return dict(volume)


# --- the README's example overlay -----------------------------------------------------------


def readme_example_overlay() -> str:
    """The kustomization.yaml a newcomer copies from the README's Kubernetes section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Kubernetes\n") :]
    match = re.search(r"\n( *)```yaml\n(.*?)\n *```\n", section, re.S)
    assert match, "no yaml example in the README's Kubernetes section"
    return textwrap.dedent(match[2])


def test_readme_example_overlay_renders_and_keeps_the_safety(tmp_path: Path):
    """The README's own overlay (images, RUN_NAME, a setting, a storage class) renders, validates
    and changes only what it says."""
    mine = tmp_path / "my-training"
    mine.mkdir()
    job_overlay = os.path.relpath(OVERLAYS / "job", mine)
    text = readme_example_overlay()
    assert "../training-sidecar/k8s/overlays/job" in text
    (mine / "kustomization.yaml").write_text(
        text.replace("../training-sidecar/k8s/overlays/job", job_overlay)
    )
    result = subprocess.run(
        [_kubectl(), "kustomize", str(mine)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = Rendered(
        "readme", result.stdout, [o for o in yaml.safe_load_all(result.stdout) if o]
    )
    assert {obj["metadata"].get("namespace") for obj in rendered.objects} == {"lora-training"}
    images = {c["name"]: c["image"] for c in rendered.containers()}
    assert images == {
        "sidecar": "registry.example.com/training-sidecar:0.1.0",
        "trainer": "registry.example.com/fluxgym:2025-01",
    }
    assert rendered.environment(rendered.trainer)["RUN_NAME"] == "my-lora"
    sidecar_env = rendered.environment(rendered.sidecar)
    assert sidecar_env["SIDECAR_STALL_TIMEOUT"] == "20m"
    assert sidecar_env["SIDECAR_RESTART_MODE"] == "signal"
    assert rendered.one("PersistentVolumeClaim")["spec"]["storageClassName"] == "standard"
    assert rendered.pod["shareProcessNamespace"] is True
    assert pod_security_violations(rendered.pod, "restricted") == []
    manifest = tmp_path / "readme.yaml"
    manifest.write_text(result.stdout)
    for version in KUBERNETES_VERSIONS:
        check = subprocess.run(
            [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(manifest)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
