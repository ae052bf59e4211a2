"""Dropout layer: active in training mode only (``module.train()`` / ``module.eval()``)."""
from disttrain.nn import functional as F
from disttrain.nn.module import Module


class Dropout(Module):
    """Zero each element with probability p while training, scaling the rest by 1 / (1 - p)."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training)

    def extra_repr(self):
        return f"p={self.p}"
