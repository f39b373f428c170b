"""Section-aware stall timeouts: the rules, and the decision folding sections in (fake clock)."""

from __future__ import annotations

from sidecar.decide import decision
from sidecar.decide.decision import Observation, Phase, Policy, VerdictKind
from sidecar.decide.sections import Section, SectionCadence, SectionGaps, SectionTimeouts

TIMEOUTS = SectionTimeouts(floor=60.0, ceiling=900.0)
POLICY = Policy(
    stall_timeout=900.0,
    gpu_idle_timeout=300.0,
    gpu_idle_percent=5.0,
    startup_grace=120.0,
    sections=TIMEOUTS,
)


def learned(section: Section, *gaps: float) -> SectionCadence:
    cadence = SectionCadence()
    for gap in gaps:
        cadence = cadence.observe(section, gap)
    return cadence


def test_training_uses_the_ceiling_until_it_has_seen_enough_steps():
    few = learned(Section.TRAINING, *[1.0] * 19)
    assert TIMEOUTS.timeout(Section.TRAINING, few) == 900.0
    enough = learned(Section.TRAINING, *[1.0] * 20)
    assert TIMEOUTS.timeout(Section.TRAINING, enough) == 60.0  # the floor


def test_slow_steps_get_three_times_their_high_percentile():
    steps = learned(Section.TRAINING, *[40.0 + i % 10 for i in range(100)])  # 40-49 s steps
    assert TIMEOUTS.timeout(Section.TRAINING, steps) == 3 * 49.0
    # One freak silence does not stretch the training timeout: it is a percentile.
    freak = steps.observe(Section.TRAINING, 600.0)
    assert TIMEOUTS.timeout(Section.TRAINING, freak) == 3 * 49.0


def test_a_long_section_gets_the_ceiling_first_then_its_own_learned_allowance():
    assert TIMEOUTS.timeout(Section.SAMPLING, SectionCadence()) == 900.0
    sampled = learned(Section.SAMPLING, 70.0, 95.0)
    assert TIMEOUTS.timeout(Section.SAMPLING, sampled) == 3 * 95.0
    # Never beyond the ceiling, never below the floor.
    assert TIMEOUTS.timeout(Section.SAVING, learned(Section.SAVING, 400.0)) == 900.0
    assert TIMEOUTS.timeout(Section.SAVING, learned(Section.SAVING, 2.0)) == 60.0


def test_silence_in_no_section_gets_the_ceiling():
    """No readable output (a run the UI streams into its page): the previous fixed default,
    never a learned timeout that a long silent sampling would exceed."""
    assert TIMEOUTS.timeout(None, learned(Section.TRAINING, *[1.0] * 50)) == 900.0
    assert "no section recognised" in TIMEOUTS.explain(None, SectionCadence())


def test_percentile_of_no_gaps_is_zero():
    assert SectionGaps().percentile(0.95) == 0.0


class Run:
    """Observations fed one poll at a time, on a fake clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.state = decision.started(0.0)
        self.step = 0
        self.verdicts: list[decision.Verdict] = []

    def poll(self, **seen: object) -> None:
        self.state, verdict = decision.advance(
            self.state,
            Observation(now=self.now, **seen),
            POLICY,  # type: ignore[arg-type]
        )
        if verdict is not None:
            self.verdicts.append(verdict)

    def train(self, steps: int, seconds: float = 1.0) -> None:
        for _ in range(steps):
            self.now += seconds
            self.step += 1
            self.poll(step=self.step, total_steps=1000, log_grew=True, section=Section.TRAINING)

    def announce(self, section: Section) -> None:
        self.now += 0.1
        self.poll(log_grew=True, section=section)

    def silence(self, seconds: float, every: float = 2.0) -> float | None:
        """Poll through ``seconds`` of silence; when a verdict came (seconds in), else None."""
        began, before = self.now, len(self.verdicts)
        while self.now - began < seconds:
            self.now += every
            self.poll()
            if len(self.verdicts) > before:
                return self.now - began
        return None


def test_a_hang_in_a_training_step_is_caught_at_the_floor_not_the_ceiling():
    run = Run()
    run.train(30)
    caught = run.silence(1000)
    assert caught is not None and 60 <= caught <= 62
    (verdict,) = run.verdicts
    assert verdict.kind is VerdictKind.STALL
    assert verdict.figures["section"] == "training"
    assert "section training" in verdict.reason


def test_a_long_first_sampling_is_not_cut_short_and_teaches_its_allowance():
    run = Run()
    run.train(30)
    run.announce(Section.SAMPLING)
    assert run.silence(300) is None  # 5 minutes of a silent sampling: never seen, the ceiling
    run.train(30)  # back to training: the sampling's silence was learned
    assert run.state.phase is Phase.RUNNING
    assert run.state.sections.of(Section.SAMPLING).longest >= 300
    run.announce(Section.SAMPLING)
    caught = run.silence(2000)
    assert caught is not None and 900 <= caught <= 902  # 3 x 300 s is past the ceiling
    assert run.verdicts[0].figures["section"] == "sampling"


def test_a_hang_right_after_a_save_began_gets_the_saves_allowance():
    run = Run()
    run.train(30)
    run.announce(Section.SAVING)
    run.silence(30)
    run.train(30)
    allowance = 3 * run.state.sections.of(Section.SAVING).longest  # the 30 s save, and a step
    assert 90 <= allowance <= 96
    run.announce(Section.SAVING)
    caught = run.silence(1000)
    assert caught is not None and allowance <= caught <= allowance + 2


def test_stacks_in_an_unannounced_sampling_extend_the_section():
    """A silence in training whose stacks show sampling, moving: judged by sampling's budget
    (the ceiling, never seen) from the same last progress; then it may still hang there."""
    run = Run()
    run.train(30)
    caught = run.silence(1000)
    assert caught is not None  # the training floor
    stalled = run.state
    assert stalled.phase is Phase.STALLED
    extended = decision.in_section(stalled, Section.SAMPLING, Phase.RUNNING, run.now, POLICY)
    assert extended is not None
    assert extended.section is Section.SAMPLING and extended.phase is Phase.RUNNING
    assert extended.last_progress_at == stalled.last_progress_at
    run.state, run.verdicts = extended, []
    again = run.silence(2000)
    assert again is not None and 898 <= again + caught <= 904  # the ceiling from the last step
    assert run.verdicts[0].figures["section"] == "sampling"
    # Already in sampling: nothing more to extend into.
    assert decision.in_section(run.state, Section.SAMPLING, Phase.RUNNING, run.now, POLICY) is None


def test_a_section_whose_budget_is_spent_does_not_extend():
    run = Run()
    run.train(30)
    run.silence(1000)
    late = run.now + 2000  # past even the ceiling
    assert decision.in_section(run.state, Section.SAMPLING, Phase.RUNNING, late, POLICY) is None


def test_a_fixed_timeout_has_no_sections_to_extend_into():
    fixed = Policy(
        stall_timeout=900.0, gpu_idle_timeout=300.0, gpu_idle_percent=5.0, startup_grace=1
    )
    state = decision.started(0.0)
    assert decision.in_section(state, Section.SAMPLING, Phase.RUNNING, 1.0, fixed) is None
