"""The retry schedule shared by the API clients (Docker Engine, Kubernetes)."""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential, wait_random
from tenacity.stop import stop_base
from tenacity.wait import wait_base


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
