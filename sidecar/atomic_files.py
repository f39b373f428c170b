"""Atomic file replacement for files that a trainer or a person reads.

A running bash reads its script incrementally, and a reader of state.json may
arrive at any moment, so a file is never rewritten in place: the new content
goes to a temporary file in the same folder (same filesystem, so the rename is
atomic), is flushed to disk, and replaces the old name with ``os.replace``.
A reader sees the old complete file or the new complete file, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def read_text_exact(path: Path) -> str:
    """Read a text file without newline translation, so a rewrite can keep every byte.

    A byte that is not UTF-8 (a cp1252 comment from a Windows editor) becomes a lone
    surrogate instead of an error, and ``replace_atomically`` writes it back as the same
    byte: files are edited, never re-encoded.
    """
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return handle.read()


def replace_atomically(
    path: Path, content: str, *, mode: int | None = None, durable: bool = True
) -> bool:
    """Write ``content`` to ``path`` atomically; return False when it was already there.

    ``durable`` False skips the fsyncs: a reader still sees the old file or the new one,
    never half of one, but a power cut may lose the write (for views, like the page's
    history, that must not wait on a disk busy with checkpoints).
    The permission bits of an existing file are kept (train.sh may be executable),
    unless ``mode`` is given. On any error the original file is left untouched and
    the temporary file is removed. A symlink is followed: its target gets the new content
    and the link stays (``os.replace`` on the link itself would turn it into a plain file and
    leave the linked script, the one the user edits, unchanged).
    """
    path = Path(os.path.realpath(path))
    try:
        if read_text_exact(path) == content:
            return False
        existing_mode: int | None = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        existing_mode = None
    final_mode = mode if mode is not None else existing_mode
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed explicitly below
        "w",
        encoding="utf-8",
        errors="surrogateescape",
        newline="",
        dir=path.parent,
        prefix=f".{path.name}.",
        suffix=".tmp",
        delete=False,
    )
    temporary = Path(handle.name)
    try:
        with handle:
            handle.write(content)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if final_mode is not None:
            os.chmod(temporary, final_mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    if durable:
        _fsync_directory(path.parent)
    return True


def copy_once(source: Path, backup: Path) -> bool:
    """Keep the user's original: write ``backup`` from ``source`` only if it does not exist."""
    if backup.exists():
        return False
    replace_atomically(backup, read_text_exact(source), mode=source.stat().st_mode & 0o7777)
    return True


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems (and Windows) refuse, which is harmless.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
