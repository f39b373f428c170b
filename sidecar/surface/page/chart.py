"""The page's chart, drawn on the server as inline SVG: it needs no script to show, no
library to ship, and it is part of the first HTML a browser receives.

Time runs left to right over the whole history. The trainer's step counter is the solid
line (scaled to the run's total), GPU utilisation the thin line (0-100 %) and power the
dashed one (scaled to the highest draw seen). Each mark is a vertical rule with a title a
browser shows on hover: the stall, crash, restart, quarantine, completion, give-up or
interruption, and why.

Only numbers and the escaped mark texts go into the markup; presentation attributes, not
``style``, so the page's Content-Security-Policy can forbid inline styles.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from sidecar.surface.history import Mark, Sample

WIDTH, HEIGHT = 800, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 8, 792, 12, 212  # the plot area inside the view box
MARK_COLOURS = {
    "stall": "#d97706",
    "crash": "#dc2626",
    "restart": "#2563eb",
    "quarantine": "#7c3aed",
    "completed": "#16a34a",
    "gave_up": "#991b1b",
    "interrupted": "#6b7280",
}


def render_chart(samples: Sequence[Sample], marks: Sequence[Mark], now: float) -> str:
    times = [s.at for s in samples] + [m.at for m in marks]
    if not times:
        return (
            '<p class="empty">No history yet: the chart fills in as the sidecar watches '
            "the run.</p>"
        )
    start = min(times)
    end = max(max(times), start + 1.0)
    end = max(end, min(now, end + 60.0))  # up to now, unless the history ended long ago

    def x(at: float) -> float:
        return _LEFT + (at - start) / (end - start) * (_RIGHT - _LEFT)

    def y(fraction: float) -> float:
        return _BOTTOM - max(0.0, min(fraction, 1.0)) * (_BOTTOM - _TOP)

    parts = [
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" preserveAspectRatio="none" '
        'aria-label="Progress, GPU utilisation and events over time">',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{_RIGHT - _LEFT}" height="{_BOTTOM - _TOP}" '
        'fill="none" stroke="#d1d5db"/>',
    ]
    scale = max([s.total or 0 for s in samples] + [s.step or 0 for s in samples] + [1])
    top_power = max([s.power_watts or 0.0 for s in samples] + [0.0])
    for segment in _segments(samples):
        progress = [(x(s.at), y((s.step or 0) / scale)) for s in segment if s.step is not None]
        parts.append(_polyline("progress", progress, stroke="#111827", width=2.5))
        gpu = [(x(s.at), y(s.gpu_percent / 100)) for s in segment if s.gpu_percent is not None]
        parts.append(_polyline("gpu", gpu, stroke="#059669", width=1.2))
        if top_power > 0:
            power = [
                (x(s.at), y(s.power_watts / top_power))
                for s in segment
                if s.power_watts is not None
            ]
            parts.append(_polyline("power", power, stroke="#9333ea", width=1.2, dashed=True))
    for mark in marks:
        at = x(mark.at)
        colour = MARK_COLOURS.get(mark.kind, "#374151")
        parts.append(
            f'<g class="marker" data-kind="{escape(mark.kind)}">'
            f"<title>{escape(utc_time(mark.at))}: {escape(mark.text)}</title>"
            f'<line x1="{at:.1f}" x2="{at:.1f}" y1="{_TOP}" y2="{_BOTTOM}" stroke="{colour}" '
            'stroke-width="2"/>'
            f'<rect x="{at - 4:.1f}" y="{_TOP - 8}" width="8" height="8" fill="{colour}"/></g>'
        )
    parts.append(
        f'<text x="{_LEFT + 4}" y="{_TOP + 14}" font-size="12" fill="#111827">'
        f"{scale} steps</text>"
        f'<text x="{_RIGHT - 4}" y="{_TOP + 14}" font-size="12" fill="#059669" '
        'text-anchor="end">GPU 100 %</text>'
        f'<text x="{_LEFT}" y="{HEIGHT - 6}" font-size="12" fill="#4b5563">'
        f"{escape(utc_time(start))}</text>"
        f'<text x="{_RIGHT}" y="{HEIGHT - 6}" font-size="12" fill="#4b5563" '
        f'text-anchor="end">{escape(utc_time(end))}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _segments(samples: Sequence[Sample]) -> list[list[Sample]]:
    """The samples in stretches without a hole: where the sidecar was away (a gap over five
    times the usual spacing, and over a minute) the lines stop, rather than draw a straight
    line across time nobody watched."""
    gaps = sorted(b.at - a.at for a, b in itertools.pairwise(samples))
    usual = gaps[len(gaps) // 2] if gaps else 0.0
    hole = max(5 * usual, 60.0)
    segments: list[list[Sample]] = []
    for sample in samples:
        if not segments or not 0 <= sample.at - segments[-1][-1].at <= hole:
            segments.append([])
        segments[-1].append(sample)
    return segments


def _polyline(
    name: str, points: list[tuple[float, float]], *, stroke: str, width: float, dashed: bool = False
) -> str:
    if not points:
        return ""
    coordinates = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return (
        f'<polyline class="{name}" points="{coordinates}" fill="none" stroke="{stroke}" '
        f'stroke-width="{width}"{dash}/>'
    )


def utc_time(at: float) -> str:
    """A wall-clock time as people read it on the page."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
