"""Activation functions as modules, so they can sit in a Sequential (the math is in ops)."""
from disttrain.nn import functional as F
from disttrain.nn.module import Module


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class LeakyReLU(Module):
    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class GELU(Module):
    """x * Phi(x): exact (``approximate="none"``, the default) or its tanh form, as PyTorch's."""

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Softplus(Module):
    def forward(self, x):
        return F.softplus(x)


class _AlongAxis(Module):
    """A module applied along ``axis`` (``dim`` is accepted as PyTorch's name for it)."""

    def __init__(self, axis=-1, dim=None):
        super().__init__()
        self.axis = axis if dim is None else dim

    def extra_repr(self):
        return f"axis={self.axis}"


class Softmax(_AlongAxis):
    """Softmax along ``axis`` (``dim`` is accepted as PyTorch's name for it)."""

    def forward(self, x):
        return F.softmax(x, axis=self.axis)


class LogSoftmax(_AlongAxis):
    """log(softmax(x)) along ``axis``, computed stably (``dim`` is accepted too)."""

    def forward(self, x):
        return F.log_softmax(x, axis=self.axis)
