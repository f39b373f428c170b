"""Finding the command in train.sh that bash will run as the trainer, and only that one.

A command counts only when bash will run it as the trainer: a launcher first
(``accelerate``, ``torchrun``, ``python``, ``python3`` or a path to one, possibly after
``exec``, ``env`` or ``FOO=1`` assignments), then a ``*.py`` script, or a module after
``-m`` / a console-script entry point such as ``axolotl train`` (``entry_points``). Every
word is read as bash reads it, variables included (``script_values``); a word whose value
cannot be known is refused when the sidecar depends on it or when it could hide an option.
Shapes that look like a trainer command but are not one to bash (CRLF line endings, a BOM,
a command cut short by a comment or a blank after ``\\``) are named with their fix
instead of being edited (``script_faults``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sidecar.trainers.shell import entry_points
from sidecar.trainers.shell.script_faults import (
    BOM_FIX,
    check_command_bytes,
    crlf_error,
    orphan_error,
    refuse_binary,
    unknown_word,
)
from sidecar.trainers.shell.script_values import Variables, expand_word, is_assignment
from sidecar.trainers.shell.script_words import (
    Command,
    Script,
    TrainScriptError,
    Word,
    line_of,
    split_commands,
)

__all__ = ["EXPECTED_COMMAND", "Arg", "Located", "TrainCommand", "find_option", "locate"]

EXPECTED_COMMAND = "accelerate launch ... sd-scripts/flux_train_network.py ..."
# Every trainer's: a launcher and a *.py script, a module, or an entry point.
OTHER_SHAPES = (
    "or any `accelerate launch|torchrun|deepspeed|python ... <trainer>.py ...`, "
    "`python -m <module> ...` or entry point such as `axolotl train <config>`"
)
_LAUNCHER = re.compile(r"(?:.*/)?(?:accelerate|torchrun|deepspeed|python|python3(?:\.[0-9]+)?)")
# Words whose value the sidecar acts on: a guess here resumes from the wrong state.
_DEPENDED_ON = ("--resume", "--output_name")


@dataclass(frozen=True)
class TrainCommand:
    """The trainer command of a train.sh, as bash would pass it to ``accelerate``."""

    trainer_script: str
    launcher_args: tuple[str, ...]
    trainer_args: tuple[str, ...]
    # (flag, why) for options whose value holds an expansion train.sh does not resolve.
    unknown_values: tuple[tuple[str, str], ...] = ()
    # The words ``trainer_script`` stands for where it is more than one: a console-script
    # entry point and its subcommand (``("axolotl", "train")``, see ``entry_points``).
    script_words: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """The whole command: launcher and its arguments, the script, the trainer's arguments."""
        script = self.script_words or (self.trainer_script,)
        return (*self.launcher_args, *script, *self.trainer_args)

    def option(self, name: str) -> str | None:
        """Value of ``--name X`` or ``--name=X`` among the trainer's arguments (last one wins).

        ``name`` may be given with or without its leading ``--``. Returns None when
        the option is absent and "" when it is a bare flag (followed by another
        ``--flag`` or by nothing).
        """
        occurrences = find_option(self.trainer_args, flag_name(name))
        return occurrences[-1].value if occurrences else None

    def has_option(self, name: str) -> bool:
        """Whether ``--name`` appears among the trainer's arguments, with or without a value."""
        return bool(find_option(self.trainer_args, flag_name(name)))

    def unresolved(self, name: str) -> str | None:
        """Why the value of ``--name`` cannot be known from train.sh alone; None when it can."""
        flag = flag_name(name)
        return next((why for known, why in self.unknown_values if known == flag), None)

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


@dataclass(frozen=True)
class OptionAt:
    first: int  # index of the flag word
    last: int  # index of the value word, or of the flag word itself
    value: str


def flag_name(name: str) -> str:
    return name if name.startswith("--") else f"--{name}"


def find_option(words: Sequence[str], flag: str) -> list[OptionAt]:
    """Every occurrence of ``flag`` as ``flag X``, ``flag=X`` or a bare ``flag``, in order."""
    found = []
    for index, word in enumerate(words):
        if word.startswith(flag + "="):
            found.append(OptionAt(index, index, word[len(flag) + 1 :]))
        elif word == flag:
            following = words[index + 1] if index + 1 < len(words) else None
            if following is None or following.startswith("--"):
                found.append(OptionAt(index, index, ""))
            else:
                found.append(OptionAt(index, index + 1, following))
    return found


@dataclass(frozen=True)
class Arg:
    """One argument bash passes: ``word`` made it, alone (``single``) or with others."""

    text: str
    word: Word
    single: bool
    known: bool = True  # False: ``text`` is the source of an expansion train.sh does not set


@dataclass(frozen=True)
class Located:
    text: str
    source: Command
    head: tuple[Arg, ...]  # the launcher and its own flags
    script: Arg
    args: tuple[Arg, ...]  # the trainer's arguments
    variables: Variables
    script_words: tuple[str, ...] = ()  # an entry point's words (``script`` is the last)

    @property
    def command(self) -> TrainCommand:
        texts = tuple(arg.text for arg in self.args)
        unknown = tuple(
            (flag, self.why_unknown(found.last))
            for flag in ("--output_dir",)
            for found in find_option(texts, flag)
            if not self.args[found.last].known
        )
        return TrainCommand(
            trainer_script=self.script.text,
            launcher_args=tuple(arg.text for arg in self.head),
            trainer_args=texts,
            unknown_values=unknown,
            script_words=self.script_words,
        )

    def why_unknown(self, index: int) -> str:
        arg = self.args[index]
        return (
            f"line {line_of(self.text, arg.word.start)}: "
            f"`{self.text[arg.word.start : arg.word.end]}` "
            f"({expand_word(arg.word, self.variables).reason})"
        )


# What one command is: the trainer command, a launcher command that cannot be read, a flag
# or script line cut off from its command ("orphan"), or something else (None).
_Found = Located | TrainScriptError | Literal["orphan"] | None


def locate(text: str) -> Located:
    """The one command bash runs as the trainer; TrainScriptError naming the line otherwise."""
    refuse_binary(text)
    script = split_commands(text)
    variables = Variables(text)
    found: list[tuple[int, Located | TrainScriptError]] = []
    orphans: list[int] = []
    for index, command in enumerate(script.commands):
        result = _classify(text, command, variables)
        if isinstance(result, (Located, TrainScriptError)):
            found.append((index, result))
        elif result == "orphan":
            orphans.append(index)
        variables.feed(command)
    if len(found) == 1 and isinstance(found[0][1], Located):
        located = found[0][1]
        _check_located(located, script, orphans, found[0][0])
        return located
    if len(found) > 1:
        raise _ambiguous(text, script, found)
    if "\r" in text:
        raise crlf_error(text)
    if found:
        assert isinstance(found[0][1], TrainScriptError)
        raise found[0][1]
    if orphans:
        raise orphan_error(text, script, orphans[0])
    raise TrainScriptError(
        "no trainer command found in the launch script: expected one command like "
        f"`{EXPECTED_COMMAND}` with a *.py script ({OTHER_SHAPES})"
    )


def _classify(text: str, command: Command, variables: Variables) -> _Found:
    """A Located trainer command, a TrainScriptError for one that cannot be read,
    "orphan" for a flag or script line cut off from its command, or None."""
    words = command.words
    at = 0
    while at < len(words) and is_assignment(words[at], text):
        at += 1
    if at < len(words) and words[at].text == "exec" and words[at].literal:
        at += 1
    if at < len(words) and words[at].text == "env" and words[at].literal:
        at += 1
        while at < len(words) and "=" in words[at].text and not words[at].text.startswith("-"):
            at += 1
    if at == len(words):
        return None  # assignments only: `SCRIPT=sd-scripts/flux_train_network.py`
    launcher = words[at].text
    line = line_of(text, words[at].start)
    if launcher.startswith("\ufeff") and _LAUNCHER.fullmatch(launcher[1:]):
        return TrainScriptError(
            f"line {line}: train.sh starts with a byte order mark (BOM, from a Windows "
            f"editor), which bash reads as part of `{launcher[1:]}`, so the trainer never "
            f"starts; remove it: {BOM_FIX}"
        )
    if launcher.startswith("-") and at and words[at - 1].text in ("exec", "env"):
        return TrainScriptError(
            f"line {line}: `{words[at - 1].text} {launcher}`: options of {words[at - 1].text} "
            "are not understood here; start the command with `FOO=1 accelerate launch ...`"
        )
    if entry_points.entry_point_subcommands(launcher):
        return _read_entry_point(text, command, at, variables)
    if not _LAUNCHER.fullmatch(launcher):
        return "orphan" if launcher.startswith("-") or launcher.endswith(".py") else None
    return _read_launch(text, command, at, variables)


def _read_launch(
    text: str, command: Command, at: int, variables: Variables
) -> Located | TrainScriptError | None:
    head: list[Arg] = []
    doubt: TrainScriptError | None = None
    words = command.words
    for position in range(at, len(words)):
        word = words[position]
        expanded = expand_word(word, variables)
        if expanded.fields is None:
            if doubt is None and _could_hide(word, head[-1].text if head else None):
                doubt = unknown_word(text, word, expanded.reason, "could be the trainer script")
            head.append(Arg(word.text, word, single=True, known=False))
            continue
        fields = expanded.fields
        previous = head[-1].text if head else None
        role = entry_points.module_role(previous, fields[0]) if fields else None
        if role == "tool":
            return None  # `python -m pip install ...`: not the trainer
        script_at = next((i for i, field in enumerate(fields) if field.endswith(".py")), None)
        if role == "trainer" and len(fields) == 1 and position > at:
            script_at = 0  # `-m pkg.train`: the module is the trainer script
        if script_at is None or position == at or role == "launcher":
            head.extend(Arg(field, word, single=len(fields) == 1) for field in fields)
            continue
        if len(fields) != 1:
            return TrainScriptError(
                f"line {line_of(text, word.start)}: `{text[word.start : word.end]}` gives the "
                "trainer script together with other words; name the *.py script on its own"
            )
        script = Arg(fields[0], word, single=True)
        args = _read_trainer_args(text, words[position + 1 :], variables)
        if isinstance(args, TrainScriptError):
            return args
        return Located(text, command, tuple(head), script, args, variables)
    return doubt


def _read_entry_point(
    text: str, command: Command, at: int, variables: Variables
) -> Located | TrainScriptError | None:
    """``axolotl train cfg.yml ...``: the entry point and its training subcommand, then the
    trainer's arguments; another subcommand is no trainer command."""
    words = command.words
    program = words[at].text
    if at + 1 == len(words) or not words[at + 1].literal:
        return None
    subcommand = words[at + 1].text
    if subcommand not in entry_points.entry_point_subcommands(program):
        return None
    script = Arg(f"{program} {subcommand}", words[at + 1], single=True)
    args = _read_trainer_args(text, words[at + 2 :], variables)
    if isinstance(args, TrainScriptError):
        return args
    return Located(text, command, (), script, args, variables, (program, subcommand))


def _read_trainer_args(
    text: str, words: Sequence[Word], variables: Variables
) -> tuple[Arg, ...] | TrainScriptError:
    args: list[Arg] = []
    for word in words:
        expanded = expand_word(word, variables)
        if expanded.fields is not None:
            fields = expanded.fields
            args.extend(Arg(field, word, single=len(fields) == 1) for field in fields)
            continue
        if _could_hide(word, args[-1].text if args else None):
            return unknown_word(text, word, expanded.reason, "could hide a --resume")
        args.append(Arg(word.text, word, single=True, known=False))
    return tuple(args)


def _could_hide(word: Word, previous: str | None) -> bool:
    """Whether an unknown ``word`` could turn into options (``--resume`` among them)."""
    computed = [seg for seg in word.segments if seg.kind not in ("text", "tilde")]
    if any(seg.kind == "all" or not seg.quoted for seg in computed):
        return True  # split into words, or one word per array element
    prefix = ""
    for seg in word.segments:
        if seg.kind != "text":
            break
        prefix += seg.text
    if prefix and not prefix.startswith("-"):
        return False  # `"b=$(echo 2)"`: whatever the expansion gives, no option starts so
    # A quoted value right after `--flag` is that flag's value to argparse.
    return not (previous is not None and previous.startswith("--") and "=" not in previous)


def _check_located(located: Located, script: Script, orphans: list[int], index: int) -> None:
    text = located.text
    words = located.source.words
    check_command_bytes(text, words[0].start, words[-1].end)
    if index + 1 in orphans:
        raise orphan_error(text, script, index + 1)
    texts = [arg.text for arg in located.args]
    for flag in _DEPENDED_ON:
        for found in find_option(texts, flag):
            if not located.args[found.last].known:
                raise TrainScriptError(
                    f"{located.why_unknown(found.last)}: the sidecar needs the value of {flag}; "
                    "write it literally or set it earlier with a plain assignment (NAME=value)"
                )


def _ambiguous(
    text: str, script: Script, found: list[tuple[int, Located | TrainScriptError]]
) -> TrainScriptError:
    where = []
    for index, result in found:
        if isinstance(result, Located):
            word = result.script.word
            where.append(f"line {line_of(text, word.start)} ({result.script.text})")
        else:
            first = script.commands[index].words[0]
            where.append(f"line {line_of(text, first.start)} (a launcher command not understood)")
    return TrainScriptError(
        f"ambiguous train.sh: more than one command runs a *.py script: {', '.join(where)}; "
        f"expected exactly one command like `{EXPECTED_COMMAND}`"
    )
