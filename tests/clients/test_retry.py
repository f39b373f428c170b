"""The retry policy both API gateways share: backoff within a window, one log line per retry,
and an end to retrying as soon as the stop event is set (SIGTERM).

No service is involved: the attempts are a function that fails on demand, and the sleeps are
recorded (or, once, really waited on the event) so that each test takes milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import structlog
from structlog.testing import capture_logs

from sidecar.clients.retry import RetriedCall, backoff_sleep, describe_error, log_retry


class Outage(ConnectionError):
    """The transient failure the tests retry."""


class FailingService:
    """Fails every call with an `Outage` until ``answer_after`` calls were made."""

    def __init__(self, answer_after: int = 1_000_000) -> None:
        self.calls = 0
        self.answer_after = answer_after

    def __call__(self) -> str:
        self.calls += 1
        if self.calls > self.answer_after:
            return "answer"
        raise Outage(f"refused #{self.calls}")


def retried_call(
    *,
    window: float = 60.0,
    stop_event: threading.Event | None = None,
    sleep: Callable[[float], None],
) -> RetriedCall[str]:
    return RetriedCall(
        worth_retrying=lambda error: isinstance(error, Outage),
        window=window,
        stop_event=stop_event,
        sleep=sleep,
        before_sleep=log_retry(
            structlog.get_logger(), "test_retry", operation="inspect", subject="the thing"
        ),
    )


def test_without_a_stop_the_window_bounds_the_retries() -> None:
    """An event that is never set changes nothing: the whole window is retried."""
    sleeps: list[float] = []
    service = FailingService()
    call = retried_call(window=20, stop_event=threading.Event(), sleep=sleeps.append)
    with pytest.raises(Outage):
        call(service)
    assert 4 <= len(sleeps) <= 10 and sum(sleeps) <= 20
    assert service.calls == call.attempts == len(sleeps) + 1
    assert not call.shutting_down


def test_a_recovering_service_is_retried_until_it_answers() -> None:
    """With a stop event given but not set, a retry succeeds as before."""
    sleeps: list[float] = []
    service = FailingService(answer_after=2)
    call = retried_call(stop_event=threading.Event(), sleep=sleeps.append)
    assert call(service) == "answer"
    assert service.calls == call.attempts == 3 and len(sleeps) == 2


def test_setting_the_event_during_a_backoff_ends_the_retries() -> None:
    """Set while the first backoff runs: no further attempt, the last failure is raised."""
    stop = threading.Event()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        stop.set()  # SIGTERM arrives while the call is backing off

    service = FailingService()
    call = retried_call(stop_event=stop, sleep=sleep)
    with pytest.raises(Outage, match="refused #1"):
        call(service)
    assert sleeps and len(sleeps) == 1, "no backoff after the stop"
    assert service.calls == call.attempts == 1, "the service is not asked again"
    assert call.shutting_down


def test_an_event_set_before_the_call_allows_one_attempt_and_no_backoff() -> None:
    """During shutdown a call still gets its one try, but never waits for a second."""
    stop = threading.Event()
    stop.set()
    sleeps: list[float] = []
    service = FailingService()
    call = retried_call(stop_event=stop, sleep=sleeps.append)
    with pytest.raises(Outage):
        call(service)
    assert (service.calls, sleeps) == (1, [])


def test_the_default_sleep_wakes_as_soon_as_the_event_is_set() -> None:
    """The backoff waits on the event, so a stop 0.2 s into a 0.5-1 s backoff ends it then."""
    stop = threading.Event()
    service = FailingService()
    call = retried_call(stop_event=stop, sleep=backoff_sleep(None, stop))
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    began = time.monotonic()
    try:
        with pytest.raises(Outage):
            call(service)
    finally:
        timer.cancel()
    assert 0.15 <= time.monotonic() - began < 0.45
    assert service.calls == 1


def test_an_injected_sleep_is_used_as_given() -> None:
    """A test's recording sleep wins over the event; without either, time.sleep is used."""
    recorded: list[float] = []
    assert backoff_sleep(recorded.append, threading.Event()) == recorded.append
    assert backoff_sleep(None, None) is time.sleep


def test_each_retry_is_logged_once_with_the_call_and_its_cause() -> None:
    """Event name, call, attempt, delay, cause, then the caller's own fields, in that order."""
    sleeps: list[float] = []
    before_sleep = log_retry(
        structlog.get_logger(),
        "test_retry",
        operation="restart",
        subject="container 'trainer'",
        docker_host="unix:///s",
    )
    call: RetriedCall[str] = RetriedCall(
        worth_retrying=lambda error: isinstance(error, Outage),
        window=60,
        stop_event=None,
        sleep=sleeps.append,
        before_sleep=before_sleep,
    )
    with capture_logs() as logs:
        assert call(FailingService(answer_after=2)) == "answer"
    assert [entry["attempt"] for entry in logs] == [1, 2]
    first = logs[0]
    assert list(first) == [
        "operation",
        "subject",
        "attempt",
        "delay",
        "error",
        "docker_host",
        "event",
        "log_level",
    ]
    assert first["event"] == "test_retry" and first["log_level"] == "warning"
    assert first["error"] == "Outage: refused #1"
    assert first["delay"] == round(sleeps[0], 2)


def test_no_logger_logs_nothing() -> None:
    """A gateway built without a logger retries silently."""
    sleeps: list[float] = []
    call: RetriedCall[str] = RetriedCall(
        worth_retrying=lambda error: isinstance(error, Outage),
        window=60,
        stop_event=None,
        sleep=sleeps.append,
        before_sleep=log_retry(None, "test_retry", operation="delete", subject="pod"),
    )
    with capture_logs() as logs:
        assert call(FailingService(answer_after=1)) == "answer"
    assert logs == [] and len(sleeps) == 1


def test_describe_error() -> None:
    assert describe_error(None) == "unknown error"
    assert describe_error(TimeoutError("slow")) == "TimeoutError: slow"
