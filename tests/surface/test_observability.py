"""The whole trail on a real run: endpoints scraped while the sidecar recovers a hung trainer,
the webhook told, an incident bundle saved, and `status` telling the story afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import run_sidecar
from prometheus_client.parser import text_string_to_metric_families
from sidecar_process import free_port
from webhook_receiver import receiving

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

pytestmark = pytest.mark.slow


class Scraper(threading.Thread):
    """Polls the three endpoints every 0.1 s while the sidecar runs."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.metrics: list[dict[str, float]] = []
        self.health: set[tuple[str, int]] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for path in ("/healthz", "/readyz"):
                status = self._get(path)[0]
                if status:
                    self.health.add((path, status))
            status, body = self._get("/metrics")
            if status == 200:
                self.metrics.append(_samples(body))

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""
        except OSError:
            return 0, ""  # not listening yet, or already gone

    def seen(self, name: str, **labels: str) -> list[float]:
        key = name + json.dumps(labels, sort_keys=True)
        return [scrape[key] for scrape in self.metrics if key in scrape]


def _samples(body: str) -> dict[str, float]:
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_a_recovered_run_leaves_metrics_notifications_a_bundle_and_a_status(fluxgym):
    tree = build_fluxgym_tree(
        fluxgym.root.parent / "t", extra_trainer_args="--save_every_n_steps 6"
    )
    port = free_port()
    scraper = Scraper(port)
    with receiving() as receiver:
        scraper.start()
        run = run_sidecar(
            tree,
            settings={
                "SIDECAR_HTTP_PORT": str(port),
                "SIDECAR_WEBHOOK_URL": receiver.url,
                "SIDECAR_WEBHOOK_SECRET": "s3cret",
            },
            simulation={"SIM_FAULTS": "hang_idle@step=20:once", "SIM_STEP_SECONDS": "0.1"},
        )
        scraper.done.set()
        scraper.join()
    assert run.exit_code == 0, run.stderr[-2000:]

    # The endpoints, while it ran.
    assert ("/healthz", 200) in scraper.health
    assert ("/readyz", 200) in scraper.health
    assert run.named("http_listening")[0]["port"] == port
    assert 1.0 in scraper.seen("training_sidecar_phase", phase="running")
    assert 1.0 in scraper.seen("training_sidecar_phase", phase="starting")
    assert max(scraper.seen("training_sidecar_last_step")) >= 20
    # The trainer's own bar total: 64, then after the exact resume from step 18
    # (--skip_until_initial_step) sd-scripts counts max_train_steps minus the 2 steps it
    # skips inside epoch 5: 62 (train_network.py builds the bar after the skip).
    assert scraper.seen("training_sidecar_max_steps")[0] == 64
    assert scraper.seen("training_sidecar_max_steps")[-1] == 64 - 18 % 4
    assert max(scraper.seen("training_sidecar_steps_per_second")) > 1
    assert max(scraper.seen("training_sidecar_last_progress_age_seconds")) >= 1.5
    assert scraper.seen("training_sidecar_restarts_total", reason="stall")[-1] == 1
    assert scraper.seen("training_sidecar_restarts_total", reason="crash")[-1] == 0
    assert scraper.seen("training_sidecar_run_recoveries")[-1] == 1
    assert scraper.seen("training_sidecar_incidents_saved_total")[-1] == 1
    assert scraper.seen("training_sidecar_last_checkpoint_age_seconds"), "a state was written"
    assert scraper.seen("training_sidecar_poll_duration_seconds_count")[-1] > 10
    assert not any(name.endswith("_created{}") for name in scraper.metrics[-1])

    # The webhook: stall, restart and completion, each a readable sentence.
    assert receiver.events() == ["stall_detected", "trainer_restarted", "training_completed"]
    texts = [request.json["text"] for request in receiver.received]
    assert "stalled at step 20/64" in texts[0]
    assert "resuming from my-lora-step00000018-state" in texts[1]
    assert "training completed" in texts[2]
    assert all(
        r.headers["X-Sidecar-Signature-256"].startswith("sha256=") for r in receiver.received
    )
    assert "secret-token" not in json.dumps(run.events), "the webhook URL's token is not logged"

    # The incident bundle, saved (and the hang diagnosed) before the stall is logged, so
    # that the stall_detected line carries the class, and before the trainer is stopped.
    saved = run.named("incident_saved")[0]
    names = run.names()
    assert names.index("incident_saved") < names.index("stall_detected")
    assert names.index("stall_detected") < names.index("trainer_stopped")
    stall = run.named("stall_detected")[0]
    assert stall["diagnosis"] in texts[0] and stall["diagnosis_evidence"]
    bundle = Path(saved["path"])
    assert bundle.parent == tree.output_dir / ".sidecar" / "incidents"
    processes = json.loads((bundle / "processes.json").read_text())
    assert any("flux_train_network.py" in row.get("cmdline", "") for row in processes)
    assert all(row["status"] in ("sleeping", "running", "disk-sleep") for row in processes)
    assert "steps:" in (bundle / "train.log.tail").read_text()
    assert saved["seconds"] < 5

    # status, afterwards.
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", "--json"],
        env={**os.environ, "SIDECAR_TRAIN_SCRIPT": str(tree.train_script)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(result.stdout)
    assert report["phase"] == "completed"
    assert report["restarts_by_reason"] == {"stall": 1}
    assert [incident["path"] for incident in report["incidents"]] == [str(bundle)]
