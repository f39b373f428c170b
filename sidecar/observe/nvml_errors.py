"""How NVML failures are told apart, for every reader of pynvml (utilisation, health).

pynvml wraps every NVML return code in an NVMLError subclass; OSError covers a library that
exists but cannot be used (wrong architecture, missing symbols at load).
"""

from __future__ import annotations

import pynvml

FAILURES: tuple[type[Exception], ...] = (pynvml.NVMLError, OSError)

# After these, the handles are worthless: NVML must be shut down and initialised again.
NEEDS_REINIT: tuple[type[Exception], ...] = (
    pynvml.NVMLError_Uninitialized,
    pynvml.NVMLError_GpuIsLost,
)

# A field or call this board or driver does not offer (power on many boards and MIG
# slices, the recovery action before driver 570): an answer about it, not a failure.
UNSUPPORTED: tuple[type[Exception], ...] = (
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_FunctionNotFound,
)
