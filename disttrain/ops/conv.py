"""2-D convolution and pooling over NCHW arrays: a strided window view (im2col) plus one matmul
or one reduction, so no Python loop runs over batch items or output positions."""
import numpy as np

from disttrain import backend
from disttrain.ops.operands import as_tensor, same_kind, xp_of
from disttrain.tensor import Tensor


# --- window helpers: im2col views and their adjoint --------------------------------------


def _pair(value, name):
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < 0 for v in pair):
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return int(pair[0]), int(pair[1])


def _output_hw(name, x_shape, kernel, stride, padding, dilation):
    out = []
    for axis in (0, 1):
        extent = dilation[axis] * (kernel[axis] - 1) + 1
        size = x_shape[2 + axis] + 2 * padding[axis]
        if size < extent:
            raise ValueError(f"{name}: input of shape {tuple(x_shape)} padded by {padding} is smaller "
                             f"than the kernel extent {extent} along axis {2 + axis}")
        out.append((size - extent) // stride[axis] + 1)
    return tuple(out)


def _windows(padded, kernel, stride, dilation, out_hw):
    """A view (A, B, OH, OW, kh, kw) of every kernel window of ``padded`` (A, B, H, W), where
    (A, B) is (N, C) or, for pooling, possibly (C, N): no copy.

    The windows overlap when stride < kernel, so the view is only ever read.
    """
    xp = backend.array_module(padded)
    step_n, step_c, step_h, step_w = padded.strides
    shape = padded.shape[:2] + tuple(out_hw) + tuple(kernel)
    strides = (step_n, step_c, step_h * stride[0], step_w * stride[1],
               step_h * dilation[0], step_w * dilation[1])
    return xp.lib.stride_tricks.as_strided(padded, shape, strides)


def _col2im(grad_windows, padded_shape, stride, dilation):
    """Adjoint of ``_windows``: add each window's gradient back where the window came from.

    ``grad_windows`` is laid out offsets first, (kh, kw, A, B, OH, OW), and the result is
    (A, B, H, W): the caller picks which of N and C is A, so both sides of every add walk
    memory in the same order. One strided add per kernel offset (kh * kw of them, each over
    the whole batch): windows overlap when stride < kernel, so one assignment through the
    window view would drop the overlaps. Faster for LeNet's convs than the alternative with one
    matmul (a transposed convolution: im2col of the padded gradient); see docs/performance.md.
    """
    xp = backend.array_module(grad_windows)
    kernel_h, kernel_w, _, _, out_h, out_w = grad_windows.shape
    grad = xp.zeros(padded_shape, grad_windows.dtype)
    for i in range(kernel_h):
        top = i * dilation[0]
        rows = slice(top, top + stride[0] * (out_h - 1) + 1, stride[0])
        for j in range(kernel_w):
            left = j * dilation[1]
            grad[:, :, rows, left:left + stride[1] * (out_w - 1) + 1:stride[1]] += grad_windows[i, j]
    return grad


def _pad_hw(xp, data, padding, value=0):
    if padding == (0, 0):
        return data
    (ph, pw) = padding
    return xp.pad(data, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _unpad_hw(grad, padding, hw):
    (ph, pw), (h, w) = padding, hw
    return grad[:, :, ph:ph + h, pw:pw + w]


def _check_nchw(name, x):
    if x.ndim != 4:
        raise ValueError(f"{name}: expected an NCHW input of 4 dimensions, got shape {x.shape}")


# --- convolution -------------------------------------------------------------------------


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation like torch.nn.functional.conv2d.

    x (N, C, H, W), weight (O, C // groups, kh, kw), bias (O,) or None -> (N, O, OH, OW).
    """
    x, weight = as_tensor(x), as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    same_kind("conv2d", [x, weight] + ([bias] if bias is not None else []))
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"conv2d: stride {stride} and dilation {dilation} must be positive")
    _check_nchw("conv2d", x)
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must have shape (out_channels, in_channels/groups, kh, kw), "
                         f"got {weight.shape}")
    n, channels, height, width = x.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    if groups < 1 or channels % groups or out_channels % groups or channels // groups != group_channels:
        raise ValueError(f"conv2d: input of shape {x.shape} and weight of shape {weight.shape} do not "
                         f"match with groups={groups} (need in_channels = weight.shape[1] * groups "
                         f"and out_channels divisible by groups)")
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"conv2d: bias of shape {bias.shape} for weight of shape {weight.shape}")
    kernel = (kernel_h, kernel_w)
    out_h, out_w = _output_hw("conv2d", x.shape, kernel, stride, padding, dilation)
    xp = xp_of(x)

    padded = _pad_hw(xp, x.data, padding)
    windows = _windows(padded, kernel, stride, dilation, (out_h, out_w))
    # im2col laid out (groups, C/groups * kh * kw, N * OH * OW): the copy reads long runs along
    # OW, and the product lands as (O, N, OH, OW), one transpose-view away from NCHW: faster on
    # LeNet-sized layers than the (N * OH * OW, C * kh * kw) layout (docs/performance.md).
    cols = (windows.reshape(n, groups, group_channels, out_h, out_w, kernel_h, kernel_w)
            .transpose(1, 2, 5, 6, 0, 3, 4)
            .reshape(groups, group_channels * kernel_h * kernel_w, n * out_h * out_w))
    kernels = weight.data.reshape(groups, out_channels // groups, group_channels * kernel_h * kernel_w)
    out = xp.matmul(kernels, cols).reshape(out_channels, n, out_h, out_w)
    if bias is not None:
        out += bias.data[:, None, None, None]

    def backward(g):
        g_rows = g.transpose(1, 0, 2, 3).reshape(groups, out_channels // groups, n * out_h * out_w)
        grad_weight = grad_bias = grad_x = None
        if weight.requires_grad:
            # cols @ g.T, transposed after: OpenBLAS runs this shape (long inner dimension,
            # output (C*kh*kw, O)) faster than g @ cols.T on LeNet's layers (docs/performance.md).
            grad_weight = xp.matmul(cols, g_rows.transpose(0, 2, 1)).transpose(0, 2, 1).reshape(weight.shape)
        if bias is not None and bias.requires_grad:
            grad_bias = g_rows.sum(axis=2).reshape(out_channels)
        if x.requires_grad:
            grad_cols = xp.matmul(kernels.transpose(0, 2, 1), g_rows)
            # (C, kh, kw, N, OH, OW) in memory: gather it back as (C, N, H, W), then view as NCHW.
            grad_windows = (grad_cols.reshape(channels, kernel_h, kernel_w, n, out_h, out_w)
                            .transpose(1, 2, 0, 3, 4, 5))
            channels_first = (channels, n) + padded.shape[2:]
            grad_x = _col2im(grad_windows, channels_first, stride, dilation).transpose(1, 0, 2, 3)
            grad_x = _unpad_hw(grad_x, padding, (height, width))
        return (grad_x, grad_weight) + ((grad_bias,) if bias is not None else ())
    parents = (x, weight) + ((bias,) if bias is not None else ())
    return Tensor.from_op(out.transpose(1, 0, 2, 3), parents, backward)


# --- pooling -----------------------------------------------------------------------------


def _pool_setup(name, x, kernel_size, stride, padding):
    _check_nchw(name, x)
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair(stride, "stride")
    padding = _pair(padding, "padding")
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(f"{name}: kernel_size {kernel} and stride {stride} must be positive")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{name}: padding {padding} must be at most half of kernel_size {kernel}")
    return kernel, stride, padding, _output_hw(name, x.shape, kernel, stride, padding, (1, 1))


def _memory_order_view(data):
    """Pooling treats N and C alike, so it runs on (C, N, H, W) when that is the memory order
    (conv2d's output is), and its copies and adds then stream through memory. Returns the view
    and whether N and C were swapped; swapping the result back restores NCHW."""
    swapped = data.strides[1] > data.strides[0]
    return (data.transpose(1, 0, 2, 3) if swapped else data), swapped


def _offsets_first(windows):
    """Copy the (A, B, OH, OW, kh, kw) windows as (kh * kw, A, B, OH, OW): reducing over the
    leading axis runs as whole-array element-wise passes, much faster than reducing over the two
    small trailing axes of the view (docs/performance.md)."""
    a, b, out_h, out_w, kernel_h, kernel_w = windows.shape
    return windows.transpose(4, 5, 0, 1, 2, 3).reshape(kernel_h * kernel_w, a, b, out_h, out_w)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over each window (stride defaults to kernel_size; padding counts as -inf).

    Like PyTorch, the gradient goes to the first maximum of a window when several tie.
    """
    x = as_tensor(x)
    kernel, stride, padding, out_hw = _pool_setup("max_pool2d", x, kernel_size, stride, padding)
    xp = xp_of(x)
    data, swapped = _memory_order_view(x.data)
    padded = _pad_hw(xp, data, padding, value=-np.inf)
    values = _offsets_first(_windows(padded, kernel, stride, (1, 1), out_hw))
    out = values.max(axis=0)

    def backward(g):
        g = g.transpose(1, 0, 2, 3) if swapped else g
        grad_windows = xp.empty_like(values)
        taken = xp.zeros(out.shape, bool)
        # One pass per kernel offset: an offset gets the gradient where it holds the maximum and
        # no earlier offset did: faster than a cumulative sum over the hits (docs/performance.md).
        for offset in range(len(values)):
            first_hit = (values[offset] == out) & ~taken
            taken |= first_hit
            xp.multiply(first_hit, g, out=grad_windows[offset])
        grad_windows = grad_windows.reshape(kernel + out.shape)
        grad = _unpad_hw(_col2im(grad_windows, padded.shape, stride, (1, 1)), padding, x.shape[2:])
        return (grad.transpose(1, 0, 2, 3) if swapped else grad,)
    return Tensor.from_op(out.transpose(1, 0, 2, 3) if swapped else out, (x,), backward)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Mean over each window (stride defaults to kernel_size).

    With ``count_include_pad`` (PyTorch's default) every window divides by kh * kw; without
    it, by the number of input (non-padding) elements it covers.
    """
    x = as_tensor(x)
    kernel, stride, padding, out_hw = _pool_setup("avg_pool2d", x, kernel_size, stride, padding)
    xp = xp_of(x)
    data, swapped = _memory_order_view(x.data)
    padded = _pad_hw(xp, data, padding)
    out = _offsets_first(_windows(padded, kernel, stride, (1, 1), out_hw)).sum(axis=0)
    if count_include_pad or padding == (0, 0):
        count = x.dtype.type(kernel[0] * kernel[1])
    else:
        inside = _pad_hw(xp, xp.ones((1, 1) + x.shape[2:], x.dtype), padding)
        count = _offsets_first(_windows(inside, kernel, stride, (1, 1), out_hw)).sum(axis=0)
    out /= count

    def backward(g):
        g = g.transpose(1, 0, 2, 3) if swapped else g
        # Every element of a window receives the same share: one broadcast view, no copies.
        grad_windows = xp.broadcast_to(g / count, kernel + g.shape)
        grad = _unpad_hw(_col2im(grad_windows, padded.shape, stride, (1, 1)), padding, x.shape[2:])
        return (grad.transpose(1, 0, 2, 3) if swapped else grad,)
    return Tensor.from_op(out.transpose(1, 0, 2, 3) if swapped else out, (x,), backward)
