"""Splitting a shell script into words the way bash does, remembering where each word is.

train.sh is edited by splicing at word offsets instead of re-rendering it (see
``train_script``), so this reader must agree with bash on where every word starts and
ends: quotes, escapes, ``\\`` continuations, comments, command separators, redirections
and array assignments. A word also keeps its pieces (``Segment``): literal text, quoted
or not, and expansions (``$VAR``, ``"${ARR[@]}"``, ``$(...)``). The word's ``text`` keeps
an expansion's source text; whether it can be resolved is ``script_values``' question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.trainers.base import LaunchScriptError

__all__ = [
    "BLANKS",
    "Command",
    "Script",
    "Segment",
    "TrainScriptError",
    "Word",
    "line_of",
    "split_commands",
]

BLANKS = " \t"
# Characters that end an unquoted word. `(` and `)` only matter to us as
# delimiters (subshells, function definitions), never as part of a word.
_WORD_DELIMITERS = " \t\n;&|()<>"
_DIGITS = re.compile(r"[0-9]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT_HEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\+?=")
_BRACED_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BRACED_ALL = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\[[@*]\]\}")


class TrainScriptError(LaunchScriptError):
    """train.sh cannot be understood; the message says what was expected and where (line number)."""


@dataclass(frozen=True)
class Segment:
    """One piece of a word: ``kind`` is "text", "param" ($NAME), "all" (${NAME[@]}, $@),
    "tilde" (a leading unquoted ~) or "other" (anything bash computes: $(...), $1, ...)."""

    kind: str
    text: str  # the literal text, or the expansion's source text
    quoted: bool
    name: str = ""  # the parameter of "param" and "all"


@dataclass(frozen=True)
class Word:
    text: str  # the word as bash passes it on, quotes and escapes removed (expansions as source)
    start: int  # offset of its first character in the script
    end: int  # offset just past its last character, trailing continuations excluded
    segments: tuple[Segment, ...] = ()
    elements: tuple[Word, ...] | None = None  # the words of `NAME=(...)`

    @property
    def literal(self) -> bool:
        """Whether bash passes ``text`` as it is: no expansion anywhere in the word."""
        return self.elements is None and all(seg.kind == "text" for seg in self.segments)


@dataclass(frozen=True)
class Command:
    """A simple command with the separators around it (start of file and EOF are "")."""

    words: tuple[Word, ...]
    before: str  # the operator before it: "", "\n", ";", "&", "|", "(" or ")"
    after: str  # the operator that ended it, same alphabet
    depth: int  # subshell parentheses open around it


@dataclass(frozen=True)
class Script:
    commands: tuple[Command, ...]
    comments: tuple[int, ...] = ()  # offsets of the `#` of each comment


def split_commands(text: str) -> Script:
    """The simple commands of ``text``, each as its words with their offsets in ``text``.

    Redirection operators and their targets are left out. Raises TrainScriptError for an
    unterminated quote or expansion and for a here-document.
    """
    return _Lexer(text).run()


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


class _Lexer:
    """Splits a script into simple commands, each a list of words with offsets.

    Redirections (``> log``, ``2>&1``) are recognised so that their targets are
    not mistaken for arguments; here-documents are refused because their bodies
    would have to be skipped line by line.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.commands: list[Command] = []
        self.comments: list[int] = []
        self.current: list[Word] = []
        self.before = ""
        self.depth = 0
        self.current_depth = 0

    def run(self) -> Script:
        text = self.text
        redirection_target_next = False
        while self.pos < len(text):
            char = text[self.pos]
            if char in BLANKS:
                self.pos += 1
            elif char == "\\" and text.startswith("\n", self.pos + 1):
                self.pos += 2  # line continuation between words
            elif char == "\\" and self.pos + 1 == len(text):
                self.pos += 1  # a backslash at end of file: bash drops it
            elif char == "#":
                self._skip_comment()
            elif char in "<>" or text.startswith("&>", self.pos):
                self._skip_redirection_operator()
                redirection_target_next = True
            elif char in "\n;&|()":
                self._end_command(char)
                self.depth += {"(": 1, ")": -1}.get(char, 0)
                self.pos += 1
            else:
                word = self._read_word()
                if not (redirection_target_next or self._is_descriptor(word)):
                    if not self.current:
                        self.current_depth = self.depth
                    self.current.append(word)
                redirection_target_next = False
        self._end_command("")
        return Script(tuple(self.commands), tuple(self.comments))

    def _skip_comment(self) -> None:
        self.comments.append(self.pos)
        newline = self.text.find("\n", self.pos)
        self.pos = len(self.text) if newline < 0 else newline

    def _is_descriptor(self, word: Word) -> bool:
        # `2>` names a file descriptor only when the digits are bare and touch the `>`.
        source = self.text[word.start : word.end]
        return bool(_DIGITS.fullmatch(source)) and self.text[word.end : word.end + 1] in ("<", ">")

    def _end_command(self, separator: str) -> None:
        if self.current:
            self.commands.append(
                Command(tuple(self.current), self.before, separator, self.current_depth)
            )
            self.current = []
            self.before = separator
        elif separator != "\n":
            # `a &&<newline>b`: b still runs only if a succeeded.
            self.before = separator

    def _skip_redirection_operator(self) -> None:
        text = self.text
        if text.startswith("<<", self.pos) and not text.startswith("<<<", self.pos):
            line = line_of(text, self.pos)
            raise TrainScriptError(
                f"line {line}: here-documents (<<) are not supported in train.sh"
            )
        for operator in ("<<<", "&>>", "&>", ">>", ">&", ">|", "<>", "<&", ">", "<"):
            if text.startswith(operator, self.pos):
                self.pos += len(operator)
                return

    def _read_word(self) -> Word:
        text = self.text
        start = self.pos
        end = start
        segments: list[Segment] = []
        while self.pos < len(text) and text[self.pos] not in _WORD_DELIMITERS:
            char = text[self.pos]
            following = text[self.pos + 1 : self.pos + 2]
            if char == "\\":
                if following in ("\n", ""):
                    self.pos += 1 + len(following)  # continuation (or EOF): not part of the word
                    continue
                _add_text(segments, following, quoted=True)
                self.pos += 2
            elif char == "'":
                _add_text(segments, self._single_quoted(), quoted=True)
            elif char == '"':
                self._double_quoted(segments)
            elif char == "$" and following == '"':
                self.pos += 1  # $"..." is a translatable string; as text it is "..."
                self._double_quoted(segments)
            elif char == "$" and following == "'":
                segments.append(Segment("other", self._ansi_c_quoted(), quoted=True))
            elif char == "$":
                self._dollar(segments, quoted=False)
            elif char == "`":
                segments.append(Segment("other", self._backquoted(), quoted=False))
            elif char == "~" and self.pos == start:
                segments.append(Segment("tilde", "~", quoted=False))
                self.pos += 1
            else:
                _add_text(segments, char, quoted=False)
                self.pos += 1
            end = self.pos
        elements = None
        if text.startswith("(", self.pos) and _ASSIGNMENT_HEAD.fullmatch(text[start:end]):
            elements = self._array_elements()
            end = self.pos
        return Word("".join(seg.text for seg in segments), start, end, tuple(segments), elements)

    def _array_elements(self) -> tuple[Word, ...]:
        """The words of ``NAME=(...)``: blanks, newlines and comments separate them."""
        opened_at = self.pos
        self.pos += 1
        elements: list[Word] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in BLANKS + "\n":
                self.pos += 1
            elif self.text.startswith("\\\n", self.pos):
                self.pos += 2
            elif char == "#":
                self._skip_comment()
            elif char == ")":
                self.pos += 1
                return tuple(elements)
            elif char in _WORD_DELIMITERS:
                raise TrainScriptError(
                    f"line {line_of(self.text, self.pos)}: unexpected {char!r} in an array"
                )
            else:
                elements.append(self._read_word())
        raise self._unterminated("array (", opened_at)

    def _dollar(self, segments: list[Segment], *, quoted: bool) -> None:
        """``$`` at ``pos``: a parameter, an expansion or (followed by nothing special) a `$`."""
        text = self.text
        following = text[self.pos + 1 : self.pos + 2]
        if following in ("(", "{"):
            source = self._expansion()
            braced = _BRACED_NAME.fullmatch(source)
            every = _BRACED_ALL.fullmatch(source)
            if braced:
                segments.append(Segment("param", source, quoted, braced.group(1)))
            elif every:
                segments.append(Segment("all", source, quoted, every.group(1)))
            else:
                segments.append(Segment("other", source, quoted))
            return
        name = _NAME.match(text, self.pos + 1)
        if name:
            self.pos = name.end()
            segments.append(Segment("param", "$" + name.group(), quoted, name.group()))
        elif following in ("@", "*"):
            self.pos += 2
            segments.append(Segment("all", "$" + following, quoted, following))
        elif following and (following.isdigit() or following in "?$!#-"):
            self.pos += 2
            segments.append(Segment("other", "$" + following, quoted))
        else:
            self.pos += 1
            _add_text(segments, "$", quoted=quoted)

    def _unterminated(self, what: str, opened_at: int) -> TrainScriptError:
        return TrainScriptError(
            f"line {line_of(self.text, opened_at)}: unterminated {what} "
            "(the closing character is missing)"
        )

    def _single_quoted(self) -> str:
        opened_at = self.pos
        close = self.text.find("'", opened_at + 1)
        if close < 0:
            raise self._unterminated("single quote", opened_at)
        self.pos = close + 1
        return self.text[opened_at + 1 : close]

    def _double_quoted(self, segments: list[Segment]) -> None:
        text = self.text
        opened_at = self.pos
        self.pos += 1
        _add_text(segments, "", quoted=True)  # `""` is a word of its own, even when empty
        while self.pos < len(text):
            char = text[self.pos]
            following = text[self.pos + 1 : self.pos + 2]
            if char == '"':
                self.pos += 1
                return
            if char == "\\" and following == "\n":
                self.pos += 2
            elif char == "\\" and following in ('"', "\\", "$", "`"):
                _add_text(segments, following, quoted=True)
                self.pos += 2
            elif char == "$":
                self._dollar(segments, quoted=True)
            elif char == "`":
                segments.append(Segment("other", self._backquoted(), quoted=True))
            else:
                # Includes a backslash before any other character, which bash keeps.
                _add_text(segments, char, quoted=True)
                self.pos += 1
        raise self._unterminated("double quote", opened_at)

    def _ansi_c_quoted(self) -> str:
        # $'...' is kept as its literal source text; only its extent matters here.
        return self._source_until("'", opener_length=2, what="$'...' quote")

    def _backquoted(self) -> str:
        return self._source_until("`", opener_length=1, what="backquote")

    def _source_until(self, closer: str, *, opener_length: int, what: str) -> str:
        """Skip to ``closer`` (backslash escapes it); the construct's literal source text."""
        opened_at = self.pos
        self.pos += opener_length
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\":
                self.pos += 2
            elif char == closer:
                self.pos += 1
                return self.text[opened_at : self.pos]
            else:
                self.pos += 1
        raise self._unterminated(what, opened_at)

    def _expansion(self) -> str:
        """Skip ``$(...)``, ``$((...))`` or ``${...}`` with nesting; return its source text."""
        text = self.text
        opened_at = self.pos
        opener = text[self.pos + 1]
        closer = ")" if opener == "(" else "}"
        depth = 1
        self.pos += 2
        while self.pos < len(text):
            char = text[self.pos]
            if char == "\\":
                self.pos += 2
            elif char == "'":
                self._single_quoted()
            elif char == '"':
                self._double_quoted([])
            elif char == "`":
                self._backquoted()
            elif char == opener:
                depth += 1
                self.pos += 1
            elif char == closer:
                depth -= 1
                self.pos += 1
                if depth == 0:
                    return text[opened_at : self.pos]
            else:
                self.pos += 1
        raise self._unterminated(f"${opener}...{closer} expansion", opened_at)


def _add_text(segments: list[Segment], text: str, *, quoted: bool) -> None:
    """Append literal text, merged into the previous piece when it is quoted alike."""
    if segments and segments[-1].kind == "text" and segments[-1].quoted == quoted and text:
        last = segments[-1]
        segments[-1] = Segment("text", last.text + text, quoted)
    else:
        segments.append(Segment("text", text, quoted))
