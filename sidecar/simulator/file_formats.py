"""The files the trainer writes, byte for byte, how it writes them, and the loaders' checks.

Safetensors and ``torch.save``-style zips are real, tiny and well-formed, so the sidecar's
own structural checks treat them exactly as they treat sd-scripts' files.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from sidecar.simulator.context import Sleep


class SafetensorError(Exception):
    """Raised, like ``safetensors_rust.SafetensorError``, for a damaged .safetensors file."""


def safetensors_bytes(metadata: Mapping[str, str], values: int = 64) -> bytes:
    """A real, tiny safetensors file: one F32 tensor and sd-scripts-like metadata."""
    data = struct.pack(f"<{values}f", *(0.01 * i for i in range(values)))
    header = {
        "__metadata__": dict(metadata),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": {
            "dtype": "F32",
            "shape": [values],
            "data_offsets": [0, len(data)],
        },
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def torch_archive_bytes(stem: str, payload: object) -> bytes:
    """A zip laid out like ``torch.save`` output, so the same structural checks apply."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{stem}/data.pkl", pickle.dumps(payload))
        archive.writestr(f"{stem}/byteorder", "little")
        archive.writestr(f"{stem}/version", "3\n")
    return buffer.getvalue()


def check_safetensors_loadable(path: Path) -> None:
    """Cheap structural check: header length, JSON header, tensor data ends at end of file."""
    size = path.stat().st_size  # FileNotFoundError for a missing file, as the loader raises
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorError("Error while deserializing header: HeaderTooSmall")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise SafetensorError("Error while deserializing header: InvalidHeaderLength")
        try:
            header = json.loads(handle.read(header_length))
            data_end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError):
            raise SafetensorError(
                "Error while deserializing header: InvalidHeaderDeserialization"
            ) from None
    if 8 + header_length + data_end != size:
        raise SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when it has none)."""
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_length))
    return dict(header.get("__metadata__") or {})


def check_torch_archive(path: Path) -> None:
    """``torch.load``'s failure modes: missing file, or a zip without its central directory."""
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        with zipfile.ZipFile(path) as archive:
            archive.testzip()
    except zipfile.BadZipFile:
        raise RuntimeError(
            "PytorchStreamReader failed reading zip archive: failed finding central directory"
        ) from None


def write_slowly(path: Path, data: bytes, seconds: float, sleep: Sleep) -> None:
    """Write ``data`` in two halves with a pause between, as a large file grows on disk."""
    with open(path, "wb") as handle:
        middle = len(data) // 2
        handle.write(data[:middle])
        handle.flush()
        if seconds > 0:
            sleep(seconds)
        handle.write(data[middle:])


def write_complete(path: Path, data: bytes) -> None:
    """Write via a temporary file and ``os.replace``, so the name appears only when complete."""
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed before the rename
        "wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def png_bytes() -> bytes:
    """Just enough of a PNG (signature and IEND chunk) for a file-type sniffer."""
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x00IEND\xaeB`\x82"
