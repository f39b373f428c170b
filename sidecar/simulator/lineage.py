"""Which batches the simulated LoRA was trained on, so tests can tell a true resume from a redo.

Real LoRA weights carry their history implicitly; the simulated ones carry it explicitly: the
list of ``(epoch index, batch index)`` pairs trained, in order, both 0-based (``epoch`` is
sd-scripts' loop variable in ``train_network.py``, ``for epoch in range(epoch_to_start,
num_train_epochs)``; the batch index is ``step`` of ``for step, batch in enumerate(...)``).
The list is stored as JSON under :data:`LINEAGE_KEY` in the ``__metadata__`` of every
``.safetensors`` file the simulator writes (a state's ``model.safetensors`` and every model
file, the final ``<name>.safetensors`` included) and restored from a state's weights on
``--resume``, as real weights are. An uninterrupted run shows every pair once, in order
(:func:`uninterrupted_lineage`); a resume that trains batches again shows repeats, one that
skips batches shows gaps.
"""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.simulator.file_formats import read_safetensors_metadata

LINEAGE_KEY = "sim_lineage"

Lineage = list[tuple[int, int]]


def lineage_metadata(lineage: Lineage) -> dict[str, str]:
    """The metadata entry that records ``lineage`` in a safetensors file."""
    return {LINEAGE_KEY: json.dumps([list(pair) for pair in lineage], separators=(",", ":"))}


def read_lineage(model_file: Path) -> list[tuple[int, int]]:
    """The ``(epoch, batch)`` pairs the weights in ``model_file`` were trained on, in order.

    A file without the entry (not written by the simulator) has an empty lineage.
    """
    text = read_safetensors_metadata(model_file).get(LINEAGE_KEY)
    if text is None:
        return []
    return [(int(epoch), int(batch)) for epoch, batch in json.loads(text)]


def uninterrupted_lineage(
    steps_per_epoch: int, epochs: int, max_train_steps: int | None = None
) -> list[tuple[int, int]]:
    """What a run that was never interrupted trains: every pair once, epoch by epoch.

    ``max_train_steps`` cuts the last epoch short, as sd-scripts' ``global_step >=
    max_train_steps`` break does (train_network.py, end of the batch loop).
    """
    pairs = [(epoch, batch) for epoch in range(epochs) for batch in range(steps_per_epoch)]
    return pairs if max_train_steps is None else pairs[:max_train_steps]
