"""Pod mode against a fake Kubernetes API server over real HTTP.

The official client talks to `fake_kube_api.FakeKubeApi` through a kubeconfig, exactly
as it would to a cluster: deleting the sidecar's own pod, retries on 429/5xx and dropped
connections (with the sleeps recorded, not slept), and the refusals that no retry can
fix — 401 and 403 (a missing RBAC rule), 404 — reported once with what to change. The
last test runs the real sidecar loop in pod mode on a simulated FluxGym run: the stall
is detected, train.sh is pointed at the newest checkpoint, the pod is deleted, and the
replacement pod's trainer resumes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog
from conftest import FAST_SETTINGS, FAST_SIMULATION, kill_everything
from fake_kube_api import TOKEN, FakeKubeApi
from repo_paths import REPO_ROOT
from restart_policy import start_runtime, tree_pattern
from sidecar_process import spawn_sidecar
from structlog.testing import capture_logs

from sidecar.clients.kubernetes_api import KubernetesGateway, KubernetesUnavailable
from sidecar.config import ConfigError, Settings, load_settings
from sidecar.restarters import RestartError
from sidecar.restarters.pod import PodRestarter
from sidecar.simulator import read_lineage, uninterrupted_lineage
from sidecar.simulator.fluxgym_tree import build_fluxgym_tree
from sidecar.trainers.shell.train_script import parse_train_script
from sidecar.wiring import build_restarter

NAMESPACE = "training"
POD = "fluxgym-train-x7k2q"


@pytest.fixture
def kube_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeApi]:
    """The fake server, with a kubeconfig for it in $KUBECONFIG and no in-cluster hints."""
    api = FakeKubeApi(pods={(NAMESPACE, POD)}).start()
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    yield api
    api.stop()


class Recorder:
    """The restarter's log callable and the gateway's sleep, both recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.sleeps: list[float] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def make_restarter(
    recorder: Recorder,
    *,
    retry_window: float = 60.0,
    pattern: str = r"(?!)",
    stop_event: threading.Event | None = None,
    sleep: Callable[[float], None] | None = None,
) -> PodRestarter:
    gateway = KubernetesGateway(
        retry_window=retry_window,
        stop_event=stop_event,
        sleep=sleep or recorder.sleeps.append,
        log=structlog.get_logger(),
    )
    return PodRestarter(
        pattern=re.compile(pattern),
        kill_grace=30.0,
        pod_name=POD,
        namespace=NAMESPACE,
        gateway=gateway,
        log=recorder,
    )


# --- deleting the pod ---------------------------------------------------------------------


def test_restart_deletes_the_own_pod_with_the_kill_grace(kube_api: FakeKubeApi):
    """One DELETE of our pod, authenticated with the token, gracePeriodSeconds = kill grace."""
    recorder = Recorder()
    make_restarter(recorder).restart()
    (delete,) = kube_api.requests
    assert delete.method == "DELETE"
    assert delete.path == f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}"
    assert delete.query["gracePeriodSeconds"] == ["30"]
    assert delete.token == TOKEN
    assert recorder.names() == ["pod_deleting", "pod_deleted"]
    assert recorder.sleeps == []


def test_forbidden_names_the_missing_rbac_rule_and_is_not_retried(kube_api: FakeKubeApi):
    """403: a RestartError naming the Role rule and the server's words, after one request."""
    kube_api.may_delete_pods = False
    recorder = Recorder()
    with capture_logs() as logs, pytest.raises(RestartError) as raised:
        make_restarter(recorder).restart()
    message = str(raised.value)
    assert "HTTP 403" in message
    assert 'resources: ["pods"], verbs: ["delete"]' in message
    assert "RoleBinding" in message
    assert 'cannot delete resource "pods"' in message, "the server's own explanation is kept"
    (named,) = re.findall(r"k8s/overlays/[\w./-]+\.yaml", message)
    assert (REPO_ROOT / named).is_file(), named
    assert len(kube_api.deletes()) == 1
    assert recorder.sleeps == [] and not [e for e in logs if e["event"] == "kubernetes_retry"]


def test_unauthorized_points_at_the_token_and_is_not_retried(kube_api: FakeKubeApi):
    """401: the credentials were refused; a RestartError about the token, no retry."""
    kube_api.fail_next("delete", 401)
    recorder = Recorder()
    with pytest.raises(RestartError, match=r"HTTP 401.*ServiceAccount token"):
        make_restarter(recorder).restart()
    assert len(kube_api.deletes()) == 1
    assert recorder.sleeps == []


def test_unknown_pod_names_the_downward_api_and_is_not_retried(kube_api: FakeKubeApi):
    """404: the configured pod does not exist; the message names the two settings."""
    kube_api.pods.clear()
    recorder = Recorder()
    with pytest.raises(RestartError, match=r"HTTP 404.*SIDECAR_POD_NAME.*downward API"):
        make_restarter(recorder).restart()
    assert len(kube_api.deletes()) == 1
    assert recorder.sleeps == []


def test_server_errors_and_throttling_are_retried_with_backoff(kube_api: FakeKubeApi):
    """503, 500 and 429 are retried with growing, jittered, bounded delays; then it succeeds."""
    kube_api.fail_next("delete", 503, 500, 429)
    recorder = Recorder()
    with capture_logs() as logs:
        make_restarter(recorder).restart()
    assert len(kube_api.deletes()) == 4
    assert (POD in " ".join(r.path for r in kube_api.deletes())) and recorder.names()[-1] == (
        "pod_deleted"
    )
    # wait_exponential(0.5) + up to 0.5 s of jitter: 0.5-1, 1-1.5, 2-2.5 s.
    assert len(recorder.sleeps) == 3
    for delay, low in zip(recorder.sleeps, (0.5, 1.0, 2.0), strict=True):
        assert low <= delay <= low + 0.5
    retries = [event for event in logs if event["event"] == "kubernetes_retry"]
    assert [event["attempt"] for event in retries] == [1, 2, 3]
    assert "503" in retries[0]["error"] and "429" in retries[2]["error"]


def test_a_failing_server_is_given_up_on_after_the_retry_window(kube_api: FakeKubeApi):
    """Endless 500s: bounded attempts whose delays fit the window, then a clear RestartError."""
    kube_api.fail_next("delete", *[500] * 100)
    recorder = Recorder()
    with pytest.raises(RestartError, match=r"kept failing delete .* 20 s retry window"):
        make_restarter(recorder, retry_window=20).restart()
    assert sum(recorder.sleeps) <= 20
    assert max(recorder.sleeps) <= 10.5, "each delay is capped"
    assert 4 <= len(kube_api.deletes()) <= 10


def test_an_unreachable_server_is_retried_then_reported(kube_api: FakeKubeApi):
    """Connection refused: retried within the window, then a RestartError saying so."""
    kube_api.stop()
    recorder = Recorder()
    with pytest.raises(RestartError, match=r"kept failing delete.*attempt"):
        make_restarter(recorder, retry_window=10).restart()
    assert len(recorder.sleeps) >= 2
    assert sum(recorder.sleeps) <= 10


def test_shutdown_during_backoff_ends_the_retries(kube_api: FakeKubeApi):
    """SIGTERM while a failing delete backs off: no further request, a RestartError saying why."""
    kube_api.fail_next("delete", *[500] * 100)
    recorder = Recorder()
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        recorder.sleeps.append(seconds)
        stop.set()

    restarter = make_restarter(recorder, retry_window=120, stop_event=stop, sleep=sleep)
    with pytest.raises(RestartError) as raised:
        restarter.restart()
    message = str(raised.value)
    assert "the sidecar is shutting down" in message and "after 1 attempt(s)" in message
    assert f"last error from {kube_api.url}: ApiException: (500)" in message
    assert len(kube_api.deletes()) == 1 and len(recorder.sleeps) == 1


def test_unset_stop_event_retries_as_before(kube_api: FakeKubeApi):
    """Given but never set, the event changes nothing: the outage is retried until it ends."""
    kube_api.fail_next("delete", 503, 500)
    recorder = Recorder()
    make_restarter(recorder, stop_event=threading.Event()).restart()
    assert len(kube_api.deletes()) == 3 and len(recorder.sleeps) == 2
    assert recorder.names() == ["pod_deleting", "pod_deleted"]


def test_shutdown_wakes_the_default_backoff_at_once(kube_api: FakeKubeApi):
    """Without an injected sleep the backoff waits on the event, so a stop ends it then."""
    kube_api.stop()
    stop = threading.Event()
    gateway = KubernetesGateway(retry_window=120, stop_event=stop)
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    began = time.monotonic()
    try:
        with pytest.raises(KubernetesUnavailable, match=r"after 1 attempt\(s\).*shutting down"):
            gateway.delete_pod(POD, NAMESPACE, grace_seconds=30)
    finally:
        timer.cancel()
    # The first backoff alone lasts 0.5-1 s; only the event can end the call sooner.
    assert time.monotonic() - began < 0.5


def test_no_credentials_is_a_restart_error_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Outside a pod and without a kubeconfig: a RestartError saying what to mount."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RestartError, match="no Kubernetes credentials"):
        make_restarter(Recorder()).restart()


# --- the start-up permission check ----------------------------------------------------------


def test_start_asks_whether_it_may_delete_its_pod(kube_api: FakeKubeApi):
    """A SelfSubjectAccessReview for delete on this pod; allowed means no error."""
    recorder = Recorder()
    make_restarter(recorder).start()
    (review,) = kube_api.requests
    assert review.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
    attributes = review.body["spec"]["resourceAttributes"]
    assert attributes == {
        "verb": "delete",
        "resource": "pods",
        "group": "",
        "namespace": NAMESPACE,
        "name": POD,
    }
    assert recorder.names() == ["pod_restart_allowed"]
    assert not kube_api.deletes(), "checking never deletes"


def test_start_reports_missing_rbac_at_once(kube_api: FakeKubeApi):
    """Denied by RBAC: the RestartError names the rule, before any stall happened."""
    kube_api.may_delete_pods = False
    with pytest.raises(
        RestartError, match=r'RBAC does not allow deleting pod .*verbs \["delete"\]'
    ):
        make_restarter(Recorder()).start()


def test_start_retries_a_struggling_server_for_the_review(kube_api: FakeKubeApi):
    """The review is retried on a 502 like every other call."""
    kube_api.fail_next("review", 502)
    recorder = Recorder()
    make_restarter(recorder).start()
    assert len(kube_api.requests) == 2 and len(recorder.sleeps) == 1


# --- seeing the trainer ---------------------------------------------------------------------


def test_status_and_stop_work_through_the_process_table(kube_api: FakeKubeApi, tmp_path: Path):
    """Like signal mode: the trainer is found by command line, stopped by signals."""
    marker = f"pod-mode-trainer-{os.getpid()}"
    script = tmp_path / f"{marker}.sh"
    script.write_text("sleep 60\n")
    trainer = subprocess.Popen(["bash", str(script)])
    try:
        restarter = make_restarter(Recorder(), pattern=re.escape(marker))
        deadline = time.monotonic() + 10
        while not restarter.status().running and time.monotonic() < deadline:
            time.sleep(0.05)
        status = restarter.status()
        assert status.running and status.attempt is not None
        assert trainer.pid in restarter.trainer_pids()
        restarter.kill_grace = restarter.processes.kill_grace = 2.0
        restarter.stop()
        trainer.wait(timeout=10)
        assert not restarter.status().running
        assert not kube_api.requests, "stopping processes needs no API call"
    finally:
        if trainer.poll() is None:
            trainer.kill()


# --- configuration --------------------------------------------------------------------------


def test_pod_mode_needs_the_pods_name_and_namespace():
    """Without the downward API variables the settings are rejected, naming both."""
    with pytest.raises(ConfigError, match="SIDECAR_POD_NAME and SIDECAR_POD_NAMESPACE"):
        load_settings({"restart_mode": "pod"})
    with pytest.raises(ConfigError, match="needs SIDECAR_POD_NAMESPACE, from the downward API"):
        load_settings({"restart_mode": "pod", "pod_name": POD})


def test_build_restarter_makes_a_pod_restarter_without_calling_the_api(kube_api: FakeKubeApi):
    """The factory wires the settings in; no request is made until one is needed."""
    settings = Settings(restart_mode="pod", pod_name=POD, pod_namespace=NAMESPACE, kill_grace=7)
    restarter = build_restarter(settings, None, structlog.get_logger())
    assert isinstance(restarter, PodRestarter)
    assert (restarter.mode, restarter.exits_with_run) == ("pod", False)
    assert (restarter.stop_before_rewrite, restarter.relaunches) == (False, False)
    assert (restarter.pod_name, restarter.namespace, restarter.kill_grace) == (
        POD,
        NAMESPACE,
        7.0,
    )
    assert not kube_api.requests


def test_build_restarter_hands_the_stop_event_to_the_gateway(kube_api: FakeKubeApi):
    """The sidecar's stop event reaches the Kubernetes gateway: once set, no call retries."""
    kube_api.fail_next("delete", *[500] * 100)
    settings = Settings(restart_mode="pod", pod_name=POD, pod_namespace=NAMESPACE)
    stop = threading.Event()
    stop.set()
    restarter = build_restarter(settings, None, structlog.get_logger(), stop_event=stop)
    assert isinstance(restarter, PodRestarter)
    began = time.monotonic()
    with pytest.raises(RestartError, match="shutting down"):
        restarter.restart()
    assert time.monotonic() - began < 5
    assert len(kube_api.deletes()) == 1


# --- the real loop --------------------------------------------------------------------------


class PodScene:
    """A simulated pod: the restart-policy stand-in running train.sh, and a pod-mode sidecar.

    Deleting the pod (the fake API's on_delete) ends both, as the kubelet would; the test
    then starts the replacement pod on the same outputs, as the Job controller would.
    """

    def __init__(self, root: Path, api: FakeKubeApi, kubeconfig: Path):
        self.root = root
        self.api = api
        self.kubeconfig = kubeconfig
        self.tree = build_fluxgym_tree(
            root / "fluxgym", extra_trainer_args="--save_every_n_steps 6 --save_state"
        )
        self.deleted = threading.Event()
        self.api.on_delete = lambda namespace, name: self.deleted.set()
        self.runtime: subprocess.Popen[bytes] | None = None
        self.sidecar: subprocess.Popen[str] | None = None
        self.events: list[dict[str, Any]] = []

    def start_pod(self, name: str, faults: str) -> None:
        self.api.pods.add((NAMESPACE, name))
        self.deleted.clear()
        # The pod's trainer and the sidecar start together; the trainer's model loading
        # (3 s, within the 4 s start-up grace) lets the sidecar, which starts in about a
        # second, watch from its first step, as the pod's sidecar container does.
        simulation = {**FAST_SIMULATION, "SIM_STARTUP_SECONDS": "3", "SIM_FAULTS": faults}
        self.runtime = start_runtime(self.tree, simulation)
        pattern = tree_pattern(self.tree)
        sidecar_env = {
            **os.environ,
            **FAST_SETTINGS,
            "SIDECAR_RESTART_MODE": "pod",
            "SIDECAR_POD_NAME": name,
            "SIDECAR_POD_NAMESPACE": NAMESPACE,
            "SIDECAR_TRAINER_PATTERN": pattern,
            "SIDECAR_TRAIN_SCRIPT": str(self.tree.train_script),
            "SIDECAR_HEARTBEAT_FILE": str(self.root / "heartbeat"),
            "SIDECAR_CHECKPOINT_SETTLE": "0.3s",
            "KUBECONFIG": str(self.kubeconfig),
        }
        sidecar_env.pop("KUBERNETES_SERVICE_HOST", None)
        self.sidecar = spawn_sidecar(sidecar_env)
        self.events = []
        # A reader thread, so that waiting for an event that never comes can time out.
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(
            target=self._read_events, args=(self.sidecar.stdout, self._lines), daemon=True
        ).start()

    def wait_for(self, name: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if event is None:
                break  # the sidecar's stdout closed
            self.events.append(event)
            if event["event"] == name:
                return event
        raise AssertionError(f"no {name} within {timeout} s; saw {self.names()}")

    @staticmethod
    def _read_events(stdout: Any, lines: queue.Queue[dict[str, Any] | None]) -> None:
        for line in stdout:
            if line.startswith("{"):
                lines.put(json.loads(line))
        lines.put(None)

    def names(self) -> list[str]:
        return [event["event"] for event in self.events]

    def end_pod(self) -> int:
        """What the kubelet does to a deleted pod: stop every container; the sidecar's code."""
        assert self.runtime is not None and self.sidecar is not None
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.runtime.pid:
                    process.send_signal(signal.SIGKILL)
            except (psutil.Error, OSError):
                continue
        self.runtime.wait(timeout=10)
        self.sidecar.send_signal(signal.SIGTERM)
        return self.sidecar.wait(timeout=15)

    def close(self) -> None:
        for process in (self.sidecar, self.runtime):
            if process is not None and process.poll() is None:
                kill_everything(process.pid)
                process.wait(timeout=10)


@pytest.fixture
def pod_scene(tmp_path: Path) -> Iterator[PodScene]:
    api = FakeKubeApi().start()
    scene = PodScene(tmp_path, api, api.write_kubeconfig(tmp_path / "kubeconfig"))
    yield scene
    scene.close()
    api.stop()


@pytest.mark.slow
def test_stall_deletes_the_pod_and_the_replacement_resumes(pod_scene: PodScene):
    """A hang: with train.sh pointing at the newest checkpoint, the sidecar deletes its own
    pod over HTTP; the replacement pod's trainer resumes from that checkpoint."""
    scene = pod_scene
    scene.start_pod("fluxgym-train-first", "hang_idle@step=20:once")
    scene.wait_for("pod_restart_allowed")
    stall = scene.wait_for("stall_detected")
    assert stall["last_step"] == 20
    scene.wait_for("pod_deleted")
    assert scene.deleted.wait(5)
    # By then train.sh points at the newest complete checkpoint (kept current while the run
    # was healthy, confirmed at the stall), so whatever starts it next resumes.
    resume = parse_train_script(scene.tree.train_script.read_text()).resume
    assert resume is not None and resume.endswith("my-lora-step00000018-state")
    (delete,) = scene.api.deletes()
    assert delete.path.endswith("/pods/fluxgym-train-first")
    assert delete.query["gracePeriodSeconds"] == [FAST_SETTINGS["SIDECAR_KILL_GRACE"].rstrip("s")]
    names = scene.names()
    assert names.index("checkpoint_selected") < names.index("pod_deleting")
    assert "trainer_restarted" not in names, "the replacement pod is not this sidecar's to see"
    assert scene.end_pod() == 128 + signal.SIGTERM

    # The Job controller's replacement: same volume, fresh containers.
    scene.start_pod("fluxgym-train-second", "hang_idle@step=20:once")
    scene.wait_for("training_completed", timeout=90)
    assert scene.runtime is not None and scene.runtime.wait(timeout=30) == 0
    assert (scene.tree.output_dir / "my-lora.safetensors").is_file()
    log = (scene.tree.output_dir / "train.log").read_text()
    assert "resuming from" in log and "my-lora-step00000018-state" in log
    assert len(scene.api.deletes()) == 1, "a healthy run is never restarted"


# --- a preemption: the kubelet stops the pod, the Job replaces it ----------------------------

# train.sh hangs (idle) at step 20 in its first run: the run then stands still on the state of
# step 18, and train.sh points --resume at it, so that the pod is taken away at a known
# position. The stall timeout is long enough never to fire meanwhile.
PREEMPTED_FAULTS = "hang_idle@step=20:once"
NEWEST_STATE = "my-lora-step00000018-state"
STEPS_PER_EPOCH = int(FAST_SIMULATION["SIM_STEPS_PER_EPOCH"])
EPOCHS = 16  # the fixture's max_train_epochs


class PreemptionScene(PodScene):
    """Pods as the Job runs them with restartPolicy Never: the sidecar starts first; once it
    has polled (its heartbeat: the native sidecar's startup probe) the trainer container runs
    train.sh once, restarted by nothing. Each pod has its own pod-lifecycle folder (the emptyDir
    of k8s/base/job.yaml) for SIDECAR_TERMINATION_FILE and the heartbeat; the outputs folder,
    train.sh and the ledger are the shared volume's. The test plays the kubelet."""

    def __init__(self, root: Path, api: FakeKubeApi, kubeconfig: Path, mode: str):
        super().__init__(root, api, kubeconfig)
        self.mode = mode
        self.lifecycle = root / "pod-lifecycle"  # the current pod's, once one started
        self.stall_timeout = "60s"

    @property
    def termination_file(self) -> Path:
        return self.lifecycle / "terminating"

    def start_pod(self, name: str, faults: str) -> None:
        self.api.pods.add((NAMESPACE, name))
        self.lifecycle = self.root / f"pod-lifecycle-{name}"  # a fresh emptyDir
        self.lifecycle.mkdir()
        environment = {
            **os.environ,
            **FAST_SETTINGS,
            "SIDECAR_RESTART_MODE": self.mode,
            "SIDECAR_TRAINER_PATTERN": tree_pattern(self.tree),
            "SIDECAR_TRAIN_SCRIPT": str(self.tree.train_script),
            "SIDECAR_HEARTBEAT_FILE": str(self.lifecycle / "heartbeat"),
            "SIDECAR_TERMINATION_FILE": str(self.termination_file),
            "SIDECAR_CHECKPOINT_SETTLE": "0.3s",
            "SIDECAR_STALL_TIMEOUT": self.stall_timeout,
            "KUBECONFIG": str(self.kubeconfig),
        }
        if self.mode == "pod":
            environment |= {"SIDECAR_POD_NAME": name, "SIDECAR_POD_NAMESPACE": NAMESPACE}
        environment.pop("KUBERNETES_SERVICE_HOST", None)
        self.sidecar = spawn_sidecar(environment)
        self.events = []
        self._lines = queue.Queue()
        threading.Thread(
            target=self._read_events, args=(self.sidecar.stdout, self._lines), daemon=True
        ).start()
        deadline = time.monotonic() + 30
        while not (self.lifecycle / "heartbeat").exists():
            assert self.sidecar.poll() is None, f"the sidecar ended with {self.sidecar.poll()}"
            assert time.monotonic() < deadline, "the sidecar never polled"
            time.sleep(0.05)
        # The trainer container: its wrapper's child `bash train.sh`, in a group of its own.
        simulation = {**FAST_SIMULATION, "SIM_FAULTS": faults}
        with (self.tree.output_dir / "train.log").open("ab") as log:
            self.runtime = subprocess.Popen(
                self.tree.command,
                cwd=self.tree.root,
                env=self.tree.env(simulation),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def wait_until_resume_points_at(self, state: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            resume = parse_train_script(self.tree.train_script.read_text()).resume
            if resume is not None and resume.endswith(state):
                return
            assert time.monotonic() < deadline, f"train.sh still resumes from {resume}"
            assert self.runtime is not None and self.runtime.poll() is None
            time.sleep(0.05)

    def stop_trainer(self, *, disruption: bool) -> None:
        """The kubelet stopping the trainer container: on a disruption its wrapper first
        creates the termination file; then train.sh's group gets SIGTERM, and the container
        ends once every process of it is gone."""
        assert self.runtime is not None
        if disruption:
            self.termination_file.touch()
        os.killpg(self.runtime.pid, signal.SIGTERM)
        assert self.runtime.wait(timeout=15) == -signal.SIGTERM
        deadline = time.monotonic() + 15
        while _session_alive(self.runtime.pid):
            assert time.monotonic() < deadline, "train.sh's processes outlived SIGTERM"
            time.sleep(0.02)

    def stop_sidecar(self) -> int:
        """The kubelet stopping the native sidecar, after the trainer: its exit code."""
        assert self.sidecar is not None
        self.sidecar.send_signal(signal.SIGTERM)
        code = self.sidecar.wait(timeout=15)
        while (event := self._lines.get(timeout=5)) is not None:
            self.events.append(event)
        return code

    def ledger(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.tree.output_dir / ".sidecar" / "state.json").read_text()
        )
        return data


def _session_alive(session: int) -> bool:
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, OSError):
            continue
    return False


@pytest.fixture(params=["pod", "signal"])
def preemption_scene(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PreemptionScene]:
    api = FakeKubeApi().start()
    scene = PreemptionScene(
        tmp_path, api, api.write_kubeconfig(tmp_path / "kubeconfig"), mode=request.param
    )
    yield scene
    scene.close()
    api.stop()


@pytest.mark.slow
@pytest.mark.parametrize("sidecar_stopped", ["at_once", "after_its_poll"])
def test_preempted_pod_is_an_interruption_and_the_replacement_resumes_uncharged(
    preemption_scene: PreemptionScene, sidecar_stopped: str
):
    """A preemption (or eviction, drain) of a pod whose trainer is training: the kubelet stops
    the trainer first, its wrapper having created the termination file, then the native
    sidecar (at once, or after its poll saw the trainer gone). The sidecar records an
    interruption (how "container_stopped"), no crash and no stall; the replacement pod's
    sidecar takes the new trainer for the run coming back (by "trainer"), charging nothing to
    the restart budget, and the run completes from the newest state at the exact position."""
    scene = preemption_scene
    scene.start_pod("fluxgym-train-first", PREEMPTED_FAULTS)
    scene.wait_for("training_progressing")
    scene.wait_until_resume_points_at(NEWEST_STATE)
    scene.stop_trainer(disruption=True)
    if sidecar_stopped == "after_its_poll":
        scene.wait_for("run_interrupted")
    assert scene.stop_sidecar() == 128 + signal.SIGTERM
    (interrupted,) = [e for e in scene.events if e["event"] == "run_interrupted"]
    assert interrupted["how"] == "container_stopped"
    assert interrupted["inferred"] is False
    assert interrupted["newest_state"] == str(scene.tree.output_dir / NEWEST_STATE)
    names = scene.names()
    assert not {"trainer_crashed", "stall_detected", "pod_deleting"} & set(names), names
    ledger = scene.ledger()
    assert ledger["recoveries"] == [] and ledger["supervising"] is False
    (interruption,) = ledger["interruptions"]
    assert interruption["how"] == "container_stopped" and interruption["resumed_at"] is None
    assert not scene.api.deletes()

    scene.start_pod("fluxgym-train-second", PREEMPTED_FAULTS)
    resumed = scene.wait_for("run_resumed_after_interruption")
    assert resumed["by"] == "trainer" and resumed["how"] == "container_stopped"
    assert resumed["down_seconds"] >= 0
    print(f"\n[pod] {scene.mode} preemption: down {resumed['down_seconds']:.2f} s")
    assert resumed["checkpoint"] == str(scene.tree.output_dir / NEWEST_STATE)
    scene.wait_for("training_completed", timeout=90)
    assert scene.runtime is not None and scene.runtime.wait(timeout=30) == 0
    assert scene.stop_sidecar() == 128 + signal.SIGTERM
    assert not {"trainer_crashed", "stall_detected", "run_interrupted"} & set(scene.names())
    log = (scene.tree.output_dir / "train.log").read_text()
    assert f"resuming from {scene.tree.output_dir / NEWEST_STATE}" in log
    final = scene.tree.output_dir / "my-lora.safetensors"
    assert read_lineage(final) == uninterrupted_lineage(STEPS_PER_EPOCH, EPOCHS), (
        "a batch lost or trained twice: the replacement did not resume at the exact position"
    )
    ledger = scene.ledger()
    assert ledger["recoveries"] == [], "an interruption is never charged to the restart budget"
    (interruption,) = ledger["interruptions"]
    assert interruption["resumed_at"] is not None
    assert interruption["down_seconds"] == resumed["down_seconds"]
    assert ledger["completed"] is True
    assert not scene.api.deletes()


@pytest.mark.slow
def test_trainer_gone_without_the_termination_file_is_a_crash_and_charged(
    preemption_scene: PreemptionScene,
):
    """The control: the same end of the trainer without the file (no disruption: it died by
    itself) is a crash. The sidecar records it (trainer_crashed, one recovery, no
    interruption) and leaves the restart to the Job; the replacement pod resumes the run."""
    scene = preemption_scene
    scene.start_pod("fluxgym-train-first", PREEMPTED_FAULTS)
    scene.wait_for("training_progressing")
    scene.wait_until_resume_points_at(NEWEST_STATE)
    scene.stop_trainer(disruption=False)
    scene.wait_for("trainer_crashed")
    assert scene.stop_sidecar() == 128 + signal.SIGTERM
    assert "run_interrupted" not in scene.names()
    ledger = scene.ledger()
    (recovery,) = ledger["recoveries"]
    assert recovery["kind"] == "crash"
    assert ledger["interruptions"] == []
    assert not scene.api.deletes(), "a crash is the Job's to restart: no DELETE"

    scene.start_pod("fluxgym-train-second", PREEMPTED_FAULTS)
    scene.wait_for("training_completed", timeout=90)
    assert scene.runtime is not None and scene.runtime.wait(timeout=30) == 0
    assert scene.stop_sidecar() == 128 + signal.SIGTERM
    assert "run_resumed_after_interruption" not in scene.names()
    log = (scene.tree.output_dir / "train.log").read_text()
    assert f"resuming from {scene.tree.output_dir / NEWEST_STATE}" in log
    ledger = scene.ledger()
    assert len(ledger["recoveries"]) == 1 and ledger["interruptions"] == []


@pytest.mark.slow
@pytest.mark.parametrize("preemption_scene", ["pod"], indirect=True)
def test_pod_modes_own_delete_stays_a_recovery_though_the_wrapper_marks_the_stop(
    preemption_scene: PreemptionScene,
):
    """Pod mode's DELETE makes the kubelet stop the pod as a preemption does: the trainer's
    wrapper cannot tell the two apart and creates the termination file. The sidecar had ended
    its watch with the recovery, so that stop is no interruption: one recovery (the stall),
    nothing resumed after an interruption in the replacement pod."""
    scene = preemption_scene
    scene.stall_timeout = FAST_SETTINGS["SIDECAR_STALL_TIMEOUT"]
    scene.start_pod("fluxgym-train-first", PREEMPTED_FAULTS)
    scene.wait_for("stall_detected")
    scene.wait_for("pod_deleted")
    scene.stop_trainer(disruption=True)
    assert scene.stop_sidecar() == 128 + signal.SIGTERM
    assert "run_interrupted" not in scene.names()
    ledger = scene.ledger()
    assert [r["kind"] for r in ledger["recoveries"]] == ["stall"]
    assert ledger["interruptions"] == []

    scene.start_pod("fluxgym-train-second", PREEMPTED_FAULTS)
    scene.wait_for("training_completed", timeout=90)
    assert scene.runtime is not None and scene.runtime.wait(timeout=30) == 0
    assert scene.stop_sidecar() == 128 + signal.SIGTERM
    assert "run_resumed_after_interruption" not in scene.names()
    log = (scene.tree.output_dir / "train.log").read_text()
    assert f"resuming from {scene.tree.output_dir / NEWEST_STATE}" in log
    assert len(scene.ledger()["recoveries"]) == 1 and len(scene.api.deletes()) == 1
