"""How the sidecar acts on the trainer: one interchangeable part per restart mode."""

from sidecar.restarters.base import Restarter, RestartError

__all__ = ["RestartError", "Restarter"]
