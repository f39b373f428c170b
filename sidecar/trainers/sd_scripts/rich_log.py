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
is folded into pieces that fill it exactly. So a row that fills the column continues its word
on the next row; a shorter one ended at a space. :func:`unwrap` rebuilds each message from its
rows by that rule; lines that are not records (prints, tqdm) pass unchanged. A record may
follow a tqdm bar on the same line (rich writes after the bar's last redraw).
"""

from __future__ import annotations

import re

_PREFIX_WIDTH = 29  # 19 for the time, 1, 8 for the level, 1
_RECORD = re.compile(
    r"(?:^|(?<=\]))(?P<prefix>(?:\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}| {19}) "
    r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) +)(?P<row>.*)$"
)
_SOURCE = re.compile(r"^(?P<message>.*?) +(?P<source>[\w.\-]+\.py:\d+) *$")
_CONTINUATION = re.compile(rf"^ {{{_PREFIX_WIDTH}}}(?P<row>\S.*)$")


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
        message = previous = source.group("message").rstrip()
        while index < len(lines):
            continuation = _CONTINUATION.match(lines[index])
            if continuation is None or _RECORD.search(lines[index]):
                break
            row = continuation.group("row").rstrip()
            message += ("" if len(previous) >= width else " ") + row
            previous = row
            index += 1
        out.append(line[: record.start()] + record.group("prefix") + message)
    return "\n".join(out)
