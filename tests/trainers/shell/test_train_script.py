"""Tests for reading and editing FluxGym's train.sh (sidecar.trainers.shell.train_script).

Where bash's behaviour is the question, bash answers it: scripts are run with a
stub ``accelerate`` on PATH that prints the argv it receives.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from bash_argv import run_with_stub_accelerate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sidecar.simulator
from sidecar.atomic_files import read_text_exact
from sidecar.trainers.shell.train_script import (
    TrainCommand,
    TrainScriptError,
    ensure_option,
    parse_train_script,
    quote_word,
    remove_resume,
    set_resume,
)

# FluxGym's generated scripts ship with the simulator; test_simulator checks them against
# the shared originals.
FIXTURES = Path(sidecar.simulator.__file__).parent / "scripts"
FIXTURE_PATHS = sorted(FIXTURES.glob("*.sh"))
DEFAULT_FIXTURE = FIXTURES / "fluxgym-20g-default.sh"
SCRIPT_LINE = "  sd-scripts/flux_train_network.py \\\n"
LAUNCHER = (
    "accelerate",
    "launch",
    "--mixed_precision",
    "bf16",
    "--num_cpu_threads_per_process",
    "1",
)
SPACED_PATH = "/app/fluxgym/outputs/my lora/my-lora-000004-state"
# Everything that is special to bash somewhere, to prove it arrives literally.
HOSTILE_PATH = "/data/my lora/\"q\" 's' $HOME $(touch pwned) `touch pwned` \\x !*? ~;&|<>#/state"


@pytest.fixture(params=FIXTURE_PATHS, ids=lambda path: path.stem)
def fixture_path(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


@pytest.fixture
def fixture_text(fixture_path: Path) -> str:
    return read_text_exact(fixture_path)


def with_line_after_script(text: str, line: str) -> str:
    """The fixture text with ``line`` inserted right after the *.py line, computed independently."""
    assert text.count(SCRIPT_LINE) == 1
    return text.replace(SCRIPT_LINE, SCRIPT_LINE + line, 1)


def argv_bash_passes(script: str, folder: Path) -> list[str]:
    """Run ``script`` with bash and return the arguments the stub ``accelerate`` received."""
    result = run_with_stub_accelerate(script, folder)
    assert result.stderr == b""
    assert not (folder / "pwned").exists()
    return result.stdout.decode("utf-8").split("\0")[:-1]


def expected_argv(command: TrainCommand) -> list[str]:
    """What accelerate should receive according to the parse: everything after its own name."""
    return [*command.launcher_args[1:], command.trainer_script, *command.trainer_args]


def bash_syntax_ok(script: str, folder: Path) -> None:
    path = folder / "check.sh"
    path.write_text(script, encoding="utf-8", newline="")
    subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True, timeout=30)


def without_resume(arguments: tuple[str, ...] | list[str]) -> list[str]:
    """Drop every ``--resume X`` / ``--resume=X`` / bare ``--resume`` from an argument list."""
    kept: list[str] = []
    skip_value = False
    for index, word in enumerate(arguments):
        if skip_value:
            skip_value = False
            continue
        if word.startswith("--resume="):
            continue
        if word == "--resume":
            following = arguments[index + 1] if index + 1 < len(arguments) else "--"
            skip_value = not following.startswith("--")
            continue
        kept.append(word)
    return kept


def count_resume_words(words: list[str]) -> int:
    return sum(1 for word in words if word == "--resume" or word.startswith("--resume="))


# ---------------------------------------------------------------------------
# The real FluxGym scripts


def test_fixture_is_parsed(fixture_path: Path, fixture_text: str) -> None:
    """Each FluxGym script yields the trainer script, accelerate's flags and the output settings."""
    command = parse_train_script(fixture_text)
    assert command.trainer_script == "sd-scripts/flux_train_network.py"
    assert command.launcher_args == LAUNCHER
    assert command.output_dir == "/app/fluxgym/outputs/my-lora"
    assert command.output_name == "my-lora"
    assert command.save_state is ("12g" in fixture_path.stem)
    assert command.resume is None
    assert command.trainer_args[:2] == (
        "--pretrained_model_name_or_path",
        "/app/fluxgym/models/unet/flux1-dev.sft",
    )


def test_glued_sample_prompts_flag_is_a_word_of_its_own(fixture_text: str) -> None:
    """FluxGym's `0.0 \\--sample_prompts="..."` is read as bash reads it: `\\-` is `-`."""
    command = parse_train_script(fixture_text)
    if "\\--sample_prompts" in fixture_text:
        assert command.option("sample_prompts") == "/app/fluxgym/outputs/my-lora/sample_prompts.txt"
        assert command.option("--sample_every_n_steps") == "100"
    else:
        assert not command.has_option("sample_prompts")
    assert not any(word.startswith("\\") for word in command.trainer_args)


def test_fixture_argv_matches_what_bash_passes(fixture_text: str, tmp_path: Path) -> None:
    """The parse of an untouched FluxGym script equals the argv bash really gives accelerate."""
    assert argv_bash_passes(fixture_text, tmp_path) == expected_argv(
        parse_train_script(fixture_text)
    )


def test_set_resume_adds_exactly_one_line_after_the_script(fixture_text: str) -> None:
    """In FluxGym's one-flag-per-line shape --resume gets its own line and nothing else moves."""
    expected = with_line_after_script(fixture_text, f'  --resume "{SPACED_PATH}" \\\n')
    assert set_resume(fixture_text, SPACED_PATH) == expected


def test_rewritten_fixture_passes_bash_syntax_check(fixture_text: str, tmp_path: Path) -> None:
    """`bash -n` accepts the rewritten script, dangling final backslash and all."""
    bash_syntax_ok(set_resume(fixture_text, HOSTILE_PATH), tmp_path)


def test_set_resume_is_idempotent(fixture_text: str) -> None:
    """Resuming from the same path twice gives the same text as once."""
    once = set_resume(fixture_text, SPACED_PATH)
    assert set_resume(once, SPACED_PATH) == once


def test_set_resume_then_remove_resume_gives_back_the_original(fixture_text: str) -> None:
    """remove_resume undoes set_resume byte for byte."""
    assert remove_resume(set_resume(fixture_text, HOSTILE_PATH)) == fixture_text


def test_rewritten_fixture_passes_the_path_literally(fixture_text: str, tmp_path: Path) -> None:
    """Bash hands accelerate `--resume <path>` once, right after the *.py word, path intact."""
    rewritten = set_resume(fixture_text, HOSTILE_PATH)
    argv = argv_bash_passes(rewritten, tmp_path)
    original = parse_train_script(fixture_text)
    assert argv == expected_argv(parse_train_script(rewritten))
    assert argv == [
        *original.launcher_args[1:],
        original.trainer_script,
        "--resume",
        HOSTILE_PATH,
        *original.trainer_args,
    ]
    assert argv.count("--resume") == 1


def test_set_resume_moves_to_a_new_path(fixture_text: str) -> None:
    """Resuming again from a newer state replaces the path on the same line."""
    first = set_resume(fixture_text, "/old/state")
    expected = with_line_after_script(fixture_text, '  --resume "/new state" \\\n')
    assert set_resume(first, "/new state") == expected


RESUME_FORMS = [
    "--resume /old/state",
    "--resume=/old/state",
    '--resume "/old/state"',
    "--resume='/old/state'",
    '"--resume" /old/state',
    "\\--resume /old/state",
    "--resume \\\n  /old/state",
]


@pytest.mark.parametrize("form", RESUME_FORMS)
def test_set_resume_replaces_an_existing_resume_in_place(form: str) -> None:
    """A user's --resume, in any spelling, is replaced where it stands (flag and value)."""
    original = read_text_exact(DEFAULT_FIXTURE)
    anchor = "  --output_name my-lora \\\n"
    text = original.replace(anchor, f"{anchor}  {form} \\\n")
    assert parse_train_script(text).resume == "/old/state"
    expected = original.replace(anchor, f'{anchor}  --resume "{SPACED_PATH}" \\\n')
    assert set_resume(text, SPACED_PATH) == expected


@pytest.mark.parametrize("form", RESUME_FORMS)
def test_set_resume_to_the_same_path_changes_nothing(form: str) -> None:
    """When train.sh already resumes from the path, the text comes back unchanged."""
    text = read_text_exact(DEFAULT_FIXTURE).replace(
        "--loss_type l2 \\", f"--loss_type l2 \\\n  {form} \\"
    )
    assert set_resume(text, "/old/state") == text


def test_set_resume_collapses_several_resumes_into_one() -> None:
    """With several --resume the first is replaced and the others removed, whole lines included."""
    original = read_text_exact(DEFAULT_FIXTURE)
    text = original.replace("--seed 42 \\\n", "--seed 42 --resume=/a \\\n  --resume '/b' \\\n")
    text = text.replace("--loss_type l2 \\", "--loss_type l2 \\\n  \\--resume /c \\")
    expected = original.replace("--seed 42 \\\n", '--seed 42 --resume "/new" \\\n')
    rewritten = set_resume(text, "/new")
    assert rewritten == expected
    assert parse_train_script(rewritten).resume == "/new"


def test_remove_resume_drops_every_form() -> None:
    """remove_resume takes out every --resume and its value, leaving the rest as it was."""
    original = read_text_exact(DEFAULT_FIXTURE)
    anchor = "  --output_name my-lora \\\n"
    text = original.replace(anchor, anchor + "".join(f"  {form} \\\n" for form in RESUME_FORMS))
    text = text.replace("--seed 42 \\", "--seed 42 --resume=/x \\")
    assert remove_resume(text) == original
    assert remove_resume(original) == original


def test_remove_resume_keeps_a_blank_line_that_ends_the_command() -> None:
    """A --resume on the last line is removed without joining the next command onto the trainer."""
    text = "python train.py \\\n  --resume /x\necho done\n"
    assert remove_resume(text) == "python train.py \\\n  \necho done\n"
    assert parse_train_script(remove_resume(text)).trainer_args == ()


def test_remove_resume_keeps_an_escaped_blank_of_the_previous_word() -> None:
    """The blanks cut with --resume stop at the previous word, whose last character may be `\\ `."""
    text = "python t.py --name a\\  --resume /x --b 1\n"
    assert remove_resume(text) == "python t.py --name a\\  --b 1\n"
    assert parse_train_script(remove_resume(text)).trainer_args == ("--name", "a ", "--b", "1")


def test_ensure_option_adds_save_state_to_the_default_script() -> None:
    """--save_state, missing from FluxGym's default script, is added on its own line once."""
    original = read_text_exact(DEFAULT_FIXTURE)
    rewritten = ensure_option(original, "--save_state")
    assert rewritten == with_line_after_script(original, "  --save_state \\\n")
    assert parse_train_script(rewritten).save_state
    assert ensure_option(rewritten, "--save_state") == rewritten


def test_ensure_option_leaves_a_present_option_alone() -> None:
    """An option already present is not added again, whatever its value."""
    original = read_text_exact(FIXTURES / "fluxgym-12g-save-state-steps.sh")
    assert ensure_option(original, "--save_state") == original
    assert ensure_option(original, "--save_every_n_steps", "50") == original


def test_ensure_option_with_a_value_quotes_it() -> None:
    """A value is written double-quoted, and both set_resume and ensure_option stay composable."""
    original = read_text_exact(DEFAULT_FIXTURE)
    rewritten = ensure_option(original, "--save_every_n_steps", "100")
    assert rewritten == with_line_after_script(original, '  --save_every_n_steps "100" \\\n')
    command = parse_train_script(set_resume(rewritten, "/s"))
    assert command.trainer_args[:4] == ("--resume", "/s", "--save_every_n_steps", "100")


def test_ensure_option_refuses_something_that_is_not_a_flag() -> None:
    """Only `--name` flags can be ensured; anything else could inject shell syntax."""
    with pytest.raises(TrainScriptError, match="not of the form --name"):
        ensure_option(read_text_exact(DEFAULT_FIXTURE), "--x; rm -rf /")


# ---------------------------------------------------------------------------
# Other shapes of train.sh


HAND_WRITTEN = """#!/usr/bin/env bash
set -e
# Edited by hand: `quotes' and a backslash at the end \\
export HF_HOME="$HOME/.cache/hf" PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
accelerate launch --num_processes 1 sd-scripts/flux_train_network.py --output_dir "$OUT/x y" \\
--network_args 'a=1' "b=$(echo 2)" --comment a#b # trailing comment
echo finished >&2
"""


def test_hand_written_script_with_preamble_is_parsed() -> None:
    """Shebang, set, export, cd, comments and expansions before the command do not confuse it."""
    command = parse_train_script(HAND_WRITTEN)
    assert command.launcher_args == ("accelerate", "launch", "--num_processes", "1")
    assert command.trainer_args == (
        "--output_dir",
        "$OUT/x y",
        "--network_args",
        "a=1",
        "b=$(echo 2)",
        "--comment",
        "a#b",
    )
    assert command.output_dir == "$OUT/x y"


def test_set_resume_on_a_single_line_command_goes_right_after_the_script() -> None:
    """Without a continuation after the *.py word the flag is inserted on the same line."""
    rewritten = set_resume(HAND_WRITTEN, "/s t")
    assert rewritten == HAND_WRITTEN.replace(
        "flux_train_network.py --output_dir", 'flux_train_network.py --resume "/s t" --output_dir'
    )
    assert remove_resume(rewritten) == HAND_WRITTEN


def test_redirections_are_not_arguments() -> None:
    """`2>&1 | tee log` and `> out` belong to the shell, not to the trainer."""
    text = "accelerate launch train.py --a 1 2>&1 >out.log | tee -a 'log file.txt'\n"
    command = parse_train_script(text)
    assert command.trainer_args == ("--a", "1")
    assert set_resume(text, "/s") == text.replace("train.py", 'train.py --resume "/s"')


def test_a_launcher_flag_line_never_receives_resume(tmp_path: Path) -> None:
    """Even when accelerate's flags share the *.py line, --resume lands among the trainer's."""
    text = "accelerate launch --mixed_precision bf16 train.py \\\n\t--seed 1 \\\n\t--out o"
    rewritten = set_resume(text, "/s")
    assert rewritten == "accelerate launch --mixed_precision bf16 train.py \\\n" + (
        '\t--resume "/s" \\\n\t--seed 1 \\\n\t--out o'
    )
    assert argv_bash_passes(rewritten, tmp_path) == [
        "launch",
        "--mixed_precision",
        "bf16",
        "train.py",
        "--resume",
        "/s",
        "--seed",
        "1",
        "--out",
        "o",
    ]


def test_option_semantics() -> None:
    """option(): last one wins, `=` form, bare flags give "", absent gives None."""
    command = parse_train_script(
        "python t.py --a 1 --a=2 --flag --b --c -1 --resume_from_huggingface --e"
    )
    assert command.option("a") == "2"
    assert command.option("--flag") == ""
    assert command.option("b") == ""
    assert command.option("c") == "-1"
    assert command.option("e") == ""
    assert command.option("missing") is None
    assert not command.has_option("resume")
    assert command.resume is None
    assert not command.save_state


# ---------------------------------------------------------------------------
# Errors


def test_script_without_python_command_is_refused() -> None:
    """No *.py word: the error says what command was expected."""
    with pytest.raises(TrainScriptError, match="no trainer command") as caught:
        parse_train_script("#!/bin/bash\necho 'train.py'x\n")
    assert "accelerate launch ... sd-scripts/flux_train_network.py" in str(caught.value)


def test_windows_line_endings_are_named() -> None:
    """A CRLF script (bash would not run it either) gets a hint in the error."""
    with pytest.raises(TrainScriptError, match="Windows line endings"):
        parse_train_script("accelerate launch train.py\r\n  --a 1\r\n")


def test_two_python_commands_are_ambiguous() -> None:
    """Two commands running *.py scripts: the error names both lines."""
    with pytest.raises(TrainScriptError, match="ambiguous") as caught:
        parse_train_script("python prepare.py\n\naccelerate launch train.py --a 1\n")
    assert "line 1" in str(caught.value)
    assert "line 3" in str(caught.value)


@pytest.mark.parametrize(
    ("broken", "what"),
    [
        ('  --output_dir "/app/x \\\n', "double quote"),
        ("  --output_dir '/app/x \\\n", "single quote"),
        ("  --output_dir $(basename x \\\n", "$(...) expansion"),
    ],
)
def test_unterminated_quote_names_its_line(broken: str, what: str) -> None:
    """An unterminated quote is reported with the line it was opened on."""
    text = "accelerate launch \\\n  train.py \\\n" + broken + "  --seed 1\n"
    with pytest.raises(TrainScriptError, match=re.escape(f"line 3: unterminated {what}")):
        parse_train_script(text)


def test_here_documents_are_refused() -> None:
    """Here-documents are out of scope and say so instead of being misread."""
    with pytest.raises(TrainScriptError, match="line 1: here-documents"):
        parse_train_script("cat <<EOF\ntrain.py\nEOF\npython x.py\n")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/a\nb", "checkpoint path contains a newline; refusing to write it into train.sh"),
        ("/a\0b", "checkpoint path contains a NUL byte"),
        ("", "checkpoint path is empty"),
        ("-state", "starts with '-'"),
    ],
)
def test_unwritable_checkpoint_paths_are_refused(path: str, message: str) -> None:
    """A path that cannot be written safely into train.sh raises instead of being written."""
    with pytest.raises(TrainScriptError, match=re.escape(message)):
        set_resume(read_text_exact(DEFAULT_FIXTURE), path)


def test_quote_word_escapes_only_what_double_quotes_need() -> None:
    """quote_word escapes backslash, double quote, dollar and backquote, nothing else."""
    assert quote_word("/a b/'c'") == "\"/a b/'c'\""
    assert quote_word('\\"$`') == '"\\\\\\"\\$\\`"'
    with pytest.raises(TrainScriptError, match="value contains a newline"):
        quote_word("a\nb")


# ---------------------------------------------------------------------------
# Generated scripts


FLAG_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(
    lambda name: name != "resume"
) | st.just("resume_from_huggingface")
TRICKY_CHARACTERS = " \t'\"$`\\!*?[]{}~#;&|<>()=%,:é中😀"
VALUES = st.text(
    alphabet=st.characters(
        exclude_categories=("Cs", "Cc", "Zl", "Zp"),
        include_characters=TRICKY_CHARACTERS,
    ),
    max_size=12,
).filter(lambda value: not value.startswith("-"))
PATHS = VALUES.filter(bool)
SAFE_BARE = re.compile(r"[A-Za-z0-9_./:=+,@%-]+")
INDENTS = st.sampled_from(["", " ", "  ", "    ", "\t"])
PREAMBLE_LINES = st.sampled_from(
    [
        "#!/usr/bin/env bash",
        "set -e",
        "export HF_HOME=/tmp/hf-cache",
        "cd .",
        "# hand edit: 'quote and a trailing backslash \\",
        "",
        "umask 022; true && true",
    ]
)


@st.composite
def rendered_values(draw: st.DrawFn, value: str) -> str:
    styles = ["double"]
    if "'" not in value:
        styles.append("single")
    if SAFE_BARE.fullmatch(value):
        styles.append("bare")
    style = draw(st.sampled_from(styles))
    if style == "single":
        return f"'{value}'"
    return value if style == "bare" else quote_word(value)


@st.composite
def rendered_options(draw: st.DrawFn, name: str, value: str | None) -> str:
    flag = draw(st.sampled_from([f"--{name}", f"\\--{name}", f'"--{name}"']))
    if value is None:
        return flag
    if draw(st.booleans()):
        return f"{flag}={draw(rendered_values(value))}"
    return f"{flag} {draw(rendered_values(value))}"


@st.composite
def train_scripts(draw: st.DrawFn) -> tuple[str, str]:
    """A train.sh in FluxGym's spirit, returned as (preamble, whole text)."""
    preamble = "".join(f"{line}\n" for line in draw(st.lists(PREAMBLE_LINES, max_size=3)))
    options = [
        draw(rendered_options(name, value))
        for name, value in draw(
            st.lists(st.tuples(FLAG_NAMES, st.none() | VALUES), max_size=6),
        )
    ]
    for _ in range(draw(st.integers(0, 2))):
        existing = draw(rendered_options("resume", draw(PATHS)))
        options.insert(draw(st.integers(0, len(options))), existing)
    # Several options may share a line; each line gets its own indentation.
    lines: list[str] = []
    for option in options:
        shares_line = draw(st.booleans())
        if lines and shares_line:
            lines[-1] += f" {option}"
        else:
            lines.append(draw(INDENTS) + option)
    launcher = "accelerate launch" + draw(st.sampled_from(["", " --mixed_precision bf16"]))
    script = draw(st.sampled_from(["sd-scripts/flux_train_network.py", '"my dir/train.py"']))
    if draw(st.booleans()):
        head = f"{launcher} \\\n{draw(INDENTS)}{script}"
    else:
        head = f"{launcher} {script}"
    ending = draw(st.sampled_from(["", " \\", "\n", "\ntrue >/dev/null 2>&1 # done\n"]))
    return preamble, preamble + " \\\n".join([head, *lines]) + ending


def command_words(text: str, preamble: str) -> list[str]:
    """The trainer command's words per shlex, after joining continuation lines."""
    assert text.startswith(preamble)
    joined = text[len(preamble) :].replace("\\\n", "").removesuffix("\\")
    return shlex.split(joined.split("\n", 1)[0])


@settings(max_examples=200, deadline=None)
@given(train_scripts(), PATHS)
def test_generated_scripts_resume_from_exactly_the_path(script: tuple[str, str], path: str) -> None:
    """For any generated script set_resume yields one --resume with the path, nothing else new."""
    preamble, text = script
    rewritten = set_resume(text, path)
    before = parse_train_script(text)
    after = parse_train_script(rewritten)
    assert after.resume == path
    assert count_resume_words(command_words(rewritten, preamble)) == 1
    assert set_resume(rewritten, path) == rewritten
    assert without_resume(after.trainer_args) == without_resume(before.trainer_args)
    assert after.launcher_args == before.launcher_args
    assert remove_resume(rewritten) == remove_resume(text)
    assert parse_train_script(remove_resume(text)).resume is None


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(script=train_scripts(), path=PATHS)
def test_generated_scripts_agree_with_bash(
    tmp_path: Path, script: tuple[str, str], path: str
) -> None:
    """Bash gives accelerate exactly the argv that parse_train_script predicts, before and after."""
    _, text = script
    rewritten = set_resume(text, path)
    for version in (text, rewritten):
        assert argv_bash_passes(version, tmp_path) == expected_argv(parse_train_script(version))
    if parse_train_script(text).resume is None:
        argv = argv_bash_passes(rewritten, tmp_path)
        script_at = argv.index(parse_train_script(text).trainer_script)
        assert argv[script_at + 1 : script_at + 3] == ["--resume", path]
