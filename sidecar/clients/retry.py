"""The retry policy shared by the API clients (Docker Engine, Kubernetes), written once.

Both gateways retry a transient failure with the same bounded, jittered backoff for a retry
window, log each retry the same way, and give up at once when the sidecar is shutting down:
a SIGTERM during an outage must not wait out the window (kubelet and compose kill the
sidecar after their own grace period, and the trainer's recovery would be lost with it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

T = TypeVar("T")

# The words every gateway puts in the error it raises when shutdown ended its retries.
SHUTTING_DOWN = "shutdown requested, the sidecar is shutting down"


def api_backoff() -> wait_base:
    """Bounded exponential backoff with jitter: 0.5, 1, 2, 4, 8, 10, 10 ... s, plus up to 0.5 s."""
    return wait_exponential(multiplier=0.5, max=10) + wait_random(0, 0.5)


class RetryWindowSpent(stop_base):
    """Stop before a sleep that would end past the window.

    Time spent counts both on the clock and as the sum of the sleeps asked for, so a
    test's recording ``sleep`` that returns at once still ends after the same schedule.
    """

    def __init__(self, window: float) -> None:
        self.window = window

    def __call__(self, retry_state: RetryCallState) -> bool:
        spent = max(retry_state.seconds_since_start or 0.0, retry_state.idle_for)
        return spent + retry_state.upcoming_sleep > self.window


def describe_error(error: BaseException | None) -> str:
    """An error as the logs and messages show it: its type, then its text."""
    if error is None:
        return "unknown error"
    return f"{type(error).__name__}: {error}"


def backoff_sleep(
    sleep: Callable[[float], None] | None, stop_event: threading.Event | None
) -> Callable[[float], None]:
    """The given sleep, else a wait on the stop event (so shutdown ends a backoff at once)."""
    if sleep is not None:
        return sleep
    if stop_event is None:
        return time.sleep
    event = stop_event

    def wait(seconds: float) -> None:
        event.wait(seconds)

    return wait


def log_retry(
    log: Any,
    event: str,
    *,
    operation: str,
    subject: str,
    describe: Callable[[BaseException | None], str] = describe_error,
    **context: Any,
) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep``: one warning per retry, naming the call and its cause.

    ``context`` adds fields after the common ones (the Docker host, say); a ``log`` of None
    logs nothing, for a gateway built without a logger.
    """

    def before_sleep(state: RetryCallState) -> None:
        if log is None:
            return
        error = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            event,
            operation=operation,
            subject=subject,
            attempt=state.attempt_number,
            delay=round(state.upcoming_sleep, 2),
            error=describe(error),
            **context,
        )

    return before_sleep


class RetriedCall(Generic[T]):
    """One call run with retries; afterwards it says how many attempts it took, and how long.

    Retries end when the window is spent or as soon as ``stop_event`` is set. tenacity
    makes the next attempt right after its sleep returns, and that sleep returns early
    when the event is set; asking a failing service once more then would only delay the
    shutdown (by a whole request timeout if it hangs). So an attempt due after the event
    is set raises the previous failure again instead, and the stop condition ends the call.
    """

    def __init__(
        self,
        *,
        worth_retrying: Callable[[BaseException], bool],
        window: float,
        stop_event: threading.Event | None,
        sleep: Callable[[float], None],
        before_sleep: Callable[[RetryCallState], None],
    ) -> None:
        stop: stop_base = RetryWindowSpent(window)
        if stop_event is not None:
            stop = stop | stop_when_event_set(stop_event)
        self._stop_event = stop_event
        self._retrying = Retrying(
            retry=retry_if_exception(worth_retrying),
            wait=api_backoff(),
            stop=stop,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        self.attempts = 0
        self._last_failure: BaseException | None = None

    def __call__(self, action: Callable[[], T]) -> T:
        return self._retrying(self._attempt, action)

    @property
    def shutting_down(self) -> bool:
        return self._stop_event is not None and self._stop_event.is_set()

    @property
    def spent(self) -> float:
        """Seconds spent retrying: on the clock, or asked to sleep, whichever is more."""
        statistics = self._retrying.statistics
        return max(
            statistics.get("delay_since_first_attempt", 0.0), statistics.get("idle_for", 0.0)
        )

    def _attempt(self, action: Callable[[], T]) -> T:
        if self._last_failure is not None and self.shutting_down:
            raise self._last_failure
        self.attempts += 1
        try:
            return action()
        except BaseException as error:
            self._last_failure = error
            raise
