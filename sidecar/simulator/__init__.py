"""A faithful simulated FluxGym / sd-scripts trainer for the sidecar's tests and demos.

- :mod:`~sidecar.simulator.trainer`: the fake ``flux_train_network.py``'s entry point,
  ``main`` (cadence via ``SIM_*`` environment variables, documented there), built from:

  - :mod:`~sidecar.simulator.run_settings`: its flags and the ``SIM_*`` cadence;
  - :mod:`~sidecar.simulator.schedule`: step and epoch totals, state names, when to sample;
  - :mod:`~sidecar.simulator.resume_position`: where a resumed run starts, as sd-scripts says;
  - :mod:`~sidecar.simulator.lineage`: the (epoch, batch) pairs the simulated LoRA trained;
  - :mod:`~sidecar.simulator.training`: the training process itself, step by step;
  - :mod:`~sidecar.simulator.accelerate_state`: state folders saved and loaded as accelerate does;
  - :mod:`~sidecar.simulator.file_formats`: safetensors, torch zip and PNG bytes, the loaders'
    checks, and the slow or atomic writes;
  - :mod:`~sidecar.simulator.terminal_output`: stdout/stderr lines, tqdm bars, the loss shown;
  - :mod:`~sidecar.simulator.gpu_state`: the GPU activity published for the NVML stand-in;
  - :mod:`~sidecar.simulator.fault_actor`: hangs and crashes carried out;
  - :mod:`~sidecar.simulator.hangs`: the call chains and process shapes of each hang class
    (dataloader workers, block swapping, a collective, uninterruptible sleep, sampling, ...),
    under upstream's names, as py-spy and ``/proc`` show them;
  - :mod:`~sidecar.simulator.context`: the streams, GPU, faults and time those parts share;
- :mod:`~sidecar.simulator.faults`: the ``SIM_FAULTS`` grammar and the :class:`Fault` builder;
- :mod:`~sidecar.simulator.accelerate_shim`: the stand-in ``accelerate launch``;
- :mod:`~sidecar.simulator.fluxgym_tree`: builds a FluxGym-shaped folder whose train.sh runs it.
"""

from sidecar.simulator.faults import Fault, format_faults, parse_faults
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.simulator.lineage import read_lineage, uninterrupted_lineage

__all__ = [
    "Fault",
    "FluxgymTree",
    "build_fluxgym_tree",
    "format_faults",
    "parse_faults",
    "read_lineage",
    "uninterrupted_lineage",
]
