"""sd-scripts' log records as one line each, the way its logger really writes them to a file.

sd-scripts logs through rich's ``RichHandler`` (library/utils.py ``setup_logging``). Into a
file (the trainer's stdin, stdout and stderr are not terminals) rich draws each record as a
table at 80 columns: the time (19 spaces when the second repeats), the level padded to 8, the
message wrapped in its own column, and the source (``train_util.py:4777``) right-aligned on
the first row only, every row padded with spaces to the full width::

    2026-12-01 12:58:16 INFO     resume training from local       train_util.py:4777
                                 state:
                                 /app/fluxgym/outputs/my-lora/my-
                                 lora-step00000018-state

A message is word-wrapped at spaces (the space is dropped) and a word longer than the column
starts a row and is folded into pieces that fill it exactly, the space after it included
(rich/_wrap.py ``divide_line``). So a full row without a blank is a piece of a folded word,
which the next row continues, unless that row starts with the space (a folded word exactly k
columns wide: ``json`` then `` at epoch 2``); any other row ended at a space. :func:`unwrap`
rebuilds each message from its rows by that rule; lines that are not records (prints, tqdm)
pass unchanged. A record may follow a tqdm bar on the same line (rich writes after the bar's
last redraw). One case cannot be told from the text: a word exactly one column wide alone on
its row reads as a folded one, and the next word is joined to it without the space.
"""

from __future__ import annotations

import re

_PREFIX_WIDTH = 29  # 19 for the time, 1, 8 for the level, 1
_RECORD = re.compile(
    r"(?:^|(?<=\]))(?P<prefix>(?:\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}| {19}) "
    r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) +)(?P<row>.*)$"
)
_SOURCE = re.compile(r"^(?P<message>.*?) +(?P<source>[\w.\-]+\.py:\d+) *$")
_CONTINUATION = re.compile(rf"^ {{{_PREFIX_WIDTH}}}(?P<row> ?\S.*)$")


def unwrap(text: str) -> str:
    """``text`` with every rich record's rows joined back into one line."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        record = _RECORD.search(line)
        if record is None:
            out.append(line)
            continue
        first = record.group("row")
        source = _SOURCE.match(first)
        if source is None:  # no source column: nothing tells the width, keep it as it is
            out.append(line)
            continue
        # The message column: the row's width less the source and the space before it.
        width = len(first) - len(source.group("source")) - 1
        message = source.group("message").rstrip()
        head = line[: record.start()] + record.group("prefix")
        message, index = _joined(lines, index, width, message)
        out.append(head + message)
    return "\n".join(out)


def _joined(lines: list[str], index: int, width: int, message: str) -> tuple[str, int]:
    """The record's message with its continuation rows from ``lines[index]`` on, and the
    index of the first line after them."""
    # What goes before the next row: nothing after a piece of a folded word (a full row
    # without a blank), else the space the wrap dropped.
    joiner = _joiner(message, width)
    while index < len(lines):
        line = lines[index]
        if _RECORD.search(line):
            break
        if not joiner and not line.strip() and _continues(lines, index + 1):
            # The folded word's trailing blank, cut into a row of its own because the word
            # after it is too wide to share it: the next row starts that word.
            message, joiner, index = message + " ", "", index + 1
            continue
        continuation = _CONTINUATION.match(line)
        if continuation is None:
            break
        row = continuation.group("row").rstrip()
        if row.startswith(" "):
            if joiner:
                break  # indented text of its own, not a row of this record
            message += row  # the folded word's trailing blank starts this row
        else:
            message += joiner + row
        joiner = _joiner(row, width)
        index += 1
    return message, index


def _joiner(row: str, width: int) -> str:
    return "" if len(row) >= width and " " not in row else " "


def _continues(lines: list[str], index: int) -> bool:
    return (
        index < len(lines)
        and _CONTINUATION.match(lines[index]) is not None
        and not _RECORD.search(lines[index])
    )
