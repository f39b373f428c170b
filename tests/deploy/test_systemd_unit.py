"""The systemd unit for process mode at boot (deploy/systemd/), and its settings file.

``systemd-analyze verify`` checks the shipped unit as systemd would load it. verify insists
that ExecStart='s binary exists and resolves User= where it can, so the unit is verified as a
copy in which exactly two lines differ: ExecStart= names this venv's own ``training-sidecar``
(the install path /opt/training-sidecar/.venv exists on no test machine) and User= the
current user (the shipped one is a placeholder). Every other line is the shipped one. Without
systemd-analyze that one test is skipped, saying so; the others read the files only.

The other checks tie the files to the code they describe: the exit codes that must not be
restarted, the SIGTERM exit status, the kill grace the stop timeout must exceed, the console
script's name, and every SIDECAR_* name (and shown default) in the .env example.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT

from sidecar.cli import EXIT_USAGE
from sidecar.config import Settings, env_name, load_settings, parse_duration
from sidecar.watchdog import (
    EXIT_COMPLETED,
    EXIT_GAVE_UP,
    EXIT_GPU_NEEDS_RESET,
    EXIT_HOST_NEEDS_ATTENTION,
    EXIT_NO_PROGRESS,
)

SYSTEMD = REPO_ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "training-sidecar.service"
ENV_EXAMPLE = SYSTEMD / "training-sidecar.env.example"
INSTALLED_BINARY = "/opt/training-sidecar/.venv/bin/training-sidecar"
ENV_FILE = "/etc/training-sidecar.env"
# A SIDECAR_* assignment, commented out (a default or an example) or not.
_ASSIGNMENT = re.compile(r"^\s*(?P<commented>#\s*)?(?P<name>SIDECAR_[A-Z0-9_]*)=(?P<value>.*)$")


def unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, in order (a key may repeat); comments and blanks dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"no continuation lines, please: {raw!r}"
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, f"an entry before any section: {raw!r}"
        key, equals, value = line.partition("=")
        assert equals, f"not a key=value line: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return unit_entries(UNIT.read_text())["Service"]


def only(values: list[str]) -> str:
    assert len(values) == 1, values
    return values[0]


def this_venvs_binary() -> Path:
    beside_python = Path(sys.executable).parent / "training-sidecar"
    found = beside_python if os.access(beside_python, os.X_OK) else None
    found = found or (Path(which) if (which := shutil.which("training-sidecar")) else None)
    if found is None:
        pytest.fail("no training-sidecar console script: pip install -e . into this venv")
    return found


def unit_for_this_machine(tmp_path: Path, text: str) -> Path:
    """The unit with only ExecStart='s binary and User= replaced, written under tmp_path."""
    user = pwd.getpwuid(os.getuid()).pw_name
    binary = str(this_venvs_binary())

    def for_this_machine(line: str) -> str:
        if line.startswith("ExecStart="):
            return line.replace(INSTALLED_BINARY, binary, 1)
        if line.startswith("User="):
            return f"User={user}"
        return line

    shipped = text.splitlines()
    adapted = [for_this_machine(line) for line in shipped]
    changed = [(a, b) for a, b in zip(shipped, adapted, strict=True) if a != b]
    assert [a.partition("=")[0] for a, _ in changed] == ["User", "ExecStart"], changed
    unit = tmp_path / UNIT.name  # verify wants a unit's own name
    unit.write_text("\n".join(adapted) + "\n")
    return unit


def verify(unit: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's status, and the lines of its output about this unit."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: the systemd package)")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Complaints about this unit name it or its file; a broken unit elsewhere on the machine
    # that verify happens to load is not this test's business.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if unit.name in line or str(unit) in line
    ]
    return result.returncode, ours


def test_systemd_analyze_verify_accepts_the_shipped_unit(tmp_path: Path) -> None:
    """Clean: no unknown key, no value systemd would ignore (verify only warns about those,
    so any output about the unit is a failure, not just the exit status)."""
    code, complaints = verify(unit_for_this_machine(tmp_path, UNIT.read_text()))
    assert code == 0 and complaints == [], complaints


def test_systemd_analyze_verify_would_catch_a_broken_line(tmp_path: Path) -> None:
    """The check above can fail: a value systemd cannot parse is reported."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=gently")
    code, complaints = verify(unit_for_this_machine(tmp_path, broken))
    assert any("kill mode" in line.lower() for line in complaints), (code, complaints)


def test_the_unit_runs_the_installed_console_script_with_the_env_file() -> None:
    entries = service()
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["training-sidecar"] == "sidecar.cli:main"
    assert only(entries["ExecStart"]) == f"{INSTALLED_BINARY} run"
    assert Path(INSTALLED_BINARY).name in scripts
    assert only(entries["EnvironmentFile"]) == ENV_FILE  # required, not "-" (optional)
    assert only(entries["User"]) not in ("", "root", "0")
    unit = unit_entries(UNIT.read_text())
    assert "network-online.target" in only(unit["Unit"]["After"]).split()
    assert "network-online.target" in only(unit["Unit"]["Wants"]).split()
    assert only(unit["Install"]["WantedBy"]) == "multi-user.target"


def test_restart_policy_matches_the_sidecars_exit_codes() -> None:
    """Restarted on failure, never after bad settings (2), giving up (3), no progress (4), a
    GPU that needs a reset (5) or a host that needs attention (6); a SIGTERM stop (143) is
    clean; 0 (completed) is a success without saying so."""
    entries = service()
    assert only(entries["Restart"]) == "on-failure"
    prevented = {int(code) for code in only(entries["RestartPreventExitStatus"]).split()}
    assert prevented == {
        EXIT_USAGE,
        EXIT_GAVE_UP,
        EXIT_NO_PROGRESS,
        EXIT_GPU_NEEDS_RESET,
        EXIT_HOST_NEEDS_ATTENTION,
    }
    assert EXIT_COMPLETED == 0 and EXIT_COMPLETED not in prevented
    success = {int(code) for code in only(entries["SuccessExitStatus"]).split()}
    assert success == {128 + signal.SIGTERM}  # sidecar/commands.py: 128 + the signal


def test_stopping_leaves_the_sidecar_time_to_stop_its_trainer() -> None:
    """SIGTERM to the sidecar alone (KillMode=mixed), and longer than its kill grace before
    systemd SIGKILLs the rest (with a margin for recording the interruption)."""
    entries = service()
    assert only(entries["KillMode"]) == "mixed"
    assert "KillSignal" not in entries  # SIGTERM: what the sidecar handles
    timeout = parse_duration(only(entries["TimeoutStopSec"]))
    kill_grace = Settings.model_fields["kill_grace"].default
    assert timeout >= kill_grace + 30, (timeout, kill_grace)


def env_example_assignments() -> list[tuple[bool, str, str]]:
    """(commented, name, value) of every SIDECAR_* line of the .env example."""
    found = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := _ASSIGNMENT.match(line):
            found.append((bool(match["commented"]), match["name"], match["value"].strip()))
    return found


def test_every_setting_in_the_env_example_is_a_real_setting() -> None:
    known = {env_name(field): field for field in Settings.model_fields}
    assignments = env_example_assignments()
    assert assignments, "no SIDECAR_* line found"
    unknown = [name for _, name, _ in assignments if name not in known]
    assert unknown == [], f"not settings (sidecar.config.Settings): {unknown}"
    active = {name for commented, name, _ in assignments if not commented}
    assert "SIDECAR_TRAIN_SCRIPT" in active, "the one required setting is not set"


def test_the_env_example_values_are_valid_and_commented_ones_are_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [name for name in os.environ if name.startswith("SIDECAR_")]:
        monkeypatch.delenv(name)
    known = {env_name(field): field for field in Settings.model_fields}
    defaults = load_settings()
    for commented, name, value in env_example_assignments():
        field = known[name]
        parsed = load_settings({field: value}) if value else defaults  # empty = unset
        if commented and Settings.model_fields[field].default is not None:
            assert getattr(parsed, field) == getattr(defaults, field), (
                f"{name}={value} is shown commented out as the default, which is "
                f"{getattr(defaults, field)!r}"
            )
    active = {name: value for commented, name, value in env_example_assignments() if not commented}
    for name, value in active.items():
        monkeypatch.setenv(name, value)
    load_settings()  # the uncommented lines together, read from the environment as systemd sets it
