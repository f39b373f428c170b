"""Real accelerate-like state folders for tests, written byte by byte.

The layouts are built here by hand (no safetensors or torch), so the checks under
test are compared with an independent writer: a safetensors file is an 8-byte
little-endian header length, a space-padded JSON header and the tensor bytes;
torch.save files are zip archives of stored members; train_state.json is what
sd-scripts' save hook writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import zipfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

# accelerate's save order (REFERENCE section 3), preceded by sd-scripts' pre-save hook.
STATE_FILES = (
    "train_state.json",
    "model.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
)

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "F64": 8}

Tensor = tuple[str, str, Sequence[int], bytes]  # name, dtype, shape, data


def tensor(name: str, dtype: str, shape: Sequence[int], fill: int = 0x5A) -> Tensor:
    """A tensor whose data has exactly the size its dtype and shape need."""
    size = math.prod(shape) * DTYPE_BYTES[dtype]
    return name, dtype, list(shape), bytes([fill]) * size


def safetensors_bytes(
    tensors: Sequence[Tensor], *, metadata: dict[str, str] | None = None
) -> bytes:
    """A safetensors file: tensors laid out back to back in the order given."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the writer pads the header to 8-byte alignment
    return len(raw).to_bytes(8, "little") + raw + b"".join(data for *_, data in tensors)


def torch_zip_bytes(members: dict[str, bytes] | None = None, *, comment: bytes = b"") -> bytes:
    """A zip archive shaped like torch.save's: stored members under archive/."""
    if members is None:
        members = {
            "archive/data.pkl": pickle.dumps({"state": {}, "param_groups": [{"lr": 1e-4}]}),
            "archive/byteorder": b"little",
            "archive/data/0": bytes(range(256)) * 4,
            "archive/version": b"3\n",
        }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.comment = comment
    return buffer.getvalue()


def state_file_contents(
    *, step: int, epoch: int, random_states_as_zip: bool = False
) -> dict[str, bytes]:
    """The bytes of each file of a complete state folder, keyed by file name."""
    random_states = {"step": step, "random_state": (3, tuple(range(8)), None)}
    return {
        "train_state.json": json.dumps({"current_epoch": epoch, "current_step": step}).encode(),
        "model.safetensors": safetensors_bytes(
            [
                tensor("lora_unet_block.alpha", "F32", []),
                tensor("lora_unet_block.lora_down.weight", "BF16", [4, 16], fill=step % 256),
                tensor("lora_unet_block.lora_up.weight", "BF16", [16, 4]),
            ],
            metadata={"format": "pt"},
        ),
        "optimizer.bin": torch_zip_bytes(),
        "scheduler.bin": torch_zip_bytes({"archive/data.pkl": pickle.dumps({"step": step})}),
        "random_states_0.pkl": (
            torch_zip_bytes({"archive/data.pkl": pickle.dumps(random_states)})
            if random_states_as_zip
            else pickle.dumps(random_states)
        ),
    }


def write_state_folder(
    folder: Path,
    *,
    step: int = 500,
    epoch: int = 2,
    truncate: str | None = None,
    truncate_by: int = 1,
    empty: str | None = None,
    omit: Collection[str] = frozenset(),
    mtime: float | None = None,
    random_states_as_zip: bool = False,
    mtimes: Mapping[str, float] | None = None,
) -> Path:
    """Write a complete state folder, then damage it as asked.

    ``truncate`` cuts ``truncate_by`` bytes off the end of that file, ``empty``
    leaves that file with no bytes, ``omit`` leaves files out, and ``mtime`` sets
    every file's modification time (the folder's own mtime is left alone);
    ``mtimes`` then sets single files' times (e.g. those an earlier save left).
    """
    folder.mkdir(parents=True, exist_ok=True)
    contents = state_file_contents(
        step=step, epoch=epoch, random_states_as_zip=random_states_as_zip
    )
    for name, data in contents.items():
        if name in omit:
            continue
        if name == truncate:
            data = data[:-truncate_by]
        if name == empty:
            data = b""
        (folder / name).write_bytes(data)
    if mtime is not None:
        set_mtime(folder, mtime)
    for name, file_mtime in (mtimes or {}).items():
        os.utime(folder / name, (file_mtime, file_mtime))
    return folder


def set_mtime(folder: Path, mtime: float) -> None:
    """Give every file in ``folder`` the modification time ``mtime``."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            os.utime(path, (mtime, mtime))
