"""When the machine goes away (issue 11), end to end on the real engine, exec mode.

The sidecar runs beside a FluxGym-like container whose UI stand-in (tests/e2e/venv-ui,
ui_launcher.py) starts train.sh as its child when "Start" is clicked, and, like FluxGym,
writes train.sh anew from its form first (so without the --resume the sidecar put there).
The compose project mirrors compose.yaml: the UI's container joins the sidecar's PID
namespace (`pid: service:sidecar`) and depends on it with `restart: true`; the sidecar runs
with `init: true` as UID 1000; both have `restart: unless-stopped`.

Machines going away are staged as Docker sees them:
- a power cut: SIGKILL for the sidecar's init, PID 1 of the namespace every training process
  lives in, so the kernel kills them all in the same instant; then the UI's container is killed
  too. A boot is the daemon starting both again: the sidecar, then the UI's container (which
  cannot start before the namespace it joins);
- `docker compose up -d` after one SIDECAR_* value changed: compose stops the UI's container
  (restart: true), recreates the sidecar and the UI's container, starts both.

The position is checked on the simulator's lineage (sidecar/simulator/lineage.py): the final
LoRA of a run resumed exactly has trained every (epoch, batch) once, in order, as an
uninterrupted run. Each resuming scenario announces its downtime (down_seconds of
run_resumed_after_interruption) and the time from the sidecar's start to the first resumed
step (training_progressing after the resume).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests
from docker_support import docker_client, require_docker
from e2e_support import (
    FAST_SIDECAR,
    FLUXGYM_ROOT,
    HANG_STEP,
    RESUMED_STATE,
    SIDECAR_OUTPUTS,
    SIDECAR_RUN_DIR,
    TRAINER_OUTPUTS,
    TRAINER_RUN_DIR,
    TRAINER_SCRIPT,
    Scene,
    announce,
    build_venv_ui_image,
    event_time,
    give_to_trainer_uid,
    open_scene,
    seconds_between,
    step_seen,
)

from sidecar.simulator import read_lineage, uninterrupted_lineage

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# The UI stand-in's settings (see ui_launcher.py): a Start is `touch UI_START_FILE`, consumed
# when taken; each Start regenerates train.sh from the form; the page's text lands in UI_PAGE.
UI_START_FILE = "/tmp/start-training"
UI_FOLDER = "/ui"
UI_FORM = f"{UI_FOLDER}/form-train.sh"
UI_PAGE = f"{UI_FOLDER}/page.log"
UI_START_MARK = re.compile(r"^=== ui start (\d+) pid (\d+) ===$", re.MULTILINE)

STEPS_PER_EPOCH, EPOCHS = 4, 16
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
UNINTERRUPTED = uninterrupted_lineage(STEPS_PER_EPOCH, EPOCHS)
# 0.2 s a step: 64 steps in about 13 s, long enough to cut the run in the middle. The cut comes
# once the page shows step 20: the step-18 state is the newest complete one then, and the next
# save (step 24) is 0.8 s away, far more than a kill takes.
SIMULATION = {"SIM_STEP_SECONDS": "0.2"}
CUT_AT_STEP = HANG_STEP
OUTAGE_SECONDS = 1.0  # how long the machine stays off
POLL_SECONDS = float(FAST_SIDECAR["SIDECAR_POLL_INTERVAL"].removesuffix("s"))
# Two trees side by side: the sidecar notices the second within a couple of polls, then the
# stopped tree takes a moment to exit (the simulator ends at once on SIGTERM), and `docker top`
# itself samples only every 0.1-0.2 s on this machine.
OVERLAP_ALLOWED = 3 * POLL_SECONDS + 1.0
TRAINER_ROW = re.compile(r"train\.sh|flux_train")
TRAIN_SH_ROW = re.compile(r"\bbash\b.*\btrain\.sh\b")


@pytest.fixture(scope="module")
def venv_ui_image() -> str:
    require_docker()
    return build_venv_ui_image()


@pytest.fixture
def beside(venv_ui_image: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Beside]:
    with open_scene(tmp_path, request.node.name) as scene:
        yield Beside(scene, venv_ui_image)


# -- the scene: FluxGym's UI beside the sidecar ----------------------------------------------


class Beside:
    """A Scene with the UI stand-in and the machine's power switch."""

    def __init__(self, scene: Scene, image: str) -> None:
        self.scene = scene
        self.image = image
        self.ui_dir = scene.folder / "ui"
        self.cut_at: float | None = None  # wall clock of the last power cut

    # -- setting up ------------------------------------------------------------------------

    def write_run(self) -> None:
        """The run as FluxGym's form writes it, with a state every 6 steps; the form's copy
        is what each Start writes train.sh anew from."""
        script = self.scene.write_run("--save_every_n_steps 6 --save_state")
        self.ui_dir.mkdir(exist_ok=True)
        shutil.copyfile(script, self.ui_dir / "form-train.sh")
        give_to_trainer_uid(self.ui_dir)

    def services(
        self, sidecar: dict[str, str] | None = None, simulation: dict[str, str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """compose.yaml's two services (the socket proxy aside, see Scene.sidecar_service)."""
        scene = self.scene
        return {
            "sidecar": scene.sidecar_service(
                {
                    "SIDECAR_RESTART_MODE": "exec",
                    "SIDECAR_TRAINER_CONTAINER": "trainer",
                    "SIDECAR_OUTPUT_DIR": SIDECAR_OUTPUTS,
                    **(sidecar or {}),
                },
                restart="unless-stopped",
            ),
            "trainer": scene.trainer_service(
                image=self.image,
                command=["python3", f"{FLUXGYM_ROOT}/ui_launcher.py"],
                simulation={**SIMULATION, **(simulation or {})},
                environment={
                    "UI_TRAIN_SCRIPT": TRAINER_SCRIPT,
                    "UI_START_FILE": UI_START_FILE,
                    "UI_REPEAT": "1",
                    "UI_REGENERATE_FROM": UI_FORM,
                    "UI_OUTPUT_FILE": UI_PAGE,
                },
                volumes=[f"{scene.outputs}:{TRAINER_OUTPUTS}", f"{self.ui_dir}:{UI_FOLDER}"],
                pid="service:sidecar",
                depends_on={"sidecar": {"condition": "service_started", "restart": True}},
                restart="unless-stopped",
                stop_signal="SIGKILL",
            ),
        }

    def up(self, **options: Any) -> None:
        self.scene.up(self.services(**options))

    # -- the UI ----------------------------------------------------------------------------

    def click_start(self) -> None:
        result = self.scene.container("trainer").exec_run(["touch", UI_START_FILE])
        assert result.exit_code == 0, result.output

    def page(self) -> str:
        try:
            return (self.ui_dir / "page.log").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def starts(self) -> list[str]:
        """What the page showed for each Start, in order."""
        pieces = UI_START_MARK.split(self.page())
        return pieces[3::3]

    def wait_for_ui_step(self, step: int, *, start: int = 1, timeout: float = 30) -> None:
        def seen() -> bool:
            starts = self.starts()
            return len(starts) >= start and step_seen(starts[start - 1], step, TOTAL_STEPS)

        self.scene.wait_until(f"the UI's training at step {step}", seen, timeout=timeout)

    def start_training_from_the_ui(self) -> None:
        """The first run: Start in the UI, the sidecar watching it, cut at CUT_AT_STEP."""
        self.scene.wait_for("run_selected")
        self.click_start()
        self.scene.wait_for("trainer_started")
        self.wait_for_ui_step(CUT_AT_STEP)

    # -- the machine -----------------------------------------------------------------------

    def power_cut(self) -> None:
        """SIGKILL everything at once, as a power cut does."""
        self.cut_at = time.time()
        self.scene.container("sidecar").kill()
        with contextlib.suppress(docker.errors.APIError):  # usually ended already
            self.scene.container("trainer").kill()
        self.scene.wait_until(
            "both containers down",
            lambda: all(self.scene.state(s)["Status"] == "exited" for s in ("sidecar", "trainer")),
            timeout=15,
        )

    def boot(self, between: Callable[[], None] | None = None) -> None:
        """What the daemon does at boot: the sidecar first, then the UI's container."""
        self.scene.container("sidecar").start()
        if between is not None:
            between()
        self.scene.container("trainer").start()

    def trainer_rows(self) -> list[str]:
        """The training processes in the UI's container (train.sh, accelerate, the trainer)."""
        rows = self.scene.container("trainer").top()["Processes"]
        return [row[-1] for row in rows if TRAINER_ROW.search(row[-1])]

    # -- reading ---------------------------------------------------------------------------

    def lifetimes(self, events: list[dict[str, Any]] | None = None) -> list[list[dict[str, Any]]]:
        """The sidecar's events, one list per start of its container (a restart keeps logs)."""
        return split_lifetimes(self.scene.events() if events is None else events)

    def story(self, extra: str = "") -> str:
        page = self.page().replace("\r", "\n")
        try:
            ledger = json.dumps(self.scene.ledger())
        except (OSError, ValueError) as error:
            ledger = repr(error)
        return (
            f"{self.scene.story()}\nUI page tail:\n{page[-1500:]}\nledger: {ledger}\n"
            f"events: {[_without_settings(e) for e in self.scene.events()]}\n{extra}"
        )


def _without_settings(event: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in event.items() if key not in {"settings", "level"}}


def split_lifetimes(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    lifetimes: list[list[dict[str, Any]]] = []
    for event in events:
        if event["event"] == "sidecar_started" or not lifetimes:
            lifetimes.append([])
        lifetimes[-1].append(event)
    return lifetimes


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == name]


def names(events: list[dict[str, Any]]) -> list[str]:
    return [event["event"] for event in events]


def wait_in_lifetime(
    beside: Beside, name: str, *, lifetime: int = -1, timeout: float = 40
) -> dict[str, Any]:
    """The first ``name`` event of one lifetime of the sidecar's container (the last one)."""

    def found() -> dict[str, Any] | None:
        lifetimes = beside.lifetimes()
        if len(lifetimes) < (lifetime + 1 if lifetime >= 0 else -lifetime):
            return None
        matching = named(lifetimes[lifetime], name)
        return matching[0] if matching else None

    deadline = time.monotonic() + timeout
    while (event := found()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name!r} within {timeout:g} s\n{beside.story()}")
        time.sleep(0.1)
    return event


# -- what is on disk -------------------------------------------------------------------------


def newest_complete_state(run_dir: Path) -> str:
    """The state folder with the most training in it among those the simulator finished
    writing (random_states_0.pkl is its last file); its position is its weights' lineage."""
    complete = [
        (len(read_lineage(folder / "model.safetensors")), folder.name)
        for folder in run_dir.glob("*-state")
        if (folder / "random_states_0.pkl").is_file()
    ]
    assert complete, f"no complete state in {sorted(p.name for p in run_dir.iterdir())}"
    return max(complete)[1]


def assert_finished_exactly(beside: Beside, resumed_from: str) -> None:
    """One resumed attempt, the sidecar's relaunch (its output goes to train.log), ran to the
    final model from ``resumed_from``; the model's lineage is an uninterrupted run's; nothing
    was charged to the restart budget."""
    scene = beside.scene
    log = scene.train_log()
    resumes = re.findall(r"resuming from (\S+)", log)
    assert resumes == [f"{TRAINER_RUN_DIR}/{resumed_from}"], beside.story()
    final = f"saving checkpoint: {TRAINER_RUN_DIR}/my-lora.safetensors"
    assert final in log.split("resuming from", 1)[1], beside.story()
    assert not [page for page in beside.starts() if final in page], "a UI run finished"
    assert read_lineage(scene.run_dir / "my-lora.safetensors") == UNINTERRUPTED
    ledger = scene.ledger()
    assert ledger["recoveries"] == [], ledger
    assert ledger["completed"] is True, ledger


def assert_one_interruption(ledger: dict[str, Any], how: set[str]) -> dict[str, Any]:
    interruptions = ledger["interruptions"]
    assert len(interruptions) == 1, ledger
    interruption: dict[str, Any] = interruptions[0]
    assert interruption["how"] in how, interruption
    assert interruption["resumed_at"] is not None, interruption
    assert interruption["down_seconds"] is not None, interruption
    return interruption


# -- the figures for the closing note ---------------------------------------------------------


def report_resume(
    config: pytest.Config,
    record_property: Callable[[str, object], None],
    label: str,
    lifetime: list[dict[str, Any]],
) -> dict[str, float]:
    """Announce and record: downtime, and the time from the sidecar's start to the first step
    of the resumed attempt."""
    started = named(lifetime, "sidecar_started")[0]
    at = names(lifetime).index("run_resumed_after_interruption")
    resumed = lifetime[at]
    progressing = named(lifetime[at:], "training_progressing")[0]
    figures = {
        "down_seconds": float(resumed["down_seconds"]),
        "start_to_resume_logged": seconds_between(started, resumed),
        "start_to_first_resumed_step": seconds_between(started, progressing),
        "attempt_to_first_step": float(progressing["seconds_since_start"]),
    }
    for key, value in figures.items():
        record_property(f"{key}_{label}", round(value, 3))
    announce(
        config,
        f"\n[e2e] {label}: down {figures['down_seconds']:.2f} s; sidecar start -> resumed "
        f"relaunch {figures['start_to_resume_logged']:.2f} s -> first resumed step "
        f"{figures['start_to_first_resumed_step']:.2f} s after the sidecar's start "
        f"(the attempt's own seconds_since_start {figures['attempt_to_first_step']:.2f} s)",
    )
    return figures


def assert_downtime_measured(beside: Beside, resumed: dict[str, Any]) -> None:
    """down_seconds runs from the last sign of life (a poll at most before the cut) to the
    relaunch: at least the outage, and about the time from the cut to the resume event."""
    assert beside.cut_at is not None
    since_cut = event_time(resumed).timestamp() - beside.cut_at
    assert resumed["down_seconds"] >= OUTAGE_SECONDS, resumed
    assert abs(resumed["down_seconds"] - since_cut) < 1.0, (resumed, since_cut)


# -- watching the UI's container --------------------------------------------------------------


@dataclass
class TreeSampler:
    """Samples `docker top` of the UI's container in the background: train.sh trees running.

    A tree is a `bash ... train.sh` process whose parent is not one (a `bash -c "exec bash
    train.sh"` wrapper and the bash it becomes are one process).
    """

    container_id: str
    samples: list[tuple[float, int | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        client = docker_client(timeout=10)
        try:
            while not self._stop.is_set():
                try:
                    top = client.api.top(self.container_id)
                    trees: int | None = count_trees(top["Titles"], top["Processes"])
                except (docker.errors.APIError, requests.RequestException):
                    trees = None  # not running (between a cut and a boot)
                self.samples.append((time.monotonic(), trees))
                self._stop.wait(0.05)
        finally:
            client.close()

    def most(self) -> int:
        return max((trees or 0 for _, trees in self.samples), default=0)

    def longest_overlap(self) -> float:
        """The longest time two or more trees were seen, up to the first sample without."""
        longest, since = 0.0, None
        for at, trees in self.samples:
            if (trees or 0) >= 2:
                since = at if since is None else since
            elif since is not None:
                longest, since = max(longest, at - since), None
        if since is not None:
            longest = max(longest, self.samples[-1][0] - since)
        return longest

    def timeline(self) -> str:
        """Changes in the count, for a failure message."""
        if not self.samples:
            return "no samples"
        first, changes, previous = self.samples[0][0], [], object()
        for at, trees in self.samples:
            if trees != previous:
                changes.append(f"{at - first:.2f}s:{trees}")
                previous = trees
        return "train.sh trees over time: " + " ".join(changes)


def count_trees(titles: list[str], rows: list[list[str]]) -> int:
    pid, ppid = titles.index("PID"), titles.index("PPID")
    scripts = {row[pid]: row[ppid] for row in rows if TRAIN_SH_ROW.search(row[-1])}
    return sum(1 for parent in scripts.values() if parent not in scripts)


@contextlib.contextmanager
def following_logs(scene: Scene, service: str = "sidecar") -> Iterator[list[dict[str, Any]]]:
    """The container's JSON events as they come, kept after compose removes the container."""
    events: list[dict[str, Any]] = []
    client = docker_client(timeout=600)
    container_id = scene.container(service).id

    def follow() -> None:
        buffer = b""
        with contextlib.suppress(docker.errors.APIError, requests.RequestException):
            for chunk in client.api.logs(
                container_id, stdout=True, stderr=False, stream=True, follow=True
            ):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"{"):
                        with contextlib.suppress(ValueError):
                            events.append(json.loads(line))

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield events
    finally:
        thread.join(timeout=15)  # ends when the container stops
        client.close()


def watch_for_no_training(beside: Beside, seconds: float) -> list[str]:
    """Every training process seen in the UI's container over ``seconds``."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.extend(beside.trainer_rows())
        time.sleep(0.1)
    return seen


# -- a) a power cut --------------------------------------------------------------------------


def test_power_cut_mid_training_resumes_by_itself_after_the_boot(
    beside: Beside, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """Both containers SIGKILLed at step 20 of the UI's run, started again as at boot: the
    sidecar infers the interruption from its ledger, relaunches train.sh in the UI's container
    from the step-18 state with no user action, outside the restart budget, and the run ends
    at the exact position."""
    beside.write_run()
    beside.up()
    beside.start_training_from_the_ui()
    beside.power_cut()
    assert newest_complete_state(beside.scene.run_dir) == RESUMED_STATE
    time.sleep(OUTAGE_SECONDS)  # the machine is off
    beside.boot()
    resumed = wait_in_lifetime(beside, "run_resumed_after_interruption")
    wait_in_lifetime(beside, "training_completed", timeout=45)

    first, after_boot = beside.lifetimes()
    assert "trainer_started" in names(first)
    interrupted = named(after_boot, "run_interrupted")
    assert len(interrupted) == 1, beside.story()
    assert interrupted[0]["inferred"] is True, interrupted
    assert interrupted[0]["how"] == "unclean", interrupted
    assert interrupted[0]["consecutive_interruptions"] == 1, interrupted
    assert resumed["by"] == "sidecar", resumed
    assert resumed["how"] == "unclean", resumed
    assert resumed["checkpoint"] == f"{SIDECAR_RUN_DIR}/{RESUMED_STATE}", resumed
    assert_downtime_measured(beside, resumed)
    assert not {"gave_up", "interruption_not_resumed"} & set(names(after_boot))
    assert named(after_boot, "training_completed")[0]["exit_code"] == 0
    report_resume(pytestconfig, record_property, "power-cut", after_boot)

    assert_finished_exactly(beside, RESUMED_STATE)
    ledger = beside.scene.ledger()
    assert assert_one_interruption(ledger, {"unclean"})["down_seconds"] >= OUTAGE_SECONDS
    assert len(beside.starts()) == 1, "nobody clicked Start again"
    assert beside.trainer_rows() == []
    assert beside.scene.state("trainer")["Running"], "the UI stayed up"


# -- b) `docker compose up -d` after an edit ---------------------------------------------------


def test_recreating_the_sidecar_after_an_edit_resumes_by_itself(
    beside: Beside, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """One SIDECAR_* value changed, `docker compose up -d`: compose stops the UI's container
    first (depends_on restart: true), recreates the sidecar (and the UI's container, which
    joins its PID namespace); the new sidecar relaunches the run from the newest complete
    state, outside the restart budget, and it ends at the exact position."""
    beside.write_run()
    beside.up()
    with following_logs(beside.scene) as old_events:
        beside.start_training_from_the_ui()
        cut = time.time()
        beside.cut_at = cut
        # compose.yaml's default, one more: any edit of the sidecar's service recreates it.
        beside.up(sidecar={"SIDECAR_INCIDENTS_KEEP": "21"})
        up_seconds = time.time() - cut
    # compose has stopped the UI's training; what it left behind is where the run goes on.
    state = newest_complete_state(beside.scene.run_dir)
    resumed = wait_in_lifetime(beside, "run_resumed_after_interruption")
    wait_in_lifetime(beside, "training_completed", timeout=45)
    story = beside.story(f"old sidecar's events: {names(old_events)}")

    assert "trainer_started" in names(old_events), story
    assert "sidecar_stopped" in names(old_events), story
    [after_recreate] = beside.lifetimes()
    assert resumed["by"] == "sidecar", resumed
    # compose stops the UI's container before it stops the sidecar: the sidecar sees the
    # container stop under the running trainer (the spec's container_stopped), unless its
    # SIGTERM came first.
    assert resumed["how"] in {"container_stopped", "sigterm"}, (resumed, story)
    assert [e["how"] for e in named(old_events, "run_interrupted")] == [resumed["how"]], story
    assert resumed["checkpoint"] == f"{SIDECAR_RUN_DIR}/{state}", (resumed, story)
    assert not {"gave_up", "interruption_not_resumed"} & set(names(after_recreate)), story
    # From the last sign of life (the training stopped a moment after `up` began) to the
    # relaunch.
    assert 0 < resumed["down_seconds"] < event_time(resumed).timestamp() - cut + 1.0, resumed
    report_resume(pytestconfig, record_property, "recreate", after_recreate)
    announce(
        pytestconfig,
        f"[e2e] recreate: compose up -d took {up_seconds:.2f} s; the old sidecar logged "
        f"{named(old_events, 'run_interrupted')}",
    )

    assert_finished_exactly(beside, state)
    assert_one_interruption(beside.scene.ledger(), {"container_stopped", "sigterm"})
    assert len(beside.starts()) == 1, "nobody clicked Start again"


# -- c) a run that had completed ---------------------------------------------------------------


def test_a_run_that_had_completed_is_not_relaunched_after_the_boot(
    beside: Beside, pytestconfig: pytest.Config
) -> None:
    """The cut comes the moment the final model is on disk, while the trainer may still be
    ending and before the sidecar may have seen it end: after the boot nothing is relaunched."""
    beside.write_run()
    beside.up()
    beside.scene.wait_for("run_selected")
    beside.click_start()
    final = beside.scene.run_dir / "my-lora.safetensors"
    beside.scene.wait_until("the final model", final.is_file, timeout=40)
    beside.power_cut()
    lineage = read_lineage(final)
    assert lineage == UNINTERRUPTED
    beside.boot()
    wait_in_lifetime(beside, "sidecar_started", lifetime=1)
    # Long enough for the sidecar to see the UI's container up and act on the ledger.
    beside.scene.wait_until(
        "the UI's container up", lambda: beside.scene.state("trainer")["Running"]
    )
    seen = watch_for_no_training(beside, 5.0)

    first, after_boot = beside.lifetimes()
    story = beside.story()
    assert seen == [], story
    assert not {"trainer_restarted", "run_resumed_after_interruption", "trainer_started"} & set(
        names(after_boot)
    ), story
    not_resumed = named(after_boot, "interruption_not_resumed")
    announce(
        pytestconfig,
        f"\n[e2e] completed, then cut: before the cut the sidecar logged "
        f"{[n for n in names(first) if n in {'training_completed', 'run_interrupted'}]}; "
        f"after the boot {names(after_boot)}",
    )
    for event in not_resumed:
        assert event["cause"] == "completed", event
    assert read_lineage(final) == lineage
    assert beside.trainer_rows() == []
    assert len(beside.starts()) == 1


# -- d) an abandoned run ---------------------------------------------------------------------


def test_an_abandoned_run_is_not_relaunched_after_the_boot(beside: Beside) -> None:
    """`training-sidecar abandon` while the UI's run trains, then a power cut and a boot: the
    sidecar says why it does not resume (cause "abandoned") and launches nothing."""
    beside.write_run()
    beside.up()
    beside.start_training_from_the_ui()
    result = beside.scene.compose(
        "exec", "-T", "sidecar", "training-sidecar", "abandon", "--reason", "bad captions"
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    marker = beside.scene.run_dir / ".sidecar" / "abandoned"
    assert marker.is_file(), beside.story(result.stdout + result.stderr)
    beside.power_cut()
    time.sleep(OUTAGE_SECONDS)
    beside.boot()
    not_resumed = wait_in_lifetime(beside, "interruption_not_resumed")
    seen = watch_for_no_training(beside, 3.0)

    story = beside.story(f"abandon printed: {result.stdout}{result.stderr}")
    _first, after_boot = beside.lifetimes()
    assert not_resumed["cause"] == "abandoned", (not_resumed, story)
    assert seen == [], story
    assert not {"trainer_restarted", "run_resumed_after_interruption", "trainer_started"} & set(
        names(after_boot)
    ), story
    assert not (beside.scene.run_dir / "my-lora.safetensors").exists()
    assert beside.scene.ledger()["recoveries"] == []


# -- e) the UI's Start and the sidecar's relaunch ------------------------------------------------


def _assert_one_trainer_kept(
    beside: Beside, trees: TreeSampler, after_boot: list[dict[str, Any]]
) -> None:
    story = beside.story(trees.timeline())
    stopped = named(after_boot, "duplicate_trainer_stopped")
    assert len(stopped) == 1, story
    assert stopped[0]["kept"] == "sidecar", (stopped, story)
    assert stopped[0]["stopped_pids"], stopped
    assert trees.most() <= 2, story
    assert trees.longest_overlap() <= OVERLAP_ALLOWED, story
    assert len(named(after_boot, "training_completed")) == 1, story
    assert not {"gave_up", "interruption_not_resumed"} & set(names(after_boot)), story
    assert beside.trainer_rows() == [], story


def test_ui_start_during_the_sidecars_relaunch_leaves_one_trainer(
    beside: Beside, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """After the boot the sidecar relaunches the run; right then the user clicks Start, and
    the UI writes train.sh anew (no --resume) and starts it from zero. The sidecar stops the
    UI's tree (same run) and keeps its resume, which runs to the end."""
    beside.write_run()
    beside.up()
    beside.start_training_from_the_ui()
    beside.power_cut()
    time.sleep(OUTAGE_SECONDS)
    with TreeSampler(beside.scene.container("trainer").id) as trees:
        beside.boot()
        wait_in_lifetime(beside, "run_resumed_after_interruption")
        beside.click_start()
        beside.scene.wait_until("the UI's second Start", lambda: len(beside.starts()) == 2)
        wait_in_lifetime(beside, "duplicate_trainer_stopped")
        wait_in_lifetime(beside, "training_completed", timeout=45)

    _first, after_boot = beside.lifetimes()
    announce(
        pytestconfig,
        f"\n[e2e] UI Start after the relaunch: two train.sh trees for "
        f"{trees.longest_overlap():.2f} s at most ({trees.timeline()})",
    )
    record_property("overlap_seconds_ui_after_relaunch", round(trees.longest_overlap(), 3))
    _assert_one_trainer_kept(beside, trees, after_boot)
    report_resume(pytestconfig, record_property, "ui-start-after-relaunch", after_boot)
    assert_finished_exactly(beside, RESUMED_STATE)


def test_ui_start_before_the_sidecar_comes_up_leaves_one_trainer(
    beside: Beside, pytestconfig: pytest.Config, record_property: Any
) -> None:
    """The other order: the UI's container is up and the user's Start is loading (a train.sh
    regenerated without --resume) before the sidecar has looked (its container is held
    paused from its start until the UI's trainer runs). The sidecar stops the UI's tree, which
    would start over, and relaunches the resume, which runs to the end."""
    beside.write_run()
    # Loading takes a while, as Flux's does: the UI's trainer is still loading when the
    # sidecar looks (its relaunch, with the original process's environment, loads as long).
    beside.up(simulation={"SIM_STARTUP_SECONDS": "4"})
    beside.start_training_from_the_ui()
    beside.power_cut()
    time.sleep(OUTAGE_SECONDS)
    sidecar = beside.scene.container("sidecar")
    with TreeSampler(beside.scene.container("trainer").id) as trees:
        beside.boot(between=sidecar.pause)
        beside.click_start()
        beside.scene.wait_until("the UI's trainer", lambda: beside.trainer_rows(), timeout=15)
        unpaused_at = time.monotonic()
        sidecar.unpause()
        stopped = wait_in_lifetime(beside, "duplicate_trainer_stopped")
        stopped_after = time.monotonic()
        wait_in_lifetime(beside, "training_completed", timeout=45)

    _first, after_boot = beside.lifetimes()
    second_start = beside.starts()[1]
    announce(
        pytestconfig,
        f"\n[e2e] UI Start before the sidecar: two train.sh trees for "
        f"{trees.longest_overlap():.2f} s at most ({trees.timeline()}); the UI's run was "
        f"stopped {seconds_between(named(after_boot, 'sidecar_started')[0], stopped):.2f} s "
        f"after the sidecar's start; the UI's run "
        f"{'had begun training' if step_seen(second_start, 1, TOTAL_STEPS) else 'was loading'}"
        f" when stopped (unpaused {stopped_after - unpaused_at:.2f} s before)",
    )
    record_property("overlap_seconds_ui_before_sidecar", round(trees.longest_overlap(), 3))
    assert "resuming from" not in second_start, "the UI's Start had --resume"
    _assert_one_trainer_kept(beside, trees, after_boot)
    report_resume(pytestconfig, record_property, "ui-start-before-sidecar", after_boot)
    assert_finished_exactly(beside, RESUMED_STATE)


def test_a_new_run_started_during_the_relaunch_is_kept_and_never_resumed_into_the_old(
    beside: Beside,
) -> None:
    """After the boot the sidecar relaunches the old run; then the user changes a setting in
    the form (another learning rate) and clicks Start. That is a new run: the sidecar stops
    its resume of the old one, keeps the user's, and watches it with a ledger of its own; the
    new run trains from its own beginning and nothing of the old run is resumed into it."""
    beside.write_run()
    beside.up()
    beside.start_training_from_the_ui()
    beside.power_cut()
    time.sleep(OUTAGE_SECONDS)
    form = beside.ui_dir / "form-train.sh"
    changed = form.read_text().replace("--learning_rate 8e-4", "--learning_rate 4e-4")
    assert changed != form.read_text()
    form.write_text(changed)
    with TreeSampler(beside.scene.container("trainer").id) as trees:
        beside.boot()
        wait_in_lifetime(beside, "run_resumed_after_interruption")
        beside.click_start()
        stopped = wait_in_lifetime(beside, "duplicate_trainer_stopped")
        beside.scene.wait_until(
            "the new run's final model",
            lambda: (beside.scene.run_dir / "my-lora.safetensors").is_file(),
            timeout=45,
        )

    _first, after_boot = beside.lifetimes()
    story = beside.story(trees.timeline())
    assert stopped["kept"] == "user", (stopped, story)
    assert trees.longest_overlap() <= OVERLAP_ALLOWED, story
    assert "new_run_detected" in names(after_boot), story
    new_run_page = beside.starts()[1]
    assert "resuming from" not in new_run_page, "the new run was resumed into the old one"
    # The new run's final model comes from its own uninterrupted schedule.
    assert read_lineage(beside.scene.run_dir / "my-lora.safetensors") == UNINTERRUPTED
    beside.scene.wait_until(
        "the new run's completion recorded",
        lambda: beside.scene.ledger().get("completed") is True,
        timeout=15,
    )
    ledger = beside.scene.ledger()
    assert ledger["interruptions"] == [] and ledger["recoveries"] == [], ledger
    assert "--learning_rate 4e-4" in (beside.scene.run_dir / "train.sh").read_text()
