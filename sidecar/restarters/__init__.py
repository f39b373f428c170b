"""How the sidecar acts on the trainer: one interchangeable part per restart mode."""

from __future__ import annotations

from sidecar.restarters.base import Restarter, RestartError, TrainerStatus

__all__ = ["RestartError", "Restarter", "TrainerStatus"]
