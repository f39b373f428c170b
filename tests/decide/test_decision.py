"""The stall/crash/completion decision, driven by a fake clock (plain numbers)."""

from __future__ import annotations

from sidecar.decide.cadence import AdaptiveTimeout
from sidecar.decide.decision import Observation, Phase, Policy, VerdictKind, advance, started

POLICY = Policy(stall_timeout=60, gpu_idle_timeout=20, gpu_idle_percent=5, startup_grace=120)


def feed(observations, state=None, policy=POLICY):
    state = state or started(0.0)
    verdicts = []
    for seen in observations:
        state, verdict = advance(state, seen, policy)
        if verdict:
            verdicts.append((seen.now, verdict))
    return state, verdicts


def test_slow_start_within_grace_is_not_a_stall():
    """No output at all for almost the whole startup grace gives no verdict."""
    state, verdicts = feed(Observation(now=t) for t in range(0, 120, 5))
    assert verdicts == []
    assert state.phase is Phase.STARTING


def test_no_progress_after_grace_is_a_stall():
    """A run that never shows progress is stalled once the grace is over."""
    _, verdicts = feed(Observation(now=t) for t in range(0, 200, 5))
    assert verdicts and verdicts[0][0] == 120
    assert verdicts[0][1].kind is VerdictKind.STALL


def test_first_step_moves_to_running_and_silence_then_stalls_after_timeout():
    """After the step counter appears, silence for the stall timeout is a stall."""
    seen = [Observation(now=10, step=0, total_steps=30, log_grew=True)]
    seen += [Observation(now=10 + k, step=k, total_steps=30, log_grew=True) for k in range(1, 6)]
    seen += [Observation(now=t) for t in range(16, 100)]
    state, verdicts = feed(seen)
    assert state.phase is Phase.STALLED
    when, verdict = verdicts[0]
    assert when == 15 + 60
    assert verdict.figures["last_step"] == 5
    assert verdict.figures["total_steps"] == 30
    assert verdict.figures["seconds_since_progress"] == 60


def test_output_files_written_count_as_progress():
    """A long save or sample phase that writes files keeps the run healthy."""
    seen = [Observation(now=1, step=3, log_grew=True)]
    seen += [Observation(now=t, outputs_changed=True) for t in range(2, 300, 30)]
    _, verdicts = feed(seen)
    assert verdicts == []


def test_busy_gpu_is_never_progress():
    """A GPU at 100% with no other progress is still stalled after the timeout."""
    seen = [Observation(now=1, step=0, log_grew=True)]
    seen += [Observation(now=t, gpu_utilization=(100,)) for t in range(2, 80)]
    _, verdicts = feed(seen)
    assert verdicts and verdicts[0][0] == 61
    assert verdicts[0][1].figures["gpu_utilization"] == [100]


def test_idle_gpu_and_no_progress_gives_the_faster_verdict():
    """Every GPU idle and nothing moving for the GPU idle timeout is a stall."""
    seen = [Observation(now=1, step=0, log_grew=True)]
    seen += [Observation(now=t, gpu_utilization=(0, 2)) for t in range(2, 80)]
    _, verdicts = feed(seen)
    # Idle first seen at 2: it went idle after the poll at 1, the last progress; 20 s later.
    assert verdicts[0][0] == 21
    assert "GPU idle" in verdicts[0][1].reason


def test_one_busy_gpu_prevents_the_idle_verdict():
    """The idle path needs every watched GPU below the threshold."""
    seen = [Observation(now=1, step=0, log_grew=True)]
    seen += [Observation(now=t, gpu_utilization=(0, 90)) for t in range(2, 50)]
    _, verdicts = feed(seen)
    assert verdicts == []


def test_idle_gpu_while_progressing_is_fine():
    """An idle GPU during progress (e.g. data loading that logs) is no stall."""
    seen = [Observation(now=t, step=t, log_grew=True, gpu_utilization=(0,)) for t in range(1, 100)]
    _, verdicts = feed(seen)
    assert verdicts == []


def test_idle_gpu_is_ignored_during_startup_grace():
    """Model loading leaves the GPU idle; within the grace that is no stall."""
    _, verdicts = feed(Observation(now=t, gpu_utilization=(0,)) for t in range(0, 119))
    assert verdicts == []


def test_exit_zero_with_final_model_is_completion():
    """A clean exit with the final model present completes the run."""
    _, verdicts = feed([Observation(now=5, exit_code=0, final_model_present=True)])
    assert verdicts[0][1].kind is VerdictKind.COMPLETED


def test_exit_zero_without_final_model_is_a_crash():
    """Exit 0 without the final model means the run did not finish."""
    _, verdicts = feed([Observation(now=5, exit_code=0, final_model_present=False)])
    assert verdicts[0][1].kind is VerdictKind.CRASH
    assert "final model is missing" in verdicts[0][1].reason


def test_nonzero_exit_is_a_crash_with_its_code():
    """Any other exit is a crash, even during the startup grace."""
    _, verdicts = feed([Observation(now=5, exit_code=137)])
    assert verdicts[0][1].kind is VerdictKind.CRASH
    assert verdicts[0][1].figures["exit_code"] == 137


def test_step_counter_reset_after_resume_counts_as_progress():
    """sd-scripts restarts its step counter at 0 after a resume; that is movement."""
    seen = [Observation(now=1, step=40, log_grew=True), Observation(now=70, step=0)]
    state, verdicts = feed(seen)
    assert verdicts == []
    assert state.last_step == 0


def test_a_decided_run_gives_no_further_verdicts():
    """Once stalled, later polls do not repeat the verdict."""
    seen = [Observation(now=1, step=0, log_grew=True)] + [Observation(now=t) for t in range(2, 300)]
    _, verdicts = feed(seen)
    assert len(verdicts) == 1


ADAPTIVE = Policy(
    stall_timeout=600,
    gpu_idle_timeout=3600,
    gpu_idle_percent=5,
    startup_grace=10,
    adaptive=AdaptiveTimeout(floor=20, ceiling=600, factor=3, warmup_gaps=20),
)


def stepping(start, steps, interval):
    return [
        Observation(now=start + k * interval, step=k, total_steps=1000, log_grew=True)
        for k in range(steps)
    ]


def test_adaptive_timeout_uses_the_ceiling_while_learning():
    """Before 20 gaps are seen, the adaptive timeout is its ceiling."""
    seen = stepping(1, 10, 2) + [Observation(now=t) for t in range(20, 640, 5)]
    _, verdicts = feed(seen, policy=ADAPTIVE)
    assert verdicts[0][0] >= 19 + 600


def test_adaptive_timeout_detects_a_hang_after_three_times_the_longest_pause():
    """Steps every 2 s with a recurring 12 s save: a hang is seen after 36 s, not 600."""
    seen = []
    now = 1.0
    for step in range(60):
        now += 12 if step % 20 == 19 else 2  # a save every 20 steps
        seen.append(Observation(now=now, step=step, total_steps=1000, log_grew=True))
    seen += [Observation(now=now + t) for t in range(1, 100)]
    _, verdicts = feed(seen, policy=ADAPTIVE)
    when, verdict = verdicts[0]
    assert when - now == 36
    assert verdict.figures["stall_timeout"] == 36
    assert "3 x longest pause 12.0 s" in verdict.reason


def test_adaptive_timeout_never_goes_below_the_floor():
    """A run stepping every second still gets the floor."""
    seen = stepping(1, 50, 1) + [Observation(now=50 + t) for t in range(1, 40)]
    _, verdicts = feed(seen, policy=ADAPTIVE)
    assert verdicts[0][0] - 50 == 20


def test_adaptive_timeout_tolerates_the_pauses_it_learned():
    """A pause as long as the longest seen, recurring, is no stall (no false positive)."""
    seen = []
    now = 1.0
    for step in range(200):
        now += 30 if step % 25 == 24 else 2
        seen.append(Observation(now=now, step=step, total_steps=1000, log_grew=True))
    _, verdicts = feed(seen, policy=ADAPTIVE)
    assert verdicts == []


def test_busy_gpu_at_idle_power_counts_as_idle():
    """100% utilisation at a fraction of the run's peak power is the hung-collective signature."""
    training = [
        Observation(now=t, step=t, log_grew=True, gpu_utilization=(98,), gpu_power_watts=(300.0,))
        for t in range(1, 6)
    ]
    hung = [
        Observation(now=t, gpu_utilization=(100,), gpu_power_watts=(60.0,)) for t in range(6, 60)
    ]
    _, verdicts = feed(training + hung)
    assert verdicts and verdicts[0][0] == 25  # 20 s after the last progress (step 5)
    assert "GPU idle" in verdicts[0][1].reason


def test_busy_gpu_at_full_power_is_not_idle():
    """A GPU really computing keeps the fast verdict off (the stall timeout still applies)."""
    seen = [
        Observation(now=t, step=1, log_grew=t < 3, gpu_utilization=(100,), gpu_power_watts=(290.0,))
        for t in range(1, 50)
    ]
    _, verdicts = feed(seen)
    assert verdicts == []


def test_stall_deadline_is_when_the_verdict_falls_due():
    """The deadline the loop wakes up for is exactly when advance() gives the verdict."""
    from sidecar.decide.decision import stall_deadline

    state, _ = feed([Observation(now=1, step=0, log_grew=True), Observation(now=3, step=1)])
    due = stall_deadline(state, POLICY)
    assert due == 3 + 60
    assert advance(state, Observation(now=due - 0.01), POLICY)[1] is None
    assert advance(state, Observation(now=due), POLICY)[1].kind is VerdictKind.STALL


def test_stall_deadline_in_startup_is_the_end_of_the_grace():
    """A silent start falls due when the grace ends."""
    from sidecar.decide.decision import stall_deadline

    assert stall_deadline(started(0.0), POLICY) == 120


def test_a_silent_trainer_with_its_final_model_written_has_completed() -> None:
    """It saved the final model and hangs on its way out: completed, never a stall to
    resume (that would train a finished run again)."""
    policy = Policy(stall_timeout=10, gpu_idle_timeout=600, gpu_idle_percent=5, startup_grace=5)
    state = started(0.0)
    state, _ = advance(state, Observation(now=1.0, step=1, log_grew=True), policy)
    state, verdict = advance(state, Observation(now=20.0, final_model_present=True), policy)
    assert verdict is not None and verdict.kind is VerdictKind.COMPLETED
    assert verdict.figures["trainer_still_running"] and state.phase is Phase.COMPLETED
    quiet = started(0.0)
    quiet, _ = advance(quiet, Observation(now=1.0, step=1, log_grew=True), policy)
    _, stall = advance(quiet, Observation(now=20.0), policy)
    assert stall is not None and stall.kind is VerdictKind.STALL
