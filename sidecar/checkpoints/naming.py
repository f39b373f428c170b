"""What a state folder's name says, as each trainer names its folders.

The scan (``scan``) is the same for every accelerate-based trainer; only the names
differ: sd-scripts writes ``<name>-step00000100-state``, another trainer its own
pattern. A trainer package provides a :class:`StateNaming` that reads its names, and
the scan asks it about every folder it finds.
"""

from __future__ import annotations

from typing import Literal, Protocol, TypeAlias

__all__ = ["CandidateKind", "NamedState", "StateNaming"]

# "accelerate": a folder no naming claims that holds accelerate's files all the same
# (e.g. a hand-made copy); the scan gives it that kind itself.
CandidateKind = Literal["epoch", "step", "final", "accelerate"]
NamedState: TypeAlias = tuple[CandidateKind, int | None]  # kind, and the number in the name


class StateNaming(Protocol):
    """One trainer's state folder names (for one run's output name, where it has one)."""

    @property
    def ignored_folders(self) -> frozenset[str]:
        """Folder names in the output folder that never hold state (e.g. sample images)."""
        ...

    def classify(self, folder_name: str) -> NamedState | None:
        """The kind and number a state folder of this name has, or None for another name."""
        ...

    def refusal(self, kind: CandidateKind) -> str | None:
        """Why a folder of this kind can never be resumed from, however whole; None if it can."""
        ...
