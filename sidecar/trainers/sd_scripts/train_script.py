"""Reading and surgically editing the train.sh that FluxGym generates.

FluxGym writes one command, ``accelerate launch <accelerate flags>
sd-scripts/flux_train_network.py <trainer flags>``, one flag per line with
`` \\`` continuations, and users edit the file by hand. To resume a stalled run
the sidecar must add ``--resume "<state folder>"`` to the trainer's flags while
leaving every other byte alone: the user's edits, FluxGym's glued
``\\--sample_prompts=...`` and the dangling final backslash included.

So nothing here re-renders the script. A small lexer (``script_words``) splits
the text into words the way bash would (quotes, escapes, continuations, comments,
command separators) and remembers where each word starts and ends in the original
text; edits are then splices at those offsets. Expansions (``$VAR``, ``$(...)``)
are kept as literal word text: we never need their values, only their extent.

Everything here is pure text in, text out; writing the file is
``sidecar.atomic_files``' job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.trainers.sd_scripts.script_words import (
    BLANKS,
    TrainScriptError,
    Word,
    line_of,
    split_commands,
)

__all__ = [
    "TrainCommand",
    "TrainScriptError",
    "ensure_option",
    "parse_train_script",
    "quote_word",
    "remove_resume",
    "set_resume",
]

EXPECTED_COMMAND = "accelerate launch ... sd-scripts/flux_train_network.py ..."

_FLAG_PATTERN = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class TrainCommand:
    """The trainer command of a train.sh, as bash would pass it to ``accelerate``."""

    trainer_script: str
    launcher_args: tuple[str, ...]
    trainer_args: tuple[str, ...]

    def option(self, name: str) -> str | None:
        """Value of ``--name X`` or ``--name=X`` among the trainer's arguments (last one wins).

        ``name`` may be given with or without its leading ``--``. Returns None when
        the option is absent and "" when it is a bare flag (followed by another
        ``--flag`` or by nothing).
        """
        occurrences = _find_option(self.trainer_args, _flag_name(name))
        return occurrences[-1].value if occurrences else None

    def has_option(self, name: str) -> bool:
        """Whether ``--name`` appears among the trainer's arguments, with or without a value."""
        return bool(_find_option(self.trainer_args, _flag_name(name)))

    @property
    def resume(self) -> str | None:
        return self.option("resume")

    @property
    def output_dir(self) -> str | None:
        return self.option("output_dir")

    @property
    def output_name(self) -> str | None:
        return self.option("output_name")

    @property
    def save_state(self) -> bool:
        return self.has_option("save_state")


def parse_train_script(text: str) -> TrainCommand:
    """Find the trainer command in ``text`` and return its words as bash would see them."""
    return _locate(text).command


def set_resume(text: str, path: str) -> str:
    """Return ``text`` with exactly one ``--resume "<path>"`` among the trainer's arguments.

    An existing ``--resume`` (in any spelling) is replaced where it stands and any
    further ones are removed; otherwise the flag goes right after the ``*.py`` word,
    on a line of its own when the script has one flag per line. The text comes
    back unchanged when it already resumes from ``path``.
    """
    _check_resume_path(path)
    replacement = f"--resume {quote_word(path, what='checkpoint path')}"
    located = _locate(text)
    occurrences = located.resume_occurrences()
    if not occurrences:
        rewritten = _insert_trainer_argument(text, located.script_word, replacement)
    else:
        rewritten = text
        # Back to front, so that each splice leaves the earlier offsets valid.
        for extra in reversed(occurrences[1:]):
            rewritten = _remove_span(rewritten, extra)
        first = occurrences[0]
        if first.value != path:
            rewritten = rewritten[: first.start] + replacement + rewritten[first.end :]
        if rewritten == text:
            return text
    _verify_resume_edit(located.command, rewritten, expected_resume=path)
    return rewritten


def remove_resume(text: str) -> str:
    """Return ``text`` without any ``--resume`` (flag and value), to restart from scratch."""
    located = _locate(text)
    rewritten = text
    for occurrence in reversed(located.resume_occurrences()):
        rewritten = _remove_span(rewritten, occurrence)
    if rewritten != text:
        _verify_resume_edit(located.command, rewritten, expected_resume=None)
    return rewritten


def ensure_option(text: str, flag: str, value: str | None = None) -> str:
    """Add ``flag`` (with ``value``, if given) to the trainer's arguments unless already present.

    An option that is present is left alone even when its value differs: this
    only guarantees presence, e.g. ``ensure_option(text, "--save_state")``.
    """
    if not _FLAG_PATTERN.fullmatch(flag):
        raise TrainScriptError(f"option {flag!r} is not of the form --name")
    located = _locate(text)
    if located.command.has_option(flag):
        return text
    added = (flag,) if value is None else (flag, value)
    argument = flag if value is None else f"{flag} {quote_word(value)}"
    rewritten = _insert_trainer_argument(text, located.script_word, argument)
    if _locate(rewritten).command.trainer_args != added + located.command.trainer_args:
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


def _check_resume_path(path: str) -> None:
    if not path:
        raise TrainScriptError("checkpoint path is empty; refusing to write --resume without one")
    if path.startswith("-"):
        # argparse would read `--resume -x` as a missing value followed by an option.
        raise TrainScriptError(
            f"checkpoint path {path!r} starts with '-', which the trainer would read as an option"
        )


# ---------------------------------------------------------------------------
# Options among word texts (shared by TrainCommand and the editors)


@dataclass(frozen=True)
class _OptionAt:
    first: int  # index of the flag word
    last: int  # index of the value word, or of the flag word itself
    value: str


def _flag_name(name: str) -> str:
    return name if name.startswith("--") else f"--{name}"


def _find_option(words: Sequence[str], flag: str) -> list[_OptionAt]:
    """Every occurrence of ``flag`` as ``flag X``, ``flag=X`` or a bare ``flag``, in order."""
    found = []
    for index, word in enumerate(words):
        if word.startswith(flag + "="):
            found.append(_OptionAt(index, index, word[len(flag) + 1 :]))
        elif word == flag:
            following = words[index + 1] if index + 1 < len(words) else None
            if following is None or following.startswith("--"):
                found.append(_OptionAt(index, index, ""))
            else:
                found.append(_OptionAt(index, index + 1, following))
    return found


# ---------------------------------------------------------------------------
# Locating the trainer command


@dataclass(frozen=True)
class _ResumeAt:
    start: int  # offset of the flag word
    end: int  # offset past the value word (or the flag word when it has no value)
    value: str
    previous_end: int  # offset past the word before the flag (the *.py word at least)


@dataclass(frozen=True)
class _Located:
    words: tuple[Word, ...]
    script_index: int

    @property
    def script_word(self) -> Word:
        return self.words[self.script_index]

    @property
    def trainer_words(self) -> tuple[Word, ...]:
        return self.words[self.script_index + 1 :]

    @property
    def command(self) -> TrainCommand:
        return TrainCommand(
            trainer_script=self.script_word.text,
            launcher_args=tuple(word.text for word in self.words[: self.script_index]),
            trainer_args=tuple(word.text for word in self.trainer_words),
        )

    def resume_occurrences(self) -> list[_ResumeAt]:
        # Index 0 is the *.py word, so trainer argument k is words[k + 1].
        words = self.words[self.script_index :]
        return [
            _ResumeAt(
                start=words[found.first + 1].start,
                end=words[found.last + 1].end,
                value=found.value,
                previous_end=words[found.first].end,
            )
            for found in _find_option([word.text for word in words[1:]], "--resume")
        ]


def _locate(text: str) -> _Located:
    candidates: list[_Located] = []
    for words in split_commands(text):
        script_index = next(
            (index for index, word in enumerate(words) if word.text.endswith(".py")), None
        )
        if script_index is not None:
            candidates.append(_Located(tuple(words), script_index))
    if not candidates:
        hint = " (the file has Windows line endings; bash needs \\n)" if "\r\n" in text else ""
        raise TrainScriptError(
            f"no trainer command found in train.sh: expected a command like "
            f"`{EXPECTED_COMMAND}` with a *.py script{hint}"
        )
    if len(candidates) > 1:
        where = ", ".join(
            f"line {line_of(text, found.script_word.start)} ({found.script_word.text})"
            for found in candidates
        )
        raise TrainScriptError(
            f"ambiguous train.sh: more than one command runs a *.py script: {where}; "
            f"expected exactly one `{EXPECTED_COMMAND}`"
        )
    return candidates[0]


# ---------------------------------------------------------------------------
# Splicing


def _insert_trainer_argument(text: str, script_word: Word, argument: str) -> str:
    """Insert ``argument`` as the first trainer argument, right after the ``*.py`` word."""
    probe = script_word.end
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
    return f"{text[: script_word.end]} {argument}{text[script_word.end :]}"


def _remove_span(text: str, option: _ResumeAt) -> str:
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


def _verify_resume_edit(
    before: TrainCommand, rewritten: str, *, expected_resume: str | None
) -> None:
    # A wrong train.sh costs a whole training run, so every edit is checked by
    # parsing the result again: only --resume may have changed.
    after = _locate(rewritten).command
    resumes = [found.value for found in _find_option(after.trainer_args, "--resume")]
    expected = [] if expected_resume is None else [expected_resume]
    unchanged = (
        after.launcher_args == before.launcher_args
        and after.trainer_script == before.trainer_script
        and _without_resume(after.trainer_args) == _without_resume(before.trainer_args)
    )
    if resumes != expected or not unchanged:
        raise TrainScriptError(
            "internal error: editing train.sh would change more than its --resume; "
            "refusing to write it"
        )


def _without_resume(arguments: tuple[str, ...]) -> tuple[str, ...]:
    dropped: set[int] = set()
    for found in _find_option(arguments, "--resume"):
        dropped.update(range(found.first, found.last + 1))
    return tuple(word for index, word in enumerate(arguments) if index not in dropped)
