"""train.sh as users edit it by hand: variables, arrays, Windows editors, broken continuations.

The rule under test: the sidecar rewrites only a command it understands the way bash will
run it; anything else is a TrainScriptError that names the line and the fix. Where bash's
behaviour is the question, bash answers it (a stub ``accelerate`` prints its argv).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from bash_argv import argv_bash_passes

import sidecar.simulator
from sidecar.atomic_files import read_text_exact
from sidecar.config import Settings
from sidecar.run.paths import RunSetupError, read_train_script, resolve_run_paths
from sidecar.trainers.sd_scripts.launch_script import rewrite_train_script
from sidecar.trainers.shell.train_script import (
    TrainScriptError,
    ensure_option,
    parse_train_script,
    remove_option,
    remove_resume,
    set_option,
    set_resume,
)

DEFAULT_FIXTURE = Path(sidecar.simulator.__file__).parent / "scripts" / "fluxgym-20g-default.sh"
TRAINER = "sd-scripts/flux_train_network.py"


def refused(text: str, *patterns: str) -> str:
    """The error each entry point gives for ``text``; every pattern must be in it."""
    messages = []
    for attempt in (
        parse_train_script,
        lambda t: set_resume(t, "/new"),
        remove_resume,
        lambda t: ensure_option(t, "--save_state"),
        lambda t: set_option(t, "--initial_step", "5"),
        lambda t: remove_option(t, "--initial_step"),
    ):
        with pytest.raises(TrainScriptError) as caught:
            attempt(text)
        messages.append(str(caught.value))
    assert len(set(messages)) == 1, messages
    for pattern in patterns:
        assert re.search(pattern, messages[0]), (pattern, messages[0])
    return messages[0]


# ---------------------------------------------------------------------------
# Assignments are not commands


@pytest.mark.parametrize("prefix", ["", "export "])
def test_an_assignment_naming_the_trainer_is_not_the_trainer_command(
    prefix: str, tmp_path: Path
) -> None:
    """`SCRIPT=...py` sets a variable; --resume goes into the command that runs it."""
    text = f'{prefix}SCRIPT={TRAINER}\naccelerate launch --num_processes 1 "$SCRIPT" --seed 1\n'
    command = parse_train_script(text)
    assert command.trainer_script == TRAINER
    rewritten = ensure_option(set_resume(text, "/s"), "--save_state")
    assert rewritten.startswith(f"{prefix}SCRIPT={TRAINER}\n")
    assert argv_bash_passes(rewritten, tmp_path) == [
        *("launch", "--num_processes", "1", TRAINER),
        *("--save_state", "--resume", "/s", "--seed", "1"),
    ]


def test_an_assignment_beside_a_literal_trainer_command_is_left_alone() -> None:
    """With the script named literally too, only the accelerate line is edited."""
    text = f"export SCRIPT={TRAINER}\naccelerate launch {TRAINER} --seed 1\n"
    assert set_resume(text, "/s") == text.replace("py --seed", 'py --resume "/s" --seed')


def test_echoing_the_trainer_name_is_no_reason_to_refuse() -> None:
    """`echo` names the script but runs nothing; it is not a second trainer command."""
    text = f'echo "starting {TRAINER}"\necho {TRAINER}\naccelerate launch {TRAINER} --a 1\n'
    assert parse_train_script(text).trainer_args == ("--a", "1")
    assert set_resume(text, "/s").count("--resume") == 1


@pytest.mark.parametrize(
    "launch",
    [
        "exec accelerate launch",
        "FOO=1 accelerate launch",
        "FOO=1 exec /opt/venv/bin/accelerate launch",
        "env FOO=1 accelerate launch",
        "python3",
        "./venv/bin/python -u",
    ],
)
def test_launcher_forms_are_understood(launch: str) -> None:
    """A launcher (or a path to one) after exec, env or assignments is the trainer command."""
    text = f"{launch} {TRAINER} --a 1\n"
    assert parse_train_script(text).trainer_args == ("--a", "1")
    assert set_resume(text, "/s") == text.replace("py --a", 'py --resume "/s" --a')


# ---------------------------------------------------------------------------
# Variables the sidecar depends on


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("OUT=/data/run", "/data/run"),
        ('OUT="/data/my run"', "/data/my run"),
        ("export OUT='/data/my run'", "/data/my run"),
        ("OUT=/old\nOUT=/data/run", "/data/run"),
    ],
)
def test_output_dir_from_an_earlier_assignment_is_resolved(
    assignment: str, expected: str, tmp_path: Path
) -> None:
    """`--output_dir "$OUT"` is the folder bash passes, not the literal `$OUT`."""
    text = f'{assignment}\naccelerate launch {TRAINER} --output_dir "$OUT" --output_name "$OUT"x\n'
    command = parse_train_script(text)
    assert command.output_dir == expected
    assert command.output_name == expected + "x"
    assert argv_bash_passes(text, tmp_path)[2:4] == ["--output_dir", expected]


@pytest.mark.parametrize(
    "setup",
    [
        "",  # from the environment
        "OUT=$(pwd)/out\n",
        "if true; then OUT=/y; fi\n",
        "OUT=/x\n[ -d /z ] && OUT=/z\n",
        "OUT=/x\nsource ./settings.sh\n",
        "f() {\n  OUT=/y\n}\n",
    ],
)
def test_an_unknowable_output_dir_stops_run_and_check(setup: str, tmp_path: Path) -> None:
    """Without SIDECAR_OUTPUT_DIR the run is refused instead of guessing the script's folder."""
    script = tmp_path / "outputs" / "my-lora" / "train.sh"
    script.parent.mkdir(parents=True)
    script.write_text(f'{setup}accelerate launch {TRAINER} --output_dir "$OUT"\n')
    _, command = read_train_script(script)
    assert command.output_dir == "$OUT"
    with pytest.raises(RunSetupError) as caught:
        resolve_run_paths(Settings(train_script=script))
    message = str(caught.value)
    assert f'line {setup.count(chr(10)) + 1}: `"$OUT"`' in message
    assert "SIDECAR_OUTPUT_DIR" in message
    given = resolve_run_paths(Settings(train_script=script, output_dir=tmp_path))
    assert given.output_dir == tmp_path


def test_a_resolved_output_dir_is_the_run_folder(tmp_path: Path) -> None:
    """The folder named through a variable is used, not the script's folder."""
    run = tmp_path / "elsewhere"
    run.mkdir()
    script = tmp_path / "outputs" / "my-lora" / "train.sh"
    script.parent.mkdir(parents=True)
    script.write_text(f'OUT="{run}"\naccelerate launch {TRAINER} --output_dir "$OUT"\n')
    assert resolve_run_paths(Settings(train_script=script)).output_dir == run


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (f'accelerate launch {TRAINER} --resume "$STATE"\n', 1),
        (f"STATE=$(ls -d /x/*)\naccelerate launch {TRAINER} --output_name=$NAME\n", 2),
        ('accelerate launch "$SCRIPT" --a 1\n', 1),
    ],
)
def test_an_unknowable_word_the_sidecar_needs_is_refused(text: str, line: int) -> None:
    """--resume, --output_name and the script itself must be known, or nothing is edited."""
    refused(text, f"^line {line}: `", "assignment")


# ---------------------------------------------------------------------------
# Expansions that could hide a --resume


EXTRA_SHAPES = [
    ('EXTRA=(--resume "/old state" --seed 1)', '"${EXTRA[@]}"', "EXTRA, set on line 1"),
    ('EXTRA_ARGS="--resume /old --seed 1"', "$EXTRA_ARGS", "EXTRA_ARGS, set on line 1"),
    ("export EXTRA_ARGS='--seed 1 --resume=/old'", "${EXTRA_ARGS}", "EXTRA_ARGS, set on line 1"),
]


@pytest.mark.parametrize(("assignment", "use", "where"), EXTRA_SHAPES)
def test_a_stale_resume_inside_a_variable_is_found(
    assignment: str, use: str, where: str, tmp_path: Path
) -> None:
    """The parse sees the --resume bash passes; editing it there is refused, naming both lines."""
    text = f"{assignment}\naccelerate launch {TRAINER} --a 1 {use}\n"
    command = parse_train_script(text)
    assert command.resume is not None and command.resume.startswith("/old")
    assert argv_bash_passes(text, tmp_path)[2:] == list(command.trainer_args)
    for edit in (lambda t: set_resume(t, "/new"), remove_resume):
        with pytest.raises(TrainScriptError) as caught:
            edit(text)
        message = str(caught.value)
        assert message.startswith(f"line 2: --resume comes from `{use}`")
        assert where in message and "move --resume" in message
    # Options the variable does not hold can still be edited.
    assert parse_train_script(ensure_option(text, "--save_state")).save_state


def test_a_variable_without_resume_does_not_stop_an_edit(tmp_path: Path) -> None:
    """With no --resume inside, the variable stays and --resume goes on the command."""
    text = f'EXTRA=(--seed 1 "--x=a b")\naccelerate launch {TRAINER} "${{EXTRA[@]}}"\n'
    rewritten = set_resume(text, "/s")
    assert argv_bash_passes(rewritten, tmp_path)[2:] == ["--resume", "/s", "--seed", "1", "--x=a b"]


@pytest.mark.parametrize(
    "use", ["$EXTRA_ARGS", '"${EXTRA[@]}"', '"$@"', "${EXTRA_ARGS}", '"$FLAG"', "$(cat flags)"]
)
def test_an_unknowable_expansion_among_trainer_args_is_refused(use: str) -> None:
    """An expansion train.sh does not set could hold a --resume: refused, with the line."""
    text = f"#!/bin/bash\naccelerate launch {TRAINER} \\\n  --a 1 \\\n  {use}\n"
    refused(text, re.escape(f"line 4: `{use}` could hide a --resume"), "write its words out")


def test_quoted_values_from_the_environment_are_kept() -> None:
    """A quoted expansion that is an option's value cannot become an option: it is kept."""
    text = f'accelerate launch {TRAINER} --logging_dir "$HOME/logs" --note "b=$(date)"\n'
    assert parse_train_script(text).option("logging_dir") == "$HOME/logs"
    assert set_resume(text, "/s").count("--resume") == 1


# ---------------------------------------------------------------------------
# Commands bash never runs as the trainer


def fixture_text() -> str:
    return read_text_exact(DEFAULT_FIXTURE)


def test_crlf_line_endings_are_named_with_the_fix() -> None:
    """A Windows editor's CRLF: the `\\` before `\\r` does not continue the command."""
    refused(
        fixture_text().replace("\n", "\r\n"), "Windows line endings", re.escape("sed -i 's/\\r$//'")
    )
    refused("accelerate launch t.py --a 1\r\n", "line 1", "Windows line endings")


def test_crlf_outside_the_trainer_command_is_no_reason_to_refuse() -> None:
    """A `\\r` on a comment line does not change what bash runs as the trainer."""
    text = "# edited on Windows\r\n" + fixture_text()
    assert set_resume(text, "/s").startswith("# edited on Windows\r\n")


def test_a_byte_order_mark_before_accelerate_is_named() -> None:
    """bash reads the BOM as part of the command name: `\\ufeffaccelerate` is not found."""
    refused("\ufeff" + fixture_text(), "^line 1: .*byte order mark", re.escape("sed -i '1s/^"))


def test_a_byte_order_mark_before_a_comment_is_harmless() -> None:
    text = "\ufeff#!/bin/bash\n" + fixture_text()
    assert parse_train_script(text).trainer_script == TRAINER


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("accelerate launch t.py --a\0 1\n", 1),
        ("#!/bin/bash\n\naccelerate launch \\\n  t.py --a\0 1\n", 4),
    ],
)
def test_a_nul_byte_is_refused(text: str, line: int) -> None:
    """bash refuses a NUL on line 1 and drops one later; either way the words differ."""
    refused(text, f"line {line}", "NUL", re.escape("tr -d '\\000'"))


def test_a_blank_after_a_backslash_among_accelerate_flags_is_named(tmp_path: Path) -> None:
    """`\\ ` escapes the blank and the newline ends the command: bash never runs the trainer."""
    text = fixture_text().replace("--mixed_precision bf16 \\\n", "--mixed_precision bf16 \\ \n")
    message = refused(text, "^line 3: `--num_cpu_threads_per_process` starts a command")
    assert "line 2 has blanks after its final `\\`" in message
    assert TRAINER not in argv_bash_passes_or_none(text, tmp_path)


def argv_bash_passes_or_none(text: str, folder: Path) -> list[str]:
    try:
        return argv_bash_passes(text, folder)
    except subprocess.CalledProcessError:
        return []


def test_a_comment_among_accelerate_flags_is_named() -> None:
    """A comment line ends the command even between `\\` continuations."""
    text = fixture_text().replace(
        "--mixed_precision bf16 \\\n", "--mixed_precision bf16 \\\n  # --num_processes 2 \\\n"
    )
    message = refused(text, "^line 4: `--num_cpu_threads_per_process` starts a command")
    assert "line 3 is or ends in a comment" in message


def test_a_comment_among_trainer_flags_is_named() -> None:
    """A comment that cuts the trainer's flags short leaves flags bash runs as a command."""
    text = fixture_text().replace("--seed 42 \\\n", "--seed 42 \\\n  # --foo 1 \\\n")
    line = text[: text.index("# --foo")].count("\n") + 2
    refused(text, f"^line {line}: `--", f"line {line - 1} is or ends in a comment")


# ---------------------------------------------------------------------------
# Bytes that are not UTF-8


def test_a_cp1252_comment_is_read_and_kept_byte_for_byte(tmp_path: Path) -> None:
    """Reading never fails on a non-UTF-8 comment, and a rewrite writes it back unchanged."""
    original = b"#!/bin/bash\n# caf\xe9 \x93quoted\x94\n" + DEFAULT_FIXTURE.read_bytes()
    script = tmp_path / "train.sh"
    script.write_bytes(original)
    _, command = read_train_script(script)
    assert command.trainer_script == TRAINER
    changed, _, _ = rewrite_train_script(script, resume_from="/s", ensure_save_state=True)
    assert changed
    rewritten = script.read_bytes()
    assert rewritten.startswith(b"#!/bin/bash\n# caf\xe9 \x93quoted\x94\n")
    assert rewritten.replace(b'  --resume "/s" \\\n  --save_state \\\n', b"") == original
    assert (tmp_path / "train.sh.orig").read_bytes() == original


def test_a_non_utf8_byte_in_the_trainer_command_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "train.sh"
    script.write_bytes(b"accelerate launch t.py --output_name caf\xe9\n")
    with pytest.raises(RunSetupError, match=r"line 1: .*not UTF-8.*iconv -f cp1252"):
        read_train_script(script)


# ---------------------------------------------------------------------------
# set_option and remove_option


def test_set_option_adds_a_missing_option_after_the_script() -> None:
    original = fixture_text()
    rewritten = set_option(original, "--initial_step", "120")
    assert rewritten == original.replace(
        f"  {TRAINER} \\\n", f'  {TRAINER} \\\n  --initial_step "120" \\\n'
    )
    assert parse_train_script(rewritten).option("initial_step") == "120"
    assert set_option(rewritten, "--initial_step", "120") == rewritten
    assert remove_option(rewritten, "--initial_step") == original


@pytest.mark.parametrize(
    "existing",
    ["--initial_step 7", "--initial_step=7", "--initial_step '7'", "--initial_step"],
)
def test_set_option_replaces_an_option_where_it_stands(existing: str) -> None:
    text = f"python t.py --a 1 {existing} --b 2 --initial_step=9\n"
    assert (
        set_option(text, "--initial_step", "120")
        == 'python t.py --a 1 --initial_step "120" --b 2\n'
    )


def test_set_option_writes_a_bare_flag() -> None:
    text = "python t.py --a 1 --skip_until_initial_step=1 --b 2\n"
    rewritten = set_option(text, "--skip_until_initial_step", None)
    assert rewritten == "python t.py --a 1 --skip_until_initial_step --b 2\n"
    assert set_option(rewritten, "--skip_until_initial_step", None) == rewritten
    assert parse_train_script(rewritten).option("skip_until_initial_step") == ""
    added = set_option("python t.py --a 1\n", "--skip_until_initial_step", None)
    assert added == "python t.py --skip_until_initial_step --a 1\n"


def test_remove_option_takes_every_occurrence_and_only_values_it_owns() -> None:
    """A bare flag followed by `--x` (or nothing) loses no neighbour."""
    text = "python t.py --skip_until_initial_step --a 1 --skip_until_initial_step\n"
    assert remove_option(text, "--skip_until_initial_step") == "python t.py --a 1\n"
    text = "python t.py --initial_step 5 --a 1 --initial_step=6 --b\n"
    assert remove_option(text, "--initial_step") == "python t.py --a 1 --b\n"
    assert remove_option("python t.py --a 1\n", "--initial_step") == "python t.py --a 1\n"


@pytest.mark.parametrize("flag", ["initial_step", "--x; rm -rf /", "-x"])
def test_set_and_remove_option_refuse_what_is_not_a_flag(flag: str) -> None:
    with pytest.raises(TrainScriptError, match="not of the form --name"):
        set_option("python t.py\n", flag, "1")
    with pytest.raises(TrainScriptError, match="not of the form --name"):
        remove_option("python t.py\n", flag)


def test_set_option_refuses_a_value_read_as_an_option() -> None:
    with pytest.raises(TrainScriptError, match="would be read as an option"):
        set_option("python t.py\n", "--initial_step", "--5")


def test_set_and_remove_option_pass_through_bash(tmp_path: Path) -> None:
    """What bash hands accelerate after both edits, on FluxGym's own script."""
    original = fixture_text()
    text = set_option(
        set_option(original, "--initial_step", "a b"), "--skip_until_initial_step", None
    )
    argv = argv_bash_passes(text, tmp_path)
    at = argv.index(TRAINER)
    assert argv[at + 1 : at + 4] == ["--skip_until_initial_step", "--initial_step", "a b"]
    cleared = remove_option(remove_option(text, "--initial_step"), "--skip_until_initial_step")
    assert cleared == original


def test_set_and_remove_option_refuse_an_option_inside_a_variable() -> None:
    """An option the sidecar must edit, found only inside an array, names both lines."""
    text = f'EXTRA=(--initial_step 5)\naccelerate launch {TRAINER} --a 1 "${{EXTRA[@]}}"\n'
    assert parse_train_script(text).option("initial_step") == "5"
    for edit in (
        lambda t: set_option(t, "--initial_step", "9"),
        lambda t: remove_option(t, "--initial_step"),
    ):
        with pytest.raises(TrainScriptError, match=r"^line 2: --initial_step comes from .*line 1"):
            edit(text)


@pytest.mark.parametrize("wrapper", ["env -i", "exec -a trainer"])
def test_options_of_exec_and_env_are_named(wrapper: str) -> None:
    refused(f"{wrapper} accelerate launch {TRAINER} --a 1\n", f"^line 1: `{wrapper.split()[0]} -")
