"""MNIST IDX reader: the real files, tiny files written here, and damaged files."""
import gzip
import struct

import numpy as np
import pytest

from disttrain.data import load_mnist, normalize, read_idx
from disttrain.data.mnist import DEFAULT_DATA_DIR

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx_bytes(array, type_code=0x08):
    header = struct.pack(">I", (type_code << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_split(folder, prefix, images, labels, compress):
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "mnist").is_dir(), reason="repository data/mnist not present")
@pytest.mark.parametrize("split,counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_real_mnist_files_have_published_sizes_and_class_counts(split, counts):
    images, labels = load_mnist(split=split)
    assert images.shape == (sum(counts), 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == counts
    assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize("compress", [True, False])
def test_tiny_idx_split_written_here_reads_back_exactly(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_split(tmp_path, "t10k", images, labels, compress)
    got_images, got_labels = load_mnist(tmp_path, split="test")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_data_dir_may_be_the_parent_of_an_mnist_folder(tmp_path):
    (tmp_path / "mnist").mkdir()
    _write_split(tmp_path / "mnist", "train", np.zeros((2, 28, 28), np.uint8), np.array([0, 9], np.uint8), True)
    assert load_mnist(tmp_path)[1].tolist() == [0, 9]


@pytest.mark.parametrize("dtype,code", [(np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D),
                                        (np.float64, 0x0E)])
def test_big_endian_idx_types_are_read_in_native_order(tmp_path, dtype, code):
    array = (np.arange(6).reshape(2, 3) - 2).astype(dtype)
    (tmp_path / "x.idx").write_bytes(_idx_bytes(array, code))
    got = read_idx(tmp_path / "x.idx")
    np.testing.assert_array_equal(got, array)
    assert got.dtype.isnative


def test_wrong_magic_number_is_reported_with_both_values(tmp_path):
    (tmp_path / "labels").write_bytes(_idx_bytes(np.zeros((2, 2), np.uint8)))
    with pytest.raises(ValueError, match="magic number 2050, expected 2049"):
        read_idx(tmp_path / "labels", expected_magic=2049)


@pytest.mark.parametrize("data,message", [
    (b"\x00\x00", "too few"),
    (b"PK\x03\x04" + b"\x00" * 20, "not an IDX file"),
    (struct.pack(">II", 0x0801, 10) + b"\x00" * 7, "holds 7 bytes of values.*need 10"),
    (struct.pack(">I", 0x0803) + b"\x00" * 5, "truncated"),
])
def test_damaged_files_raise_clear_errors(tmp_path, data, message):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad")


def test_truncated_gzip_stream_is_a_value_error(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(100, np.uint8)))[:30])
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_missing_files_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_mnist(tmp_path)


def test_normalize_maps_pixels_with_mnist_statistics_in_float32():
    out = normalize(np.array([0, 255], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-0.1307 / 0.3081, (1 - 0.1307) / 0.3081], rtol=1e-6)
