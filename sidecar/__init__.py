"""training-sidecar: keeps long GPU training runs alive unattended."""

__version__ = "0.1.0"
