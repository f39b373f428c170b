"""The live console line: drawn only for a person at a terminal, never into JSON logs."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from conftest import FAST_SETTINGS, FAST_SIMULATION

from sidecar.config import Settings
from sidecar.surface.live_line import ProgressLine, describe, wanted
from sidecar.surface.step_rate import Speed


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("log_format", "stdout_tty", "stderr_tty", "mode", "echo", "drawn"),
    [
        ("console", True, True, "exec", True, True),
        (None, True, True, "process", False, True),  # console is the default on a terminal
        ("json", True, True, "exec", True, False),  # JSON logs get no redraws
        (None, False, True, "exec", True, False),  # piped stdout: JSON by default
        ("console", True, False, "exec", True, False),  # stderr not a terminal
        ("console", True, True, "process", True, False),  # the echoed tqdm bar is the line
    ],
)
def test_drawn_only_for_a_console_on_a_terminal(
    log_format, stdout_tty, stderr_tty, mode, echo, drawn
):
    settings = Settings(
        log_format=log_format,
        restart_mode=mode,
        trainer_container="fluxgym" if mode == "exec" else None,
        echo_trainer_output=echo,
    )
    stdout = Terminal() if stdout_tty else io.StringIO()
    stderr = Terminal() if stderr_tty else io.StringIO()
    shown = wanted(
        log_format=settings.log_format,
        restart_mode=settings.restart_mode,
        echo_trainer_output=settings.echo_trainer_output,
        stdout=stdout,
        stderr=stderr,
    )
    assert shown is drawn


def test_the_line_is_redrawn_in_place_and_throttled():
    """Each update rewrites the same row; updates closer than the interval are skipped."""
    now = [0.0]
    terminal = Terminal()
    line = ProgressLine(terminal, clock=lambda: now[0], min_interval=0.5)
    line.update("running", Speed(step=120, total=400, steps_per_second=0.02, eta_seconds=14000))
    assert terminal.getvalue() == "\r\x1b[2Krunning: step 120/400 (30%) · 50.0 s/step · ETA 3h53m"
    now[0] = 0.1
    line.update("running", Speed(step=121, total=400, steps_per_second=0.02, eta_seconds=13950))
    assert "121/400" not in terminal.getvalue()
    now[0] = 0.7
    line.update("running", Speed(step=121, total=400, steps_per_second=0.02, eta_seconds=13950))
    assert terminal.getvalue().endswith(
        "\r\x1b[2Krunning: step 121/400 (30%) · 50.0 s/step · ETA 3h52m"
    )


def test_a_log_event_wipes_the_line_first():
    """As a structlog processor it clears the row, so the event prints on a clean line."""
    terminal = Terminal()
    line = ProgressLine(terminal, clock=lambda: 0.0)
    line(None, "info", {"event": "nothing drawn yet"})
    assert terminal.getvalue() == ""
    line.update("starting", None)
    event = {"event": "stall_detected"}
    assert line(None, "warning", event) is event
    assert terminal.getvalue() == "\r\x1b[2Kstarting: waiting for the first step\r\x1b[2K"


def test_descriptions():
    assert describe("stalled", Speed(20, 64, 0.5, 88.0)) == "stalled: step 20/64 (31%) · 2.0 s/step"
    assert describe("running", Speed(3, None, 9.5, None)) == "running: step 3 · 9.50 steps/s"


@pytest.mark.slow
def test_the_real_sidecar_draws_the_line_on_a_terminal(fluxgym):
    """Under a pseudo-terminal with console logs, stderr shows the live step/rate/ETA line."""
    primary, secondary = pty.openpty()
    env = {
        **fluxgym.env({**FAST_SIMULATION, "SIM_STEP_SECONDS": "0.1"}),
        **FAST_SETTINGS,
        "SIDECAR_LOG_FORMAT": "console",
        "SIDECAR_TRAIN_SCRIPT": str(fluxgym.train_script),
        "SIDECAR_HEARTBEAT_FILE": str(fluxgym.root / "heartbeat"),
        "COLUMNS": "120",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: the sidecar exited
                break
            if not chunk:
                break
            screen += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(primary)
    text = screen.decode("utf-8", "replace")
    assert process.returncode == 0, text[-3000:]
    lines = re.findall(r"\x1b\[2K(running: step \d+/\d+[^\r\n\x1b]*)", text)
    assert lines, text[-3000:]
    assert any("steps/s" in line and "ETA" in line for line in lines), lines[-5:]
    assert "training_completed" in text
    assert '{"event"' not in text, "console format, not JSON"
