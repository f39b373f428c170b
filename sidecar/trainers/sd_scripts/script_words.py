"""Splitting a shell script into words the way bash does, remembering where each word is.

train.sh is edited by splicing at word offsets instead of re-rendering it (see
``train_script``), so this reader must agree with bash on where every word starts and
ends: quotes, escapes, ``\\`` continuations, comments, command separators and
redirections. Expansions (``$VAR``, ``$(...)``) are kept as literal word text: only
their extent matters, never their values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.trainers.base import LaunchScriptError

__all__ = ["BLANKS", "TrainScriptError", "Word", "line_of", "split_commands"]

BLANKS = " \t"
# Characters that end an unquoted word. `(` and `)` only matter to us as
# delimiters (subshells, function definitions), never as part of a word.
_WORD_DELIMITERS = " \t\n;&|()<>"
_DIGITS = re.compile(r"[0-9]+")


class TrainScriptError(LaunchScriptError):
    """train.sh cannot be understood; the message says what was expected and where (line number)."""


def split_commands(text: str) -> list[list[Word]]:
    """The simple commands of ``text``, each as its words with their offsets in ``text``.

    Redirection operators and their targets are left out. Raises TrainScriptError for an
    unterminated quote or expansion and for a here-document.
    """
    return _Lexer(text).run()


@dataclass(frozen=True)
class Word:
    text: str  # the word as bash passes it on, quotes and escapes removed
    start: int  # offset of its first character in the script
    end: int  # offset just past its last character, trailing continuations excluded


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
        self.commands: list[list[Word]] = []
        self.current: list[Word] = []

    def run(self) -> list[list[Word]]:
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
                newline = text.find("\n", self.pos)
                self.pos = len(text) if newline < 0 else newline
            elif char in "<>" or text.startswith("&>", self.pos):
                self._skip_redirection_operator()
                redirection_target_next = True
            elif char in "\n;&|()":
                self._end_command()
                self.pos += 1
            else:
                word = self._read_word()
                if not (redirection_target_next or self._is_descriptor(word)):
                    self.current.append(word)
                redirection_target_next = False
        self._end_command()
        return self.commands

    def _is_descriptor(self, word: Word) -> bool:
        # `2>` names a file descriptor only when the digits are bare and touch the `>`.
        source = self.text[word.start : word.end]
        return bool(_DIGITS.fullmatch(source)) and self.text[word.end : word.end + 1] in ("<", ">")

    def _end_command(self) -> None:
        if self.current:
            self.commands.append(self.current)
            self.current = []

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
        parts: list[str] = []
        while self.pos < len(text) and text[self.pos] not in _WORD_DELIMITERS:
            char = text[self.pos]
            following = text[self.pos + 1 : self.pos + 2]
            if char == "\\":
                if following in ("\n", ""):
                    self.pos += 1 + len(following)  # continuation (or EOF): not part of the word
                    continue
                parts.append(following)
                self.pos += 2
            elif char == "'":
                parts.append(self._single_quoted())
            elif char == '"':
                parts.append(self._double_quoted())
            elif char == "$" and following == '"':
                self.pos += 1  # $"..." is a translatable string; as text it is "..."
                parts.append(self._double_quoted())
            elif char == "$" and following == "'":
                parts.append(self._ansi_c_quoted())
            elif char == "$" and following in ("(", "{"):
                parts.append(self._expansion())
            elif char == "`":
                parts.append(self._backquoted())
            else:
                parts.append(char)
                self.pos += 1
            end = self.pos
        return Word("".join(parts), start, end)

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

    def _double_quoted(self) -> str:
        text = self.text
        opened_at = self.pos
        self.pos += 1
        parts: list[str] = []
        while self.pos < len(text):
            char = text[self.pos]
            following = text[self.pos + 1 : self.pos + 2]
            if char == '"':
                self.pos += 1
                return "".join(parts)
            if char == "\\" and following == "\n":
                self.pos += 2
            elif char == "\\" and following in ('"', "\\", "$", "`"):
                parts.append(following)
                self.pos += 2
            elif char == "$" and following in ("(", "{"):
                parts.append(self._expansion())
            elif char == "`":
                parts.append(self._backquoted())
            else:
                # Includes a backslash before any other character, which bash keeps.
                parts.append(char)
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
                self._double_quoted()
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
