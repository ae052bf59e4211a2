"""Weight initialisers (PyTorch's ``nn.init``): each fills a tensor in place and returns it.

Every draw comes from ``disttrain.random.default_rng()``, so ``manual_seed`` fixes them all.
"""
import math

import numpy as np

from disttrain import backend
from disttrain.random import default_rng


def _fill(tensor, values):
    """Write ``values`` (a numpy array or number) into ``tensor`` in its own dtype and device."""
    xp = backend.array_module(tensor.data)
    tensor.data[...] = xp.asarray(values, dtype=tensor.dtype) if xp is not np else values
    return tensor


def calculate_gain(nonlinearity, param=None):
    """The factor that keeps activations' variance steady through ``nonlinearity``."""
    linear = ("linear", "identity", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"calculate_gain: negative_slope {param!r} is not a number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def _calculate_fan_in_and_fan_out(tensor):
    """fan_in = inputs per output unit, fan_out = outputs per input unit (conv: x kernel area)."""
    if tensor.ndim < 2:
        raise ValueError(f"fan in and fan out need a tensor of at least 2 dimensions, got shape {tensor.shape}")
    receptive_field = int(np.prod(tensor.shape[2:])) if tensor.ndim > 2 else 1
    return tensor.shape[1] * receptive_field, tensor.shape[0] * receptive_field


def _fan(tensor, mode):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode {mode!r} is not supported; use 'fan_in' or 'fan_out'")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def uniform_(tensor, a=0.0, b=1.0):
    """U(a, b)."""
    return _fill(tensor, default_rng().uniform(a, b, tensor.shape))


def normal_(tensor, mean=0.0, std=1.0):
    """N(mean, std^2)."""
    return _fill(tensor, default_rng().normal(mean, std, tensor.shape))


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """N(mean, std^2) restricted to [a, b] (absolute bounds, as in PyTorch), by rejection."""
    if not a < b:
        raise ValueError(f"trunc_normal_: need a < b, got a={a}, b={b}")
    rng = default_rng()
    low, high = (a - mean) / std, (b - mean) / std
    mass = 0.5 * (math.erf(high / math.sqrt(2)) - math.erf(low / math.sqrt(2)))
    count = int(np.prod(tensor.shape))
    if mass > 1e-3:
        # Draw standard normals and redraw the ones outside: each round keeps a share `mass`.
        values = rng.standard_normal(count)
        outside = (values < low) | (values > high)
        while outside.any():
            values[outside] = rng.standard_normal(int(outside.sum()))
            outside = (values < low) | (values > high)
    elif math.isfinite(low) and math.isfinite(high):
        # A far-tail window: propose uniformly inside it, accept with the density's ratio to its
        # peak in the window (the window end closest to 0, or 0 itself).
        peak = 0.0 if low <= 0 <= high else min(abs(low), abs(high))
        values = np.empty(count)
        todo = np.arange(count)
        while todo.size:
            proposal = rng.uniform(low, high, todo.size)
            keep = rng.uniform(0, 1, todo.size) < np.exp((peak ** 2 - proposal ** 2) / 2)
            values[todo[keep]] = proposal[keep]
            todo = todo[~keep]
    else:
        raise ValueError(f"trunc_normal_: the window [{a}, {b}] holds too little of N({mean}, {std}^2) "
                         f"to sample by rejection")
    return _fill(tensor, (mean + std * values).reshape(tensor.shape))


def constant_(tensor, val):
    return _fill(tensor, val)


def zeros_(tensor):
    return _fill(tensor, 0)


def ones_(tensor):
    return _fill(tensor, 1)


def xavier_uniform_(tensor, gain=1.0):
    """Glorot & Bengio (2010): U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound)


def xavier_normal_(tensor, gain=1.0):
    """Glorot & Bengio (2010): N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu"):
    """He et al. (2015): U(-b, b) with b = gain * sqrt(3 / fan); ``a`` is leaky_relu's slope."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound)


def kaiming_normal_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu"):
    """He et al. (2015): N(0, std^2) with std = gain / sqrt(fan)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return normal_(tensor, 0.0, std)


def orthogonal_(tensor, gain=1.0):
    """Saxe et al. (2013): a (semi-)orthogonal matrix from the QR decomposition of a normal one.

    Dimensions after the first are flattened; the sign fix makes the draw uniform over the
    orthogonal group instead of biased by QR's sign convention.
    """
    if tensor.ndim < 2:
        raise ValueError(f"orthogonal_ needs a tensor of at least 2 dimensions, got shape {tensor.shape}")
    rows = tensor.shape[0]
    cols = int(np.prod(tensor.shape[1:]))
    flat = default_rng().standard_normal((rows, cols))
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return _fill(tensor, gain * q.reshape(tensor.shape))


# The other common names of the same initialisers.
glorot_uniform_ = xavier_uniform_
glorot_normal_ = xavier_normal_
he_uniform_ = kaiming_uniform_
he_normal_ = kaiming_normal_


def fan_in_uniform_(weight, bias=None):
    """PyTorch's default for Linear and Conv layers: weight kaiming_uniform_(a=sqrt(5)), which
    is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias from the same range."""
    kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = _calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        uniform_(bias, -bound, bound)
