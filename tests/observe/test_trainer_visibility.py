"""Whether the trainer can be seen: each change of reachability is logged once."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from sidecar.observe.trainer_visibility import TrainerVisibility
from sidecar.restarters.base import RestartError, TrainerStatus


class FlakyRestarter:
    """Answers from a script: a status, or a RestartError with that message."""

    def __init__(self, answers: list[TrainerStatus | str]) -> None:
        self.answers = answers

    def status(self) -> TrainerStatus:
        answer = self.answers.pop(0)
        if isinstance(answer, str):
            raise RestartError(answer)
        return answer

    def start(self) -> None:
        self.status()


def test_an_outage_is_logged_once_and_its_end_once() -> None:
    """Three polls into the same outage: one trainer_unreachable; then one trainer_reachable."""
    running = TrainerStatus(running=True)
    fake = FlakyRestarter([running, "daemon down", "daemon down", "daemon down", running, running])
    visibility = TrainerVisibility(fake, structlog.get_logger())  # type: ignore[arg-type]
    with capture_logs() as logs:
        seen = [visibility.status() for _ in range(6)]
    assert seen == [running, None, None, None, running, running]
    assert [(e["event"], e.get("reason")) for e in logs] == [
        ("trainer_unreachable", "daemon down"),
        ("trainer_reachable", None),
    ]


def test_a_different_problem_is_logged_again() -> None:
    """The daemon comes back but the container is gone: that is news, and logged."""
    fake = FlakyRestarter(["daemon down", "no such container"])
    visibility = TrainerVisibility(fake, structlog.get_logger())  # type: ignore[arg-type]
    with capture_logs() as logs:
        visibility.start()
        assert visibility.status() is None
    assert [e["reason"] for e in logs] == ["daemon down", "no such container"]
