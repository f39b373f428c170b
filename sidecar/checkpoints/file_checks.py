"""Cheap structural checks for the files of an accelerate state folder.

Nothing in a state folder says it is complete (REFERENCE section 3), and loading
its files would take seconds and gigabytes. These checks read only the bytes that
a truncated or half-written file gets wrong: a safetensors header and its offsets,
a zip archive's end record, a pickle's final STOP opcode. None reads a whole
large file, so a check costs the same for a 1 MB file and a 20 GB one.

Every check returns None when the file looks intact, else a short reason. Bad
content never raises; only programming errors would.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickletools
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from sidecar.checkpoints.access import UnreadableFile, denial

StrPath: TypeAlias = str | os.PathLike[str]

# The safetensors loader itself refuses headers above 100 MB; a longer claim is corruption.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
# train_state.json holds two integers; anything this large is not one, so it is never read.
MAX_TRAIN_STATE_BYTES = 1024 * 1024
# Below this size a pickle is walked opcode by opcode (no code runs), which catches a
# truncation that happens to end on a b"." byte inside the data. Larger ones get the
# STOP-byte check only, to keep the cost independent of the file size.
MAX_PICKLE_WALK_BYTES = 256 * 1024

# The first read of a file: enough for a typical safetensors header in one system call.
_FIRST_READ_BYTES = 64 * 1024
# Files up to this size (scheduler.bin, random_states_0.pkl, train_state.json) are read
# whole in that one call.
_SMALL_FILE_BYTES = 64 * 1024

_EOCD = struct.Struct("<4sHHHHIIH")  # zip end-of-central-directory record
_EOCD_SIGNATURE = b"PK\x05\x06"
# The record sits in the last 22 bytes plus a comment of at most 65535 bytes.
_MAX_EOCD_SEARCH_BYTES = _EOCD.size + 0xFFFF
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_RECORD = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_RECORD_SIGNATURE = b"PK\x06\x06"
_CENTRAL_DIRECTORY_SIGNATURE = b"PK\x01\x02"

_PICKLE_STOP = b"."

# Bytes per element of the safetensors dtypes that occupy whole bytes; sub-byte and
# future dtypes are not size-checked (their offsets still are).
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class FileReport:
    """The outcome of checking one state file, with what the same open revealed."""

    problem: str | None
    mtime: float | None = None  # st_mtime from the descriptor that was checked
    epoch: int | None = None  # current_epoch, train_state.json only
    step: int | None = None  # current_step, train_state.json only
    # The same time in nanoseconds: the write-order check compares files saved
    # milliseconds apart, which a float of seconds since 1970 rounds together.
    mtime_ns: int | None = None
    unreadable: UnreadableFile | None = None  # set when access was refused (not "broken")


class _OpenFile:
    """A file opened once; size and mtime come from the same descriptor as the reads.

    A small file is read whole up front: one read costs no more than a header read,
    and every later check is then served from memory.
    """

    def __init__(self, descriptor: int, status: os.stat_result) -> None:
        self._descriptor = descriptor
        self.status = status
        self.size = status.st_size
        self._whole: bytes | None = None
        if stat.S_ISREG(status.st_mode) and 0 < self.size <= _SMALL_FILE_BYTES:
            self._whole = self._pread(0, self.size)

    def report(
        self, problem: str | None, *, epoch: int | None = None, step: int | None = None
    ) -> FileReport:
        """The report of this file, dated by the descriptor's own status."""
        mtime, mtime_ns = self.status.st_mtime, self.status.st_mtime_ns
        return FileReport(problem, mtime, epoch=epoch, step=step, mtime_ns=mtime_ns)

    def read_at(self, offset: int, count: int) -> bytes:
        """Read up to ``count`` bytes at ``offset``; fewer only at the end of the file."""
        if self._whole is not None and len(self._whole) == self.size:
            return self._whole[offset : offset + count]
        return self._pread(offset, count)

    def read_tail(self, count: int) -> bytes:
        count = min(count, self.size)
        return self.read_at(self.size - count, count)

    def _pread(self, offset: int, count: int) -> bytes:
        chunks: list[bytes] = []
        while count > 0:
            chunk = os.pread(self._descriptor, count, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            count -= len(chunk)
        return b"".join(chunks)


def _run(path: StrPath, check: Callable[[_OpenFile], str | FileReport | None]) -> FileReport:
    try:
        # O_NONBLOCK: a FIFO left in the folder must not block the scan on open.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        return _unreadable(path, error)
    try:
        file = _OpenFile(descriptor, os.fstat(descriptor))
        if not stat.S_ISREG(file.status.st_mode):
            return file.report("not a regular file")
        if file.size == 0:
            return file.report("empty file")
        outcome = check(file)
    except OSError as error:
        return _unreadable(path, error)
    finally:
        os.close(descriptor)
    return outcome if isinstance(outcome, FileReport) else file.report(outcome)


def _unreadable(path: StrPath, error: OSError) -> FileReport:
    problem = f"unreadable: {error.strerror or error}"
    refused = denial(os.fspath(path), error)
    if refused is None:
        return FileReport(problem)
    # Its times still date the folder: a refused file is as recent as it is.
    return FileReport(problem, refused.mtime, mtime_ns=refused.mtime_ns, unreadable=refused)


# ----------------------------------------------------------------------------- safetensors


def check_safetensors(path: StrPath) -> str | None:
    """Header length, JSON header and tensor offsets that end exactly at the file size."""
    return _run(path, _safetensors_problem).problem


def _safetensors_problem(file: _OpenFile) -> str | None:
    if file.size < 8:
        return f"truncated: {file.size} bytes, less than the 8-byte header length"
    head = file.read_at(0, min(file.size, _FIRST_READ_BYTES))
    header_length = int.from_bytes(head[:8], "little")
    # Both limits are checked before anything is allocated for the header.
    if header_length > MAX_SAFETENSORS_HEADER_BYTES:
        return f"header length {header_length} exceeds the 100 MiB limit"
    if header_length > file.size - 8:
        return f"truncated: header says {header_length} header bytes, file has {file.size - 8}"
    raw_header = head[8 : 8 + header_length]
    if len(raw_header) < header_length:
        raw_header += file.read_at(len(head), header_length - len(raw_header))
    if len(raw_header) < header_length:
        return "truncated while being read"
    header = _parse_json(raw_header)
    if header is _NOT_JSON:
        return "header is not valid JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    return _tensor_layout_problem(header, data_size=file.size - 8 - header_length)


_NOT_JSON = object()


def _parse_json(raw: bytes) -> Any:
    """The parsed value, or _NOT_JSON for anything that is not JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _NOT_JSON


def _tensor_layout_problem(header: dict[str, Any], *, data_size: int) -> str | None:
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        span_or_problem = _tensor_span(entry)
        if isinstance(span_or_problem, str):
            return f"tensor {_short(name)}: {span_or_problem}"
        spans.append(span_or_problem)
    data_end = max((end for _, end in spans), default=0)
    if data_end > data_size:
        return f"truncated: header says {data_end} data bytes, file has {data_size}"
    if data_end < data_size:
        return f"{data_size - data_end} unexpected bytes after the last tensor"
    # The loader requires the tensors to tile the data section without gaps or overlaps.
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            return f"tensor data is not contiguous at byte {begin}"
        position = end
    return None


def _tensor_span(entry: object) -> tuple[int, int] | str:
    if not isinstance(entry, dict):
        return "entry is not an object"
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        return "data_offsets is not a pair of 64-bit unsigned integers"
    begin, end = offsets
    if begin > end:
        return f"data_offsets [{begin}, {end}] run backwards"
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str):
        return "dtype is not a string"
    if not (isinstance(shape, list) and all(map(_is_count, shape))):
        return "shape is not a list of 64-bit unsigned integers"
    element_bytes = _DTYPE_BYTES.get(dtype)
    if element_bytes is not None and math.prod(shape) * element_bytes != end - begin:
        return f"{end - begin} data bytes do not match its {dtype} shape"
    return begin, end


def _is_count(value: object) -> bool:
    # The format stores offsets and dimensions as 64-bit unsigned integers.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


# ----------------------------------------------------------------------------- zip (torch.save)


def check_torch_zip(path: StrPath) -> str | None:
    """A torch.save archive: an end record at the very end, and a central directory it points to."""
    return _run(path, _zip_problem).problem


def _zip_problem(file: _OpenFile) -> str | None:
    record_at = _find_end_record(file)
    if record_at is None:
        return "no zip end-of-central-directory record (truncated?)"
    fields = _EOCD.unpack(file.read_at(record_at, _EOCD.size))
    _, _, _, entries_here, entries, directory_size, directory_offset, _ = fields
    directory_limit = record_at
    locator_at = record_at - _ZIP64_LOCATOR.size
    locator = file.read_at(locator_at, _ZIP64_LOCATOR.size) if locator_at >= 0 else b""
    if locator.startswith(_ZIP64_LOCATOR_SIGNATURE):
        zip64 = _zip64_directory(file, locator, locator_at=locator_at)
        if isinstance(zip64, str):
            return zip64
        directory_offset, directory_size, directory_limit = zip64
    elif 0xFFFF in (entries_here, entries) or 0xFFFFFFFF in (directory_size, directory_offset):
        return "zip64 end record expected but its locator is missing"
    if directory_offset + directory_size > directory_limit:
        return (
            f"central directory (offset {directory_offset}, {directory_size} bytes) "
            f"does not fit before byte {directory_limit}"
        )
    if directory_size and file.read_at(directory_offset, 4) != _CENTRAL_DIRECTORY_SIGNATURE:
        return f"no central directory at offset {directory_offset}"
    return None


def _find_end_record(file: _OpenFile) -> int | None:
    """Offset of an end record that ends exactly at the end of the file (with its comment)."""
    if file.size < _EOCD.size:
        return None
    # Common case first: torch writes no comment, so the record is the last 22 bytes.
    last = file.read_tail(_EOCD.size)
    if last.startswith(_EOCD_SIGNATURE) and last.endswith(b"\0\0"):
        return file.size - _EOCD.size
    tail = file.read_tail(_MAX_EOCD_SEARCH_BYTES)
    tail_start = file.size - len(tail)
    position = tail.rfind(_EOCD_SIGNATURE)
    while position >= 0:
        if position + _EOCD.size <= len(tail):
            comment_length = int.from_bytes(tail[position + 20 : position + 22], "little")
            if position + _EOCD.size + comment_length == len(tail):
                return tail_start + position
        position = tail.rfind(_EOCD_SIGNATURE, 0, position)
    return None


def _zip64_directory(
    file: _OpenFile, locator: bytes, *, locator_at: int
) -> tuple[int, int, int] | str:
    """(directory offset, directory size, where the directory must end) from the zip64 record."""
    record_at = _ZIP64_LOCATOR.unpack(locator)[2]
    if record_at + _ZIP64_RECORD.size > locator_at:
        return f"zip64 end record offset {record_at} is past its locator"
    record = _ZIP64_RECORD.unpack(file.read_at(record_at, _ZIP64_RECORD.size))
    if record[0] != _ZIP64_RECORD_SIGNATURE:
        return f"no zip64 end record at offset {record_at}"
    return record[9], record[8], record_at


# ----------------------------------------------------------------------------- pickle


def check_pickle(path: StrPath) -> str | None:
    """A complete pickle ends with the STOP opcode; small ones are also walked opcode by opcode."""
    return _run(path, _pickle_problem).problem


def _pickle_problem(file: _OpenFile) -> str | None:
    if file.read_tail(1) != _PICKLE_STOP:
        return "does not end with the pickle STOP opcode (truncated?)"
    if file.size > MAX_PICKLE_WALK_BYTES:
        return None
    return _pickle_walk_problem(file.read_at(0, file.size))


def _pickle_walk_problem(data: bytes) -> str | None:
    stream = io.BytesIO(data)
    try:
        # genops only decodes opcodes and their arguments; it never builds objects.
        for _ in pickletools.genops(stream):
            pass
    except ValueError as error:  # truncated arguments, unknown opcodes, no STOP
        return f"not a complete pickle: {_short(str(error))}"
    if stream.tell() != len(data):
        return f"{len(data) - stream.tell()} bytes after the pickle STOP opcode"
    return None


# ----------------------------------------------------------------------------- train_state.json


def _train_state_report(file: _OpenFile) -> FileReport:
    if file.size > MAX_TRAIN_STATE_BYTES:
        return file.report(f"{file.size} bytes is too large for train_state.json")
    state = _parse_json(file.read_at(0, file.size))
    if state is _NOT_JSON:
        return file.report("not valid JSON")
    if not isinstance(state, dict):
        return file.report("not a JSON object")
    numbers: dict[str, int | None] = {}
    for key in ("current_epoch", "current_step"):
        value = state.get(key)
        if value is not None and not _is_integer(value):
            return file.report(f"{key} is not an integer")
        numbers[key] = value
    return file.report(None, epoch=numbers["current_epoch"], step=numbers["current_step"])


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- dispatch


def check_state_file(path: StrPath) -> str | None:
    """Check one file of a state folder by its name; None when it looks intact."""
    return inspect_state_file(path).problem


def inspect_state_file(path: StrPath) -> FileReport:
    """Like check_state_file, plus the mtime (and train state) seen by the same open."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return _run(path, _safetensors_problem)
    if suffix in (".bin", ".pt", ".pth"):
        return _run(path, _torch_file_problem)
    if suffix == ".pkl":
        return _run(path, _pkl_problem)
    if suffix == ".json":
        return _run(path, _train_state_report)
    return FileReport(f"unknown kind of state file {os.path.basename(path)!r}")


def _torch_file_problem(file: _OpenFile) -> str | None:
    if file.read_at(0, 2) == b"PK":
        return _zip_problem(file)
    # torch.save(..., _use_new_zipfile_serialization=False) writes pickles and raw
    # storage back to back; only its last byte can be checked cheaply.
    if file.read_tail(1) == _PICKLE_STOP:
        return None
    return "neither a zip archive nor a pickle (truncated?)"


def _pkl_problem(file: _OpenFile) -> str | None:
    # accelerate writes random_states_<i>.pkl with torch.save, which makes it a zip
    # archive despite the name; a plain pickle.dump is accepted as well.
    if file.read_at(0, 2) == b"PK":
        return _zip_problem(file)
    return _pickle_problem(file)
