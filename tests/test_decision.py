"""The stall/crash/completion decision, driven by a fake clock (plain numbers)."""

from __future__ import annotations

from sidecar.decision import Observation, Phase, Policy, VerdictKind, advance, started

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
    assert verdicts[0][0] == 22  # idle first seen at 2, so idle for 20 s at 22
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
