"""The status page as HTML: the whole page, and the ``<main>`` the page's script swaps in.

The first answer is the complete page, so it works with JavaScript off (a ``<noscript>``
refresh then keeps it current); with JavaScript on, ``page.js`` fetches the live part
every few seconds and replaces it without a reload. Everything from a user or a trainer
(run names, paths, reasons, log lines, stacks) goes through :func:`_text` or
:func:`_block` (``html.escape``, quotes included), nothing else is ever interpolated but
numbers and the fixed words of this module. Very long lines are cut, so one runaway log
line cannot make the page megabytes wide.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.surface.page.chart import MARK_COLOURS, render_chart, utc_time
from sidecar.surface.page.model import CheckpointRow, IncidentView, PageModel
from sidecar.surface.step_rate import format_duration

REFRESH_SECONDS = 5  # the script's refresh; without JavaScript the page reloads every 30 s
_NOSCRIPT_REFRESH_SECONDS = 30
_LINE_CHARS = 500


def render_page(model: PageModel) -> str:
    title = f"{model.run} · training-sidecar" if model.run else "training-sidecar"
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title>"
        '<link rel="stylesheet" href="/assets/page.css"><link rel="icon" href="data:,">'
        f'<noscript><meta http-equiv="refresh" content="{_NOSCRIPT_REFRESH_SECONDS}"></noscript>'
        '<script src="/assets/page.js" defer></script>'
        "</head><body>"
        '<header><h1>training-sidecar</h1><p class="meta">'
        f"mode {_text(model.mode)} · version {_text(__version__)} · "
        '<a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></p></header>'
        f'<main id="live" data-updated="{model.rendered_at:.0f}" '
        f'data-refresh-seconds="{REFRESH_SECONDS}">'
        f"{render_live(model)}</main>"
        '<footer><p id="freshness">Updated '
        f"{_text(utc_time(model.rendered_at))}; live while this page is open.</p></footer>"
        "</body></html>\n"
    )


def render_live(model: PageModel) -> str:
    if model.run is None:
        return (
            '<section><h2 id="run-name">No run yet</h2><p id="phase">idle</p>'
            "<p>The sidecar is waiting for a training run (a train.sh under its output "
            "folder).</p></section>"
        )
    return "".join(
        (
            _relaunch_notice(model),
            _problems(model.problems),
            _summary(model),
            _chart(model),
            _budget(model),
            _checkpoints(model),
            _diff(model.script_diff),
            _incidents(model.incidents, model.incidents_total),
        )
    )


def _relaunch_notice(model: PageModel) -> str:
    if not model.relaunches:
        return ""
    times = "once" if model.relaunches == 1 else f"{model.relaunches} times"
    last = model.recoveries[-1] if model.recoveries else None
    source = (
        "from the start (no complete checkpoint was left)"
        if last is not None and not last.get("checkpoint")
        else "from its newest complete checkpoint"
    )
    if model.mode == "exec":  # FluxGym's UI started the run, and lost sight of it
        text = (
            f"<strong>The sidecar relaunched this run {times}</strong>, outside FluxGym's UI. "
            "FluxGym says “Training Complete” whenever the command it started ends, also when "
            f"the sidecar stopped a hung or crashed trainer; the training went on here {source}. "
            "Watch it on this page (or with <code>training-sidecar status</code>), not in "
            "FluxGym's log view."
        )
    else:
        text = (
            f"<strong>The sidecar relaunched this run {times}</strong>, {source}; the "
            "restarts and why are below."
        )
    return f'<aside id="relaunch-notice" class="notice"><p>{text}</p></aside>'


def _problems(problems: list[str]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{_text(problem)}</li>" for problem in problems)
    return f'<aside id="problems" class="notice bad"><p>Could not read:</p><ul>{items}</ul></aside>'


def _summary(model: PageModel) -> str:
    step = "—"
    if model.step is not None:
        step = f"{model.step} / {model.total}" if model.total is not None else str(model.step)
    speed = f"{model.steps_per_second:.2f} steps/s" if model.steps_per_second else "—"
    eta = format_duration(model.eta_seconds) if model.eta_seconds is not None else "—"
    quiet = "—"
    if model.quiet_seconds is not None:
        quiet = format_duration(model.quiet_seconds)
        if model.allowance_seconds is not None:
            quiet += f" of {format_duration(model.allowance_seconds)} allowed"
    rows = [
        ("Run", f'<span id="run-name">{_text(model.run)}</span>'),
        (
            "Phase",
            f'<span id="phase" class="phase phase-{_text(model.phase)}">{_text(model.phase)}</span>'
            f' <span class="detail">{_text(model.phase_detail)}</span>',
        ),
        ("Section", f'<span id="section">{_text(model.section or "—")}</span>'),
        ("Step", f'<span id="step">{_text(step)}</span>'),
        ("Speed", f'<span id="speed">{_text(speed)}</span>'),
        (
            "Time left",
            f'<span id="eta">{_text(eta)}</span> <span class="detail">at the speed measured '
            "since this launch (tqdm's own estimate is too long after a resume)</span>",
        ),
        ("Since progress", f'<span id="quiet">{_text(quiet)}</span>'),
        ("train.sh resumes from", _text(model.resumes_from or "— (from the start)")),
        ("train.sh", f"<code>{_text(model.train_script or '')}</code>"),
    ]
    cells = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows)
    return f'<section id="run"><h2>Run</h2><dl class="facts">{cells}</dl></section>'


def _chart(model: PageModel) -> str:
    legend = "".join(
        f'<li><svg class="swatch" width="10" height="10" aria-hidden="true"><rect width="10" '
        f'height="10" fill="{colour}"/></svg>{kind.replace("_", " ")}</li>'
        for kind, colour in MARK_COLOURS.items()
    )
    return (
        '<section><h2>Progress</h2><figure id="chart">'
        f"{render_chart(model.samples, model.marks, model.rendered_at)}"
        "<figcaption>Solid: the trainer's step counter (it counts again from the resumed "
        "epoch after a restart). Thin: GPU utilisation, 0-100 %. Dashed: GPU power. "
        f'Marks:</figcaption><ul class="legend">{legend}</ul></figure></section>'
    )


def _budget(model: PageModel) -> str:
    left = model.max_restarts - model.restarts
    wait = (
        f"; a relaunch now would wait {format_duration(model.backoff_seconds)}"
        if model.backoff_seconds is not None and left > 0
        else ""
    )
    rows = "".join(
        f"<tr><td>{_text(r.get('at'))}</td><td>{_text(r.get('kind'))}</td>"
        f"<td>{_text(r.get('diagnosis') or '')}</td><td>{_text(r.get('reason'))}</td>"
        f"<td>{_text(_name(r.get('checkpoint')) or 'from the start')}</td></tr>"
        for r in reversed(model.recoveries)
    )
    table = (
        "<table><thead><tr><th>When</th><th>Why</th><th>Diagnosis</th><th>Reason</th>"
        f"<th>Resumed from</th></tr></thead><tbody>{rows}</tbody></table>"
        if rows
        else "<p>No recovery yet.</p>"
    )
    interruptions = "".join(
        f"<li>{_text(utc_time(i['at']))}: {_text(i.get('how'))}"
        f"{', resumed' if i.get('resumed_at') else ', not resumed yet'}</li>"
        for i in model.interruptions
    )
    if interruptions:
        interruptions = f"<h3>Interruptions</h3><ul>{interruptions}</ul>"
    return (
        '<section><h2>Restarts</h2><p id="budget">'
        f"{model.restarts} of {model.max_restarts} restarts used, {max(left, 0)} left{wait}"
        f"</p>{table}{interruptions}</section>"
    )


def _checkpoints(model: PageModel) -> str:
    rows = model.checkpoints
    if not rows:
        return (
            '<section><h2>Checkpoints</h2><table id="checkpoints"><tbody><tr><td>No state '
            "folder yet.</td></tr></tbody></table></section>"
        )
    lines = "".join(_checkpoint_row(row) for row in rows)
    more = model.checkpoints_total - len(rows)
    scanned = utc_time(model.checkpoints_scanned_at) if model.checkpoints_scanned_at else "now"
    note = f"As of {scanned}" + (f"; {more} older state folders not shown." if more else ".")
    return (
        '<section><h2>Checkpoints</h2><table id="checkpoints"><thead><tr><th>State folder</th>'
        "<th>Step</th><th>Epoch</th><th>Verdict</th><th>Completed</th><th>Why</th></tr></thead>"
        f'<tbody>{lines}</tbody></table><p class="detail">{_text(note)}</p></section>'
    )


def _checkpoint_row(row: CheckpointRow) -> str:
    resumed = ' class="resumed"' if row.resumed else ""
    pointer = " ← train.sh" if row.resumed else ""
    completed = utc_time(row.completed_at) if row.completed_at else "—"
    return (
        f'<tr data-checkpoint="{_text(row.name)}"{resumed}><td>{_text(row.name)}{pointer}</td>'
        f"<td>{_number(row.step)}</td><td>{_number(row.epoch)}</td>"
        f'<td class="verdict verdict-{_text(row.verdict.replace(" ", "-"))}">'
        f"{_text(row.verdict)}</td><td>{completed}</td>"
        f'<td class="why">{_text(row.why)}</td></tr>'
    )


def _diff(diff: str | None) -> str:
    body = (
        f'<pre id="train-script-diff" class="diff" data-key="diff">{_block(diff)}</pre>'
        if diff
        else '<p id="train-script-diff">train.sh is as it was written: the sidecar has not '
        "changed it.</p>"
    )
    return f"<section><h2>train.sh, as the sidecar changed it</h2>{body}</section>"


def _incidents(incidents: list[IncidentView], total: int) -> str:
    if not incidents:
        return '<section id="incidents"><h2>Incidents</h2><p>None.</p></section>'
    shown = f" (the newest {len(incidents)} of {total})" if total > len(incidents) else ""
    return (
        f'<section id="incidents"><h2>Incidents{shown}</h2>'
        f"{''.join(_incident(incident) for incident in incidents)}</section>"
    )


def _incident(incident: IncidentView) -> str:
    evidence = "".join(f"<li>{_text(line)}</li>" for line in incident.evidence)
    mitigation = (
        f'<p class="mitigation">What helps: {_text(incident.mitigation)}</p>'
        if incident.mitigation
        else ""
    )
    key = _text(incident.name)  # data-key: the page's script keeps it open, and scrolled
    stacks = (
        f'<details open data-key="stacks-{key}"><summary>Python stacks</summary>'
        f'<pre class="stacks" data-key="stacks-text-{key}">{_block(incident.stacks)}</pre>'
        "</details>"
        if incident.stacks
        else ""
    )
    return (
        f'<article class="incident"><h3>{_text(incident.name)}: {_text(incident.kind)}</h3>'
        f'<p>Diagnosis: <strong class="diagnosis">{_text(incident.diagnosis or "unknown")}'
        f"</strong>. {_text(incident.reason)}</p><ul>{evidence}</ul>{mitigation}"
        f'<details data-key="log-{key}"><summary>Log tail</summary>'
        f'<pre class="log-tail" data-key="log-text-{key}">{_block(incident.log_tail)}</pre>'
        f"</details>{stacks}</article>"
    )


def _text(value: Any) -> str:
    """Any value as escaped text (quotes too: it may land in an attribute)."""
    return escape("" if value is None else str(value), quote=True)


def _block(text: str) -> str:
    """A multi-line text for a ``<pre>``: each line cut at ``_LINE_CHARS``, escaped."""
    lines = []
    for line in text.splitlines():
        if len(line) > _LINE_CHARS:
            line = f"{line[:_LINE_CHARS]} … ({len(line) - _LINE_CHARS} more characters)"
        lines.append(line)
    return _text("\n".join(lines))


def _name(path: Any) -> str | None:
    return Path(str(path)).name if path else None


def _number(value: int | None) -> str:
    return "—" if value is None else str(value)
