"""Variables in train.sh: what the reader resolves must be what bash passes, word for word.

Generated scripts put the trainer's options partly on the command, partly in an array and
partly in a string variable expanded unquoted; bash (with a stub ``accelerate``) answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bash_argv import argv_bash_passes
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.trainers.shell.train_script import (
    TrainScriptError,
    parse_train_script,
    quote_word,
)

WORDS = st.text(
    alphabet=st.characters(
        exclude_categories=("Cs", "Cc", "Zl", "Zp"), include_characters=" \t'\"$`\\*?é"
    ),
    max_size=8,
)
BARE = st.from_regex(r"[A-Za-z0-9_./=+-]{1,8}", fullmatch=True)


@st.composite
def scripts_with_variables(draw: st.DrawFn) -> str:
    array = draw(st.lists(WORDS, max_size=4))
    split = draw(st.lists(BARE, max_size=4))
    scalar = draw(WORDS)
    separator = draw(st.sampled_from([" ", "  ", "\t", " \n  "]))
    lines = [
        f"ARR=({' '.join(quote_word(word) for word in array)})",
        f"{draw(st.sampled_from(['', 'export ']))}ARGS='{separator.join(split)}'",
        f"ONE={quote_word(scalar)}",
        'SCRIPT="my dir/train.py"',
    ]
    uses = draw(
        st.lists(
            st.sampled_from(
                [
                    '"${ARR[@]}"',
                    "${ARR[@]}",
                    '"$ARR"',
                    '"${ARR[*]}"',
                    "$ARGS",
                    '"$ARGS"',
                    '--x="$ONE"',
                    '"$ONE"x',
                    "${ARGS}",
                    '--y "$ONE"',
                ]
            ),
            max_size=5,
        )
    )
    if any(char in word for word in array for char in "*?["):
        uses = [use for use in uses if use != "${ARR[@]}"]  # bash would glob: refused (test below)
    body = " \\\n  ".join(["accelerate launch", '"$SCRIPT"', *uses])
    return "\n".join(lines) + "\n" + body + "\n"


# Found by this test: bash splits unquoted values on space, tab and newline only.
NBSP_IN_AN_ARRAY = 'ARR=("\xa0")\nSCRIPT="my dir/train.py"\naccelerate launch "$SCRIPT" ${ARR[@]}\n'


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=scripts_with_variables())
@example(script=NBSP_IN_AN_ARRAY)
def test_resolved_arguments_agree_with_bash(tmp_path: Path, script: str) -> None:
    """Whatever the variables hold, the reader passes the trainer what bash passes it."""
    command = parse_train_script(script)
    expected = [*command.launcher_args[1:], command.trainer_script, *command.trainer_args]
    assert argv_bash_passes(script, tmp_path) == expected


def test_an_unquoted_glob_from_a_variable_is_refused() -> None:
    """bash would match `*` against files the sidecar cannot see: not resolved, refused."""
    text = "ARR=('--resume' '/state*')\naccelerate launch t.py ${ARR[@]}\n"
    with pytest.raises(TrainScriptError, match=r"^line 2: `\$\{ARR\[@\]\}` could hide.*glob"):
        parse_train_script(text)


def test_ifs_changed_by_the_script_stops_splitting() -> None:
    text = "IFS=,\nARGS=--a,1\naccelerate launch t.py $ARGS\n"
    with pytest.raises(TrainScriptError, match="changes IFS"):
        parse_train_script(text)
