"""Embedding: a lookup table of vectors indexed by integer ids."""
import numpy as np

from disttrain.nn import functional as F, init
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter


class Embedding(Module):
    """weight (num_embeddings, embedding_dim) ~ N(0, 1), as in PyTorch; forward(ids) -> rows.

    With ``sparse=True`` backward leaves a RowSparseGrad holding only the rows a batch used,
    which the parameter server can push and update row by row. ``padding_idx``'s row starts
    at zero and receives no gradient.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, sparse=False):
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx {padding_idx} is outside the table of "
                                 f"{num_embeddings} rows")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.sparse = padding_idx, sparse
        self.weight = Parameter(np.zeros((num_embeddings, embedding_dim), np.float32))
        self.reset_parameters()

    def reset_parameters(self):
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight.data[self.padding_idx] = 0

    def forward(self, indices):
        return F.embedding(self.weight, indices, sparse=self.sparse, padding_idx=self.padding_idx)

    def extra_repr(self):
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text + (", sparse=True" if self.sparse else "")
