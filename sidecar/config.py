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

from sidecar.observe.trainer_processes import DEFAULT_TRAINER_PATTERN
from sidecar.run.path_map import PathMap, PathMapError

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


def parse_duration_or_auto(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"expected auto or {DURATION_FORMAT}, got {value!r}") from None


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


# The trainer packages in sidecar/trainers, by name (a test keeps the two in step).
TrainerName = Literal["auto", "sd-scripts", "hf-trainer", "diffusers", "ai-toolkit", "onetrainer"]


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
    trainer: Literal[
        "auto", "sd-scripts", "hf-trainer", "diffusers", "ai-toolkit", "onetrainer"
    ] = Field(
        "auto",
        description="The trainer the launch script runs; auto: the one its command line is "
        "recognised as (kohya_ss GUI runs are sd-scripts; Axolotl, LLaMA-Factory and TRL "
        "are hf-trainer).",
    )
    follow: Literal["off", "kohya-gui"] = Field(
        "off",
        description="kohya-gui: with no SIDECAR_TRAIN_SCRIPT, wait for the run the kohya_ss GUI "
        "starts, capture its command line, working directory and environment into "
        "<output>/.sidecar/kohya_gui_launch.sh, watch it, and after a stall or crash relaunch "
        "that script with --resume (process mode).",
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
    restart_mode: Literal["process", "container", "exec", "signal", "pod", "none"] = Field(
        "process",
        description="process: launch and supervise train.sh; container: restart the trainer "
        "container; exec: relaunch train.sh inside a long-lived container; signal: stop the "
        "trainer's processes and let the orchestrator restart it; pod: delete the sidecar's own "
        "Kubernetes pod so its controller replaces it (multi-node); none: detect and report only.",
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
    pod_name: str | None = Field(
        None,
        description="pod mode: the name of the pod the sidecar runs in, from the downward API "
        "(metadata.name); required in pod mode.",
    )
    pod_namespace: str | None = Field(
        None,
        description="pod mode: that pod's namespace, from the downward API (metadata.namespace); "
        "required in pod mode.",
    )
    # With a native sidecar the kubelet stops the trainer before the sidecar: without a word
    # from the trainer's container, a preemption would look like a crash.
    termination_file: Path | None = Field(
        None,
        description="signal and pod modes: a file the trainer container's wrapper creates when "
        "the platform stops the pod (preemption, eviction, drain); the trainer found gone "
        "while it exists was interrupted, not crashed.",
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
    # Section-aware by default: the trainer says what it is doing (training, sampling, a
    # save, an epoch boundary), and each gets its own learned budget, so a hang in an
    # ordinary step is caught within a minute while a long save or sampling is never cut short.
    stall_timeout: Annotated[float | Literal["auto"], BeforeValidator(parse_duration_or_auto)] = (
        Field(
            "auto",
            description="No progress (step, log growth, output files) for this long = stalled; "
            "auto: per section the trainer announces (training, sampling, saving, epoch "
            "boundary), 3 x what this run showed, between SIDECAR_STALL_TIMEOUT_FLOOR and "
            "SIDECAR_STALL_TIMEOUT_CEILING.",
        )
    )
    # A training step of seconds: a minute of silence in the training section is a hang.
    stall_timeout_floor: Duration = Field(
        60.0,
        description="With SIDECAR_STALL_TIMEOUT=auto: the training section's shortest timeout.",
    )
    # FluxGym on a 12 GB card logs ~50 s per step, and sample generation or a state save of a
    # Flux LoRA can take minutes: a quarter of an hour is beyond any of those, and is what a
    # section not learned yet (or silence in no known section) gets.
    stall_timeout_ceiling: Duration = Field(
        900.0,
        description="With SIDECAR_STALL_TIMEOUT=auto: the longest, and the timeout of a section "
        "not learned yet.",
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
    # A reboot, a preemption or a recreated container is not the run's own failure: it is
    # resumed without spending the restart budget, and bounded by a budget of its own.
    resume_interrupted: bool = Field(
        True,
        description="At start, resume the run that was interrupted (the sidecar or the machine "
        "went away while it trained) from its newest complete state, by itself.",
    )
    max_interruptions: int = Field(
        5,
        ge=1,
        description="Interruptions in a row with no new complete state in between before the "
        "sidecar gives up on the run (a machine that dies every few minutes).",
    )
    # NVRx stops after 3 restarts without progress: a hang that comes back every time from
    # the same checkpoint will not go away by itself, and the budget is for other failures.
    max_futile_recoveries: int = Field(
        3,
        ge=1,
        description="Recoveries in a row that resume from the same checkpoint (the attempts "
        "between them saved nothing newer) before the sidecar stops (exit 4: do not requeue).",
    )
    remediate: bool = Field(
        False,
        description="When the same hang class comes back from the same checkpoint, apply its "
        "known mitigation to train.sh (logged with the diff; train.sh.orig is kept).",
    )
    gpu_release_timeout: Duration = Field(
        60.0,
        description="After stopping a trainer, how long to wait for the GPU memory it held to "
        "be released before relaunching (NVML process list; 0 turns the wait off).",
    )
    kill_grace: Duration = Field(
        30.0, description="SIGTERM-to-SIGKILL delay when stopping the trainer."
    )
    restart_backoff: Duration = Field(
        10.0, description="Delay before the first relaunch; doubles for each consecutive recovery."
    )
    restart_backoff_max: Duration = Field(300.0, description="Upper bound of the relaunch delay.")
    # FluxGym saves state every 4 epochs: on a slow card an incident can cost hours. 30 min
    # of lost training is what a person watching would accept; each save costs a few
    # seconds of GPU time and one state folder of disk (bounded by the sidecar too).
    max_lost_work: Duration = Field(
        1800.0,
        description="Most training an incident may lose: the state cadence is made denser "
        "for the next launch once the step time is known (0 turns this off).",
    )
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
    # Outside the ports of what usually shares a GPU pod's or host's network: FluxGym 7860,
    # TensorBoard 6006, Jupyter 8888, the ubiquitous 8080, node_exporter 9100, Prometheus 9090,
    # NVIDIA's DCGM exporter 9400, OpenTelemetry's exporter 9464. On by default so that the
    # health checks and probes have an endpoint without extra configuration.
    http_port: int = Field(
        9477,
        ge=0,
        le=65535,
        description="Port of the status page (/), /status.json, /healthz, /readyz and /metrics "
        "on 0.0.0.0; 0 disables the endpoint (the healthcheck then reads the heartbeat file).",
    )
    page_url: str | None = Field(
        None,
        description="The status page's address as people reach it (e.g. http://gpu-box:9477/), "
        "given in the restart notification, and a host the page answers to without a token; "
        "unset: the notification names the port.",
    )
    http_token: str | None = Field(
        None,
        description="When set, /, /status.json and /metrics need it: as a bearer token or as "
        "the password of HTTP basic auth (any user). Set it before publishing the port.",
    )
    webhook_url: str | None = Field(
        None,
        description="Receives a JSON POST on stall, restart, give-up and completion (Slack- and "
        "Discord-compatible: text and content fields).",
    )
    webhook_headers: str = Field(
        "",
        description="Extra headers for the webhook, as 'Name: value; Name2: value' "
        "(e.g. Authorization).",
    )
    webhook_secret: str | None = Field(
        None,
        description="When set, each webhook body is signed: header X-Sidecar-Signature-256 is "
        "sha256=HMAC-SHA256(secret, body) in hex.",
    )
    incidents_keep: int = Field(
        20,
        ge=0,
        description="Incident bundles kept in <state dir>/incidents (newest first); 0 saves none.",
    )
    python_stacks: bool = Field(
        True,
        description="On a stall, read the trainer's Python stacks with py-spy (it attaches "
        "with ptrace, without pausing it) for the diagnosis and the incident bundle.",
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

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("webhook_headers")
    @classmethod
    def _check_webhook_headers(cls, value: str) -> str:
        parse_headers(value)
        return value

    @model_validator(mode="after")
    def _check_mode_needs(self) -> Settings:
        if self.restart_mode in ("container", "exec") and not self.trainer_container:
            raise ValueError(
                f"restart mode {self.restart_mode} needs SIDECAR_TRAINER_CONTAINER "
                "(a container name, ID or compose service)"
            )
        if self.restart_mode == "pod":
            missing = [
                env_name(name) for name in ("pod_name", "pod_namespace") if not getattr(self, name)
            ]
            if missing:
                raise ValueError(
                    f"restart mode pod needs {' and '.join(missing)}, from the downward API "
                    "(fieldRef metadata.name and metadata.namespace)"
                )
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def stall_timeout_bound(self) -> float:
        """The longest the stall timeout can be: the fixed value, or the adaptive ceiling."""
        return self.stall_timeout_ceiling if self.stall_timeout == "auto" else self.stall_timeout

    @property
    def path_mapping(self) -> PathMap:
        return PathMap.parse(self.path_map)

    @property
    def webhook_header_map(self) -> dict[str, str]:
        return parse_headers(self.webhook_headers)

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log, with secrets hidden.

        Slack's and Discord's webhook URLs carry their token in the path, and webhook headers
        usually carry credentials, so only the URL's host and the header names are shown.
        """
        shown: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            secret = any(word in name for word in ("secret", "token", "password"))
            shown[name] = "***" if secret and value else value
        if self.webhook_url:
            shown["webhook_url"] = re.sub(r"^(https?://[^/]+).*$", r"\1/***", self.webhook_url)
        if self.webhook_headers:
            shown["webhook_headers"] = "; ".join(f"{key}: ***" for key in self.webhook_header_map)
        return shown


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token


def parse_headers(text: str) -> dict[str, str]:
    """``Name: value; Name2: value`` as a dict; a ValueError naming the format otherwise."""
    headers: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        name, colon, value = item.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _HEADER_NAME.match(name) or "\n" in value or "\r" in value:
            raise ValueError("expected 'Name: value; Name2: value'")
        headers[name] = value
    return headers


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
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a rule across settings; its message names the variables
            lines.append(message)
            continue
        field = str(problem["loc"][0])
        given = problem.get("input")
        lines.append(
            f"{env_name(field)} (--{field.replace('_', '-')}): {message}"
            + (f" (got {given!r})" if given is not None and not isinstance(given, dict) else "")
        )
    return "invalid configuration: " + "; ".join(lines)
