"""Structural checks of single state files, against files written by an independent writer."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from state_factory import DTYPE_BYTES, safetensors_bytes, tensor, torch_zip_bytes

from sidecar.checkpoints.file_checks import (
    check_pickle,
    check_safetensors,
    check_state_file,
    check_torch_zip,
    inspect_state_file,
)

# Hypothesis runs many examples against one tmp_path; each example writes its own file.
FILE_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def raw_safetensors(header: object, data: bytes = b"") -> bytes:
    """A safetensors file with exactly this header, for layouts the honest writer never makes."""
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_from_the_independent_writer_is_intact(tmp_path: Path) -> None:
    """A file laid out like safetensors writes it passes, metadata included."""
    data = safetensors_bytes(
        [tensor("a", "F32", [2, 3]), tensor("b", "BF16", [0]), tensor("c", "U8", [])],
        metadata={"format": "pt"},
    )
    assert check_safetensors(write(tmp_path, "model.safetensors", data)) is None


def test_safetensors_truncated_data_names_both_sizes(tmp_path: Path) -> None:
    """A file cut inside the tensor data reports the size the header promises and the real one."""
    data = safetensors_bytes([tensor("weight", "U8", [4096])])
    header_end = len(data) - 4096
    path = write(tmp_path, "model.safetensors", data[: header_end + 1000])
    assert check_safetensors(path) == "truncated: header says 4096 data bytes, file has 1000"


def test_safetensors_metadata_is_not_a_tensor(tmp_path: Path) -> None:
    """__metadata__ holds strings, not offsets, and must not be read as a tensor."""
    data = raw_safetensors({"__metadata__": {"format": "pt"}, "x": _entry("U8", [1], 0, 1)}, b"z")
    assert check_safetensors(write(tmp_path, "m.safetensors", data)) is None


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        ({"x": _entry("U8", [2], 0, 2)}, b"ab!", "1 unexpected bytes after the last tensor"),
        ({"x": _entry("U8", [1], 1, 2)}, b"ab", "tensor data is not contiguous at byte 1"),
        (
            {"x": _entry("U8", [2], 0, 2), "y": _entry("U8", [2], 1, 3)},
            b"abc",
            "tensor data is not contiguous at byte 1",
        ),
        (
            {"x": _entry("F32", [2], 0, 4)},
            b"abcd",
            "tensor 'x': 4 data bytes do not match its F32 shape",
        ),
        ({"x": _entry("U8", [1], 2, 1)}, b"ab", "tensor 'x': data_offsets [2, 1] run backwards"),
        ({"x": {"dtype": "U8", "shape": [1]}}, b"a", "tensor 'x': data_offsets is not a pair"),
        ({"x": _entry("U8", [-1], 0, 1)}, b"a", "tensor 'x': shape is not a list"),
        ({"x": [0, 1]}, b"a", "tensor 'x': entry is not an object"),
        ([1, 2], b"", "header is not a JSON object"),
    ],
)
def test_safetensors_layout_errors_are_named(
    tmp_path: Path, header: object, data: bytes, expected: str
) -> None:
    """Each way the header and data can disagree gives its own reason."""
    problem = check_safetensors(write(tmp_path, "m.safetensors", raw_safetensors(header, data)))
    assert problem is not None
    assert problem.startswith(expected)


def test_safetensors_header_that_is_not_json(tmp_path: Path) -> None:
    """Bytes that do not decode as a JSON header are refused, not raised."""
    data = (4).to_bytes(8, "little") + b"\xff{[x"
    assert check_safetensors(write(tmp_path, "m.safetensors", data)) == "header is not valid JSON"


def test_safetensors_with_an_unknown_dtype_still_has_its_offsets_checked(tmp_path: Path) -> None:
    """A dtype this module has no size for skips the size check but not the layout check."""
    good = raw_safetensors({"x": _entry("F4", [4], 0, 2)}, b"ab")
    cut = raw_safetensors({"x": _entry("F4", [4], 0, 2)}, b"a")
    assert check_safetensors(write(tmp_path, "good.safetensors", good)) is None
    assert check_safetensors(write(tmp_path, "cut.safetensors", cut)) == (
        "truncated: header says 2 data bytes, file has 1"
    )


@pytest.mark.parametrize(
    ("claimed", "expected"),
    [
        (2**64 - 1, "exceeds the 100 MiB limit"),
        (2**50, "exceeds the 100 MiB limit"),
        (100 * 1024 * 1024 + 1, "exceeds the 100 MiB limit"),
        (100 * 1024 * 1024, "truncated: header says 104857600 header bytes, file has 16"),
        (17, "truncated: header says 17 header bytes, file has 16"),
    ],
)
def test_safetensors_huge_header_claims_are_refused_without_allocating(
    tmp_path: Path, claimed: int, expected: str
) -> None:
    """A header length beyond the file or the loader's limit is refused before any read of it."""
    path = write(tmp_path, "m.safetensors", claimed.to_bytes(8, "little") + b"{}" + b" " * 14)
    started = time.perf_counter()
    problem = check_safetensors(path)
    assert time.perf_counter() - started < 0.1
    assert problem is not None
    assert expected in problem


def test_sparse_20_gb_safetensors_checks_as_fast_as_a_small_one(tmp_path: Path) -> None:
    """Only the header is read: a 20 GB file whose data is a hole takes no longer than 1 MB."""
    data_size = 20 * 1024**3
    header = raw_safetensors({"w": _entry("U8", [data_size], 0, data_size)})
    path = write(tmp_path, "model.safetensors", header)
    os.truncate(path, len(header) + data_size)
    assert path.stat().st_size > data_size

    started = time.perf_counter()
    problem = check_safetensors(path)
    elapsed = time.perf_counter() - started

    assert problem is None
    assert elapsed < 0.1
    os.truncate(path, len(header) + data_size - 1)
    assert check_safetensors(path) == (
        f"truncated: header says {data_size} data bytes, file has {data_size - 1}"
    )


# ----------------------------------------------------------------------------- zip


def test_torch_zip_intact_and_with_a_comment(tmp_path: Path) -> None:
    """An archive passes whether its end record is the last 22 bytes or followed by a comment."""
    assert check_torch_zip(write(tmp_path, "a.bin", torch_zip_bytes())) is None
    with_comment = torch_zip_bytes(comment=b"PK\x05\x06 looks like a record but is a comment")
    assert check_torch_zip(write(tmp_path, "b.bin", with_comment)) is None


def test_torch_zip_without_end_record_is_truncated(tmp_path: Path) -> None:
    """Cutting the last byte destroys the end record, which is what a torn write leaves."""
    data = torch_zip_bytes()
    problem = check_torch_zip(write(tmp_path, "optimizer.bin", data[:-1]))
    assert problem == "no zip end-of-central-directory record (truncated?)"


def test_torch_zip_directory_outside_the_file_is_refused(tmp_path: Path) -> None:
    """An end record whose central directory would lie past the record is corrupt."""
    data = bytearray(torch_zip_bytes())
    record_at = len(data) - 22
    struct.pack_into("<I", data, record_at + 16, record_at)  # directory offset -> the record
    problem = check_torch_zip(write(tmp_path, "optimizer.bin", bytes(data)))
    assert problem is not None
    assert "does not fit before byte" in problem


def test_torch_zip_directory_offset_pointing_at_data_is_refused(tmp_path: Path) -> None:
    """The recorded offset must land on a central directory header, not inside member data."""
    data = bytearray(torch_zip_bytes())
    struct.pack_into("<I", data, len(data) - 22 + 16, 0)  # offset 0 is a local header
    problem = check_torch_zip(write(tmp_path, "optimizer.bin", bytes(data)))
    assert problem == "no central directory at offset 0"


def as_zip64(data: bytes) -> bytes:
    """Rewrite a small archive's end as a zip64 end record, locator and capped end record."""
    entries, directory_size, directory_offset = struct.unpack_from(
        "<HII", data, len(data) - 22 + 10
    )
    record_at = len(data) - 22
    zip64_record = struct.pack(
        "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0,
        entries, entries, directory_size, directory_offset,
    )  # fmt: skip
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, record_at, 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:record_at] + zip64_record + locator + end


def test_zip64_archive_is_read_through_its_locator(tmp_path: Path) -> None:
    """Archives over 4 GB (large optimizer states) keep their real offsets in the zip64 record."""
    data = as_zip64(torch_zip_bytes())
    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # the rewrite is a valid archive
        assert archive.testzip() is None
    assert check_torch_zip(write(tmp_path, "optimizer.bin", data)) is None


def test_zip64_markers_without_a_locator_are_refused(tmp_path: Path) -> None:
    """An end record saying 'see zip64' with no zip64 locator before it is corrupt."""
    data = as_zip64(torch_zip_bytes())
    locator_at = len(data) - 22 - 20
    damaged = data[:locator_at] + b"\0" * 20 + data[locator_at + 20 :]
    problem = check_torch_zip(write(tmp_path, "optimizer.bin", damaged))
    assert problem == "zip64 end record expected but its locator is missing"


def test_zip64_locator_pointing_nowhere_is_refused(tmp_path: Path) -> None:
    """A locator whose record offset holds no zip64 record is corrupt."""
    data = bytearray(as_zip64(torch_zip_bytes()))
    struct.pack_into("<Q", data, len(data) - 22 - 20 + 8, 0)
    problem = check_torch_zip(write(tmp_path, "optimizer.bin", bytes(data)))
    assert problem == "no zip64 end record at offset 0"


# ----------------------------------------------------------------------------- pickle


def test_pickle_intact_and_missing_stop(tmp_path: Path) -> None:
    """A pickle ends with STOP; without its last byte it is incomplete."""
    data = pickle.dumps({"random_state": (3, tuple(range(10)))})
    assert check_pickle(write(tmp_path, "ok.pkl", data)) is None
    assert check_pickle(write(tmp_path, "cut.pkl", data[:-1])) == (
        "does not end with the pickle STOP opcode (truncated?)"
    )


def test_pickle_cut_right_after_a_dot_inside_the_data_is_caught(tmp_path: Path) -> None:
    """The last byte can be a '.' that is data, not STOP; the opcode walk sees through it."""
    data = pickle.dumps(["file.name", 1.5], protocol=0)
    cut = data[: data.index(b".") + 1]
    problem = check_pickle(write(tmp_path, "cut.pkl", cut))
    assert problem is not None
    assert problem.startswith("not a complete pickle")


def test_pickle_with_trailing_bytes_after_stop(tmp_path: Path) -> None:
    """Two pickles back to back are not one pickle file."""
    data = pickle.dumps(1) + pickle.dumps(2)
    assert check_pickle(write(tmp_path, "two.pkl", data)) == "5 bytes after the pickle STOP opcode"


# ----------------------------------------------------------------------------- dispatch


def test_state_file_dispatch_by_name(tmp_path: Path) -> None:
    """Each accelerate file kind is checked by the check its format needs."""
    zipped = torch_zip_bytes()
    assert check_state_file(write(tmp_path, "optimizer.bin", zipped)) is None
    assert check_state_file(write(tmp_path, "scaler.pt", zipped)) is None
    assert check_state_file(write(tmp_path, "random_states_0.pkl", zipped)) is None
    assert check_state_file(write(tmp_path, "random_states_1.pkl", pickle.dumps([1]))) is None
    safetensors = safetensors_bytes([tensor("x", "F16", [3])])
    assert check_state_file(write(tmp_path, "model.safetensors", safetensors)) is None
    assert check_state_file(write(tmp_path, "notes.txt", b"x")) is not None


def test_legacy_torch_pickle_is_accepted_by_its_last_byte(tmp_path: Path) -> None:
    """A pre-zip torch.save file is pickles and raw data; only a final STOP byte can be told."""
    assert check_state_file(write(tmp_path, "pytorch_model.bin", b"\x80\x02}q\x00.")) is None
    problem = check_state_file(write(tmp_path, "sampler.bin", b"\x80\x02}q\x00"))
    assert problem == "neither a zip archive nor a pickle (truncated?)"


def test_zip_named_pkl_is_checked_as_zip(tmp_path: Path) -> None:
    """accelerate's random_states_<i>.pkl is a torch.save zip; a cut one is caught as a zip."""
    problem = check_state_file(write(tmp_path, "random_states_0.pkl", torch_zip_bytes()[:-3]))
    assert problem == "no zip end-of-central-directory record (truncated?)"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"current_epoch": 2, "current_step": 500}', None),
        (b"{}", None),
        (b'{"current_epoch": 2, "current_step": 5', "not valid JSON"),
        (b"[2, 500]", "not a JSON object"),
        (b'{"current_step": "500"}', "current_step is not an integer"),
        (b'{"current_epoch": true}', "current_epoch is not an integer"),
        (b'{"current_step": 1.5}', "current_step is not an integer"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_train_state_json(tmp_path: Path, content: bytes, expected: str | None) -> None:
    """train_state.json must be an object whose counters, when present, are integers."""
    assert check_state_file(write(tmp_path, "train_state.json", content)) == expected


def test_train_state_numbers_are_reported(tmp_path: Path) -> None:
    """The epoch and step sd-scripts recorded come back with the check."""
    path = write(tmp_path, "train_state.json", b'{"current_epoch": 3, "current_step": 120}')
    report = inspect_state_file(path)
    assert (report.problem, report.epoch, report.step) == (None, 3, 120)
    assert report.mtime == path.stat().st_mtime


def test_oversized_train_state_is_refused_unread(tmp_path: Path) -> None:
    """A 'train_state.json' over 1 MiB is not what sd-scripts writes and is not read."""
    path = write(tmp_path, "train_state.json", b"{")
    os.truncate(path, 2 * 1024 * 1024)
    assert check_state_file(path) == "2097152 bytes is too large for train_state.json"


@pytest.mark.parametrize(
    "name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json"]
)
def test_empty_files_are_refused(tmp_path: Path, name: str) -> None:
    """A file created but not yet written is the commonest half-saved state."""
    assert check_state_file(write(tmp_path, name, b"")) == "empty file"


def test_missing_and_dangling_files_are_unreadable(tmp_path: Path) -> None:
    """A name that cannot be opened gives the operating system's reason, not an exception."""
    (tmp_path / "optimizer.bin").symlink_to(tmp_path / "nowhere")
    assert check_state_file(tmp_path / "optimizer.bin") == "unreadable: No such file or directory"
    assert check_safetensors(tmp_path / "absent.safetensors") == (
        "unreadable: No such file or directory"
    )


def test_folder_and_fifo_are_not_regular_files(tmp_path: Path) -> None:
    """A FIFO is refused without blocking on open, and a folder is refused without reading."""
    os.mkfifo(tmp_path / "scheduler.bin")
    (tmp_path / "model.safetensors").mkdir()
    assert check_state_file(tmp_path / "scheduler.bin") == "not a regular file"
    assert check_state_file(tmp_path / "model.safetensors") == "not a regular file"


# ----------------------------------------------------------------------------- properties

DTYPES = sorted(DTYPE_BYTES)


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(min_value=0, max_value=4))
    tensors = []
    for index in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=3))
        size = DTYPE_BYTES[dtype]
        for dimension in shape:
            size *= dimension
        data = draw(st.binary(min_size=size, max_size=size))
        tensors.append((f"t{index}.{draw(st.text(max_size=5))}", dtype, shape, data))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
    return safetensors_bytes(tensors, metadata=metadata)


# zipfile cuts member names at a NUL byte, so names keep to what torch writes.
member_names = st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_.]{1,8}){0,2}", fullmatch=True)
zip_files = st.builds(
    torch_zip_bytes,
    st.dictionaries(member_names, st.binary(max_size=300), max_size=4),
    comment=st.binary(max_size=40),
)

pickle_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
pickle_files = st.builds(pickle.dumps, pickle_values, st.integers(min_value=0, max_value=5))

train_state_files = st.builds(
    lambda state: json.dumps(state).encode(),
    st.fixed_dictionaries(
        {},
        optional={"current_epoch": st.integers(0, 10**6), "current_step": st.integers(0, 10**9)},
    ),
)

VALID_FILES = {
    "model.safetensors": safetensors_files(),
    "optimizer.bin": zip_files,
    "random_states_0.pkl": zip_files | pickle_files,
    "train_state.json": train_state_files,
}


@pytest.mark.parametrize("name", sorted(VALID_FILES))
@FILE_SETTINGS
@given(data=st.data())
def test_every_proper_prefix_of_a_valid_file_is_detected(
    tmp_path: Path, name: str, data: st.DataObject
) -> None:
    """Whatever the content, the whole file passes and any cut of it gives a reason."""
    content = data.draw(VALID_FILES[name], label="content")
    cut = data.draw(st.integers(min_value=0, max_value=len(content) - 1), label="cut")
    path = tmp_path / name
    path.write_bytes(content)
    assert check_state_file(path) is None
    path.write_bytes(content[:cut])
    assert isinstance(check_state_file(path), str)


CHECKS = [check_safetensors, check_torch_zip, check_pickle, check_state_file]
NAMES = ["model.safetensors", "optimizer.bin", "scaler.pt", "random_states_0.pkl", "x.json"]


@FILE_SETTINGS
@given(content=st.binary(max_size=2000), name=st.sampled_from(NAMES))
def test_random_bytes_never_raise(tmp_path: Path, content: bytes, name: str) -> None:
    """Garbage gives None or a reason from every check, never an exception."""
    path = tmp_path / name
    path.write_bytes(content)
    for check in CHECKS:
        assert check(path) is None or isinstance(check(path), str)


@FILE_SETTINGS
@given(
    prefix=st.binary(max_size=300),
    fields=st.tuples(*[st.integers(0, 0xFFFF)] * 4, *[st.integers(0, 0xFFFFFFFF)] * 2),
    locator=st.none() | st.tuples(st.integers(0, 2**64 - 1), st.booleans()),
)
def test_random_archives_with_plausible_end_records_never_raise(
    tmp_path: Path,
    prefix: bytes,
    fields: tuple[int, int, int, int, int, int],
    locator: tuple[int, bool] | None,
) -> None:
    """Garbage that reaches the zip64 and directory checks is refused, never raised on."""
    tail = b""
    if locator is not None:
        offset, with_record = locator
        if with_record:
            tail += b"PK\x06\x06" + os.urandom(52)
        tail += struct.pack("<4sIQI", b"PK\x06\x07", 0, offset, 1)
    tail += struct.pack("<4sHHHHIIH", b"PK\x05\x06", *fields, 0)
    path = write(tmp_path, "optimizer.bin", b"PK" + prefix + tail)
    problem = check_state_file(path)
    assert problem is None or isinstance(problem, str)


@FILE_SETTINGS
@given(
    claimed=st.integers(min_value=0, max_value=2**64 - 1),
    body=st.binary(max_size=64),
)
def test_any_claimed_header_length_is_answered_fast(
    tmp_path: Path, claimed: int, body: bytes
) -> None:
    """No header length, however large, makes the check allocate or read for long."""
    path = write(tmp_path, "model.safetensors", claimed.to_bytes(8, "little") + body)
    started = time.perf_counter()
    problem = check_safetensors(path)
    assert time.perf_counter() - started < 0.1
    assert problem is None or isinstance(problem, str)
