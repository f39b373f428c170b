"""What bash would make of the words of train.sh's trainer command, when that can be known.

Users edit train.sh with variables: ``OUT=/data/run`` then ``--output_dir "$OUT"``, or
``EXTRA=(--resume /old)`` then ``"${EXTRA[@]}"``. The sidecar depends on some of those
words (the output folder, the output name, a stale --resume), so it resolves what can be
known from the script alone: plain literal assignments made earlier at top level. A
variable set in any other way (from a command, inside an ``if`` or a function, after
``&&``, by ``read`` or ``source``) is marked unknowable, so nothing is ever guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.trainers.shell.script_words import Command, Word, line_of

__all__ = ["Expanded", "Variables", "expand_word", "is_assignment"]

_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IFS_BLANKS = " \t\n"
_GLOB = re.compile(r"[*?\[]")
# `function f {` opens with its `{`; `[[ ... ]]` is one command, not a block.
_OPENERS = {"if", "while", "until", "for", "select", "case", "{"}
_CLOSERS = {"fi", "done", "esac", "}"}
_DECLARERS = {"export", "readonly", "declare", "typeset"}
_READERS = {"read", "mapfile", "readarray", "unset", "local", "getopts"}
_EVERYTHING = {"source", ".", "eval"}


@dataclass(frozen=True)
class _Binding:
    line: int
    value: str | tuple[str, ...] | None  # None: set in a way the sidecar cannot follow
    why: str = ""


@dataclass(frozen=True)
class Expanded:
    fields: tuple[str, ...] | None  # the words bash makes of it; None when unknowable
    reason: str = ""  # why it is unknowable
    names: tuple[str, ...] = ()  # the variables it reads


def is_assignment(word: Word, text: str) -> bool:
    return bool(_ASSIGNMENT.match(text, word.start)) and word.segments[0].kind == "text"


class Variables:
    """The shell variables as train.sh has set them so far, fed one command at a time."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.bindings: dict[str, _Binding] = {}
        self.everything: _Binding | None = None  # a `source` or `eval` may have set anything
        self.block_depth = 0

    def lookup(self, name: str) -> _Binding | None:
        return self.everything or self.bindings.get(name)

    def where(self, name: str) -> str:
        binding = self.lookup(name)
        return f", set on line {binding.line}" if binding else ""

    def feed(self, command: Command) -> None:
        """Record what ``command`` does to variables; call it for every command in order."""
        words = command.words
        head = words[0].text if words[0].literal else ""
        line = line_of(self.text, words[0].start)
        plain = (
            self.block_depth == 0
            and command.depth == 0
            and command.before in ("", "\n", ";", ")")
            and command.after in ("", "\n", ";")
        )
        if head in _CLOSERS:
            self.block_depth = max(self.block_depth - 1, 0)
        elif head in _OPENERS:
            self.block_depth += 1
        if head in _EVERYTHING:
            self.everything = _Binding(line, None, f"line {line} runs `{head}`")
            return
        if all(is_assignment(word, self.text) for word in words):
            self._assign(words, line, plain=plain)
        elif head in _DECLARERS:
            plain = plain and not any(word.text.startswith("-") for word in words[1:])
            self._assign(
                tuple(w for w in words[1:] if is_assignment(w, self.text)), line, plain=plain
            )
        else:
            # `then OUT=/x`, `FOO=1 cmd`: nothing the sidecar can follow, so never a value.
            for word in words:
                if is_assignment(word, self.text):
                    name = word.text.split("=", 1)[0].rstrip("+")
                    self._unknowable(name, line, f"it is set on line {line} as part of a command")
            if head in _READERS or head in ("for", "select", "printf"):
                for word in words[1:]:
                    if _IDENTIFIER.fullmatch(word.text):
                        self._unknowable(word.text, line, f"`{head}` sets it on line {line}")

    def _assign(self, words: tuple[Word, ...], line: int, *, plain: bool) -> None:
        for word in words:
            match = _ASSIGNMENT.match(self.text, word.start)
            assert match is not None
            name = match.group(1)
            value = _literal_value(word, self.text, len(match.group()))
            if not plain:
                self._unknowable(
                    name, line, f"it is set on line {line} inside a block or a condition"
                )
            elif match.group(2) or value is None:
                self._unknowable(name, line, f"line {line} sets it to something bash computes")
            else:
                self.bindings[name] = _Binding(line, value)

    def _unknowable(self, name: str, line: int, why: str) -> None:
        self.bindings[name] = _Binding(line, None, why)


def _literal_value(word: Word, text: str, head: int) -> str | tuple[str, ...] | None:
    """The value of ``NAME=value`` / ``NAME=(a b)`` when it is plain text, else None."""
    if word.elements is not None:
        if any(not element.literal or _globs(element) for element in word.elements):
            return None
        return tuple(element.text for element in word.elements)
    if not word.literal or text.startswith("~", word.start + head):
        return None  # bash expands a leading ~ of an assignment's value
    return word.text[head:]


def _globs(word: Word) -> bool:
    return any(not seg.quoted and _GLOB.search(seg.text) for seg in word.segments)


def expand_word(word: Word, variables: Variables) -> Expanded:
    """The fields bash makes of ``word``: parameters substituted, unquoted ones split."""
    if word.literal:
        return Expanded((word.text,))
    fields: list[str] = []
    current: str | None = None
    names: list[str] = []
    for seg in word.segments:
        if seg.kind == "text":
            current = (current or "") + seg.text
            continue
        if seg.kind not in ("param", "all"):
            return Expanded(None, f"bash computes `{seg.text}` only when it runs")
        names.append(seg.name)
        binding = variables.lookup(seg.name)
        if seg.name in ("@", "*"):
            return Expanded(None, "the script's own arguments are not known", tuple(names))
        if binding is None:
            return Expanded(None, f"{seg.name} is not set earlier in train.sh", tuple(names))
        if binding.value is None:
            return Expanded(None, f"{seg.name} cannot be known: {binding.why}", tuple(names))
        values = _values(binding.value, every=seg.kind == "all")
        if seg.quoted and seg.kind == "all" and "[*]" not in seg.text:
            if any(
                other is not seg and (other.kind != "text" or other.text) for other in word.segments
            ):
                return Expanded(None, f"`{seg.text}` is glued to other text", tuple(names))
            return Expanded(values, names=tuple(names))
        if seg.quoted:
            current = (current or "") + " ".join(values)
            continue
        if variables.lookup("IFS") is not None:
            return Expanded(None, "train.sh changes IFS", tuple(names))
        for index, value in enumerate(values):
            if _GLOB.search(value):
                return Expanded(None, f"{seg.name} holds a glob pattern", tuple(names))
            if index and current is not None:  # each element of an array is a field of its own
                fields.append(current)
                current = None
            current = _split_into(fields, current, value)
    if current is not None:
        fields.append(current)
    return Expanded(tuple(fields), names=tuple(names))


def _values(value: str | tuple[str, ...], *, every: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    # `$ARR` is its first element; `${ARR[@]}` all of them.
    return value if every else value[:1]


def _split_into(fields: list[str], current: str | None, value: str) -> str | None:
    """Word splitting of one unquoted value with the default IFS; returns the open field."""
    # bash splits on IFS (space, tab, newline) only: str.split() would also split on
    # Unicode spaces such as U+00A0, which bash keeps inside a word.
    pieces = [piece for piece in re.split(f"[{_IFS_BLANKS}]+", value) if piece]
    if not pieces:
        if current is not None and value:
            fields.append(current)
            return None
        return current
    if value[0] in _IFS_BLANKS and current is not None:
        fields.append(current)
        current = None
    for index, piece in enumerate(pieces):
        if index:
            assert current is not None
            fields.append(current)
            current = None
        current = (current or "") + piece
    if value[-1] in _IFS_BLANKS:
        assert current is not None
        fields.append(current)
        current = None
    return current
