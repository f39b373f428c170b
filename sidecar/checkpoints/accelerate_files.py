"""The files accelerate's ``save_state`` writes into a state folder, and which must be there.

They are accelerate's, not one trainer's: every trainer that saves its state through
accelerate (sd-scripts among them) leaves the same set, so the scan judges any such
folder by this one list.
"""

from __future__ import annotations

import re
from collections.abc import Collection

__all__ = ["ACCELERATE_MARKER", "STATE_FILE", "missing_files"]

# Files accelerate's save_state writes, in its order; the numbered "_<i>" forms are
# the extra models, optimizers, schedulers and dataloaders, and one random state per process.
_WEIGHTS = re.compile(r"(?:model(?:_\d+)?\.safetensors|pytorch_model(?:_\d+)?\.bin)")
STATE_FILE = re.compile(
    r"train_state\.json"
    r"|model(?:_\d+)?\.safetensors|pytorch_model(?:_\d+)?\.bin"
    r"|(?:optimizer|scheduler|sampler|dl_state_dict)(?:_\d+)?\.bin"
    r"|scaler\.pt"
    r"|(?:random_states|custom_checkpoint)_\d+\.pkl"
)
# Any of these makes an otherwise unnamed folder an accelerate state folder.
ACCELERATE_MARKER = re.compile(
    r"(?:optimizer|scheduler)(?:_\d+)?\.bin|random_states_\d+\.pkl|" + _WEIGHTS.pattern
)
_PRIMARY_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_REQUIRED = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def missing_files(names: Collection[str]) -> list[str]:
    """One problem per required file absent from ``names`` (a state folder's file names)."""
    problems = []
    if not any(weights in names for weights in _PRIMARY_WEIGHTS):
        problems.append("model weights missing (model.safetensors or pytorch_model.bin)")
    problems.extend(f"{name} missing" for name in _REQUIRED if name not in names)
    return problems
