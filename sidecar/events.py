"""Every event the sidecar logs, by name: the contract people alert on.

The loop, the restarters, metrics, webhooks, the live line and the demo all use these
constants, so that a misspelt name fails at import (and in mypy) instead of quietly zeroing a
metric or silencing a notification. ``CONTRACT`` is the list the README promises.
"""

from __future__ import annotations

from typing import Final

# The run and its recovery.
SIDECAR_STARTED: Final = "sidecar_started"
SIDECAR_STOPPED: Final = "sidecar_stopped"
CONFIGURATION_INVALID: Final = "configuration_invalid"
RUN_SELECTED: Final = "run_selected"
NEW_RUN_DETECTED: Final = "new_run_detected"
EARLIER_RUN_FILES: Final = "earlier_run_files"
TRAINER_STARTED: Final = "trainer_started"
TRAINING_PROGRESSING: Final = "training_progressing"
PROGRESS_RESUMED: Final = "progress_resumed"
STALL_DETECTED: Final = "stall_detected"
TRAINER_CRASHED: Final = "trainer_crashed"
RESUME_FAILED: Final = "resume_failed"
TRAINER_STOPPED: Final = "trainer_stopped"
STOPPING_TRAINER: Final = "stopping_trainer"
CHECKPOINT_SELECTED: Final = "checkpoint_selected"
CHECKPOINT_QUARANTINED: Final = "checkpoint_quarantined"
CHECKPOINT_SET_ASIDE: Final = "checkpoint_set_aside"
CHECKPOINT_NOT_SET_ASIDE: Final = "checkpoint_not_set_aside"
CHECKPOINT_PUT_BACK: Final = "checkpoint_put_back"
WAITING_FOR_GUI_RUN: Final = "waiting_for_gui_run"
GUI_RUN_CAPTURED: Final = "gui_run_captured"
TRAIN_SCRIPT_REWRITTEN: Final = "train_script_rewritten"
TRAIN_SCRIPT_NOT_UPDATED: Final = "train_script_not_updated"
SAVE_CADENCE_ADDED: Final = "save_cadence_added"
RESUME_POINTER_NOT_UPDATED: Final = "resume_pointer_not_updated"
RESTART_BACKOFF: Final = "restart_backoff"
LAUNCH_RETRY: Final = "launch_retry"
TRAINER_ADOPTED: Final = "trainer_adopted"
TRAINER_KILLED: Final = "trainer_killed"
TRAINER_PID_NOT_RECORDED: Final = "trainer_pid_not_recorded"
TRAINER_RESTARTED: Final = "trainer_restarted"
# exec mode, just before a relaunch: whose environment and working directory it uses.
RELAUNCH_ENVIRONMENT: Final = "relaunch_environment"
RESTART_FAILED: Final = "restart_failed"
TRAINING_COMPLETED: Final = "training_completed"
# The machine went away: interrupted runs, resumed by themselves or left alone.
RUN_INTERRUPTED: Final = "run_interrupted"
RUN_RESUMED_AFTER_INTERRUPTION: Final = "run_resumed_after_interruption"
INTERRUPTION_NOT_RESUMED: Final = "interruption_not_resumed"
WAITING_FOR_TRAINER_CONTAINER: Final = "waiting_for_trainer_container"
RUN_ABANDONED: Final = "run_abandoned"
DUPLICATE_TRAINER_STOPPED: Final = "duplicate_trainer_stopped"
GAVE_UP: Final = "gave_up"
# Processes that SIGKILL cannot end (uninterruptible sleep): no second trainer joins them.
HOST_NEEDS_ATTENTION: Final = "host_needs_attention"
REMEDY_APPLIED: Final = "remedy_applied"
TRAINER_UNREACHABLE: Final = "trainer_unreachable"
TRAINER_REACHABLE: Final = "trainer_reachable"
LEDGER_WRITE_FAILED: Final = "ledger_write_failed"
HEARTBEAT_FAILED: Final = "heartbeat_failed"

# Clients of the orchestrators.
DOCKER_RETRY: Final = "docker_retry"
DOCKER_SERVICE_AMBIGUOUS: Final = "docker_service_ambiguous"
DOCKER_OWN_CONTAINER_UNKNOWN: Final = "docker_own_container_unknown"
KUBERNETES_RETRY: Final = "kubernetes_retry"
POD_RESTART_ALLOWED: Final = "pod_restart_allowed"
POD_DELETING: Final = "pod_deleting"
POD_DELETED: Final = "pod_deleted"

# The GPU signal.
GPU_DETECTED: Final = "gpu_detected"
GPU_UNAVAILABLE: Final = "gpu_unavailable"
GPU_POLL_FAILED: Final = "gpu_poll_failed"
GPU_POLL_RECOVERED: Final = "gpu_poll_recovered"
GPU_INIT_RETRY_FAILED: Final = "gpu_init_retry_failed"
GPU_INDEX_MISSING: Final = "gpu_index_missing"
GPU_DRIVER_VERSION_UNKNOWN: Final = "gpu_driver_version_unknown"
GPU_SHUTDOWN_FAILED: Final = "gpu_shutdown_failed"
GPU_MEMORY_RELEASED: Final = "gpu_memory_released"
GPU_MEMORY_NOT_RELEASED: Final = "gpu_memory_not_released"
GPU_NEEDS_RESET: Final = "gpu_needs_reset"

# The trail: HTTP, incidents, webhooks, metrics.
HTTP_LISTENING: Final = "http_listening"
INCIDENT_SAVED: Final = "incident_saved"
INCIDENT_REPORT_FAILED: Final = "incident_report_failed"
# The hang's diagnosis: Python stacks cannot be read (said once), a class seen again.
STACKS_UNAVAILABLE: Final = "stacks_unavailable"
HANG_REPEATED: Final = "hang_repeated"
# A silence whose stacks show sampling or a save, moving: judged by that section's budget.
STALL_DEFERRED: Final = "stall_deferred"
NOTIFICATION_SENT: Final = "notification_sent"
NOTIFICATION_RETRY: Final = "notification_retry"
NOTIFICATION_FAILED: Final = "notification_failed"
NOTIFICATION_DROPPED: Final = "notification_dropped"
NOTIFICATIONS_ABANDONED: Final = "notifications_abandoned"
METRICS_SCRAPE_FAILED: Final = "metrics_scrape_failed"
HISTORY_NOT_SAVED: Final = "history_not_saved"
HISTORY_UNREADABLE: Final = "history_unreadable"
PAGE_FAILED: Final = "page_failed"

# The names the README lists as the contract to alert on.
CONTRACT: Final = (
    SIDECAR_STARTED,
    TRAINER_STARTED,
    STALL_DETECTED,
    TRAINER_CRASHED,
    CHECKPOINT_SELECTED,
    CHECKPOINT_QUARANTINED,
    CHECKPOINT_SET_ASIDE,
    TRAIN_SCRIPT_REWRITTEN,
    TRAINER_RESTARTED,
    RESTART_FAILED,
    TRAINING_COMPLETED,
    GAVE_UP,
    RUN_INTERRUPTED,
    RUN_RESUMED_AFTER_INTERRUPTION,
)

ALL: Final = frozenset(
    value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str)
)
