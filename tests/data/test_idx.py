import gzip

import numpy as np
import pytest

from ffcompile.data import DataError, read_idx, write_idx
from ffcompile.data.idx import encode_idx
from ffcompile.core.errors import FFCompileError


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 255], dtype=np.uint8),
        np.array([[-5, 7]], dtype=np.int8),
        np.array([-300, 300], dtype=np.int16),
        np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        np.array([[1.5, -2.25]], dtype=np.float32),
        np.array([np.pi], dtype=np.float64),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-3d", "u8-1d", "i8", "i16", "i32", "f32", "f64", "empty"],
)
def test_round_trip(tmp_path, array, compress):
    path = tmp_path / "a.idx"
    write_idx(path, array, gzip=compress)
    assert path.read_bytes().startswith(b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=") and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable, native byte order


def test_header_layout_is_big_endian():
    data = encode_idx(np.zeros((2, 3), dtype=np.uint8))
    assert data[:4] == b"\x00\x00\x08\x02"
    assert data[4:12] == b"\x00\x00\x00\x02\x00\x00\x00\x03"
    assert len(data) == 12 + 6


def test_gzip_detected_by_content_not_extension(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "compressed.idx", array, gzip=True)
    write_idx(tmp_path / "raw.gz", array, gzip=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "compressed.idx"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), array)


def test_gzip_output_is_deterministic(tmp_path):
    array = np.arange(1000, dtype=np.uint8).reshape(10, 100) % 7
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    data = (tmp_path / "a.gz").read_bytes()
    assert data == (tmp_path / "b.gz").read_bytes()
    assert data[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field


def test_unsupported_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.complex64))


def corrupt_cases():
    valid = encode_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    return {
        "bad magic": (b"\x12\x34" + valid[2:], "bad magic"),
        "unknown dtype code": (valid[:2] + b"\x42" + valid[3:], "bad magic"),
        "empty file": (b"", "bad magic"),
        "truncated header": (valid[:10], "truncated IDX header"),
        "truncated payload": (valid[:-1], "truncated IDX payload"),
        "trailing garbage": (valid + b"junk", "trailing garbage"),
        "truncated gzip": (gzip.compress(valid, mtime=0)[:-12], "corrupt gzip"),
        "garbled gzip": (gzip.compress(valid, mtime=0)[:10] + b"\xff" * 40, "corrupt gzip"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_files_raise_data_error_naming_the_file(tmp_path, case):
    data, reason = corrupt_cases()[case]
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    assert_one_line_error(excinfo, path, reason)


def test_gzipped_payload_errors_are_checked_too(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(encode_idx(np.zeros(5, dtype=np.uint8))[:-2]))
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    assert_one_line_error(excinfo, path, "truncated IDX payload")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        read_idx(tmp_path / "nope")
    assert_one_line_error(excinfo, tmp_path / "nope")
    assert isinstance(excinfo.value, FFCompileError)
