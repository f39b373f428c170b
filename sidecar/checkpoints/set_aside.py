"""Moving an incomplete state out of a trainer's way, and back: a rename, never a delete.

Trainers that resume from "the latest" themselves (ai-toolkit, OneTrainer, HF Trainer's
``get_last_checkpoint``, diffusers' ``latest``) pick it by number, name or creation time,
with no completeness check: a state cut short by a kill mid-save fails every retry. The
sidecar cannot tell them which state to load, so it makes the latest complete instead:
each incomplete state the trainer would take is renamed beside itself under a name the
trainer's own listing never matches (the trainer package chooses it). The state is
evidence, and perhaps a user knows better: it stays on the volume, is listed by ``status``
and ``checkpoints``, and ``checkpoints --put-back NAME`` renames it back.
"""

from __future__ import annotations

import ctypes
import errno
import os
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["SetAsideError", "aside_stamp", "move_state", "put_back"]


class SetAsideError(OSError):
    """A state could not be moved (or moved back); the message says which and why."""


def aside_stamp(now: float) -> str:
    """The UTC time a set-aside name carries: sortable, no characters a shell must quote."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")


def move_state(state: Path, target: Path) -> None:
    """Rename ``state`` to ``target`` (beside it, or one folder up), never over an entry."""
    _rename(state, target, what="set aside")


def put_back(moved: Path, original: Path) -> None:
    """Rename a set-aside state back to its own name, unless that name is taken again."""
    _rename(moved, original, what="put back")


def _rename(source: Path, target: Path, *, what: str) -> None:
    # Beside it, or one folder up where a trainer lists every folder of its own one
    # (OneTrainer's backup/): in sight of the trainer's user, on the same filesystem.
    if not {source.parent, source.parent.parent} & {target.parent, target.parent.parent}:
        raise SetAsideError(
            f"cannot {what} {source}: {target} is neither beside it nor one folder up"
        )
    try:
        _rename_no_replace(source, target)
    except FileExistsError:
        raise SetAsideError(
            f"cannot {what} {source}: {target} exists; move one of the two by hand"
        ) from None
    except OSError as error:
        raise SetAsideError(f"cannot {what} {source} as {target.name}: {error}") from None


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_no_replace(source: Path, target: Path) -> None:
    """rename(2) that fails rather than replace ``target`` (a file, or an empty folder the
    trainer just made): renameat2's RENAME_NOREPLACE where the kernel and filesystem have
    it, else a look first (a narrow race, only where renameat2 is missing)."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: not on this filesystem
            raise OSError(code, os.strerror(code), str(source), None, str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
