"""Reading and surgically editing the train.sh that FluxGym generates.

FluxGym writes one command, ``accelerate launch <accelerate flags>
sd-scripts/flux_train_network.py <trainer flags>``, one flag per line with
`` \\`` continuations, and users edit the file by hand. To resume a stalled run
the sidecar must add ``--resume "<state folder>"`` to the trainer's flags while
leaving every other byte alone: the user's edits, FluxGym's glued
``\\--sample_prompts=...`` and the dangling final backslash included.

So nothing here re-renders the script. A small lexer (``script_words``) splits
the text into words the way bash would and remembers where each word starts and
ends in the original text; ``trainer_command`` finds the one command bash runs as
the trainer, with variables resolved where train.sh itself sets them. Edits are
splices at word offsets, and every edit is checked by reading the result again.
An option that only exists inside a variable (``EXTRA=(--resume /old)``) is not
edited there: the error names the lines, so the user can move it.

Everything here is pure text in, text out; writing the file is
``sidecar.atomic_files``' job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.trainers.shell.script_words import BLANKS, TrainScriptError, line_of
from sidecar.trainers.shell.trainer_command import (
    EXPECTED_COMMAND,
    Arg,
    Located,
    TrainCommand,
    find_option,
    locate,
)

__all__ = [
    "EXPECTED_COMMAND",
    "TrainCommand",
    "TrainScriptError",
    "ensure_option",
    "parse_train_script",
    "quote_word",
    "remove_option",
    "remove_resume",
    "set_option",
    "set_resume",
]

_FLAG_PATTERN = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")


def parse_train_script(text: str) -> TrainCommand:
    """Find the trainer command in ``text`` and return its words as bash would see them."""
    return locate(text).command


def set_resume(text: str, path: str) -> str:
    """Return ``text`` with exactly one ``--resume "<path>"`` among the trainer's arguments.

    An existing ``--resume`` (in any spelling) is replaced where it stands and any
    further ones are removed; otherwise the flag goes right after the ``*.py`` word,
    on a line of its own when the script has one flag per line. The text comes
    back unchanged when it already resumes from ``path``.
    """
    _check_resume_path(path)
    return _set(text, "--resume", path, what="checkpoint path")


def remove_resume(text: str) -> str:
    """Return ``text`` without any ``--resume`` (flag and value), to restart from scratch."""
    return remove_option(text, "--resume")


def set_option(text: str, flag: str, value: str | None) -> str:
    """Return ``text`` with exactly one ``flag`` among the trainer's arguments.

    ``flag value`` when ``value`` is given, a bare ``flag`` when it is None. Existing
    occurrences are replaced where they stand (the first) and removed (the others), as
    :func:`set_resume` does; otherwise the option goes right after the ``*.py`` word.
    """
    _check_flag(flag)
    if value is not None and value.startswith("--"):
        raise TrainScriptError(f"value {value!r} for {flag} would be read as an option")
    return _set(text, flag, value, what=f"value of {flag}")


def remove_option(text: str, flag: str) -> str:
    """Return ``text`` without any ``flag`` among the trainer's arguments, values included.

    A flag followed by another ``--flag`` or by nothing is bare and has no value to take.
    """
    _check_flag(flag)
    located = locate(text)
    rewritten = text
    for span in reversed(option_spans(located, flag)):
        rewritten = remove_span(rewritten, span)
    if rewritten != text:
        _verify_edit(located.command, rewritten, flag, expected=[])
    return rewritten


def ensure_option(text: str, flag: str, value: str | None = None) -> str:
    """Add ``flag`` (with ``value``, if given) to the trainer's arguments unless already present.

    An option that is present is left alone even when its value differs: this
    only guarantees presence, e.g. ``ensure_option(text, "--save_state")``.
    """
    _check_flag(flag)
    located = locate(text)
    if located.command.has_option(flag):
        return text
    added = (flag,) if value is None else (flag, value)
    argument = flag if value is None else f"{flag} {quote_word(value)}"
    rewritten = insert_trainer_argument(text, located.script.word.end, argument)
    if locate(rewritten).command.trainer_args != added + located.command.trainer_args:
        raise TrainScriptError(f"internal error: could not add {flag} to train.sh cleanly")
    return rewritten


def quote_word(value: str, *, what: str = "value") -> str:
    """Quote ``value`` for bash the way FluxGym quotes paths: in double quotes.

    Inside double quotes only ``\\``, ``"``, ``$`` and backquote are special, so
    escaping those four makes every other character arrive literally. A newline
    or NUL is refused: neither can be a sane path, and a newline would let a value
    start a new command. ``what`` names the value in that error.
    """
    if "\n" in value:
        raise TrainScriptError(f"{what} contains a newline; refusing to write it into train.sh")
    if "\0" in value:
        raise TrainScriptError(f"{what} contains a NUL byte; refusing to write it into train.sh")
    escaped = re.sub(r'([\\"$`])', r"\\\1", value)
    return f'"{escaped}"'


def _check_flag(flag: str) -> None:
    if not _FLAG_PATTERN.fullmatch(flag):
        raise TrainScriptError(f"option {flag!r} is not of the form --name")


def _check_resume_path(path: str) -> None:
    if not path:
        raise TrainScriptError("checkpoint path is empty; refusing to write --resume without one")
    if path.startswith("-"):
        # argparse would read `--resume -x` as a missing value followed by an option.
        raise TrainScriptError(
            f"checkpoint path {path!r} starts with '-', which the trainer would read as an option"
        )


def _set(text: str, flag: str, value: str | None, *, what: str) -> str:
    replacement = flag if value is None else f"{flag} {quote_word(value, what=what)}"
    located = locate(text)
    occurrences = option_spans(located, flag)
    if not occurrences:
        rewritten = insert_trainer_argument(text, located.script.word.end, replacement)
    else:
        rewritten = text
        # Back to front, so that each splice leaves the earlier offsets valid.
        for extra in reversed(occurrences[1:]):
            rewritten = remove_span(rewritten, extra)
        first = occurrences[0]
        if not first.matches(value):
            rewritten = rewritten[: first.start] + replacement + rewritten[first.end :]
        if rewritten == text:
            return text
    _verify_edit(located.command, rewritten, flag, expected=["" if value is None else value])
    return rewritten


# ---------------------------------------------------------------------------
# Where an option is in the text


@dataclass(frozen=True)
class OptionSpan:
    start: int  # offset of the flag word
    end: int  # offset past the value word (or the flag word when it has no value)
    value: str
    bare: bool
    previous_end: int  # offset past the word before the flag (the *.py word at least)

    def matches(self, value: str | None) -> bool:
        return self.bare if value is None else (not self.bare and self.value == value)


def option_spans(located: Located, flag: str) -> list[OptionSpan]:
    """Each ``flag`` among the trainer's arguments as a span of text that can be cut.

    An occurrence that comes out of an expansion (``"${EXTRA[@]}"``, ``$ARGS``) has no
    text of its own in the command: it is refused, naming the lines to change.
    """
    args = (located.script, *located.args)
    spans = []
    for found in find_option([arg.text for arg in located.args], flag):
        first, last = args[found.first + 1], args[found.last + 1]
        for arg in (first, last):
            if not arg.single or (not arg.word.literal and arg.word is not last.word):
                raise _inside_expansion(located, arg, flag)
        spans.append(
            OptionSpan(
                start=first.word.start,
                end=last.word.end,
                value=found.value,
                bare=found.first == found.last and found.value == "" and first.text == flag,
                previous_end=args[found.first].word.end,
            )
        )
    return spans


def _inside_expansion(located: Located, arg: Arg, flag: str) -> TrainScriptError:
    source = located.text[arg.word.start : arg.word.end]
    names = sorted({seg.name for seg in arg.word.segments if seg.name})
    where = ", ".join(f"{name}{located.variables.where(name)}" for name in names)
    return TrainScriptError(
        f"line {line_of(located.text, arg.word.start)}: {flag} comes from `{source}` "
        f"({where or 'an expansion'}), where the sidecar cannot edit it; move {flag} and its "
        "value out of the variable onto the trainer command in train.sh"
    )


# ---------------------------------------------------------------------------
# Splicing


def insert_trainer_argument(text: str, script_end: int, argument: str) -> str:
    """Insert ``argument`` as the first trainer argument, right after the ``*.py`` word."""
    probe = script_end
    while probe < len(text) and text[probe] in BLANKS:
        probe += 1
    if text.startswith("\\\n", probe):
        # One flag per line (FluxGym): add a line of our own, indented like the next one.
        line_start = probe + 2
        indent_end = line_start
        while indent_end < len(text) and text[indent_end] in BLANKS:
            indent_end += 1
        indent = text[line_start:indent_end]
        return f"{text[:line_start]}{indent}{argument} \\\n{text[line_start:]}"
    return f"{text[:script_end]} {argument}{text[script_end:]}"


def remove_span(text: str, option: OptionSpan) -> str:
    """Cut one option with the blanks that separated it from its neighbours.

    When the option was alone on a continuation line, the whole line goes, so a
    set_resume followed by remove_resume gives back the original bytes. A line
    left blank without a continuation is kept: removing it would join the next
    command onto this one.
    """
    line_start = text.rfind("\n", 0, option.start) + 1
    # Never walk back into the previous word: its last character may be an
    # escaped blank (`foo\ `).
    floor = max(line_start, option.previous_end)
    before = option.start
    while before > floor and text[before - 1] in BLANKS:
        before -= 1
    if before > line_start:
        return text[:before] + text[option.end :]
    after = option.end
    while after < len(text) and text[after] in BLANKS:
        after += 1
    text = text[: option.start] + text[after:]
    line_end = text.find("\n", line_start)
    if line_end < 0 and line_start > 0 and text[line_start:].strip(BLANKS) == "\\":
        # The last line, without a newline: take the newline before it instead,
        # so a dangling final backslash stays dangling as FluxGym wrote it.
        return text[: line_start - 1]
    if line_end >= 0 and text[line_start:line_end].strip(BLANKS) == "\\":
        return text[:line_start] + text[line_end + 1 :]
    return text


def _verify_edit(before: TrainCommand, rewritten: str, flag: str, *, expected: list[str]) -> None:
    # A wrong train.sh costs a whole training run, so every edit is checked by
    # parsing the result again: only ``flag`` may have changed.
    after = locate(rewritten).command
    values = [found.value for found in find_option(after.trainer_args, flag)]
    unchanged = (
        after.launcher_args == before.launcher_args
        and after.trainer_script == before.trainer_script
        and _without(after.trainer_args, flag) == _without(before.trainer_args, flag)
    )
    if values != expected or not unchanged:
        raise TrainScriptError(
            f"internal error: editing train.sh would change more than its {flag}; "
            "refusing to write it"
        )


def _without(arguments: tuple[str, ...], flag: str) -> tuple[str, ...]:
    dropped: set[int] = set()
    for found in find_option(arguments, flag):
        dropped.update(range(found.first, found.last + 1))
    return tuple(word for index, word in enumerate(arguments) if index not in dropped)
