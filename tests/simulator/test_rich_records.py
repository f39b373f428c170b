"""The simulator's log records against the real rich, and unwrap on the real rich's rows.

sd-scripts logs through rich's RichHandler into a file (library/utils.py ``setup_logging``);
the simulator draws its records itself (``terminal_output.rich_record``) and the sidecar
reads them back with ``rich_log.unwrap``. Here the real RichHandler is the oracle. Its
wrapping rule (``rich/_wrap.py`` ``divide_line``) reads the same in rich 13.7.0, sd-scripts'
pin, as in the rich the test extra installs (13.8 or later: transformers' typer needs it).

CI once met the case this pins down: a path exactly four columns wide, then ``at epoch 2``.
rich cuts the path's trailing blank into a piece of its own, which then starts the next row.
"""

from __future__ import annotations

import io
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.logging import RichHandler

from sidecar.simulator.terminal_output import rich_record
from sidecar.trainers.sd_scripts.rich_log import unwrap

SOURCE_FILE, SOURCE_LINE = "train_network.py", 946
COLUMN = 80 - 29 - 1 - len(f"{SOURCE_FILE}:{SOURCE_LINE}")  # the message column: 30


def real_record(message: str) -> str:
    """``message`` logged at INFO as sd-scripts' handler writes it into a file."""
    written = io.StringIO()
    console = Console(file=written, width=80, color_system=None, force_terminal=False)
    handler = RichHandler(console=console, log_time_format="%Y-%m-%d %H:%M:%S")
    handler.emit(
        logging.LogRecord(
            "sd", logging.INFO, f"/sd-scripts/{SOURCE_FILE}", SOURCE_LINE, message, None, None
        )
    )
    return written.getvalue()


def rows(record: str) -> list[str]:
    """A record's rows without the time column (the two draws may fall in different seconds)."""
    return [line[19:].rstrip() for line in record.rstrip("\n").split("\n")]


def path_of_width(width: int) -> str:
    stem = "/tmp/pytest-of-root/pytest-4/"
    return (stem + "x" * width)[:width]


MESSAGES = [
    "save train state to /tmp/pytest-of-root/pytest-4/test_resume_log_lines_come_in_0/outputs/"
    "my-lora/my-lora-step00000006-state/train_state.json at epoch 2 step 6",
    *(
        # n + 1 == COLUMN (29) is the one case unwrap cannot tell: see the property test.
        f"load train state from {path_of_width(n)}: {{'current_epoch': 2}}"
        for n in (28, 30, 59, 60, 61, 90)
    ),
    *(f"resume training from local state: {path_of_width(n)}" for n in (29, 30, 31, 60, 89)),
    f"{path_of_width(60)} starts the message",
    "a b c",
    "",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_the_simulator_draws_a_record_as_rich_does(message: str) -> None:
    assert rows(rich_record(message, "INFO", f"{SOURCE_FILE}:{SOURCE_LINE}", None)) == rows(
        real_record(message)
    )


@pytest.mark.parametrize("message", [m for m in MESSAGES if m])
def test_unwrap_rebuilds_the_message_from_the_real_rows(message: str) -> None:
    assert f"INFO     {message}" in unwrap(real_record(message))


WORDS = st.text(alphabet="abc/-_.019", min_size=1, max_size=2 * COLUMN + 3)


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=6))
def test_any_message_of_single_spaced_words(words: list[str]) -> None:
    """Words of every width around the column's multiples, one space apart."""
    message = " ".join(words)
    real = real_record(message)
    assert rows(rich_record(message, "INFO", f"{SOURCE_FILE}:{SOURCE_LINE}", None)) == rows(real)
    # A word exactly one column wide, alone on its row, cannot be told from a folded one
    # (rich_log's docstring): the rebuilt text is then only checked without its blanks.
    ambiguous = any(len(word) == COLUMN for word in words[:-1])
    rebuilt = unwrap(real)
    if ambiguous:
        assert message.replace(" ", "") in rebuilt.replace(" ", "")
    else:
        assert f"INFO     {message}" in rebuilt
