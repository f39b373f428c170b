"""A faithful simulated FluxGym / sd-scripts trainer for the sidecar's tests and demos.

- :mod:`~sidecar.simulator.trainer`: the fake ``flux_train_network.py`` (cadence via ``SIM_*``
  environment variables, documented there);
- :mod:`~sidecar.simulator.faults`: the ``SIM_FAULTS`` grammar and the :class:`Fault` builder;
- :mod:`~sidecar.simulator.accelerate_shim`: the stand-in ``accelerate launch``;
- :mod:`~sidecar.simulator.fluxgym_tree`: builds a FluxGym-shaped folder whose train.sh runs it.
"""

from sidecar.simulator.faults import Fault, format_faults, parse_faults
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree

__all__ = ["Fault", "FluxgymTree", "build_fluxgym_tree", "format_faults", "parse_faults"]
