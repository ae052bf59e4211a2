"""Linear (fully connected) layer, plus the shape-only Flatten and Identity."""

import numpy as np

from disttrain.nn import functional as F, init
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter


class FanInLayer(Module):
    """A layer with a weight whose first axis is the output and an optional bias of that
    length, initialised as PyTorch initialises Linear and Conv layers."""

    def _weight_and_bias(self, weight_shape, bias):
        self.weight = Parameter(np.zeros(weight_shape, np.float32))
        if bias:
            self.bias = Parameter(np.zeros(weight_shape[0], np.float32))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        init.fan_in_uniform_(self.weight, self.bias)


class Linear(FanInLayer):
    """y = x @ weight.T + bias, with weight (out_features, in_features) as in PyTorch.

    Initialised like PyTorch: weight by kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)),
    and bias U(-1/sqrt(in), 1/sqrt(in)).
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._weight_and_bias((out_features, in_features), bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Flatten(Module):
    """Merge axes start_dim..end_dim into one (by default all but the batch axis)."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        start = self.start_dim % x.ndim
        end = self.end_dim % x.ndim
        if start > end:
            raise ValueError(f"Flatten: start_dim {self.start_dim} comes after end_dim {self.end_dim} "
                             f"for an input of shape {x.shape}")
        merged = int(np.prod(x.shape[start:end + 1]))
        return x.reshape(x.shape[:start] + (merged,) + x.shape[end + 1:])

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Identity(Module):
    """Returns its input: a placeholder where a layer is optional."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x
