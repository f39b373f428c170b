"""Detection per section, replayed: healthy and hung FluxGym runs at real-time cadences.

A run's console output is generated as sd-scripts writes it (rich records at 80 columns,
tqdm redraws, prints), with the pauses sd-scripts really has, in seconds of a real run:
steps of a few seconds (block swapping on a 12-16 GB card: 4-50 s), a silent model load,
sampling whose autoencoder moves and first denoising step print nothing for a minute or more,
state saves that print nothing while they write, epoch boundaries whose dataloader workers
start silently. Shapes and seeds vary all of them, so no single cadence is what the detector
was tuned on. The output is fed, one poll at a time on a virtual clock, through the real
section reader (trainers/sd_scripts/sections.py) and the real decision (decide/decision.py)
under three policies: the section-aware default, the previous section-blind ``auto`` and the
previous fixed default. A hang is the output stopping for good, inside a chosen section.

Virtual time makes hours of training cost milliseconds; what is measured is the decision, on
the exact text the sidecar would read. The end-to-end path (a real trainer process, the log
follower, the loop) is measured by bench.py's detection rows.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

from sidecar.decide import decision
from sidecar.decide.cadence import AdaptiveTimeout
from sidecar.decide.decision import Observation, Policy, VerdictKind
from sidecar.decide.sections import Section, SectionTimeouts
from sidecar.trainers.sd_scripts.sections import section_at_end

POLL = 2.0  # the default SIDECAR_POLL_INTERVAL
GRACE = 1200.0  # the default SIDECAR_STARTUP_GRACE
POLICIES = {
    "section-aware (default)": Policy(
        stall_timeout=900.0,
        gpu_idle_timeout=300.0,
        gpu_idle_percent=5.0,
        startup_grace=GRACE,
        sections=SectionTimeouts(floor=60.0, ceiling=900.0),
    ),
    "previous auto": Policy(
        stall_timeout=1800.0,
        gpu_idle_timeout=300.0,
        gpu_idle_percent=5.0,
        startup_grace=GRACE,
        adaptive=AdaptiveTimeout(floor=120.0, ceiling=1800.0),
    ),
    "previous fixed 15 min": Policy(
        stall_timeout=900.0, gpu_idle_timeout=300.0, gpu_idle_percent=5.0, startup_grace=GRACE
    ),
}


@dataclass(frozen=True)
class Shape:
    """One FluxGym-like run, in real seconds."""

    name: str
    step: tuple[float, float]  # seconds per step, min and max
    steps_per_epoch: int
    epochs: int
    sample_every: int  # steps
    sample_silence: tuple[float, float]  # the silent part of sampling (AE moves, first step)
    sample_steps: int  # denoising steps, one bar redraw each
    denoise_step: float
    save_every: int  # steps
    save_silence: tuple[float, float]
    epoch_silence: tuple[float, float]  # dataloader workers starting
    load_silence: float  # before the first line: loading Flux


SHAPES = (
    Shape("24 GB, 4 s", (3.0, 5.0), 40, 25, 100, (60, 90), 20, 0.8, 100, (20, 40), (2, 8), 240),
    Shape("16 GB, 12 s", (10.0, 14.0), 20, 25, 50, (80, 140), 20, 2.0, 75, (30, 70), (5, 15), 300),
    Shape("12 GB, 45 s", (40.0, 55.0), 16, 12, 24, (120, 200), 20, 6.0, 24, (40, 90), (5, 20), 420),
    Shape("fast, 1 s", (0.6, 1.4), 100, 10, 200, (45, 75), 20, 0.3, 250, (15, 30), (1, 5), 180),
)


@dataclass(frozen=True)
class Write:
    at: float  # seconds since launch
    text: str
    step: int | None = None
    section: Section | None = None  # what the trainer is doing from this write on (truth)


def _record(message: str, source: str) -> str:
    """One rich record at 80 columns (the first row; the rest of a long message wraps)."""
    first, rest = message[:33], message[33:]
    lines = [f"                    INFO     {first:<33} {source:>17}"]
    if rest:
        lines.append(f"{' ' * 29}{rest}")
    return "\n".join(lines) + "\n"


def _bar(n: int, total: int) -> str:
    filled = int(10 * n / total)
    bar = "█" * filled + " " * (10 - filled)
    return f"\rsteps: {100 * n // total:3d}%|{bar}| {n}/{total} [00:00<00:00]"


def healthy_run(shape: Shape, rng: random.Random) -> Iterator[Write]:
    """sd-scripts' output for one run, in order (train_network.py's loop: the step bar, then
    the sample, then the save; each epoch starts with a banner and its workers' first batch).

    ``Write.section`` is the truth: what the trainer does from that write until the next. The
    text is what reaches the log: "epoch N/M" is a print, held in stdout's buffer under
    ``accelerate launch`` until the next tqdm bar is created (a sample's denoising bar) or
    the end, so the silence of an epoch's start is announced by nothing.
    """
    t = shape.load_silence
    yield Write(t, _record("caching latents...", "train_util.py:1170"), section=Section.STARTUP)
    t += rng.uniform(5, 20)
    yield Write(t, "prepare optimizer, data loader etc.\n", section=Section.STARTUP)
    total = shape.steps_per_epoch * shape.epochs
    step, buffered = 0, ""
    for epoch in range(1, shape.epochs + 1):
        buffered += f"\nepoch {epoch}/{shape.epochs}\n\n"
        t += rng.uniform(*shape.epoch_silence)  # the workers start: nothing printed
        yield Write(t, _record("epoch is incremented. current_epoch: 0", "train_util.py:784"))
        for batch in range(shape.steps_per_epoch):
            t += rng.uniform(*shape.step)
            step += 1
            last_of_epoch = batch == shape.steps_per_epoch - 1 and epoch < shape.epochs
            after = Section.EPOCH if last_of_epoch else Section.TRAINING
            yield Write(t, _bar(step, total), step=step, section=after)
            if step % shape.sample_every == 0:
                t += 0.05
                message = "generating sample images at step / サンプル画像生成 ステップ: "
                yield Write(
                    t,
                    _record(message + str(step), "flux_train_utils.py:61"),
                    section=Section.SAMPLING,
                )
                t += rng.uniform(*shape.sample_silence)
                for denoise in range(1, shape.sample_steps + 1):
                    t += shape.denoise_step * rng.uniform(0.8, 1.2)
                    flushed, buffered = buffered, ""  # a new tqdm bar flushes stdout
                    redraw = f"\r{100 * denoise // shape.sample_steps:3d}%|| {denoise}/20"
                    yield Write(t, flushed + redraw, section=Section.SAMPLING)
                yield Write(t, _bar(step, total) + ", avr_loss=0.41]", step=step, section=after)
            if step % shape.save_every == 0 and step < total:
                t += 0.05
                yield Write(
                    t,
                    _record(f"saving state at step {step}", "train_util.py:5964"),
                    section=Section.SAVING,
                )
                t += rng.uniform(*shape.save_silence)
                yield Write(t, _bar(step, total) + ", avr_loss=0.41]", step=step, section=after)


def hung_run(shape: Shape, rng: random.Random, section: Section) -> tuple[list[Write], float]:
    """A run whose output stops for good inside ``section``: its writes, and the hang's start
    (the last write before the silence)."""
    writes = list(healthy_run(shape, rng))
    entries = [i for i, write in enumerate(writes) if write.section is section]
    # A hang in the second half of the run, once the detector had the chance to learn.
    index = rng.choice(entries[len(entries) // 2 :] or entries)
    return writes[: index + 1], writes[index].at


def detect(
    writes: list[Write], policy: Policy, *, until: float
) -> tuple[float | None, float | None]:
    """Replay ``writes`` through the section reader and the decision; the first stall
    verdict's time and the timeout it applied (None, None: no verdict before ``until``)."""
    state = decision.started(0.0)
    index, now, step = 0, 0.0, None
    while now < until:
        now += POLL
        chunk, last_write = [], None
        while index < len(writes) and writes[index].at <= now:
            write = writes[index]
            chunk.append(write.text)
            step = write.step if write.step is not None else step
            last_write = write.at
            index += 1
        text = "".join(chunk)
        seen = Observation(
            now=now,
            step=step,
            log_grew=bool(text),
            progress_at=last_write,
            section=section_at_end(text) if text else None,
        )
        state, verdict = decision.advance(state, seen, policy)
        if verdict is not None and verdict.kind is VerdictKind.STALL:
            return now, float(verdict.figures.get("stall_timeout", policy.stall_timeout))
        if verdict is not None:
            return None, None
    return None, None


@dataclass(frozen=True)
class Result:
    policy: str
    section: Section
    detections: list[float]  # seconds from the hang's start to the verdict
    over_bound: list[float]  # detection / the timeout the verdict applied
    false_verdicts: int
    healthy_runs: int


def measure(seeds: int = 5) -> list[Result]:
    """Every policy on every shape: ``seeds`` healthy runs each, and ``seeds`` hangs in each
    section of each shape."""
    results = []
    hung_sections = (Section.TRAINING, Section.SAMPLING, Section.SAVING, Section.EPOCH)
    for name, policy in POLICIES.items():
        false_verdicts = healthy = 0
        for shape in SHAPES:
            for seed in range(seeds):
                writes = list(healthy_run(shape, random.Random(seed)))
                verdict_at, _ = detect(writes, policy, until=writes[-1].at)
                healthy += 1
                false_verdicts += verdict_at is not None
        for section in hung_sections:
            detections, over_bound = [], []
            for shape in SHAPES:
                for seed in range(seeds):
                    writes, hang = hung_run(shape, random.Random(1000 + seed), section)
                    verdict_at, bound = detect(writes, policy, until=hang + 4000)
                    if verdict_at is not None and bound:
                        detections.append(verdict_at - hang)
                        over_bound.append((verdict_at - hang) / bound)
            results.append(Result(name, section, detections, over_bound, false_verdicts, healthy))
    return results


def table(results: list[Result]) -> str:
    sections = sorted({r.section for r in results}, key=list(Section).index)
    lines = [
        "| hang in | " + " | ".join(POLICIES) + " |",
        "|---|" + "---|" * len(POLICIES),
    ]
    by = {(r.policy, r.section): r for r in results}
    default = next(iter(POLICIES))
    for section in sections:
        cells = []
        base = statistics.median(by[(default, section)].detections)
        for name in POLICIES:
            found = by[(name, section)].detections
            median = statistics.median(found) if found else float("nan")
            ratio = "" if name == default else f" ({median / base:.1f}x)"
            cells.append(f"{median:.0f} s (max {max(found):.0f}){ratio}")
        lines.append(f"| {section.value} | " + " | ".join(cells) + " |")
    false = [
        f"{by[(name, sections[0])].false_verdicts} of {by[(name, sections[0])].healthy_runs}"
        for name in POLICIES
    ]
    lines.append("| false verdicts, healthy runs | " + " | ".join(false) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(measure()))
