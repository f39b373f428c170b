"""State files and folders the sidecar may not read, and what to say about them.

safetensors 0.8+ writes through a hidden temporary file created with mode 0600 and
renames it into place (REFERENCE section 3), so a sidecar running with another UID
than the trainer can find a state it cannot open. Such a state is progress all the
same: the recovery must stop and say what to change, never treat it as "no
checkpoint yet" and restart from step 0. This module records who owns what and
words the fix; the scan only calls it when an open or a listing has already failed,
so a scan of readable states costs nothing more.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from dataclasses import dataclass

__all__ = ["UnreadableFile", "denial", "describe_denial"]

# The errors that mean "not allowed", as opposed to "not there" or "broken".
_DENIED = frozenset({errno.EACCES, errno.EPERM})


@dataclass(frozen=True)
class UnreadableFile:
    """A state file (or a whole state folder) the sidecar was not allowed to read."""

    path: str
    errno: int
    uid: int | None  # owner; None when even its status could not be read
    gid: int | None
    mode: int | None  # permission bits (stat.S_IMODE)
    mtime: float | None
    mtime_ns: int | None
    is_folder: bool = False


def denial(path: str, error: OSError, *, is_folder: bool = False) -> UnreadableFile | None:
    """The record of ``path`` when ``error`` refused access to it; None for any other error.

    One ``stat`` on the failure path: it needs only search permission on the folder
    above, which the sidecar has wherever it could list the folder.
    """
    if error.errno not in _DENIED:
        return None
    try:
        status = os.stat(path)
    except OSError:
        return UnreadableFile(path, error.errno, None, None, None, None, None, is_folder)
    return UnreadableFile(
        path=path,
        errno=error.errno,
        uid=status.st_uid,
        gid=status.st_gid,
        mode=stat.S_IMODE(status.st_mode),
        mtime=status.st_mtime,
        mtime_ns=status.st_mtime_ns,
        is_folder=is_folder,
    )


def describe_denial(unreadable: UnreadableFile, *, sidecar_uid: int | None = None) -> str:
    """One sentence naming the file, its owner and mode, the sidecar's UID and the fix."""
    uid = os.geteuid() if sidecar_uid is None else sidecar_uid
    what = "state folder" if unreadable.is_folder else "state file"
    reason = os.strerror(unreadable.errno)
    if unreadable.uid is None or unreadable.mode is None:
        owner = "owner and mode unknown (its folder cannot be searched either)"
    else:
        owner = (
            f"owned by uid {_user(unreadable.uid)}, gid {unreadable.gid}, "
            f"mode {unreadable.mode:04o}"
        )
    folder = unreadable.path if unreadable.is_folder else os.path.dirname(unreadable.path)
    trainer = f" ({unreadable.uid})" if unreadable.uid is not None else ""
    # safetensors creates every new file 0600 (REFERENCE section 3), so a chmod helps only
    # the states already written; the same UID is the fix that lasts.
    return (
        f"{what} {unreadable.path} cannot be read ({reason}): {owner}; "
        f"the sidecar runs as uid {_user(uid)}. Run the sidecar with the trainer's UID"
        f"{trainer} (safetensors writes each new state file with mode 0600), or, to resume "
        f"from this state now, give the sidecar read access (chgrp -R to a group the "
        f"sidecar is in, then chmod -R g+rX {folder})"
    )


def _user(uid: int) -> str:
    try:
        return f"{uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, OSError):  # no passwd entry, as is common for container UIDs
        return str(uid)
