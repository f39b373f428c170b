"""The adaptive stall timeout: learn how long this run legitimately pauses.

A fixed timeout must outlast the slowest legitimate pause of any run, so on a run
that steps every few seconds a hang is noticed far later than it could be. With
``SIDECAR_STALL_TIMEOUT=auto`` the sidecar measures the gaps between progress
events once the run is stepping — step intervals, and the longer pauses that
recur (state saves, sample generation, epoch boundaries) — and declares a stall
after a safety factor times the longest gap seen so far, clamped between a floor
and a ceiling. Until enough gaps were seen it uses the ceiling. Pure code.
"""

from __future__ import annotations

from dataclasses import dataclass

# Gaps to observe before trusting them: a few epochs' worth of steps, typically
# including a sample or a save.
WARMUP_GAPS = 20
# A pause three times longer than any seen so far in this run is not a slow step.
SAFETY_FACTOR = 3.0


@dataclass(frozen=True)
class Cadence:
    """What this run taught us: how many gaps, and the longest."""

    gaps: int = 0
    longest_gap: float = 0.0

    def observe(self, gap: float) -> Cadence:
        return Cadence(gaps=self.gaps + 1, longest_gap=max(self.longest_gap, gap))


@dataclass(frozen=True)
class AdaptiveTimeout:
    floor: float
    ceiling: float
    factor: float = SAFETY_FACTOR
    warmup_gaps: int = WARMUP_GAPS

    def timeout(self, cadence: Cadence) -> float:
        if cadence.gaps < self.warmup_gaps:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.factor * cadence.longest_gap))

    def explain(self, cadence: Cadence) -> str:
        if cadence.gaps < self.warmup_gaps:
            return f"adaptive, still learning ({cadence.gaps} of {self.warmup_gaps} gaps): ceiling"
        return (
            f"adaptive: {self.factor:g} x longest pause {cadence.longest_gap:.1f} s, "
            f"within {self.floor:.0f}-{self.ceiling:.0f} s"
        )
