"""Section-aware stall timeouts: what the trainer is doing decides how long silence may last.

A section-blind timeout must outlast the longest legitimate pause of the whole run — a model
save, sample generation — so a hang inside an ordinary training step is caught late. The
trainer announces what it does (sd-scripts prints "generating sample images at step N",
"saving state at step N", "epoch N/M"; its step bar moves while it trains), and each section
gets its own budget, learned in this run:

- training: ``factor`` x a high percentile of the silences seen while training, never below
  ``floor`` (steps of seconds: one minute), the ceiling until ``warmup`` silences were seen;
- a recognised long section (start-up, an epoch boundary, sampling, a save): ``factor`` x the
  longest silence seen in that section, the ceiling until it was seen once — never cut short
  by the training floor;
- silence in no recognised section: the ceiling, as the previous fixed default. That is
  the case of a run whose output the sidecar cannot read (one FluxGym's UI started streams
  into the UI): a section-blind learned timeout would take its first long silent sampling
  for a hang.

Pure code: the sections come in with the observations, the clock is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Silences remembered per section for its percentile (the newest; older ones are dropped).
_KEEP = 256
# The share of training silences a step may take without being a hang.
TRAINING_PERCENTILE = 0.95


class Section(StrEnum):
    STARTUP = "startup"  # loading models, caching latents and text-encoder outputs
    TRAINING = "training"  # the step bar moving
    EPOCH = "epoch"  # an epoch boundary (the dataloader's workers start again)
    SAMPLING = "sampling"  # sample images
    SAVING = "saving"  # a state or a model being written


@dataclass(frozen=True)
class SectionGaps:
    """The silences seen in one section (the newest ``_KEEP``) and the longest ever."""

    count: int = 0
    longest: float = 0.0
    recent: tuple[float, ...] = ()

    def observe(self, gap: float) -> SectionGaps:
        return SectionGaps(
            count=self.count + 1,
            longest=max(self.longest, gap),
            recent=(*self.recent[-(_KEEP - 1) :], gap),
        )

    def percentile(self, share: float) -> float:
        ordered = sorted(self.recent)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass(frozen=True)
class SectionCadence:
    """What the run taught, per section (kept across the attempts of a run)."""

    gaps: tuple[tuple[Section, SectionGaps], ...] = ()

    def of(self, section: Section) -> SectionGaps:
        return dict(self.gaps).get(section, SectionGaps())

    def observe(self, section: Section, gap: float) -> SectionCadence:
        learned = dict(self.gaps)
        learned[section] = learned.get(section, SectionGaps()).observe(gap)
        return SectionCadence(tuple(sorted(learned.items())))


@dataclass(frozen=True)
class SectionTimeouts:
    floor: float  # the training section's shortest timeout
    ceiling: float  # the longest of any, and the budget of a section not learned yet
    factor: float = 3.0
    warmup: int = 20  # training silences to see before trusting their percentile

    def timeout(self, section: Section | None, sections: SectionCadence) -> float:
        if section is None:
            return self.ceiling
        gaps = sections.of(section)
        if section is Section.TRAINING:
            if gaps.count < self.warmup:
                return self.ceiling
            return _clamp(
                self.factor * gaps.percentile(TRAINING_PERCENTILE), self.floor, self.ceiling
            )
        if gaps.count == 0:
            return self.ceiling
        return _clamp(self.factor * gaps.longest, self.floor, self.ceiling)

    def explain(self, section: Section | None, sections: SectionCadence) -> str:
        if section is None:
            return "no section recognised in the trainer's output: the ceiling"
        gaps = sections.of(section)
        if section is Section.TRAINING:
            if gaps.count < self.warmup:
                return f"section training, still learning ({gaps.count} of {self.warmup}): ceiling"
            return (
                f"section training: {self.factor:g} x p{TRAINING_PERCENTILE * 100:.0f} silence "
                f"{gaps.percentile(TRAINING_PERCENTILE):.1f} s, at least {self.floor:.0f} s"
            )
        if gaps.count == 0:
            return f"section {section.value}, not seen before in this run: ceiling"
        return (
            f"section {section.value}: {self.factor:g} x its longest silence {gaps.longest:.1f} s"
        )


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))
