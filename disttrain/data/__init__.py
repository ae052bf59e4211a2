"""Datasets, the sharded prefetching DataLoader, and readers for MNIST (IDX) and character text."""
from disttrain.data.dataset import Dataset, TensorDataset
from disttrain.data.loader import DataLoader
from disttrain.data.mnist import load_mnist, normalize, read_idx
from disttrain.data.text import CharDataset, Vocab, char_datasets, load_text, split_ids

__all__ = ["Dataset", "TensorDataset", "DataLoader", "load_mnist", "normalize", "read_idx",
           "CharDataset", "Vocab", "char_datasets", "load_text", "split_ids"]
