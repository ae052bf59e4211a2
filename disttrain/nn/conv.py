"""2-D convolution and pooling layers over NCHW inputs (the math is in ops/conv.py)."""

import numpy as np

from disttrain.nn import functional as F
from disttrain.nn.linear import FanInLayer
from disttrain.nn.module import Module


def _pair(value):
    return (value, value) if isinstance(value, (int, np.integer)) else tuple(value)


def _padding(padding, kernel_size, stride, dilation):
    """Padding as a pair of ints; 'valid' is none, 'same' keeps H and W (stride 1 only, and only
    where the padding splits evenly: ops.conv2d pads both sides alike)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"Conv2d: padding='same' needs stride 1, got stride {stride}")
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(total % 2 for total in totals):
            raise ValueError(f"Conv2d: padding='same' with kernel_size {kernel_size} and dilation "
                             f"{dilation} needs uneven padding, which is not supported")
        return tuple(total // 2 for total in totals)
    if isinstance(padding, str):
        raise ValueError(f"Conv2d: padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    return _pair(padding)


class Conv2d(FanInLayer):
    """Cross-correlation of (N, C_in, H, W) with weight (C_out, C_in / groups, kh, kw).

    Initialised like PyTorch: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
    fan_in = C_in / groups * kh * kw (kaiming_uniform_(a=sqrt(5)) for the weight).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must both be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.dilation, self.groups = _pair(dilation), groups
        self.padding = _padding(padding, self.kernel_size, self.stride, self.dilation)
        self._weight_and_bias((out_channels, in_channels // groups) + self.kernel_size, bias)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups)

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class MaxPool2d(Module):
    """The maximum of each kernel_size window (stride defaults to kernel_size)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    """The mean of each kernel_size window (stride defaults to kernel_size)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.count_include_pad = padding, count_include_pad

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                            count_include_pad=self.count_include_pad)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
