"""Which container the sidecar itself runs in, as far as it can tell from the inside.

The engine is then asked about each candidate id; the first it knows is the sidecar's own
container, whose compose project is where the trainer service is looked for by default.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

# Short (hostname) or full container id.
_CONTAINER_ID = re.compile(r"[0-9a-f]{12}|[0-9a-f]{64}")
_MOUNTED_CONTAINER_DIR = re.compile(r"/containers/([0-9a-f]{64})/")
_CGROUP_CONTAINER = re.compile(r"(?:/docker/|docker-)([0-9a-f]{64})")


def own_container_id_candidates(hostname: str, mountinfo: str, cgroup: str) -> list[str]:
    """Ids under which the current process's container may be known to the engine.

    Docker sets the hostname to the short id unless compose or ``--hostname`` overrides
    it; ``/etc/hostname`` is bind-mounted from ``/var/lib/docker/containers/<id>/`` and
    cgroup v1 paths carry ``/docker/<id>``, which covers the override.
    """
    found: list[str] = []
    if _CONTAINER_ID.fullmatch(hostname):
        found.append(hostname)
    found += _MOUNTED_CONTAINER_DIR.findall(mountinfo)
    found += _CGROUP_CONTAINER.findall(cgroup)
    found += _CGROUP_CONTAINER.findall(mountinfo)
    return list(dict.fromkeys(found))


def own_container_ids() -> list[str]:
    """`own_container_id_candidates` for this process; empty outside a container."""
    return own_container_id_candidates(
        socket.gethostname(),
        _read_text("/proc/self/mountinfo"),
        _read_text("/proc/self/cgroup"),
    )


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        # Not Linux, or /proc hidden: nothing to learn from it, which is an answer too.
        return ""
