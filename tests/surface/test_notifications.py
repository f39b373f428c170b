"""Webhook notifications against real HTTP receivers on 127.0.0.1: fast, slow, failing, absent."""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from typing import Any

import pytest
import tenacity
from conftest import run_sidecar
from webhook_receiver import receiving, wait_until

from sidecar.config import ConfigError, Settings, load_settings
from sidecar.simulator.fluxgym_tree import build_fluxgym_tree
from sidecar.surface.notifications import NOTIFIED_EVENTS, WebhookNotifier, WebhookTarget

STALL = {
    "event": "stall_detected",
    "level": "warning",
    "timestamp": "2025-01-01T03:00:00Z",
    "reason": "no progress for 902 s (stall timeout 900 s)",
    "last_step": 120,
    "total_steps": 400,
    "seconds_since_progress": 902.0,
    "gpu_utilization": (0,),
}


class RecordingLog:
    """Stands in for the structlog logger the notifier reports through."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.entries.append((event, fields))

    info = warning = error = debug = _record

    def events(self) -> list[str]:
        return [event for event, _ in self.entries]


def notifier(url: str, log: RecordingLog, **options: Any) -> WebhookNotifier:
    settings: dict[str, Any] = {"wait": tenacity.wait_none(), "host": "gpu-box-1"}
    settings.update(options)
    headers = settings.pop("headers", {})
    secret = settings.pop("secret", None)
    return WebhookNotifier(
        WebhookTarget(url, headers, secret), run_name=lambda: "my-lora", log=log, **settings
    )


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_notified_events_are_posted_signed_with_text_and_content():
    """One POST per notified event: text = content, details, headers, HMAC signature."""
    log = RecordingLog()
    with receiving() as receiver:
        sender = notifier(
            receiver.url, log, headers={"Authorization": "Bearer abc"}, secret="s3cret"
        )
        sender.start()
        sender(None, "info", {"event": "trainer_started", "pid": 1})  # not worth a message
        returned = sender(None, "warning", {**STALL, "diff": ["+ --resume x"]})
        sender.close()
    assert returned["event"] == "stall_detected", "the processor passes the event on"
    assert len(receiver.received) == 1
    request = receiver.received[0]
    payload = request.json
    assert payload["text"] == payload["content"]
    assert payload["text"] == (
        "[training-sidecar] my-lora on gpu-box-1: stalled at step 120/400: no progress for "
        "902 s (stall timeout 900 s); stopping it to resume from the newest checkpoint"
    )
    assert payload["event"] == "stall_detected" and payload["run"] == "my-lora"
    assert payload["details"]["last_step"] == 120
    assert payload["details"]["gpu_utilization"] == [0]
    assert "diff" not in payload["details"], "bulky fields stay in the log"
    assert request.headers["Authorization"] == "Bearer abc"
    assert request.headers["Content-Type"] == "application/json"
    expected = hmac.new(b"s3cret", request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Sidecar-Signature-256"] == f"sha256={expected}"
    assert log.events() == ["notification_sent"]


@pytest.mark.parametrize(
    ("event", "fields", "headline"),
    [
        (
            "trainer_crashed",
            {"reason": "trainer exited with code 7", "last_step": 14},
            "trainer crashed at step 14: trainer exited with code 7",
        ),
        (
            "trainer_restarted",
            {
                "reason": "stall",
                "checkpoint": "/o/my-lora-step00000018-state",
                "restarts": 1,
                "budget_left": 9,
            },
            "restarted after a stall, resuming from my-lora-step00000018-state (restart 1, 9 left)",
        ),
        (
            "gave_up",
            {"reason": "restart budget of 10 spent"},
            "GAVE UP: restart budget of 10 spent. train.sh and every checkpoint were left as they",
        ),
        (
            "training_completed",
            {
                "reason": "trainer exited 0 with the final model present",
                "last_step": 400,
                "total_steps": 400,
            },
            "training completed at step 400/400: trainer exited 0 with the final model present",
        ),
    ],
)
def test_each_notified_event_has_a_readable_headline(event, fields, headline):
    payload = notifier("http://127.0.0.1:9/", RecordingLog()).payload({"event": event, **fields})
    assert event in NOTIFIED_EVENTS
    assert headline in payload["text"]
    assert len(payload["text"]) < 300


def test_a_slow_receiver_never_blocks_the_caller():
    """Logging a notified event returns at once; the message arrives later."""
    log = RecordingLog()
    with receiving(delay=0.5) as receiver:
        sender = notifier(receiver.url, log)
        sender.start()
        started = time.monotonic()
        for name in ("stall_detected", "trainer_restarted", "training_completed"):
            sender(None, "info", {**STALL, "event": name})
        assert time.monotonic() - started < 0.1
        assert wait_until(lambda: len(receiver.received) == 3, timeout=20)
        sender.close()
    assert receiver.events() == ["stall_detected", "trainer_restarted", "training_completed"]


def test_a_failing_receiver_is_retried_until_it_answers():
    """500 and 503 are retried (each attempt logged with its cause), then 200 delivers."""
    log = RecordingLog()
    with receiving(statuses=[500, 503, 200]) as receiver:
        sender = notifier(receiver.url, log)
        sender.start()
        sender(None, "warning", dict(STALL))
        assert wait_until(lambda: "notification_sent" in log.events())
        sender.close()
    assert len(receiver.received) == 3
    assert log.events() == ["notification_retry", "notification_retry", "notification_sent"]
    assert log.entries[0][1]["error"] == "HTTP 500 Internal Server Error"
    assert "secret-token" not in str(log.entries), "the webhook URL's token is never logged"


def test_rate_limiting_is_waited_out():
    """429 with Retry-After: the sender waits that long, then delivers."""
    log = RecordingLog()
    with receiving(statuses=[429, 204]) as receiver:
        sender = notifier(receiver.url, log)
        sender.start()
        sender(None, "warning", dict(STALL))
        assert wait_until(lambda: "notification_sent" in log.events())
        sender.close()
    first, second = receiver.received
    assert second.at - first.at >= 0.18


def test_a_refusing_receiver_is_not_retried():
    """A 4xx other than 429 will not improve: one attempt, then notification_failed."""
    log = RecordingLog()
    with receiving(statuses=[404]) as receiver:
        sender = notifier(receiver.url, log)
        sender.start()
        sender(None, "warning", dict(STALL))
        assert wait_until(lambda: "notification_failed" in log.events())
        sender.close()
    assert len(receiver.received) == 1
    assert log.entries[-1][1]["error"] == "HTTP 404 Not Found"


def test_an_unreachable_receiver_fails_after_bounded_attempts():
    """Nothing listening: the caller never waits; the failure is logged after the attempts."""
    log = RecordingLog()
    sender = notifier(f"http://127.0.0.1:{unused_port()}/hook", log, attempts=3)
    sender.start()
    started = time.monotonic()
    sender(None, "warning", dict(STALL))
    assert time.monotonic() - started < 0.1
    assert wait_until(lambda: "notification_failed" in log.events())
    sender.close(timeout=2)
    assert log.events() == ["notification_retry", "notification_retry", "notification_failed"]
    assert "refused" in log.entries[-1][1]["error"].lower()


def test_a_full_queue_drops_with_a_log():
    """Messages beyond the queue's bound are dropped, each with a notification_dropped line."""
    log = RecordingLog()
    sender = notifier("http://127.0.0.1:9/", log, queue_size=1)  # not started: nothing drains
    sender(None, "warning", dict(STALL))
    sender(None, "info", {**STALL, "event": "trainer_restarted"})
    assert log.events() == ["notification_dropped"]
    assert log.entries[0][1]["notified_event"] == "trainer_restarted"


def test_closing_never_waits_long_for_a_hanging_receiver():
    """At exit a receiver that does not answer is abandoned after the close timeout."""
    log = RecordingLog()
    with receiving(delay=60) as receiver:
        sender = notifier(receiver.url, log)
        sender.start()
        sender(None, "info", {**STALL, "event": "training_completed"})
        assert wait_until(lambda: len(receiver.received) == 1)
        started = time.monotonic()
        sender.close(timeout=0.5)
        assert time.monotonic() - started < 2
    assert "notifications_abandoned" in log.events()


def test_a_broken_payload_never_breaks_the_log_call():
    """Whatever goes wrong building a message, the event itself is passed on."""

    def broken_name() -> str:
        raise RuntimeError("no run name today")

    log = RecordingLog()
    sender = WebhookNotifier(WebhookTarget("http://127.0.0.1:9/"), run_name=broken_name, log=log)
    assert sender(None, "warning", dict(STALL))["event"] == "stall_detected"
    assert log.events() == ["notification_failed"]


# -- with the real sidecar -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("receiver_kind", ["slow", "unreachable"])
def test_recovery_never_waits_for_the_webhook(fluxgym, receiver_kind):
    """A receiver taking 3 s per message, or none at all: the restart follows the stall at once."""
    tree = build_fluxgym_tree(
        fluxgym.root.parent / "t", extra_trainer_args="--save_every_n_steps 6"
    )
    with receiving(delay=3.0) as receiver:
        url = receiver.url if receiver_kind == "slow" else f"http://127.0.0.1:{unused_port()}/x"
        started = time.monotonic()
        run = run_sidecar(
            tree,
            settings={"SIDECAR_WEBHOOK_URL": url},
            simulation={"SIM_FAULTS": "hang_idle@step=20:once"},
        )
        took = time.monotonic() - started
    assert run.exit_code == 0, run.stderr[-2000:]
    stall, restart = run.named("stall_detected")[0], run.named("trainer_restarted")[0]
    assert run.seconds_between(stall, restart) < 2.0
    assert took < 45, "the sidecar's exit waits at most the close timeout for the webhook"
    if receiver_kind == "slow":
        assert "stall_detected" in receiver.events()
    else:
        assert run.named("notification_retry"), "each failed attempt is logged"


def test_a_run_found_finished_is_not_news():
    """A sidecar started on a run that already ended logs it but sends nothing."""
    log = RecordingLog()
    sender = notifier("http://127.0.0.1:9/", log, queue_size=1)
    sender(None, "info", {"event": "training_completed", "launched": False})
    sender(None, "info", {"event": "training_completed", "reason": "exited 0"})
    sender(None, "info", {"event": "training_completed", "reason": "exited 0"})
    assert log.events() == ["notification_dropped"], "only the real completion was queued"


def test_webhook_settings_are_validated_and_redacted(monkeypatch):
    """URL, headers and secret: checked at start, and never shown in full in the log."""
    settings = Settings(
        webhook_url="https://hooks.slack.com/services/T000/B000/XXXXsecret",
        webhook_headers="Authorization: Bearer abc; X-Team: ml",
        webhook_secret="s3cret",
    )
    assert settings.webhook_header_map == {"Authorization": "Bearer abc", "X-Team": "ml"}
    shown = settings.redacted()
    assert shown["webhook_url"] == "https://hooks.slack.com/***"
    assert shown["webhook_headers"] == "Authorization: ***; X-Team: ***"
    assert shown["webhook_secret"] == "***"
    monkeypatch.setenv("SIDECAR_WEBHOOK_HEADERS", "Authorization Bearer abc")
    with pytest.raises(ConfigError, match=r"SIDECAR_WEBHOOK_HEADERS .*'Name: value; Name2"):
        load_settings()
    monkeypatch.delenv("SIDECAR_WEBHOOK_HEADERS")
    monkeypatch.setenv("SIDECAR_WEBHOOK_URL", "hooks.slack.com/services/x")
    with pytest.raises(ConfigError, match=r"SIDECAR_WEBHOOK_URL .*http:// or https://"):
        load_settings()


def test_a_restart_message_says_where_the_status_page_is():
    """FluxGym's UI said "Training Complete"; the message points at what still shows the run."""
    restarted = {"event": "trainer_restarted", "reason": "stall", "restarts": 1}
    sender = WebhookNotifier(
        WebhookTarget("http://127.0.0.1:9/"), host="gpu-box-1", page="http://gpu-box-1:9477/"
    )
    text = sender.payload(dict(restarted))["text"]
    assert text.endswith("Watch it on the status page: http://gpu-box-1:9477/")
    assert "status page" not in sender.payload({**STALL})["text"], "only with the restart"
