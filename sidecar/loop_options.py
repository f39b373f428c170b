"""What the loop takes from the settings, and the clocks it reads (injected in tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.decide.decision import Policy
from sidecar.decide.interruption import InterruptionOptions
from sidecar.decide.recovery_rules import RecoveryRules
from sidecar.recover.resume_point import ResumeOptions


@dataclass(frozen=True)
class Clocks:
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time


@dataclass(frozen=True)
class LoopOptions:
    """What the loop takes from the settings (``wiring.loop_options_of`` builds it)."""

    poll_interval: float
    checkpoint_settle: float  # a state folder younger than this may still be written
    keep_resume_current: bool  # point train.sh at each new complete checkpoint while healthy
    resume: ResumeOptions
    policy: Policy  # how verdicts are reached
    rules: RecoveryRules  # budget, backoff and the runtime's restart window
    max_lost_work: float = 0.0  # seconds; 0: leave the trainer's state cadence as it is
    remediate: bool = False  # apply a repeated hang's known mitigation to train.sh
    interruptions: InterruptionOptions = field(
        default_factory=lambda: InterruptionOptions(resume=True, max_in_a_row=5)
    )
