"""MNIST reader for the standard IDX files (``.gz`` or uncompressed); Fashion-MNIST loads the same."""
import gzip
import struct
from pathlib import Path

import numpy as np

IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # uint8 with 3 and 1 dimensions
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels scaled to [0, 1]
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def read_idx(path, expected_magic=None):
    """Read one IDX file into a numpy array (native byte order); ``.gz`` is decompressed.

    IDX: a big-endian magic number (two zero bytes, a type code, the number of dimensions), one
    big-endian uint32 per dimension, then the values in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip raises these for a damaged stream
        raise ValueError(f"read_idx: cannot read {path}: {error}") from None
    if len(data) < 4:
        raise ValueError(f"read_idx: {path} has {len(data)} bytes, too few for an IDX magic number")
    (magic,) = struct.unpack(">I", data[:4])
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or type_code not in IDX_DTYPES:
        raise ValueError(f"read_idx: {path} has magic number {magic:#010x}, not an IDX file")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"read_idx: {path} has magic number {magic}, expected {expected_magic}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"read_idx: {path} is truncated inside its {ndim}-dimension header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[type_code]
    expected = dtype.itemsize * int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(f"read_idx: {path} holds {len(data) - header} bytes of values, but dimensions "
                         f"{list(dims)} of {dtype.name} need {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(data_dir, name):
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"load_mnist: neither {name}.gz nor {name} in {data_dir}")


def _resolve_dir(data_dir):
    """``data_dir`` itself, or its ``mnist`` sub-folder, when that holds the IDX files."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    for folder in (data_dir, data_dir / "mnist"):
        if any(folder.glob("train-images-idx3-ubyte*")) or any(folder.glob("t10k-images-idx3-ubyte*")):
            return folder
    return data_dir


def load_mnist(data_dir=None, split="train"):
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of the "train" or "test" split.

    ``data_dir`` holds the four files named as on the MNIST page (``train-images-idx3-ubyte.gz``,
    ...) or has them in a ``mnist/`` sub-folder; default: the repository's ``data/mnist``.
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    folder = _resolve_dir(data_dir)
    prefix = SPLIT_PREFIX[split]
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"), IMAGES_MAGIC)
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"), LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"load_mnist: {len(images)} images but {len(labels)} labels in {folder} ({split})")
    return images, labels.astype(np.int64)


def normalize(images, mean=MNIST_MEAN, std=MNIST_STD):
    """uint8 pixels -> float32 ``(x / 255 - mean) / std`` (MNIST's usual statistics by default)."""
    scaled = images.astype(np.float32)
    scaled *= np.float32(1 / 255)
    scaled -= np.float32(mean)
    scaled /= np.float32(std)
    return scaled
