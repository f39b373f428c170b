"""The Kubernetes manifests: every overlay renders, validates offline, and keeps its safety.

Each overlay under k8s/overlays is rendered with `kubectl kustomize`, validated with
`kubernetes-validate --strict` against every Kubernetes minor version it supports (from its
minimum to the newest schema bundled), and its pod is checked for the properties the sidecar
depends on (shared PID namespace, GPU on the trainer only, a non-root sidecar that cannot
escalate, the intended restart mode, restartPolicy Never with the podFailurePolicy that
ignores disruptions, the termination file on a per-pod emptyDir both containers mount) and for
the Pod Security profile it claims. A later edit that drops one of them fails here. The shell
wrappers are run for real: the trainer's (train.sh as its child; the kubelet's SIGTERM creates
the termination file and reaches train.sh's whole group, the sidecar's own stop creates none)
and the pre-1.29 sidecar's. Without kubectl the tests skip on a laptop and fail under CI (env
CI set).
"""

from __future__ import annotations

import contextlib
import copy
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

from sidecar.config import Settings
from sidecar.observe.trainer_processes import DEFAULT_TRAINER_PATTERN, find_trainer_processes
from sidecar.restarters.signal import stop_processes

ROOT = REPO_ROOT
K8S = ROOT / "k8s"
OVERLAYS = K8S / "overlays"
# The newest minor version validated even where the installed kubernetes-validate bundled no
# newer schema: the oldest release pyproject.toml allows (kubernetes-validate>=1.33) has it.
NEWEST_REQUIRED_MINOR = 33
# The oldest an overlay with native sidecars supports: they are on by default from 1.29.
NATIVE_SIDECARS_MINOR = 29
# The oldest any overlay supports: podFailurePolicy and the DisruptionTarget pod condition are
# beta and on by default from 1.26 (alpha, behind feature gates, in 1.25).
POD_FAILURE_POLICY_MINOR = 26


def _bundled_minors() -> set[int]:
    """The Kubernetes 1.x minor versions the installed kubernetes-validate has schemas for."""
    try:
        from kubernetes_validate.utils import all_versions
    except ImportError:  # the validation tests then skip (or fail under CI) by themselves
        return set()
    return {int(v.split(".")[1]) for v in all_versions() if re.fullmatch(r"1\.\d+\.\d+", v)}


NEWEST_MINOR = max({NEWEST_REQUIRED_MINOR, *_bundled_minors()})


@dataclass(frozen=True)
class Profile:
    """What an overlay promises."""

    restart_mode: str  # SIDECAR_RESTART_MODE
    native_sidecar: bool  # an init container with restartPolicy Always
    pod_security: str  # the strictest Pod Security level it passes
    minimum_minor: int = NATIVE_SIDECARS_MINOR  # the oldest Kubernetes 1.x it supports

    @property
    def versions(self) -> tuple[str, ...]:
        """Every minor version it supports, each validated: the old ones must not meet a field
        they lack, the new ones a field they dropped."""
        return tuple(f"1.{minor}.0" for minor in range(self.minimum_minor, NEWEST_MINOR + 1))


# Every overlay must be listed here: a new one cannot ship without stating its promises.
PROFILES = {
    "job": Profile("signal", native_sidecar=True, pod_security="restricted"),
    "job-pre-1.29": Profile(
        "signal",
        native_sidecar=False,
        pod_security="restricted",
        minimum_minor=POD_FAILURE_POLICY_MINOR,
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
    [(overlay, version) for overlay, profile in PROFILES.items() for version in profile.versions],
)
def test_overlay_validates_strictly(overlay: str, version: str):
    """kubernetes-validate --strict accepts every object: no unknown field, no wrong type, no
    missing required one."""
    assert strict_validation_errors(render(overlay).objects, version) == []


def strict_validation_errors(objects: list[dict[str, Any]], version: str) -> list[str]:
    """What `kubernetes-validate --strict -k VERSION` reports, from its library in this process
    (the same validator as the command, without a start per version; the command itself is
    run by the test below)."""
    try:
        import kubernetes_validate
    except ImportError:
        _unavailable("kubernetes-validate is not installed (pip install -e '.[test]')")
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{obj['kind']} {obj['metadata']['name']}: {error}")
    return errors


def test_strict_validation_catches_an_unknown_field(tmp_path: Path):
    """The validation above can fail, and so does the command CI users run: a misspelt pod
    field is rejected."""
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


def test_strict_validation_reaches_the_pod_failure_policy():
    """The validation above checks the policy's own fields, at the oldest version supported and
    the newest: a misspelt key in a rule is rejected, and so is a condition pattern without
    `status` where the schema still requires it (why job.yaml spells out its default)."""
    import kubernetes_validate

    for version in (f"1.{POD_FAILURE_POLICY_MINOR}.0", f"1.{NEWEST_MINOR}.0"):
        job = copy.deepcopy(render("job-pre-1.29").job)
        rule = job["spec"]["podFailurePolicy"]["rules"][0]
        rule["onPodCondition"] = rule.pop("onPodConditions")
        with pytest.raises(kubernetes_validate.ValidationError, match="onPodCondition"):
            kubernetes_validate.validate(job, version, strict=True)
    job = copy.deepcopy(render("job").job)
    del job["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["status"]
    with pytest.raises(kubernetes_validate.ValidationError, match="status"):
        kubernetes_validate.validate(job, f"1.{NATIVE_SIDECARS_MINOR}.0", strict=True)


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


# --- restarts, disruptions and the Job's retry budget -----------------------------------------

# The one rule every Job carries: a pod the cluster took away (preemption, eviction, drain: the
# DisruptionTarget condition) does not count toward backoffLimit. Nothing else: no FailJob on
# an exit code, the sidecar's restart budget decides when a failing run stops.
IGNORE_DISRUPTIONS = {
    "rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
}


def restart_policy_problems(job: dict[str, Any]) -> list[str]:
    """What is wrong with the pairing of the pod's restartPolicy and the Job's podFailurePolicy
    (empty: nothing). The API server refuses a podFailurePolicy unless restartPolicy is Never,
    but kubernetes-validate cannot tell: its JSON schemas hold no rule across two fields, so
    this checks our own invariant instead."""
    problems = []
    restart_policy = job["spec"]["template"]["spec"].get("restartPolicy")
    if restart_policy not in ("Never", "OnFailure"):
        problems.append(f"restartPolicy {restart_policy}: a Job's pod needs Never or OnFailure")
    if job["spec"].get("podFailurePolicy") is not None and restart_policy != "Never":
        problems.append(f"podFailurePolicy with restartPolicy {restart_policy}: it needs Never")
    return problems


@overlays
def test_disruptions_do_not_spend_the_retry_budget(overlay: str):
    """Every Job has restartPolicy Never and exactly the rule that ignores DisruptionTarget, so
    preemption, eviction and node drain are replaced without counting toward backoffLimit."""
    rendered = render(overlay)
    assert rendered.pod["restartPolicy"] == "Never"
    assert rendered.job["spec"]["podFailurePolicy"] == IGNORE_DISRUPTIONS
    assert restart_policy_problems(rendered.job) == []


def test_restart_policy_check_can_fail():
    """The invariant above catches OnFailure (or no policy) next to a podFailurePolicy."""
    job = copy.deepcopy(render("job").job)
    job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    assert restart_policy_problems(job) == [
        "podFailurePolicy with restartPolicy OnFailure: it needs Never"
    ]
    del job["spec"]["template"]["spec"]["restartPolicy"]
    assert len(restart_policy_problems(job)) == 2
    del job["spec"]["podFailurePolicy"]
    job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    assert restart_policy_problems(job) == []


@overlays
def test_restarts_fit_the_jobs_retry_budget(overlay: str):
    """Under restartPolicy Never each recovery is one failed pod per node (the Job replaces
    it), and backoffLimit leaves room for every recovery the sidecar may make on every node,
    so the Job does not fail first. The sidecar container's own restarts count for nothing
    (in place, as a native sidecar or by its wrapper), nor do ignored disruptions."""
    rendered = render(overlay)
    assert rendered.pod["restartPolicy"] == "Never"
    max_restarts = int(rendered.environment(rendered.sidecar)["SIDECAR_MAX_RESTARTS"])
    nodes = int(rendered.job["spec"].get("parallelism", 1))
    assert rendered.job["spec"]["backoffLimit"] > nodes * max_restarts


@overlays
def test_no_restart_delay_falls_inside_a_watched_attempt(overlay: str):
    """The stall timeout and the startup grace time only a trainer that runs. Nothing restarts
    the trainer in place (restartPolicy Never, none of its own), so every delay of a recovery —
    the Job's pod backoff (10 s, 20 s, 40 s … up to minutes), scheduling, an image pull —
    passes before the replacement pod's trainer exists, and no kubelet restart delay can be
    taken for a stall. Where the sidecar is native, that trainer starts only once the
    sidecar's startup probe passed: it is watched from its first process on."""
    rendered = render(overlay)
    assert rendered.pod["restartPolicy"] == "Never"
    assert "restartPolicy" not in rendered.trainer
    assert rendered.trainer in rendered.pod["containers"]
    if PROFILES[overlay].native_sidecar:
        assert rendered.pod["initContainers"] == [rendered.sidecar]
        assert rendered.sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"


@overlays
def test_sidecar_has_probes_and_small_resources(overlay: str):
    """Startup and liveness probes ask /healthz, readiness /readyz, on the port the sidecar
    serves (SIDECAR_HTTP_PORT); requests and limits are set and small. An ordinary-container
    sidecar has the readiness probe only: under restartPolicy Never a startup or liveness
    probe would kill it for good, so its wrapper runs the health check and restarts it."""
    rendered = render(overlay)
    sidecar = rendered.sidecar
    (port,) = [p for p in sidecar["ports"] if p["name"] == "http"]
    served = int(rendered.environment(sidecar)["SIDECAR_HTTP_PORT"])
    assert port["containerPort"] == served != 0
    paths = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    if not PROFILES[overlay].native_sidecar:
        assert "startupProbe" not in sidecar and "livenessProbe" not in sidecar
        assert "training-sidecar healthcheck" in sidecar["args"][0]
        paths = {"readinessProbe": "/readyz"}
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
    """From FluxGym's root, the trainer's wrapper runs outputs/$RUN_NAME/train.sh as `bash
    <script>` (what the sidecar's default pattern recognises), as a child it waits for, not
    through exec; the wrapper itself is never taken for the trainer."""
    rendered = render(overlay)
    trainer = rendered.trainer
    assert trainer["workingDir"] == "/app/fluxgym"
    assert trainer["command"] == ["bash", "-c"]
    (wrapper,) = trainer["args"]
    assert 'script="/app/fluxgym/outputs/${RUN_NAME}/train.sh"' in wrapper
    assert re.search(r'^\s*bash "\$script" &$', wrapper, re.M)
    assert not re.search(r"^\s*exec\b", wrapper, re.M), "the wrapper must outlive train.sh"
    assert re.search(r"^\s*trap .*\bTERM$", wrapper, re.M)
    assert "RUN_NAME" in rendered.environment(trainer)
    pattern = re.compile(DEFAULT_TRAINER_PATTERN)
    assert pattern.search("bash /app/fluxgym/outputs/my-lora/train.sh")
    assert not pattern.search(" ".join(["bash", "-c", wrapper])), "the wrapper looks like a trainer"


def test_pre_129_trainer_is_the_base_wrapper_after_writing_its_pid():
    """job-pre-1.29 replaces the trainer's script (a JSON patch cannot prepend a line): it must
    stay the base's wrapper, with only the PID line for the sidecar's wrapper in front."""
    (base,) = render("job").trainer["args"]
    (pre_129,) = render("job-pre-1.29").trainer["args"]
    assert pre_129 == 'echo "$$" > /run/pod/trainer.pid\n' + base


@overlays
def test_termination_file_is_on_a_per_pod_volume_both_containers_share(overlay: str):
    """SIDECAR_TERMINATION_FILE names a file on a small in-memory emptyDir that the trainer
    mounts writable at the same path and the sidecar read-only (only the wrapper creates it),
    and the trainer's wrapper creates exactly that file. An emptyDir lives as long as its pod:
    the replacement pod starts without the file."""
    rendered = render(overlay)
    marker = Path(rendered.environment(rendered.sidecar)["SIDECAR_TERMINATION_FILE"])
    in_sidecar = _mount_of(rendered, rendered.sidecar, marker)
    in_trainer = _mount_of(rendered, rendered.trainer, marker)
    assert in_sidecar["name"] == in_trainer["name"]
    assert in_sidecar["mountPath"] == in_trainer["mountPath"]
    assert in_sidecar.get("readOnly") is True and not in_trainer.get("readOnly")
    volume = _volume(rendered, in_trainer["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert _mebibytes(volume["emptyDir"]["sizeLimit"]) <= 1
    (wrapper,) = rendered.trainer["args"]
    assert f": > {marker}\n" in wrapper


# --- the trainer's wrapper, run for real ------------------------------------------------------


class TrainerWrapper:
    """The trainer container's command (job.yaml) run by bash on local paths."""

    def __init__(self, root: Path):
        self.root = root
        self.outputs = root / "outputs"
        (self.outputs / "my-lora").mkdir(parents=True)
        (root / "lifecycle").mkdir()
        self.marker = root / "lifecycle" / "terminating"
        self.script = self.outputs / "my-lora" / "train.sh"
        self.wrapper = local_script(render("job").trainer["args"][0], root)
        self.process: subprocess.Popen[str] | None = None
        # What the sidecar's trainer pattern becomes for this test's paths only.
        self.pattern = re.compile(re.escape(str(root)) + r"\S*/train\.sh( |$)")

    def start(self, train_sh: str | None = None) -> subprocess.Popen[str]:
        if train_sh is not None:
            self.script.write_text(train_sh)
        self.process = subprocess.Popen(
            ["bash", "-c", self.wrapper],
            env={**os.environ, "RUN_NAME": "my-lora", "ROOT": str(self.root)},
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the "container": the test can SIGKILL it all
        )
        return self.process

    def child(self, timeout: float = 10) -> psutil.Process:
        """The bash running train.sh, once the wrapper has started it."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in psutil.Process(self.process.pid).children():
                with contextlib.suppress(psutil.Error):
                    if self.pattern.search(" ".join(process.cmdline())):
                        return process
            time.sleep(0.05)
        raise AssertionError("the wrapper started no train.sh")

    def wait_for_file(self, name: str, timeout: float = 10) -> str:
        path = self.root / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"{name} never appeared"
            time.sleep(0.05)
        return path.read_text()

    def close(self) -> None:
        if self.process is None:
            return
        groups = {self.process.pid}
        with contextlib.suppress(psutil.Error):
            groups |= {os.getpgid(p.pid) for p in psutil.Process(self.process.pid).children(True)}
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def trainer_wrapper(tmp_path: Path) -> Iterator[TrainerWrapper]:
    wrapper = TrainerWrapper(tmp_path)
    yield wrapper
    wrapper.close()


def test_trainer_waits_then_runs_train_sh_as_its_child(trainer_wrapper: TrainerWrapper):
    """Run for real: while train.sh is missing it waits and says so, unmatched by the trainer
    pattern; once it appears, a child `bash <script>` runs it, matched (the wrapper still not),
    in a process group of its own, and the wrapper exits with its status, no termination file
    written: a crash stays a crash."""
    trainer = trainer_wrapper.start()
    assert trainer.stdout is not None
    assert "waiting for" in trainer.stdout.readline()
    pattern = re.compile(DEFAULT_TRAINER_PATTERN)
    assert not pattern.search(" ".join(psutil.Process(trainer.pid).cmdline()))
    trainer_wrapper.script.write_text("sleep 1\nexit 7\n")
    child = trainer_wrapper.child()
    assert child.cmdline() == ["bash", str(trainer_wrapper.script)]
    assert pattern.search(" ".join(child.cmdline()))
    assert not pattern.search(" ".join(psutil.Process(trainer.pid).cmdline()))
    assert os.getpgid(child.pid) == child.pid != os.getpgid(trainer.pid)
    assert trainer.wait(timeout=10) == 7
    assert not trainer_wrapper.marker.exists()


# train.sh with a worker in the foreground, as FluxGym's runs `accelerate launch`: the worker
# notes the signal it gets, and takes a moment to exit, as a training process writing its
# last lines does.
_TRAIN_SH = """\
bash -c 'trap "echo SIGNAL >> $ROOT/worker; sleep 0.5; echo done >> $ROOT/worker; exit STATUS" \\
  SIGNAL
echo ready > $ROOT/worker-ready
while :; do sleep 0.05; done'
"""


@pytest.mark.parametrize(
    ("stop_signal", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_kubelets_stop_creates_the_termination_file_then_stops_train_sh(
    trainer_wrapper: TrainerWrapper, stop_signal: signal.Signals, status: int
):
    """The kubelet's SIGTERM (or SIGINT, an image's stop signal) to the wrapper: the
    termination file is created, then train.sh's whole group gets the signal (its bash and the
    worker); the wrapper waits until the worker too has exited (the container's end would kill
    it), then ends with train.sh's status, 128 + the signal."""
    name = stop_signal.name.removeprefix("SIG")
    trainer = trainer_wrapper.start(
        _TRAIN_SH.replace("SIGNAL", name).replace("STATUS", str(status))
    )
    child = trainer_wrapper.child()
    trainer_wrapper.wait_for_file("worker-ready")
    assert not trainer_wrapper.marker.exists()
    trainer.send_signal(stop_signal)
    assert trainer.wait(timeout=15) == status
    assert trainer_wrapper.marker.exists()
    assert not child.is_running()
    assert trainer_wrapper.wait_for_file("worker").splitlines() == [name, "done"], (
        "the wrapper ended before the worker did"
    )


def test_kubelets_stop_while_waiting_for_train_sh_ends_at_once(trainer_wrapper: TrainerWrapper):
    """Before train.sh is there no trainer ran: the SIGTERM simply ends the wrapper."""
    trainer = trainer_wrapper.start()
    assert trainer.stdout is not None
    assert "waiting for" in trainer.stdout.readline()
    began = time.monotonic()
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=10) == -signal.SIGTERM
    assert time.monotonic() - began < 5


@pytest.mark.parametrize(
    ("train_sh", "status"),
    [
        # Killed by the SIGTERM: the child's status is 143, and so is the wrapper's.
        ("while :; do sleep 0.05; done\n", 143),
        # A train.sh that handles it: its own status is passed on.
        ("trap 'exit 5' TERM\nwhile :; do sleep 0.05; done\n", 5),
    ],
)
def test_sidecars_stop_reaches_train_sh_only_and_creates_no_file(
    trainer_wrapper: TrainerWrapper, train_sh: str, status: int
):
    """The sidecar's own stop (its code, with this test's trainer pattern) finds train.sh's
    processes and never the wrapper; the wrapper then exits with the child's status and
    writes no termination file, so the recovery is not taken for a disruption."""
    trainer = trainer_wrapper.start(train_sh)
    child = trainer_wrapper.child()
    found = {process.pid for process in find_trainer_processes(trainer_wrapper.pattern)}
    assert child.pid in found and trainer.pid not in found
    stop_processes(trainer_wrapper.pattern, 5.0, lambda *args, **kwargs: None)
    assert trainer.wait(timeout=15) == status
    assert not trainer_wrapper.marker.exists()


def local_script(script: str, root: Path) -> str:
    """A manifest's shell script with its pod paths moved under ``root`` and short sleeps."""
    return (
        script.replace("/run/pod/", f"{root / 'lifecycle'}/")
        .replace("/tmp/trainer-ended", str(root / "trainer-ended"))
        .replace("/app/fluxgym/outputs", str(root / "outputs"))
        .replace("sleep 30", "sleep 0.1")
        .replace("sleep 10", "sleep 0.1")
        .replace("sleep 2;", "sleep 0.1;")
        .replace("sleep 6", "sleep 0.1")
        .replace("sleep 1\n", "sleep 0.1\n")
        .replace("delay=10", "delay=1")
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


# --- the pre-1.29 wrappers, run for real -----------------------------------------------------


class Handshake:
    """The pre-1.29 overlay's two wrapper scripts, run by sh/bash on local paths: the trainer's
    wrapper writes its PID (and lives until train.sh has ended), and the sidecar's wrapper ends
    once that process is gone."""

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
        # A stand-in sidecar. `run` notes its start and runs until SIGTERM (exit 143, as the
        # real one does), or, for its first $FAKE_SIDECAR_FAILS starts, exits 3 after a moment;
        # `healthcheck` fails while the file "unhealthy" exists.
        fake = self.bin / "training-sidecar"
        fake.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = healthcheck ]; then\n'
            f"  [ ! -e {root}/unhealthy ] && echo ok >> {root}/healthy; exit $?\n"
            "fi\n"
            f"echo start >> {root}/sidecar-starts\n"
            f"trap 'echo stopped >> {root}/sidecar-stopped; exit 143' TERM\n"
            f'if [ "$(wc -l < {root}/sidecar-starts)" -le "${{FAKE_SIDECAR_FAILS:-0}}" ]; then\n'
            "  sleep 0.3; exit 3\n"
            "fi\n"
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

    def start_trainer(self, train_sh: str | None) -> subprocess.Popen[bytes]:
        """The trainer container; ``None``: train.sh is not on the volume yet."""
        if train_sh is not None:
            (self.outputs / "my-lora" / "train.sh").write_text(train_sh)
        trainer = subprocess.Popen(
            ["bash", "-c", self.trainer_script],
            env=self.environment(),
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # its own group: SIGKILL of the whole "container"
        )
        self.started.append(trainer)
        return trainer

    def start_sidecar(self, **extra: str) -> subprocess.Popen[bytes]:
        sidecar = subprocess.Popen(
            ["sh", "-c", self.sidecar_script],
            env=self.environment(**extra),
            start_new_session=True,  # so the fixture can stop its background loops too
        )
        self.started.append(sidecar)
        return sidecar

    def count(self, name: str) -> int:
        path = self.root / name
        return len(path.read_text().splitlines()) if path.exists() else 0

    def wait_for(self, name: str, at_least: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.count(name) < at_least:
            assert time.monotonic() < deadline, f"{name}: {self.count(name)} < {at_least}"
            time.sleep(0.05)

    def stop_all(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def handshake(tmp_path: Path) -> Iterator[Handshake]:
    scene = Handshake(tmp_path)
    yield scene
    scene.stop_all()


@pytest.mark.parametrize(
    ("train_sh", "status"),
    [
        ("exit 0\n", 0),  # completed: the pod succeeds
        # Stopped by the sidecar: the pod fails and is replaced. train.sh is killed by the
        # signal, and its wrapper, the container's main process, exits with its 143.
        ("sleep 0.5\nkill -TERM $$\n", 143),
        ("sleep 0.5\nexit 3\n", 3),  # crashed: the same
    ],
)
def test_pre_129_trainers_end_ends_the_sidecar_with_0(
    handshake: Handshake, train_sh: str, status: int
):
    """Whatever train.sh's status (it stays the trainer container's), the sidecar is stopped
    and its container exits 0, so the pod ends with the trainer's phase."""
    sidecar = handshake.start_sidecar()
    handshake.wait_for("sidecar-starts", 1)
    trainer = handshake.start_trainer(train_sh)
    assert trainer.wait(timeout=15) == status
    assert sidecar.wait(timeout=15) == 0
    assert handshake.count("sidecar-stopped") == 1


def test_pre_129_sidecar_waits_for_the_trainer_and_survives_its_sigkill(handshake: Handshake):
    """Before the trainer's PID is written, and while it runs, the sidecar stays up; the
    trainer container killed outright (no status, no chance to write anything) still ends it."""
    sidecar = handshake.start_sidecar()
    handshake.wait_for("sidecar-starts", 1)
    time.sleep(0.5)
    trainer = handshake.start_trainer(None)  # waiting for train.sh
    time.sleep(0.5)
    assert sidecar.poll() is None
    os.killpg(trainer.pid, signal.SIGKILL)
    trainer.wait()
    assert sidecar.wait(timeout=15) == 0


def test_pre_129_failed_sidecar_is_started_again(handshake: Handshake):
    """The kubelet restarts no container under Never: the wrapper starts a failed sidecar
    again (after its delay), and the trainer's end still ends the container with 0."""
    sidecar = handshake.start_sidecar(FAKE_SIDECAR_FAILS="1")
    handshake.wait_for("sidecar-starts", 2)
    assert sidecar.poll() is None
    trainer = handshake.start_trainer("exit 0\n")
    assert trainer.wait(timeout=15) == 0
    assert sidecar.wait(timeout=15) == 0


def test_pre_129_unhealthy_sidecar_is_killed_and_started_again(handshake: Handshake):
    """What the liveness probe did: three failed health checks in a row, once healthy, and the
    wrapper kills the sidecar and starts it again."""
    sidecar = handshake.start_sidecar()
    handshake.wait_for("healthy", 1)
    (handshake.root / "unhealthy").touch()
    handshake.wait_for("sidecar-starts", 2)
    assert handshake.count("sidecar-stopped") == 0, "killed, not asked to stop"
    assert sidecar.poll() is None


def test_pre_129_sidecar_stops_on_sigterm(handshake: Handshake):
    """SIGTERM to the wrapper (the kubelet stopping the pod) reaches the sidecar; 143 results."""
    sidecar = handshake.start_sidecar()
    handshake.wait_for("sidecar-starts", 1)
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(timeout=15) == 143
    assert handshake.count("sidecar-stopped") == 1


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
    for version in PROFILES["job"].versions:
        assert strict_validation_errors(rendered.objects, version) == [], version
