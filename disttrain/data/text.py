"""Character-level language-modelling data (tiny-shakespeare: 65 characters): a vocabulary, and
(x, y) windows where y is x shifted by one character."""
from pathlib import Path

import numpy as np

from disttrain.data.dataset import Dataset

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare" / "input.txt"


def load_text(path=None):
    """The whole file as a str (UTF-8); default: the repository's tiny-shakespeare."""
    return Path(path if path is not None else DEFAULT_TEXT).read_text(encoding="utf-8")


def _code_points(text):
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class Vocab:
    """The sorted distinct characters of a text; id i is the i-th character."""

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self._codes = _code_points(self.chars)

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        """int64 ids of every character of ``text`` (one vectorised lookup, not a Python loop)."""
        codes = _code_points(text)
        ids = np.searchsorted(self._codes, codes)
        unknown = (ids >= len(self._codes)) | (self._codes[np.minimum(ids, len(self._codes) - 1)] != codes)
        if unknown.any():
            raise KeyError(f"Vocab.encode: character {text[int(np.argmax(unknown))]!r} is not in the "
                           f"vocabulary of {len(self)} characters")
        return ids.astype(np.int64)

    def decode(self, ids):
        """The text for a sequence of ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"Vocab.decode: ids must be in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        return self._codes[ids].tobytes().decode("utf-32-le")


def split_ids(ids, train_fraction=0.9):
    """(train, val): the first ``train_fraction`` of the ids, and the rest (the usual 90/10)."""
    cut = int(train_fraction * len(ids))
    return ids[:cut], ids[cut:]


class CharDataset(Dataset):
    """Sample i is ``(x, y)``: ``x = ids[i*seq_len : (i+1)*seq_len]`` and ``y`` the same shifted by one.

    Windows do not overlap, so an epoch reads the text once; ``get_batch`` gathers a batch of
    windows with one fancy index. ``ids`` is an int array (e.g. ``vocab.encode(text)``).
    """

    def __init__(self, ids, seq_len):
        ids = np.asarray(ids, dtype=np.int64)
        if seq_len < 1 or len(ids) < seq_len + 1:
            raise ValueError(f"CharDataset: need seq_len >= 1 and more than seq_len ids, "
                             f"got seq_len={seq_len} and {len(ids)} ids")
        self.ids, self.seq_len = ids, int(seq_len)
        self._offsets = np.arange(self.seq_len)

    def __len__(self):
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"CharDataset: index {index} out of range for {len(self)} windows")
        x, y = self.get_batch(np.array([index % len(self)]))
        return x[0], y[0]

    def get_batch(self, indices):
        positions = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len + self._offsets
        return self.ids[positions], self.ids[positions + 1]


def char_datasets(text, seq_len, train_fraction=0.9):
    """``(vocab, train, val)``: the text's vocabulary and CharDatasets of its 90/10 split."""
    vocab = Vocab(text)
    train_ids, val_ids = split_ids(vocab.encode(text), train_fraction)
    return vocab, CharDataset(train_ids, seq_len), CharDataset(val_ids, seq_len)
