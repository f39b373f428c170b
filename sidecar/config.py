"""The sidecar's configuration: read once at start, validated, immutable.

Every setting comes from a ``SIDECAR_*`` environment variable or the matching
command-line flag (the flag wins). The names are a contract: users put them in
compose files and Kubernetes manifests, and the README's table is checked
against this model by a test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sidecar.path_map import PathMap, PathMapError
from sidecar.trainer_processes import DEFAULT_TRAINER_PATTERN

ENV_PREFIX = "SIDECAR_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DURATION_FORMAT = "a duration such as 90, 90s, 10m or 1h"


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``1h`` (or a number)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected {DURATION_FORMAT}, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"expected {DURATION_FORMAT}, got a negative value")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _parse_gpu_indices(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        if value in ("", "all"):
            return None
        try:
            return [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(
                f"expected 'all' or a comma-separated list such as 0,1; got {value!r}"
            ) from None
    return value


class Settings(BaseSettings):
    """All of the sidecar's settings. Field descriptions feed ``--help`` and the README."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        env_ignore_empty=True,
    )

    train_script: Path | None = Field(
        None,
        description="Path of train.sh as the sidecar sees it (required by run, check, resume).",
    )
    output_dir: Path | None = Field(
        None,
        description="The run's output folder as the sidecar sees it; default: train.sh's "
        "--output_dir mapped through SIDECAR_PATH_MAP, else the script's folder.",
    )
    path_map: str = Field(
        "",
        description="sidecar_prefix:trainer_prefix[,...] when the trainer sees the shared volume "
        "at another path; paths written into train.sh are always the trainer's view.",
    )
    trainer_workdir: Path | None = Field(
        None,
        description="Working directory for launching train.sh; default: the FluxGym root when the "
        "script is <root>/outputs/<name>/train.sh, else the script's folder.",
    )
    restart_mode: Literal["process", "container", "exec", "signal", "none"] = Field(
        "process",
        description="process: launch and supervise train.sh; container: restart the trainer "
        "container; exec: relaunch train.sh inside a long-lived container; signal: stop the "
        "trainer's processes and let the orchestrator restart it; none: detect and report only.",
    )
    trainer_container: str | None = Field(
        None,
        description="container and exec modes: the trainer's container, by name, ID or compose "
        "service.",
    )
    compose_project: str | None = Field(
        None,
        description="Compose project in which SIDECAR_TRAINER_CONTAINER is a service; default: "
        "the sidecar's own project.",
    )
    trainer_pattern: str = Field(
        DEFAULT_TRAINER_PATTERN,
        description="exec, signal modes and run following: regular expression over a process's "
        "command line that picks out the training processes (never the web UI).",
    )
    keep_resume_current: bool = Field(
        True,
        description="container, exec, signal modes: while the run is healthy, point train.sh's "
        "--resume at each new complete checkpoint, so any restart resumes.",
    )
    docker_retry_window: Duration = Field(
        60.0,
        description="How long transient Docker failures (daemon unreachable, 5xx) are retried.",
    )
    poll_interval: Duration = Field(2.0, description="How often the run is observed.")
    # FluxGym on a 12 GB card logs ~50 s per step, and sample generation or a state save of a
    # Flux LoRA can take minutes without moving the step counter; a quarter of an hour with no
    # log line and no file written is far beyond any of those.
    stall_timeout: Duration = Field(
        900.0, description="No progress (step, log growth, output files) for this long = stalled."
    )
    gpu_idle_timeout: Duration = Field(
        300.0,
        description="Faster verdict: every watched GPU below SIDECAR_GPU_IDLE_PERCENT and no "
        "progress for this long = stalled.",
    )
    gpu_idle_percent: float = Field(
        5.0, ge=0, le=100, description="GPU utilisation below this is idle."
    )
    gpu_indices: Annotated[list[int] | None, BeforeValidator(_parse_gpu_indices)] = Field(
        None, description="GPUs to watch: 'all' or a list such as 0,1."
    )
    # Loading Flux (a 23 GB checkpoint, converted to fp8 on the fly) and caching latents and
    # text-encoder outputs print little and can take well over ten minutes on slow disks.
    startup_grace: Duration = Field(
        1200.0, description="After each (re)launch, how long to wait for first progress."
    )
    max_restarts: int = Field(10, ge=0, description="Recoveries allowed before giving up.")
    kill_grace: Duration = Field(
        30.0, description="SIGTERM-to-SIGKILL delay when stopping the trainer."
    )
    restart_backoff: Duration = Field(
        10.0, description="Delay before the first relaunch; doubles for each consecutive recovery."
    )
    restart_backoff_max: Duration = Field(300.0, description="Upper bound of the relaunch delay.")
    # accelerate writes a state folder's files one after another; a folder only counts once
    # nothing in it has changed for this long.
    checkpoint_settle: Duration = Field(
        10.0, description="A checkpoint must be unchanged this long to count as complete."
    )
    ensure_save_state: bool = Field(
        True, description="Add --save_state to train.sh when missing (without it nothing resumes)."
    )
    fallback: Literal["giveup", "scratch"] = Field(
        "giveup",
        description="With no usable checkpoint left: giveup, or scratch = restart from the start.",
    )
    state_dir: Path | None = Field(
        None, description="Where the sidecar keeps its ledger; default <output dir>/.sidecar."
    )
    train_log: Path | None = Field(
        None,
        description="The trainer's log; default <output dir>/train.log (written by process mode).",
    )
    echo_trainer_output: bool = Field(
        True, description="Copy the trainer's output to the sidecar's stderr (process mode)."
    )
    heartbeat_file: Path = Field(
        Path("/tmp/training-sidecar.heartbeat"),
        description="Touched by the loop on every poll; `training-sidecar healthcheck` reads it.",
    )
    log_format: Literal["json", "console"] | None = Field(
        None, description="json or console; default: json unless stdout is a terminal."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Minimum level of the sidecar's own log events."
    )

    @field_validator("path_map")
    @classmethod
    def _check_path_map(cls, value: str) -> str:
        try:
            PathMap.parse(value)
        except PathMapError as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("trainer_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"expected a regular expression: {error}") from None
        return value

    @model_validator(mode="after")
    def _check_mode_needs(self) -> Settings:
        if self.restart_mode in ("container", "exec") and not self.trainer_container:
            raise ValueError(
                f"restart mode {self.restart_mode} needs SIDECAR_TRAINER_CONTAINER "
                "(a container name, ID or compose service)"
            )
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def path_mapping(self) -> PathMap:
        return PathMap.parse(self.path_map)

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log, with secrets hidden."""
        shown: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            secret = any(word in name for word in ("secret", "token", "password"))
            shown[name] = "***" if secret and value else value
        return shown


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


class ConfigError(Exception):
    """A setting is invalid; the message names the variable and the expected format."""


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from the environment, with ``overrides`` (CLI flags) on top."""
    try:
        return Settings(**(overrides or {}))
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else "?"
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        lines.append(
            f"{env_name(field)} (--{field.replace('_', '-')}): {message}"
            + (f" (got {given!r})" if given is not None and not isinstance(given, dict) else "")
        )
    return "invalid configuration: " + "; ".join(lines)
