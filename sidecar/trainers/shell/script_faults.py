"""Shapes of a launch script that bash reads otherwise than they look, named with their fix.

CRLF line endings, a byte order mark, NUL bytes, text that is not UTF-8, a flag line cut off
from its command, a word whose value cannot be known: each is refused with the line, what
bash does with it, and the command that repairs the file, rather than being edited.
"""

from __future__ import annotations

import re

from sidecar.trainers.shell.script_words import Script, TrainScriptError, Word, line_of

__all__ = [
    "BOM_FIX",
    "check_command_bytes",
    "crlf_error",
    "orphan_error",
    "refuse_binary",
    "unknown_word",
]

CRLF_FIX = "sed -i 's/\\r$//' train.sh"
BOM_FIX = "sed -i '1s/^\\xEF\\xBB\\xBF//' train.sh"
NUL_FIX = "tr -d '\\000' < train.sh > train.fixed && mv train.fixed train.sh"
CP1252_FIX = "iconv -f cp1252 -t utf-8 train.sh > train.fixed && mv train.fixed train.sh"
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def refuse_binary(text: str) -> None:
    first_line = text[:80].split("\n", 1)[0]
    if "\0" in first_line:
        raise TrainScriptError(
            "line 1 holds a NUL byte, so bash refuses train.sh (cannot execute binary file); "
            f"remove it: {NUL_FIX}"
        )


def check_command_bytes(text: str, span_start: int, span_end: int) -> None:
    """Refuse bytes in the trainer command that bash reads otherwise than they look."""
    span = text[span_start:span_end]
    if "\r" in span:
        raise crlf_error(text)
    nul = span.find("\0")
    if nul >= 0:
        raise TrainScriptError(
            f"line {line_of(text, span_start + nul)}: the trainer command holds a NUL byte, "
            f"which bash drops; remove it: {NUL_FIX}"
        )
    undecodable = _UNDECODABLE.search(span)
    if undecodable:
        # surrogateescape keeps byte 0xNN as U+DCNN (see atomic_files.read_text_exact).
        byte = ord(undecodable.group()) - 0xDC00
        raise TrainScriptError(
            f"line {line_of(text, span_start + undecodable.start())}: the trainer command holds "
            f"bytes that are not UTF-8 (can't decode byte 0x{byte:02x}; a Windows editor's "
            f"cp1252?); save train.sh as UTF-8: {CP1252_FIX}"
        )


def unknown_word(text: str, word: Word, reason: str, risk: str) -> TrainScriptError:
    return TrainScriptError(
        f"line {line_of(text, word.start)}: `{text[word.start : word.end]}` {risk} and its "
        f"value cannot be known from train.sh ({reason}); write its words out literally, "
        "or set it earlier with a plain assignment (NAME=value or NAME=(a b)) at top level"
    )


def crlf_error(text: str) -> TrainScriptError:
    line = line_of(text, text.index("\r"))
    return TrainScriptError(
        f"train.sh has Windows line endings (CRLF, first on line {line}): bash reads each \\r "
        "as part of the line's last word, so a final `\\` no longer continues the command and "
        f"the trainer would not get its flags; convert the file: {CRLF_FIX}"
    )


def orphan_error(text: str, script: Script, index: int) -> TrainScriptError:
    first = script.commands[index].words[0]
    line = line_of(text, first.start)
    previous = text.split("\n")[line - 2] if line > 1 else ""
    commented = any(line_of(text, at) == line - 1 for at in script.comments)
    if line == 1:
        reason = "no command comes before it"
    elif re.search(r"\\[ \t]+$", previous):
        reason = (
            f"line {line - 1} has blanks after its final `\\`, which then escapes a blank "
            "instead of continuing the line; delete the blanks after the `\\`"
        )
    elif commented:
        reason = (
            f"line {line - 1} is or ends in a comment, and a comment ends the command even "
            "among `\\` continuations; delete it or move it above the command"
        )
    else:
        reason = f"line {line - 1} does not end with ` \\`; add it"
    return TrainScriptError(
        f"line {line}: `{first.text}` starts a command of its own, so bash does not pass it "
        f"to the trainer command: {reason}"
    )
