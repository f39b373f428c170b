"""Settings: durations, validation messages, CLI overrides, and the README table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config import (
    ConfigError,
    Settings,
    env_name,
    load_settings,
    parse_duration,
    parse_duration_or_auto,
)

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("1h", 3600), ("1.5s", 1.5), ("250ms", 0.25), (7, 7)],
)
def test_durations_accept_the_documented_forms(text, seconds):
    """90, 90s, 10m, 1h (and fractions) are seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["ten minutes", "5d", "-3s", "", "1h30"])
def test_bad_durations_are_refused(text):
    """Anything else is an error naming the expected format."""
    with pytest.raises(ValueError, match="90s, 10m or 1h"):
        parse_duration(text)


def test_environment_is_read_with_the_prefix(monkeypatch):
    """SIDECAR_* variables set the fields."""
    monkeypatch.setenv("SIDECAR_STALL_TIMEOUT", "10m")
    monkeypatch.setenv("SIDECAR_MAX_RESTARTS", "4")
    monkeypatch.setenv("SIDECAR_GPU_INDICES", "0,2")
    settings = load_settings()
    assert settings.stall_timeout == 600
    assert settings.max_restarts == 4
    assert settings.gpu_indices == [0, 2]


def test_flags_override_the_environment(monkeypatch):
    """A CLI flag wins over its variable."""
    monkeypatch.setenv("SIDECAR_POLL_INTERVAL", "10s")
    assert load_settings({"poll_interval": "3s"}).poll_interval == 3


def test_bad_value_names_the_variable(monkeypatch):
    """The error names SIDECAR_<NAME> and what was expected."""
    monkeypatch.setenv("SIDECAR_STALL_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match=r"SIDECAR_STALL_TIMEOUT .*90s, 10m or 1h"):
        load_settings()


def test_bad_path_map_is_refused(monkeypatch):
    """A path map without a colon or with relative prefixes is refused with the format."""
    monkeypatch.setenv("SIDECAR_PATH_MAP", "outputs")
    with pytest.raises(ConfigError, match=r"SIDECAR_PATH_MAP.*sidecar_prefix:trainer_prefix"):
        load_settings()


def test_bad_value_exits_2_with_a_message(tmp_path):
    """The real command exits 2 and says which variable is wrong."""
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env={"SIDECAR_KILL_GRACE": "forever", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "SIDECAR_KILL_GRACE" in result.stderr
    assert "expected a duration" in result.stderr


def test_help_lists_every_setting_with_its_variable(capsys):
    """--help shows each flag with its environment variable and default."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text
        assert env_name(name) in text


def test_readme_table_matches_the_settings_model():
    """Every SIDECAR_* variable appears in the README table with its real default, and no others."""
    # Cells may hold escaped pipes (\|), as the trainer pattern's default does.
    row = re.compile(r"^\| `(SIDECAR_[A-Z_]+)` \| ((?:\\\||[^|])*) \|", re.M)
    cells = row.findall(README.read_text())
    rows = {name: cell.replace("\\|", "|") for name, cell in cells}
    expected = {env_name(name) for name in Settings.model_fields}
    assert set(rows) == expected
    for name, field in Settings.model_fields.items():
        documented = rows[env_name(name)].strip().strip("`")
        assert documented == readme_default(field), name


def readme_default(field):
    value = field.default
    if value is None or value == "":
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    durations = (parse_duration, parse_duration_or_auto)
    if any(getattr(meta, "func", None) in durations for meta in field.metadata):
        return _duration_text(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _duration_text(seconds):
    if seconds == "auto":
        return "auto"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def test_a_rule_across_settings_names_the_missing_variable(monkeypatch):
    """container mode without a trainer container names SIDECAR_TRAINER_CONTAINER."""
    monkeypatch.setenv("SIDECAR_RESTART_MODE", "container")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "SIDECAR_TRAINER_CONTAINER" in str(raised.value)
    assert "SIDECAR_? " not in str(raised.value)
