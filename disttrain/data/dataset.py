"""Datasets: indexable collections of samples; ``get_batch`` fetches a whole batch at once
(TensorDataset: one fancy index per array, not a Python loop over samples)."""
import numpy as np


class Dataset:
    """Base class: ``__len__`` and ``__getitem__(i)`` returning a sample (a tuple of arrays, or one).

    ``get_batch(indices)`` stacks samples field by field; override it to fetch a batch at once.
    """

    def __len__(self):
        raise NotImplementedError

    def __getitem__(self, index):
        raise NotImplementedError

    def get_batch(self, indices):
        """The samples at ``indices`` stacked along a new first axis (a tuple if samples are)."""
        samples = [self[int(i)] for i in indices]
        if samples and isinstance(samples[0], tuple):
            return tuple(np.stack(field) for field in zip(*samples))
        return np.stack(samples)


class TensorDataset(Dataset):
    """Sample i is ``(arrays[0][i], arrays[1][i], ...)``; all arrays share their first dimension."""

    def __init__(self, *arrays):
        if not arrays:
            raise ValueError("TensorDataset: needs at least one array")
        arrays = tuple(getattr(a, "data", a) if hasattr(a, "requires_grad") else np.asarray(a) for a in arrays)
        lengths = [len(a) for a in arrays]
        if len(set(lengths)) != 1:
            raise ValueError(f"TensorDataset: arrays have different first dimensions {lengths}")
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, index):
        return tuple(a[index] for a in self.arrays)

    def get_batch(self, indices):
        return tuple(a[indices] for a in self.arrays)
