"""sd-scripts' state folder names (train_util.py), and which of them cannot be resumed.

With ``--save_state`` sd-scripts saves into ``<output_name>-step%08d-state`` every
``--save_every_n_steps``, ``<output_name>-%06d-state`` every ``--save_every_n_epochs``,
and ``<output_name>-state`` once training ends. That last one is the end-of-training
state: sd-scripts cannot resume from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.checkpoints.naming import CandidateKind, NamedState

__all__ = ["FINAL_STATE_PROBLEM", "SdScriptsStateNaming", "state_naming"]

FINAL_STATE_PROBLEM = "end-of-training state: sd-scripts cannot resume from it"

# FluxGym's sample images live next to the state folders and are never state.
_NOT_STATE_FOLDERS = frozenset({"sample"})


@dataclass(frozen=True)
class SdScriptsStateNaming:
    """sd-scripts' state folder names, optionally for one output_name."""

    step: re.Pattern[str]
    epoch: re.Pattern[str]
    final: re.Pattern[str]

    @classmethod
    def for_output_name(cls, output_name: str | None) -> SdScriptsStateNaming:
        prefix = ".+" if output_name is None else re.escape(output_name)
        # {:06d} and {:08d} are minimum widths, so longer numbers are still the same naming.
        return cls(
            step=re.compile(rf"{prefix}-step(\d{{8,}})-state"),
            epoch=re.compile(rf"{prefix}-(\d{{6,}})-state"),
            final=re.compile(rf"{prefix}-state"),
        )

    @property
    def ignored_folders(self) -> frozenset[str]:
        return _NOT_STATE_FOLDERS

    def classify(self, folder_name: str) -> NamedState | None:
        # Step and epoch first: without an output_name, "x-000004-state" also fits final.
        if match := self.step.fullmatch(folder_name):
            return "step", int(match[1])
        if match := self.epoch.fullmatch(folder_name):
            return "epoch", int(match[1])
        if self.final.fullmatch(folder_name):
            return "final", None
        if self is not _ANY_NAME and _ANY_NAME.classify(folder_name) == ("final", None):
            # Another output_name's end-of-training state in the same folder: sd-scripts
            # cannot resume from it either, so it must never be chosen as a plain folder.
            return "final", None
        return None

    def refusal(self, kind: CandidateKind) -> str | None:
        return FINAL_STATE_PROBLEM if kind == "final" else None


_ANY_NAME = SdScriptsStateNaming.for_output_name(None)


def state_naming(output_name: str | None) -> SdScriptsStateNaming:
    """sd-scripts' naming for the run saving as ``output_name`` (None: any output_name)."""
    return SdScriptsStateNaming.for_output_name(output_name)
